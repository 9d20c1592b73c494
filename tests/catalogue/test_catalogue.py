"""The experiment catalogue: every model-zoo row is a params file with the row's settings and the official model
switches, baselines pair with framework rows, and the published numbers match the model-zoo page (and the official
model-zoo page)."""

import dataclasses
import re
from pathlib import Path

import pytest
from checkout import ROOT

from mcibi.catalogue.budget import budget, budget_markdown
from mcibi.catalogue.generate import check_catalogue
from mcibi.catalogue.official import load_official_configs
from mcibi.catalogue.published import published, published_miou
from mcibi.catalogue.rows import DATASET_TITLES, DATASETS, ROWS, catalogue_entry, rows_of, select
from mcibi.spec.params import experiment_files, load_params

PARAMS = ROOT / "params"
PAGES = ROOT / "tests" / "fixtures"  # copies of the model-zoo page and the official one


def _all_files():
    return [f for ds in DATASETS for f in experiment_files(PARAMS, ds)]


def test_36_rows_16_baselines_and_one_file_each():
    assert len(ROWS) == 36
    assert sum(r.section == "frameworks" for r in ROWS) == 16 and sum(r.section == "sota" for r in ROWS) == 20
    files = _all_files()
    assert len(files) == 36 + 16
    stems = {(f.parent.name, f.stem) for f in files}
    for r in ROWS:
        assert (r.dataset, r.stem) in stems
        if r.section == "frameworks":
            assert (r.dataset, r.baseline_stem) in stems
        else:
            assert r.baseline_stem is None
    for ds in DATASETS:  # at most one defaults layer per dataset, nothing else but experiments
        assert {p.name for p in (PARAMS / ds).iterdir()} == {"defaults.yaml"} | {f.name for f in
                                                                                 experiment_files(PARAMS, ds)}


@pytest.mark.parametrize("file", _all_files(), ids=lambda f: f"{f.parent.name}/{f.stem}")
def test_params_carry_the_model_zoo_row(file):
    p = load_params(file)
    row, baseline = catalogue_entry(file.parent.name, file.stem)
    assert p.data.name == row.dataset
    assert tuple(p.data.crop_size) == row.crop
    assert (p.train.optimizer.lr, p.train.total_batch_size, p.train.epochs) == (row.lr, row.batch, row.epochs)
    assert (p.data.train_split, p.data.eval_split) == (row.train_split, row.eval_split)
    assert list(p.evaluate.protocols) == list(row.protocols)
    assert p.model.memory.kind == ("none" if baseline else "mcibi++")
    assert p.model.backbone.pretrained  # ImageNet weights, as every model-zoo row
    assert p.train.total_batch_size % p.train.batch_per_device == 0


def test_model_zoo_schedule_and_crop_match_the_published_records():
    """The params' crop and 'LR/POLICY/BS/EPOCH' are the model-zoo page's, cell for cell."""
    from mcibi.reports.table import schedule_title

    for rec in published():
        if rec["source"] != "model_zoo":
            continue
        p = load_params(PARAMS / rec["dataset"] / f"{rec['experiment']}.yaml")
        assert "x".join(map(str, p.data.crop_size)) == rec["crop"], rec
        assert schedule_title(p) == rec["schedule"], rec


def test_committed_files_are_what_the_catalogue_generates():
    assert check_catalogue(PARAMS, load_official_configs()) == []


def test_model_switches_are_the_official_ones():
    from mcibi.catalogue.official import model_params_from_official

    configs = load_official_configs()
    for file in _all_files():
        row, baseline = catalogue_entry(file.parent.name, file.stem)
        want = model_params_from_official(row.official_name, configs[row.official_name], pretrained="official")
        if baseline:
            want = dataclasses.replace(want, memory=dataclasses.replace(want.memory, kind="none"))
        assert load_params(file).model == want, file


