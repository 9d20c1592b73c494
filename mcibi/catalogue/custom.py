"""A custom dataset's params from a model-zoo row (``mcibi new-dataset``): the row's complete params with the crop,
schedule and batch scaled to the dataset, written as ``params/<name>/`` (MCIBI++ + its paired baseline) beside the
registered description ``datasets/<name>.yaml`` and a ``dvc.yaml`` stage; nothing is written unless all checks."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from mcibi.data.custom import CustomDatasetError, description_path, load_description, validate
from mcibi.data.lookup import get_spec
from mcibi.files import write_text
from mcibi.spec.params import SLIDE_MODES, SamplerParams, load_params, params_from_dict, to_dict
from mcibi.spec.sampler import iterations_per_epoch


def _scaled(value: list[int], factor: float, multiple: int = 8) -> list[int]:
    return [max(multiple, int(round(v * factor / multiple)) * multiple) for v in value]


def experiment_params(row_params: Any, name: str, num_classes: int, train_images: int, median_size: tuple[int, int],
                      crop: int | None = None, epochs: int | None = None, batch: int | None = None,
                      gpus: int | None = None) -> tuple[dict, str]:
    """The complete params of a model-zoo row (or any MCIBI++ experiment) adapted to a custom dataset, and a note
    of what was scaled.

    Crop: the row's, capped by the median image's short side (or ``crop``); resizes, slide windows and strides
    scale by the same factor. Schedule: the row's learning rate and policy; the batch capped by half the
    training images; epochs x clamp(sqrt(row's images / images), 1, 10) (smaller datasets get more epochs,
    fewer iterations); or ``epochs``/``batch`` as given. The epoch is the ``loader`` layout (no official run to
    follow).
    """
    d = to_dict(row_params)
    for key in ("name", "path"):
        d.pop(key, None)
    row_crop = d["data"]["crop_size"]
    new_side = crop or min(min(row_crop), min(median_size))
    factor = new_side / min(row_crop)
    d["data"].update({"name": name, "train_split": "train", "eval_split": "val", "train_sampling": "image"})
    d["data"]["crop_size"] = [new_side, new_side] if crop or row_crop[0] == row_crop[1] else _scaled(row_crop,
                                                                                                       factor)
    for key in ("train_resize", "test_resize"):
        d["data"][key]["size"] = _scaled(d["data"][key]["size"], factor)
    for proto in d["evaluate"]["protocols"].values():
        if proto["mode"] in SLIDE_MODES:
            # no window side beyond the crop's longer side; the window's orientation stays (CityScapes' official
            # windows, 1024 high and 512 wide, are the training crop 512x1024 turned on its side)
            proto["crop"] = [min(c, max(d["data"]["crop_size"])) for c in _scaled(proto["crop"], factor)]
            proto["stride"] = _scaled(proto["stride"], factor)
    d["model"]["num_classes"] = num_classes
    row_images = get_spec(row_params.data.name).splits.get(row_params.data.train_split, train_images)
    t = d["train"]
    t["total_batch_size"] = batch or max(1, min(t["total_batch_size"], train_images // 2))
    t["batch_per_device"] = min(t["batch_per_device"], t["total_batch_size"])
    if gpus is not None:
        t["resources"]["gpus"] = gpus
        d["evaluate"]["resources"]["gpus"] = min(gpus, 1)
    while t["resources"]["gpus"] > 1 and t["total_batch_size"] % t["resources"]["gpus"]:
        t["resources"]["gpus"] -= 1  # the launcher needs a GPU count that divides the batch
    t["epochs"] = epochs or int(math.ceil(t["epochs"] * min(10.0, max(1.0, math.sqrt(row_images / train_images)))))
    # no official run to follow: each image once per epoch (the row's 8-replica layout may not divide the batch)
    t["sampler"] = {"kind": "loader", "replicas": 1}
    iters = t["epochs"] * iterations_per_epoch(train_images, t["total_batch_size"], SamplerParams(**t["sampler"]))
    t["checkpoint_every"] = max(1, min(t["checkpoint_every"], iters))
    t["log_every"] = max(1, min(t["log_every"], max(1, iters // 20)))
    note = (f"crop {d['data']['crop_size'][0]}x{d['data']['crop_size'][1]} (the row's {row_crop[0]}x{row_crop[1]}, "
            f"x{factor:.3g}), batch {t['total_batch_size']}, {t['epochs']} epochs = {iters} iterations on "
            f"{train_images} training images (the row's: {row_params.train.epochs} epochs on {row_images})")
    return d, note


def new_dataset(description: str | Path, row: str | Path, params_root: str | Path = "params",
                crop: int | None = None, epochs: int | None = None,
                batch: int | None = None, gpus: int | None = None, dvc_file: str | Path | None = "dvc.yaml",
                show_progress: bool = True) -> list[Path]:
    """Validate a description and its files, then register it (``datasets/<name>.yaml``) and write
    ``params/<name>/{defaults,<stem>_mcibipp,<stem>_baseline}.yaml`` from a model-zoo row (a params file, or
    ``<dataset>/<stem>``); adds a ``dvc.yaml`` stage. Nothing is written unless everything checks."""
    desc = load_description(description)
    checked = validate(desc, show_progress)
    row_file = Path(row)
    if not row_file.is_file():
        row_file = Path(params_root) / f"{row}.yaml"
    if not row_file.is_file():
        raise CustomDatasetError(f"{row}: no such model-zoo row (a params file or <dataset>/<stem>, e.g. "
                                 "lip/upernet_r50_mcibipp).")
    row_params = load_params(row_file)
    if row_params.model.memory.kind != "mcibi++":
        raise CustomDatasetError(f"{row_file}: the row must be an MCIBI++ experiment (model.memory.kind "
                                 f"mcibi++), this one is '{row_params.model.memory.kind}'.")
    defaults, note = experiment_params(row_params, desc.name, len(desc.classes), len(checked["splits"]["train"]),
                                       checked["median_size"], crop, epochs, batch, gpus)
    stem = row_file.stem if row_file.stem.endswith("_mcibipp") else f"{row_file.stem}_mcibipp"
    base_stem = stem.removesuffix("_mcibipp") + "_baseline"
    defaults.pop("description", None)
    folder = Path(params_root) / desc.name
    registered = description_path(desc.name)
    text = desc.text
    if registered.resolve() != desc.file.resolve():  # paths in the copy stay relative to where it is
        data = yaml.safe_load(desc.text)
        for key in ("images", "masks"):
            data[key] = os.path.relpath((desc.file.parent / data[key]).resolve(), registered.parent.resolve())
        for key, value in (data.get("splits") or {}).items():
            data["splits"][key] = os.path.relpath((desc.file.parent / value).resolve(), registered.parent.resolve())
        text = f"# registered from {desc.file} by `mcibi new-dataset`\n" + yaml.safe_dump(data, sort_keys=False)
    header = f"# {desc.name}: generated by `mcibi new-dataset` from {row_file} ({note}).\n"
    files = {
        registered: text,
        folder / "defaults.yaml": header + yaml.safe_dump(defaults, sort_keys=False),
        folder / f"{stem}.yaml": header + yaml.safe_dump({
            "description": f"MCIBI++ on {desc.name} from row {row_file} ({note})",
            "model": {"memory": {"kind": "mcibi++"}}}, sort_keys=False),
        folder / f"{base_stem}.yaml": header + yaml.safe_dump({
            "description": f"Baseline (no memory) paired with {stem} on {desc.name}",
            "model": {"memory": {"kind": "none"}}}, sort_keys=False),
    }
    stale = [p for p in folder.glob("*.yaml") if p not in files] if folder.is_dir() else []
    if stale:
        raise CustomDatasetError(f"{folder}: already holds other experiments ({', '.join(p.name for p in stale)}); "
                                 "remove them or choose another dataset name.")
    dvc = Path(dvc_file) if dvc_file else None
    if dvc is not None and dvc.is_file() and not re.search(rf"^  {desc.name}:$", dvc.read_text(), re.M):
        files[dvc] = dvc.read_text().rstrip("\n") + "\n" + (
            f"  {desc.name}:\n    cmd: python -m snakemake --cores all results/{desc.name}\n    deps:\n"
            f"      - Snakefile\n      - workflow\n      - mcibi\n      - params/{desc.name}\n"
            f"      - {registered.as_posix()}\n    outs:\n      - runs/{desc.name}:\n          persist: true\n"
            f"      - results/{desc.name}:\n          persist: true\n")
    for path in (folder / f"{stem}.yaml", folder / f"{base_stem}.yaml"):  # strict type checks, in memory
        merged = copy.deepcopy(defaults) | yaml.safe_load(files[path])
        merged["model"] = copy.deepcopy(defaults["model"])
        merged["model"]["memory"]["kind"] = yaml.safe_load(files[path])["model"]["memory"]["kind"]
        params_from_dict(merged, path)
    for path, content in files.items():  # everything checked: write (each file atomically)
        write_text(path, content)
    return list(files)
