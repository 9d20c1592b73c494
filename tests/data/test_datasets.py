"""The seven real datasets end to end on miniature archives in their official formats, served from a local HTTP
server (no network): download (mirror fallback, resume, corrupt archives), verify, prepare, verify prepared data,
with every label checked pixel by pixel against hand-written expectations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from miniature_datasets import (
    BUILDERS,
    H,
    Server,
    W,
    build_mirror_layouts,
    jpg,
    local_path,
    mini_spec,
    place,
    png_gray,
    png_palette,
    sha256,
    with_checksums,
    zip_bytes,
)

from mcibi.data.download import ArchiveError, download, verify_archives
from mcibi.data.lookup import get_spec
from mcibi.data.prepare import PreparedDataError, prepare, verify_prepared
from mcibi.data.specs import DATASETS, IGNORE_INDEX

ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
COCO_URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip"
SBD_URL1 = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"

# Hand-written label expectations: raw value -> train id (everything not listed -> 255 where stated).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CONTEXT_TRAIN_IDS = {2: 0, 9: 1, 284: 36, 458: 58}  # aeroplane, bag, person, wood; 0, 1 (accordion), 100, 459 ignored


def expected_label(dataset: str, raw: np.ndarray) -> np.ndarray:
    if dataset in ("lip", "pascalvoc"):
        return raw  # LIP: values 0..19 as they are; VOC: indices 0..20 and 255 as they are
    if dataset in ("ade20k", "cocostuff10k"):
        return np.where(raw == 0, 255, raw - 1)
    if dataset == "vspw":
        return np.where((raw == 0) | (raw >= 253), 255, raw - 1)
    table = CITYSCAPES_TRAIN_IDS if dataset == "cityscapes" else CONTEXT_TRAIN_IDS
    return np.vectorize(lambda v: table.get(int(v), 255))(raw)


@pytest.fixture(scope="module")
def server():
    s = Server().start()
    yield s
    s.stop()


def _arrange(dataset: str, server: Server, mini, monkeypatch) -> tuple:
    """Per dataset, the fault or path the download exercises; returns (checksummed, source expected)."""
    if dataset == "ade20k":
        server.truncate_once.add(local_path(ADE_URL))  # the first transfer breaks off half-way
        return True, "official"
    if dataset == "cityscapes":
        monkeypatch.setenv("CITYSCAPES_USERNAME", server.credentials[0])
        monkeypatch.setenv("CITYSCAPES_PASSWORD", server.credentials[1])
        return True, "official"
    if dataset == "cocostuff10k":  # the official zip is corrupt (a CRC fails) and nothing is published for it
        data = bytearray(mini.served[COCO_URL])
        data[200] ^= 0xFF
        server.files[local_path(COCO_URL)] = bytes(data)
        return False, "mirror"
    if dataset == "vspw":  # the Drive link answers with a quota page: the mirror's 10 volumes are joined
        server.html.add("/drive.usercontent.google.com/download")
        return True, "mirror"
    if dataset == "lip":  # the official zips have no direct URL: the mirror is used
        return True, "mirror"
    return True, "official"


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_download_prepare_verify_pixel_by_pixel(dataset, server, tmp_path, monkeypatch):
    mini = BUILDERS[dataset]()
    server.serve(mini)
    checksummed, source = _arrange(dataset, server, mini, monkeypatch)
    spec = mini_spec(dataset, mini, checksummed)
    downloads = tmp_path / "downloads" / dataset
    paths = download(spec, downloads, url_map=server.url_map, retry_delay=0)
    assert [p.name for p in paths] == [a.name for a in next(s for s in spec.sources if s.name == source).archives]
    assert not list(downloads.glob("*.part")) and not list(downloads.glob("*.0[0-9][0-9]"))

    record = verify_archives(spec, downloads)
    assert record["source"] == source
    assert all(r["verified"] == checksummed for r in record["archives"].values())

    out = prepare(spec, downloads, tmp_path / "data" / dataset, archive_record=record, workers=2)
    summary = verify_prepared(spec, out, expected=mini.splits)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == spec.num_classes and manifest["ignore_index"] == IGNORE_INDEX
    assert manifest["archives"]["source"] == source
    assert set(summary["splits"]) == set(mini.splits)

    all_ids = {i for split in mini.splits for i in (out / "splits" / f"{split}.txt").read_text().split()}
    assert all_ids == set(mini.raw)
    for image_id, raw in mini.raw.items():
        got = cv2.imread(str(out / "labels" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and got.ndim == 2
        np.testing.assert_array_equal(got, expected_label(dataset, raw), err_msg=f"{dataset} {image_id}")
        image = cv2.imread(str(out / "images" / f"{image_id}{spec.image_ext}"), cv2.IMREAD_COLOR)
        assert image.shape == (H, W, 3)

    # the real documented sizes stay in the spec: the miniature fails them, naming the list file
    with pytest.raises(PreparedDataError, match=r"splits/\w+\.txt: \d+ (images|videos), the dataset documents"):
        verify_prepared(dataset, out)


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    mini = BUILDERS["ade20k"]()
    server.serve(mini)
    data = mini.served[ADE_URL]
    path = local_path(ADE_URL)
    server.truncate_once.add(path)
    spec = mini_spec("ade20k", mini)
    before = len(server.log)
    download(spec, tmp_path, url_map=server.url_map, retry_delay=0)
    gets = [r for r in server.log[before:] if r[1] == path]
    assert gets[0][2] is None and gets[1][2] == f"bytes={len(data) // 2}-"  # resumed, not restarted
    assert (tmp_path / "ADEChallengeData2016.zip").read_bytes() == data


def test_a_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    mini = BUILDERS["pascalcontext"]()
    server.serve(mini)
    url = "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"
    data = mini.served[url]
    (tmp_path / "VOCtrainval_03-May-2010.tar.part").write_bytes(data[:1000])
    before = len(server.log)
    download(mini_spec("pascalcontext", mini), tmp_path, url_map=server.url_map, retry_delay=0)
    gets = [r for r in server.log[before:] if r[1] == local_path(url)]
    assert [g[2] for g in gets] == ["bytes=1000-"]
    assert (tmp_path / "VOCtrainval_03-May-2010.tar").read_bytes() == data


def test_a_corrupt_archive_is_rejected_never_extracted_nor_marked_done(server, tmp_path):
    mini = BUILDERS["ade20k"]()
    spec = mini_spec("ade20k", mini)  # records the sha256 of the good archive
    corrupt = bytearray(mini.served[ADE_URL])
    corrupt[len(corrupt) // 3] ^= 0x01
    server.files[local_path(ADE_URL)] = bytes(corrupt)
    downloads = tmp_path / "downloads"
    with pytest.raises(ArchiveError, match=r"sha256 [0-9a-f]{64} does not match the recorded"):
        download(spec, downloads, url_map=server.url_map, retry_delay=0)
    assert sorted(p.name for p in downloads.iterdir()) == []  # no archive, no .part, no record
    with pytest.raises(ArchiveError, match="missing"):
        verify_archives(spec, downloads)
    # an archive placed by hand that fails its checksum is not extracted either
    (downloads / "ADEChallengeData2016.zip").write_bytes(bytes(corrupt))
    with pytest.raises(ArchiveError, match="does not match the recorded"):
        prepare(spec, downloads, tmp_path / "data" / "ade20k")
    assert not (tmp_path / "data").exists()  # nothing extracted, not even a scratch folder


def test_official_source_first_then_mirror(server, tmp_path):
    mini = BUILDERS["cocostuff10k"]()
    server.serve(mini)  # both the official zip and the mirror are good: the official one is taken
    before = len(server.log)
    download(mini_spec("cocostuff10k", mini), tmp_path, url_map=server.url_map, retry_delay=0)
    assert (tmp_path / "cocostuff-10k-v1.1.zip").is_file() and not (tmp_path / "COCOStuff10k.tar.gz").exists()
    assert not any("modelstore" in r[1] for r in server.log[before:])


def test_second_url_of_an_archive_is_tried(server, tmp_path):
    mini = BUILDERS["pascalvoc"]()
    server.serve(mini)
    before = len(server.log)
    download(mini_spec("pascalvoc", mini), tmp_path, url_map=server.url_map, retry_delay=0)
    hosts = [r[1].split("/")[1] for r in server.log[before:] if r[1].endswith("benchmark.tgz")]
    assert hosts == ["www.eecs.berkeley.edu", "www2.eecs.berkeley.edu"]


def test_cityscapes_without_credentials_or_archives_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    dest = tmp_path / "downloads" / "cityscapes"
    with pytest.raises(ArchiveError) as err:
        download("cityscapes", dest)
    msg = str(err.value)
    for needle in ("CITYSCAPES_USERNAME", "CITYSCAPES_PASSWORD", ".netrc", "gtFine_trainvaltest.zip",
                   "leftImg8bit_trainvaltest.zip", str(dest), "https://www.cityscapes-dataset.com/downloads/"):
        assert needle in msg


def test_cityscapes_bad_credentials_are_reported(server, tmp_path, monkeypatch):
    server.serve(BUILDERS["cityscapes"]())
    monkeypatch.setenv("CITYSCAPES_USERNAME", "alice")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong")
    with pytest.raises(ArchiveError, match="login as 'alice' failed"):
        download("cityscapes", tmp_path, url_map=server.url_map, retry_delay=0)
    assert not list(tmp_path.iterdir())


def test_cityscapes_netrc_credentials(server, tmp_path, monkeypatch):
    mini = BUILDERS["cityscapes"]()
    server.serve(mini)
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine www.cityscapes-dataset.com login alice password secret\n")
    netrc.chmod(0o600)
    paths = download(mini_spec("cityscapes", mini), tmp_path / "dl", url_map=server.url_map, retry_delay=0)
    assert [p.read_bytes() for p in paths] == [mini.served["cityscapes:1"], mini.served["cityscapes:3"]]


def test_manually_placed_official_archives_are_used_without_network(tmp_path):
    """CityScapes and LIP archives placed by hand: nothing is fetched (the URL map points nowhere)."""
    for dataset in ("cityscapes", "lip"):
        mini = BUILDERS[dataset]()
        spec = mini_spec(dataset, mini)
        place(tmp_path / dataset, mini.manual)
        paths = download(spec, tmp_path / dataset, url_map=lambda url: "http://127.0.0.1:9/unreachable")
        assert {p.name for p in paths} == set(mini.manual)
        out = prepare(spec, tmp_path / dataset, tmp_path / "data" / dataset, workers=1)
        verify_prepared(spec, out, expected=mini.splits)
        for image_id, raw in mini.raw.items():
            got = cv2.imread(str(out / "labels" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(got, expected_label(dataset, raw))


def test_voc_palette_pngs_are_read_as_indices_not_luminance(server, tmp_path):
    mini = BUILDERS["pascalvoc"]()
    server.serve(mini)
    spec = mini_spec("pascalvoc", mini)
    download(spec, tmp_path / "dl", url_map=server.url_map, retry_delay=0)
    out = prepare(spec, tmp_path / "dl", tmp_path / "voc", workers=1)
    raw_png = tmp_path / "raw.png"
    raw_png.write_bytes(png_palette(mini.raw["2007_000032"]))
    luminance = cv2.imread(str(raw_png), cv2.IMREAD_GRAYSCALE)
    got = cv2.imread(str(out / "labels" / "2007_000032.png"), cv2.IMREAD_UNCHANGED)
    assert got[0, :6].tolist() == [0, 1, 15, 20, 255, 7]  # the indices written
    assert luminance[0, :6].tolist() != got[0, :6].tolist()  # what a grayscale read would have produced
    # trainaug = (VOC train + SBD train + SBD val) - VOC val; the SBD-only ids come from GTcls .mat files
    assert (out / "splits" / "trainaug.txt").read_text().split() == [
        "2007_000032", "2007_000039", "2008_000002", "2008_000003"]


def test_cocostuff10k_keeps_the_model_zoo_182_way_ids():
    spec = get_spec("cocostuff10k")
    assert spec.num_classes == 182  # MCIBI++ configs: num_classes 182, dead classes kept
    assert spec.classes[0] == "person" and spec.classes[91] == "banner" and spec.classes[181] == "wood"
    assert [spec.classes[i - 1] for i in (12, 26, 45, 83)] == ["street sign", "hat", "plate", "blender"]


def test_specs_are_complete_and_their_pipelines_are_valid_params():
    from mcibi.spec.params import DataParams, _convert

    sizes = {"lip": 20, "ade20k": 150, "cityscapes": 19, "cocostuff10k": 182, "vspw": 124, "pascalvoc": 21,
             "pascalcontext": 59, "demo": 8}
    assert {n: s.num_classes for n, s in DATASETS.items()} == sizes
    assert get_spec("lip").flip_pairs == ((14, 15), (16, 17), (18, 19))
    assert get_spec("lip").flip_permutation()[14:20] == [15, 14, 17, 16, 19, 18]
    assert get_spec("pascalvoc").splits["trainaug"] == 10582 and get_spec("ade20k").splits["train"] == 20210
    assert get_spec("lip").pipeline.rotation == (0.6, 30.0)
    for name, spec in DATASETS.items():
        assert len(set(spec.classes)) == spec.num_classes, name
        for pipe in spec.pipelines:
            data = _convert(DataParams, spec.data_params(pipe), "data", Path(f"<spec {name}>"))
            assert data.name == name and data.train_split in spec.splits and data.eval_split in spec.splits


def test_verify_names_the_file_with_a_bad_label_or_size(server, tmp_path):
    mini = BUILDERS["vspw"]()
    spec = mini_spec("vspw", mini)
    place(tmp_path / "dl", mini.manual)
    out = prepare(spec, tmp_path / "dl", tmp_path / "vspw", workers=1)
    assert verify_prepared(spec, out, expected=mini.splits)["splits"]["train"]["videos"] == 2
    bad = out / "labels" / "1002_zKUBRwvL6vA" / "00000006.png"
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 124  # one past the last class
    cv2.imwrite(str(bad), label)
    with pytest.raises(PreparedDataError, match=r"00000006\.png: label values \[124\]"):
        verify_prepared(spec, out, expected=mini.splits)
    cv2.imwrite(str(bad), np.zeros((H + 1, W), np.uint8))
    with pytest.raises(PreparedDataError, match=r"00000006\.jpg: size \(5, 7\) differs from its label's \(6, 7\)"):
        verify_prepared(spec, out, expected=mini.splits)


@pytest.mark.parametrize("cut", [20, "half"])
def test_verify_names_a_truncated_jpeg_that_opencv_decodes_only_partly(tmp_path, cut):
    """OpenCV decodes a truncated JPEG without an error (the missing rows grey, a warning on stderr), so training
    would use it: verification decodes JPEGs with PIL too, which fails on it, and names the file."""
    h, w = 48, 64
    members = {"ADEChallengeData2016/images/training/ADE_train_00000001.jpg": jpg(1, h, w),
               "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": jpg(2, h, w),
               "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_gray(np.ones((h, w))),
               "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_gray(np.ones((h, w)))}
    data = zip_bytes(members)
    spec = with_checksums(get_spec("ade20k"), {"ADEChallengeData2016.zip": sha256(data)})
    place(tmp_path / "dl", {"ADEChallengeData2016.zip": data})
    out = prepare(spec, tmp_path / "dl", tmp_path / "ade20k", workers=1)
    verify_prepared(spec, out, expected={"train": 1, "val": 1})
    bad = out / "images" / "ADE_val_00000001.jpg"
    image = bad.read_bytes()
    bad.write_bytes(image[:-20] if cut == 20 else image[: len(image) // 2])
    assert cv2.imread(str(bad), cv2.IMREAD_COLOR).shape == (h, w, 3)  # what the loader would train on
    with pytest.raises(PreparedDataError, match=r"ADE_val_00000001\.jpg: truncated or corrupt \(image file is "
                                                r"truncated.*OpenCV decodes it only partly"):
        verify_prepared(spec, out, expected={"train": 1, "val": 1})


def test_a_label_value_outside_the_encoding_stops_prepare_naming_the_file(tmp_path):
    members = {"ADEChallengeData2016/images/training/ADE_train_00000001.jpg": jpg(1),
               "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": jpg(2),
               "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_gray(np.full((H, W), 151)),
               "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_gray(np.zeros((H, W)))}
    data = zip_bytes(members)
    spec = with_checksums(get_spec("ade20k"), {"ADEChallengeData2016.zip": sha256(data)})
    place(tmp_path / "dl", {"ADEChallengeData2016.zip": data})
    with pytest.raises(PreparedDataError, match=r"ADE_train_00000001\.png: raw label values \[151\]"):
        prepare(spec, tmp_path / "dl", tmp_path / "ade20k", workers=1)
    assert not (tmp_path / "ade20k").exists()


def test_preparation_throughput_is_reported(server, tmp_path, caplog):
    """Prepare logs images/s; the miniature LIP mirror archive is converted well above 20 images/s here."""
    mini = BUILDERS["lip"]()
    spec = mini_spec("lip", mini)
    server.serve(mini)
    download(spec, tmp_path / "dl", url_map=server.url_map, retry_delay=0)
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="mcibi.data.prepare"):
        prepare(spec, tmp_path / "dl", tmp_path / "lip", workers=2)
    assert len(mini.raw) / (time.perf_counter() - start) > 20
    assert any("images/s" in r.getMessage() for r in caplog.records)


def test_cli_chain_with_the_real_spec_of_an_unchecksummed_archive(tmp_path, caplog):
    """COCO-Stuff-10k publishes no checksum: the real spec accepts the miniature zip (CRCs checked, marked
    unverified), prepares it, and verify-data fails on the documented 9,000/1,000 split sizes."""
    from mcibi.cli import main

    mini = BUILDERS["cocostuff10k"]()
    place(tmp_path / "dl", {"cocostuff-10k-v1.1.zip": mini.served[COCO_URL]})
    report = tmp_path / "archives.json"
    assert main(["verify-archives", "cocostuff10k", "--dest", str(tmp_path / "dl"), "--report", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["archives"]["cocostuff-10k-v1.1.zip"]["verified"] is False
    assert "CRCs" in record["archives"]["cocostuff-10k-v1.1.zip"]["checked_with"]
    out = tmp_path / "data" / "cocostuff10k"
    assert main(["prepare", "cocostuff10k", "--archives", str(tmp_path / "dl"), "--out", str(out),
                 "--archive-record", str(report), "--workers", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"] == {"train": 2, "test": 1}
    with caplog.at_level("ERROR"):
        assert main(["verify-data", "cocostuff10k", "--data", str(out)]) == 1
    assert "train.txt: 2 images, the dataset documents 9000" in caplog.text


def test_cityscapes_uses_the_official_downloader_when_installed(tmp_path, monkeypatch):
    """With cityscapesscripts importable, its download_packages fetches into a staging folder; the result is
    checked against the recorded checksum before it gets its final name."""
    import sys
    import types

    from mcibi.data import download as dl

    mini = BUILDERS["cityscapes"]()
    spec = mini_spec("cityscapes", mini)
    calls = []

    def download_packages(*, session, package_names, destination_path, resume=False):
        calls.append((package_names, Path(destination_path).name, resume))
        for name in package_names:
            (Path(destination_path) / name).write_bytes(mini.manual[name])

    fake = types.ModuleType("cityscapesscripts.download.downloader")
    fake.download_packages = download_packages
    for mod, value in (("cityscapesscripts", types.ModuleType("cityscapesscripts")),
                       ("cityscapesscripts.download", types.ModuleType("cityscapesscripts.download")),
                       ("cityscapesscripts.download.downloader", fake)):
        monkeypatch.setitem(sys.modules, mod, value)
    sys.modules["cityscapesscripts.download"].downloader = fake
    monkeypatch.setattr(dl, "cityscapes_credentials", lambda: ("alice", "secret"))
    monkeypatch.setattr(dl, "cityscapes_login", lambda user, password, site: object())
    paths = download(spec, tmp_path)
    assert [c[0] for c in calls] == [["gtFine_trainvaltest.zip"], ["leftImg8bit_trainvaltest.zip"]]
    assert [p.read_bytes() for p in paths] == [mini.manual[p.name] for p in paths]
    # a package that does not match the recorded checksum is refused and removed from the staging folder
    for p in paths:
        p.unlink()
    bad = with_checksums(get_spec("cityscapes"), {"gtFine_trainvaltest.zip": "0" * 64})
    with pytest.raises(ArchiveError, match="does not match the recorded"):
        download(bad, tmp_path)
    assert not (tmp_path / "gtFine_trainvaltest.zip").exists()
    assert not list((tmp_path / ".cityscapes-download").iterdir())


def test_a_server_without_range_support_restarts_the_file(server, tmp_path):
    mini = BUILDERS["pascalcontext"]()
    server.serve(mini)
    url = "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz"
    data = mini.served[url]
    server.no_range.add(local_path(url))
    (tmp_path / "trainval.tar.gz.part").write_bytes(b"garbage that must not survive")
    download(mini_spec("pascalcontext", mini), tmp_path, url_map=server.url_map, retry_delay=0)
    assert (tmp_path / "trainval.tar.gz").read_bytes() == data


@pytest.mark.parametrize("dataset", ["pascalvoc", "pascalcontext"])
def test_mirror_layouts_are_converted(dataset, server, tmp_path):
    """The official hosts are down (404): the mirror's repackaged layout is fetched (VOC: 3 volumes joined)."""
    mini = build_mirror_layouts()[dataset]
    server.serve(mini)
    for url in [a_url for s in get_spec(dataset).sources if s.name == "official" for a in s.archives
                for a_url in a.urls]:
        server.files.pop(local_path(url), None)
    spec = mini_spec(dataset, mini)
    download(spec, tmp_path / "dl", url_map=server.url_map, retry_delay=0)
    out = prepare(spec, tmp_path / "dl", tmp_path / dataset, workers=1)
    verify_prepared(spec, out, expected=mini.splits)
    assert json.loads((out / "manifest.json").read_text())["archives"]["source"] == "mirror"
    for image_id, raw in mini.raw.items():
        got = cv2.imread(str(out / "labels" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        # VOC: index PNGs as they are; Context: 0 (background) ignored, 1..59 -> 0..58
        want = raw if dataset == "pascalvoc" else np.where(raw == 0, 255, raw - 1)
        np.testing.assert_array_equal(got, want)


def test_an_exif_rotated_jpeg_is_rewritten_in_its_stored_pixel_grid(tmp_path):
    """OpenCV applies EXIF orientation on reading: prepare drops the tag so image and label stay aligned."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:H, 0:W]
    pixels = np.stack([xx * 30, yy * 40, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth: JPEG keeps it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" on display
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100, exif=exif)
    members = {"ADEChallengeData2016/images/training/ADE_train_00000001.jpg": buf.getvalue(),
               "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": jpg(2),
               "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_gray(np.ones((H, W))),
               "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_gray(np.ones((H, W)))}
    data = zip_bytes(members)
    spec = with_checksums(get_spec("ade20k"), {"ADEChallengeData2016.zip": sha256(data)})
    place(tmp_path / "dl", {"ADEChallengeData2016.zip": data})
    raw_jpeg = tmp_path / "raw.jpg"
    raw_jpeg.write_bytes(buf.getvalue())
    assert cv2.imread(str(raw_jpeg), cv2.IMREAD_COLOR).shape[:2] == (W, H)  # what OpenCV does to the original
    out = prepare(spec, tmp_path / "dl", tmp_path / "ade20k", workers=1)
    image = cv2.imread(str(out / "images" / "ADE_train_00000001.jpg"), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (H, W)
    rgb = image[..., ::-1].astype(float)  # same pixels (re-encoded): red ramps along x, green along y
    assert np.corrcoef(rgb[..., 0].ravel(), xx.ravel())[0, 1] > 0.95
    assert np.corrcoef(rgb[..., 1].ravel(), yy.ravel())[0, 1] > 0.95
    verify_prepared(spec, out, expected={"train": 1, "val": 1})