def test_slide_windows_are_the_official_slideinference_windows():
    """Where an official config's active inference slides, every sliding protocol of its rows runs the windows its
    ``slideinference`` runs: cropsize and stride read as (h, w), our ``slide`` mode. CityScapes' cropsize
    [1024, 512] is the one non-square window: 1024 high, 512 wide."""
    configs = load_official_configs()
    checked = set()
    for file in _all_files():
        row, _ = catalogue_entry(file.parent.name, file.stem)
        forward = configs[row.official_name]["inference"]["forward"]
        if forward["mode"] != "slide":
            continue
        for name, proto in load_params(file).evaluate.protocols.items():
            if proto.mode != "whole":
                assert (proto.mode, proto.crop, proto.stride) == (
                    "slide", tuple(forward["cropsize"]), tuple(forward["stride"])), (file, name)
                checked.add((file.parent.name, file.stem, proto.crop))
    city = {(stem, crop) for ds, stem, crop in checked if ds == "cityscapes"}
    assert city == {(f"deeplabv3_{bb}_mcibipp", (1024, 512)) for bb in ("r101", "s101", "hr48")}
    assert {ds for ds, _, _ in checked} == {"cityscapes", "vspw", "pascalcontext", "ade20k", "cocostuff10k"}


def test_the_generator_refuses_windows_other_than_the_official_ones():
    from mcibi.catalogue.generate import experiment_dict

    row = next(r for r in ROWS if r.dataset == "cityscapes" and r.backbone == "r101")
    cfg = load_official_configs()[row.official_name]
    assert experiment_dict(row, cfg)["evaluate"]["protocols"]["msflip"]["crop"] == [1024, 512]
    for crop, mode in (((512, 1024), "slide"), ((1024, 512), "slide_wh")):
        proto = dataclasses.replace(row.protocols["msflip"], crop=crop, mode=mode)
        with pytest.raises(ValueError, match=r"rows\.py: cityscapes/deeplabv3_r101_mcibipp protocol 'msflip'"):
            experiment_dict(dataclasses.replace(row, protocols={"msflip": proto}), cfg)


def test_selection_all_sections_and_one_row():
    stems = [f.stem for f in experiment_files(PARAMS, "lip")]
    assert select("lip", stems, "all") == stems
    fw = select("lip", stems, "frameworks")
    assert len(fw) == 8 and all("_r50_" in s for s in fw)
    assert set(select("lip", stems, "sota")) == {"upernet_r101_mcibipp", "upernet_s101_mcibipp",
                                                 "upernet_swinl_mcibipp", "deeplabv3_hr48_mcibipp"}
    assert select("lip", stems, ["upernet_swinl_mcibipp"]) == ["upernet_swinl_mcibipp"]
    assert select("lip", stems, "upernet_swinl_mcibipp") == ["upernet_swinl_mcibipp"]
    with pytest.raises(ValueError, match="upernet_r18_mcibipp"):
        select("lip", stems, ["upernet_r18_mcibipp"])
    with pytest.raises(ValueError, match="no experiment"):
        select("vspw", [f.stem for f in experiment_files(PARAMS, "vspw")], "frameworks")


# ------------------------------------------------------------------------------------------- published numbers
def _page_rows(page: Path) -> list[dict]:
    """Every result row of a model zoo page: section, dataset title and the cells by header."""
    rows, section, title, header = [], None, None, None
    for line in page.read_text().splitlines():
        if line.startswith("## "):
            section = {"Results of Different Frameworks": "frameworks", "SOTA Results": "sota"}.get(line[3:].strip())
        elif line.startswith("#### "):
            title, header = line[5:].strip(), None
        elif line.startswith("|") and section:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not cells[0].startswith(":-:"):
                rows.append({"section": section, "title": title, **dict(zip(header, cells, strict=False))})
    return rows


@pytest.mark.parametrize("source,page", [("model_zoo", "model_zoo_page.md"), ("official", "official_model_zoo.md")])
def test_published_numbers_match_the_pages(source, page):
    titles = {v: k for k, v in DATASET_TITLES.items()}
    records = [r for r in published() if r["source"] == source]
    rows = _page_rows(PAGES / page)
    assert len(rows) == 36
    seen = set()
    for row in rows:
        dataset = titles[row["title"].removesuffix("-59")]  # the official page says PASCAL-Context-59
        miou_col = next(k for k in row if k.startswith("mIoU"))
        protocols = [{"mIoU": "ss", "mIoU (flip)": "flip", "mIoU (ms+flip)": "msflip"}[c] for c in miou_col.split("/")]
        values = [v.strip().rstrip("%") for v in row[miou_col].split("/")] if row[miou_col] else [""] * len(protocols)
        match = [r for r in records if r["dataset"] == dataset and r["section"] == row["section"]
                 and r["segmentor"] == row["Segmentor"] and r["backbone"] == row["Backbone"]]
        assert match, row
        stem = match[0]["experiment"]
        assert [r["protocol"] for r in match] == protocols
        for rec, value in zip(match, values, strict=True):
            assert rec["miou"] == value, (rec, value)
            assert (rec["crop"], rec["schedule"], rec["train_eval"]) == (
                row["Crop Size"], row["Schedule"], row["Train/Eval Set"]), (rec, row)
            assert published_miou(dataset, stem, rec["protocol"], source) == (float(value) if value else None)
        seen.add((dataset, stem))
    assert len(seen) == 36 and len(records) == sum(len(r.protocols) for r in ROWS)


