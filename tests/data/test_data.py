"""Demo generator determinism and content, download verification, preparation and its checks."""

import json
import shutil

import cv2
import numpy as np
import pytest
from checkout import ROOT

from mcibi.data.dataset import SegmentationDataset
from mcibi.data.download import ArchiveError, download, verify_archives
from mcibi.data.prepare import PreparedDataError, prepare, verify_prepared
from mcibi.data.specs import DEMO
from mcibi.data.synthetic import CLASS, generate_archive, render_sample, sha256_file

DEMO_PARAMS = ROOT / "params" / "demo"


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("downloads")
    download("demo", folder)
    return folder


@pytest.fixture(scope="module")
def prepared(archive_dir, tmp_path_factory):
    return prepare("demo", archive_dir, tmp_path_factory.mktemp("data") / "demo")


def test_generator_is_byte_identical_and_matches_the_recorded_hash(archive_dir, tmp_path):
    again = generate_archive(tmp_path / "demo.tar")
    assert sha256_file(again) == sha256_file(archive_dir / "demo.tar") == DEMO.archives["demo.tar"]
    assert generate_archive(tmp_path / "other.tar", seed=1).read_bytes() != again.read_bytes()


def test_left_arm_is_left_of_the_torso_and_right_arm_right():
    for i in range(20):
        _, label = render_sample(np.random.default_rng([0, 0, i]))
        if not (label == CLASS["torso"]).any() or not (label == CLASS["left_arm"]).any():
            continue
        cols = {name: np.nonzero((label == CLASS[name]).any(axis=0))[0] for name in ("left_arm", "torso", "right_arm")}
        if len(cols["right_arm"]):
            assert cols["left_arm"].mean() < cols["torso"].mean() < cols["right_arm"].mean()


def test_disks_separable_across_dataset_but_not_within_image_brightness():
    """Mean colour separates amber from ochre over the dataset; illumination jitter exceeds the gap."""
    means = {"amber_disk": [], "ochre_disk": []}
    for i in range(80):
        image, label = render_sample(np.random.default_rng([0, 0, i]))
        for name in means:
            mask = label == CLASS[name]
            if mask.sum() > 30:
                means[name].append(image[mask].astype(float).mean(axis=0))
    amber, ochre = np.array(means["amber_disk"]), np.array(means["ochre_disk"])
    gap = np.linalg.norm(amber.mean(0) - ochre.mean(0))
    spread = np.linalg.norm(amber.std(0)) + np.linalg.norm(ochre.std(0))
    assert gap > 10  # consistent difference across the dataset
    assert spread > gap / 2  # per-image illumination makes single instances ambiguous