def test_model_zoo_framework_rows_are_empty_and_differences_are_recorded():
    """The model-zoo page leaves the framework rows' mIoU empty (the official page fills them); the rows where the
    two pages disagree say so in their params description."""
    assert all(published_miou(r.dataset, r.stem, "ss", "model_zoo") is None for r in ROWS if r.section == "frameworks")
    assert published_miou("lip", "fcn_r50_mcibipp", "ss", "official") == 51.13
    assert published_miou("cityscapes", "deeplabv3_r101_mcibipp", "msflip", "model_zoo") is None
    assert published_miou("cityscapes", "deeplabv3_r101_mcibipp", "msflip", "official") == 82.20
    for dataset, stem in (("lip", "deeplabv3_hr48_mcibipp"), ("cityscapes", "deeplabv3_s101_mcibipp"),
                          ("ade20k", "fcn_r50_mcibipp"), ("cityscapes", "fcn_r50_baseline")):
        assert "official" in load_params(PARAMS / dataset / f"{stem}.yaml").description
    assert re.search(r"473x473", load_params(PARAMS / "lip" / "deeplabv3_hr48_mcibipp.yaml").description)


# ------------------------------------------------------------------------------------------------ model builds
def _distinct_models():
    """One (file, model params without weights) per distinct model (the class count aside): building each
    model-zoo model once covers every switch combination without paying for 52 builds."""
    seen, out = set(), []
    for file in _all_files():
        m = load_params(file).model
        m = dataclasses.replace(m, backbone=dataclasses.replace(m.backbone, pretrained=False))
        key = repr(dataclasses.replace(m, num_classes=0))
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(file, m, id=f"{file.parent.name}/{file.stem}",
                                    marks=[pytest.mark.slow] if m.backbone.name != "resnet50c" else []))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("file,model_params", _distinct_models())
def test_every_distinct_model_builds(file, model_params):
    from mcibi.models import build_segmentor

    model = build_segmentor(model_params)
    assert (getattr(model, "memory_module", None) is not None) == (model_params.memory.kind != "none")
    assert sum(p.numel() for p in model.parameters()) > 20_000_000


def test_rows_of_orders_frameworks_first():
    assert [r.section for r in rows_of("lip")] == ["frameworks"] * 4 + ["sota"] * 4


def test_budget_follows_the_schedule():
    voc = next(r for r in ROWS if r.dataset == "pascalvoc" and r.backbone == "r50")
    b = budget(voc, rate={"r50": 10.0})
    assert b.iterations == 60 * (10582 // 16) and b.images == b.iterations * 16
    assert abs(b.gpu_hours - b.images / 10.0 / 3600) < 1e-9
    city = next(r for r in ROWS if r.dataset == "cityscapes" and r.backbone == "r50")  # 512x1024: half the rate
    # the official 8-GPU epoch: ceil(2975 / 8) = 372 images per GPU, 186 batches of 2 (2975 // 16 = 185)
    assert budget(city).iterations == 220 * 186
    assert abs(budget(city, rate={"r50": 10.0}).gpu_hours - 220 * 186 * 16 / 5.0 / 3600) < 1e-9
    assert "| **all** |" in budget_markdown("lip")


def test_catalogue_command(tmp_path, capsys):
    """`mcibi catalogue check` fails (exit 1) where the params files are missing; `budget` prints every dataset."""
    from mcibi.cli import main

    assert main(["catalogue", "check", "--params-root", str(tmp_path)]) == 1
    assert main(["catalogue", "budget"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{ds}\n" in out for ds in DATASETS) and out.count("| **all** |") == len(DATASETS)