def test_prepare_writes_the_format_and_verify_passes(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["classes"] == list(DEMO.classes) and manifest["flip_pairs"] == [[2, 3]]
    assert manifest["splits"] == {"train": 240, "val": 60} and manifest["ignore_index"] == 255
    label = cv2.imread(str(prepared / "labels" / "train_0000.png"), cv2.IMREAD_UNCHANGED)
    assert label.ndim == 2 and label.dtype == np.uint8 and label.max() < 8
    summary = verify_prepared("demo", prepared)
    assert summary["splits"]["val"]["images"] == 60
    assert abs(sum(summary["splits"]["train"]["class_pixel_share"].values()) - 1) < 1e-3


def _broken_copy(prepared, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(prepared, copy)
    return copy


def test_verify_names_a_corrupt_label(prepared, tmp_path):
    copy = _broken_copy(prepared, tmp_path)
    bad = copy / "labels" / "val_0003.png"
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 42
    cv2.imwrite(str(bad), label)
    with pytest.raises(PreparedDataError, match=r"val_0003\.png: label values \[42\]"):
        verify_prepared("demo", copy)


def test_verify_names_a_missing_file_and_a_wrong_count(prepared, tmp_path):
    copy = _broken_copy(prepared, tmp_path)
    (copy / "images" / "train_0010.png").unlink()
    with pytest.raises(PreparedDataError, match=r"train_0010\.png: missing"):
        verify_prepared("demo", copy)
    lines = (copy / "splits" / "val.txt").read_text().splitlines()
    (copy / "splits" / "val.txt").write_text("\n".join(lines[:-1]) + "\n")
    shutil.copy(prepared / "images" / "train_0010.png", copy / "images" / "train_0010.png")
    with pytest.raises(PreparedDataError, match=r"val\.txt: 59 images, the dataset documents 60"):
        verify_prepared("demo", copy)


def _damage(copy, damage):
    """One fault in val_0003's pair of a copy of the prepared demo; returns the damaged file."""
    from PIL import Image

    image, label = copy / "images" / "val_0003.png", copy / "labels" / "val_0003.png"
    if damage == "image: 20 bytes cut off":
        image.write_bytes(image.read_bytes()[:-20])
    elif damage == "image: half cut off":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    elif damage == "label: 20 bytes cut off":
        label.write_bytes(label.read_bytes()[:-20])
        return label
    elif damage == "image: not an image":
        image.write_bytes(b"<html><body>quota exceeded</body></html>")
    elif damage == "label: wrong size":
        cv2.imwrite(str(label), np.zeros((129, 128), np.uint8))
    elif damage == "image: EXIF rotation":
        with Image.open(image) as im:
            exif = im.getexif()
            exif[0x0112] = 6
            im.save(image, exif=exif)
    return image


@pytest.mark.parametrize("damage, reason", [
    ("image: 20 bytes cut off", r"images/val_0003\.png: truncated \(the PNG ends before its IEND chunk\)"),
    ("image: half cut off", r"images/val_0003\.png: truncated \(the PNG ends before its IEND chunk\)"),
    ("label: 20 bytes cut off", r"labels/val_0003\.png: truncated"),
    ("image: not an image", r"images/val_0003\.png: not an image \(40 bytes starting b'<html><b'\)"),
    ("label: wrong size", r"images/val_0003\.png: size \(128, 128\) differs from its label's \(129, 128\)"),
    ("image: EXIF rotation", r"images/val_0003\.png: EXIF orientation 6"),
])
def test_verify_decodes_every_file_as_training_reads_it(prepared, tmp_path, damage, reason):
    """verify-data decodes every image and label completely with OpenCV, as the loader does: a file training
    would fail on (or train on wrongly) fails verification first, named with the real reason and what to do."""
    copy = _broken_copy(prepared, tmp_path)
    bad = _damage(copy, damage)
    with pytest.raises(PreparedDataError, match=reason) as err:
        verify_prepared("demo", copy, workers=2)
    assert str(bad) in str(err.value)
    if "cut off" in damage or "not an image" in damage:
        assert "Prepare the dataset again" in str(err.value)
        ds = _loader(copy)  # what training would have met, later
        with pytest.raises(FileNotFoundError, match=rf"{bad.name}: unreadable or missing"):
            ds.read(ds.ids.index("val_0003"))


def test_a_modified_archive_is_rejected(archive_dir, tmp_path):
    copy = tmp_path / "demo.tar"
    data = bytearray((archive_dir / "demo.tar").read_bytes())
    data[5000] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="does not match the recorded"):
        verify_archives("demo", tmp_path)
    assert verify_archives("demo", archive_dir)["archives"]["demo.tar"]["verified"]


def test_prepare_replaces_a_stale_folder(archive_dir, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    prepare("demo", archive_dir, out)
    assert not (out / "stale.txt").exists() and (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_dataset_reads_rgb_and_augments_reproducibly(prepared):

    from mcibi.data.transforms import build_train_transform
    from mcibi.spec.params import load_params

    params = load_params(ROOT / "params" / "demo" / "upernet_mcibipp.yaml")
    ds = SegmentationDataset(prepared, "train", build_train_transform(params.data, DEMO.flip_pairs), seed=3)
    a, b = ds[5], ds[5]
    assert a["image"].shape == (3, 96, 96) and a["label"].shape == (96, 96)
    assert (a["image"] == b["image"]).all() and (a["label"] == b["label"]).all()
    ds.set_epoch(1)
    assert not (ds[5]["image"] == a["image"]).all()
    raw, _ = ds.read(0)
    bgr = cv2.imread(str(prepared / "images" / "train_0000.png"))
    assert (raw == bgr[..., ::-1]).all()


def _video_dataset(root):
    """A prepared-format folder with ids '<video>/<frame>': video a has 3 frames, b has 2."""
    ids = ["a/0", "a/1", "a/2", "b/0", "b/1"]
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "manifest.json").write_text(json.dumps({"image_ext": ".png", "splits": {"train": 5},
                                                   "classes": [f"c{k}" for k in range(8)]}))
    for n, image_id in enumerate(ids):
        for folder, value in (("images", n * 10), ("labels", n)):
            path = root / folder / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (4, 4, 3) if folder == "images" else (4, 4)
            cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return ids


def test_frame_per_video_sampling_draws_one_frame_of_each_video_per_epoch(tmp_path):
    ids = _video_dataset(tmp_path)
    identity = lambda image, label, rng: (image, label)  # noqa: E731
    assert len(SegmentationDataset(tmp_path, "train", identity)) == 5
    data = SegmentationDataset(tmp_path, "train", identity, seed=3, frame_per_video=True)
    assert len(data) == 2  # an epoch is one pass over the videos, as the official VSPW loader
    seen = {0: set(), 1: set()}
    for epoch in range(30):
        data.set_epoch(epoch)
        for index in range(2):
            sample = data[index]
            assert sample["id"].split("/")[0] == "ab"[index]
            assert int(sample["label"][0, 0]) == ids.index(sample["id"])  # the label of that very frame
            assert data.sample_id(index) == sample["id"]  # reproducible within the epoch
            seen[index].add(sample["id"])
    assert seen == {0: {"a/0", "a/1", "a/2"}, 1: {"b/0", "b/1"}}  # every frame is drawn over the epochs
    again = SegmentationDataset(tmp_path, "train", identity, seed=3, frame_per_video=True)
    again.set_epoch(29)
    assert [again.sample_id(i) for i in range(2)] == [data.sample_id(i) for i in range(2)]  # seeded


def _loader(folder):
    from mcibi.data.transforms import build_test_transform
    from mcibi.spec.params import load_params

    params = load_params(DEMO_PARAMS / "upernet_baseline.yaml")
    return SegmentationDataset(folder, "val", build_test_transform(params.data))


def test_loader_rejects_a_bad_pair_naming_the_file(prepared, tmp_path):
    from PIL import Image

    from mcibi.data.dataset import BadSampleError

    copy = _broken_copy(prepared, tmp_path)
    ids = (copy / "splits" / "val.txt").read_text().split()
    ds = _loader(copy)
    # a label of another size than its image
    label_file = copy / "labels" / f"{ids[0]}.png"
    cv2.imwrite(str(label_file), cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)[:-4])
    with pytest.raises(BadSampleError, match=rf"{ids[0]}\.png: size \(\d+, \d+\) differs from its label's"):
        ds[0]
    # a label value outside the classes (not 255): no longer counted as ignored at evaluation
    label_file = copy / "labels" / f"{ids[1]}.png"
    label = cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)
    label[5, 5] = 9
    cv2.imwrite(str(label_file), label)
    with pytest.raises(BadSampleError, match=rf"{ids[1]}\.png: label values \[9\] outside \[0, 8\)"):
        ds[1]
    # an image carrying an EXIF rotation
    image_file = copy / "images" / f"{ids[2]}.png"
    with Image.open(image_file) as im:
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(image_file, exif=exif)
    with pytest.raises(BadSampleError, match=rf"{ids[2]}\.png: EXIF orientation 6"):
        ds[2]
    assert ds[3]["label"].shape  # the untouched pairs still load
