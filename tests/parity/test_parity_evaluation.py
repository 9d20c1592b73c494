"""Evaluation protocol parity: ``mcibi evaluate``'s code path gives the official test-time class maps.

For the same converted weights, the class map of every original-size image that our evaluation path produces
(the prepared dataset read, the protocol's test-time resize, scales, flips with the left/right class swap, whole
or sliding-window inference, averaging of logits or probabilities, resize back to the original size, argmax;
through :func:`mcibi.evaluation.export_predictions`, which shares ``_predictions`` with ``evaluate``) equals the
official path: the official test pipeline (Resize, Normalize, ToTensor) on the image read as the official reader
does, the official ``auginference`` (whole / slide, scales, flip, pairs read from the train pipeline) and the
averaging + resize + argmax of the official test script (``ssseg/test.py``, which needs CUDA + NCCL, so its three
lines are transcribed in :func:`_official_class_map`).

Compared are every class score of every pixel (within float rounding: :data:`TOLERANCE`), then the class maps
pixel for pixel wherever the official top-2 margin exceeds twice the measured score error (a smaller margin is a
tie that rounding may break either way). The evaluation runs unfolded, NCHW, one window per forward
(:data:`EXACT`, settings a user can choose) because this random-weight network amplifies rounding: with BatchNorm
folded, channels-last and batched windows the scores still agree to 1e-2 of the largest (tests/models/test_folding.py
proves folding equal on its own).

The protocols are the committed params files' (``params/<dataset>/*.yaml``), compared with the official values
(the config's active block, or its commented TTA block) in :data:`OFFICIAL`; all pixel sizes are divided by
the dataset's :data:`SHRINK` on both sides so that a CPU runs it in seconds (the arithmetic does not depend on the
sizes).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_support import calibrate, official_config, randomise_state
from torch import nn

from mcibi.catalogue.official import model_params_from_official
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.transforms import build_test_transform
from mcibi.evaluation.inference import slide_windows
from mcibi.evaluation.protocols import cityscapes_train_to_label_ids, export_predictions, load_model, protocol_scores
from mcibi.models import build_segmentor
from mcibi.models.build import save_checkpoint
from mcibi.official.checkpoints import convert_official_checkpoint
from mcibi.spec.params import load_params

# CityScapes by more: its committed protocol slides tall windows over wide images at six scales, with flips
SHRINK = {"lip": 12, "ade20k": 12, "cityscapes": 32}
# the model each dataset's checks run (any official model will do: the protocol is what is compared)
MODEL = {"lip": "mcibiplusplus_resnet50os8_lip", "ade20k": "mcibiplusplus_aspp_resnet50os8_ade20k",
         "cityscapes": "mcibiplusplus_aspp_resnet50os8_cityscapes"}
SIX_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
# official protocols: test Resize (output_size, keep_ratio), forward mode, cropsize, stride, scales, flip, probs.
# ss values are the configs' active blocks; flip and ms+flip the commented TTA blocks of the same files
OFFICIAL = {
    ("lip", "upernet_r101_mcibipp", "ss"): ((473, 473), False, "whole", None, None, [1], False, False),
    ("lip", "upernet_r101_mcibipp", "flip"): ((473, 473), False, "whole", None, None, [1], True, False),
    ("lip", "upernet_r101_mcibipp", "msflip"): ((520, 520), False, "slide", (473, 473), (315, 315),
                                                [0.75, 1.0, 1.25], True, True),
    ("ade20k", "upernet_r101_mcibipp", "ss"): ((2048, 512), True, "whole", None, None, [1], False, False),
    ("ade20k", "upernet_r101_mcibipp", "msflip"): ((2048, 512), True, "whole", None, None,
                                                  [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], True, True),
    ("ade20k", "upernet_swinl_mcibipp", "msflip"): ((2560, 640), True, "slide", (640, 640), (426, 426),
                                                   SIX_SCALES, True, True),
    # the active block; cropsize [1024, 512] as its slideinference reads it, (h, w): windows 1024 high, 512 wide
    ("cityscapes", "deeplabv3_r101_mcibipp", "msflip"): ((2048, 1024), True, "slide", (1024, 512), (341, 341),
                                                        SIX_SCALES, True, True),
}
EXACT = {"fold_batchnorm": False, "channels_last": False, "window_batch": 1}
# largest |our score - official score| over the largest |score|, from float rounding alone (flips batched with
# their image, windows and images one by one as the official): logits, and probabilities averaged over passes.
# Logits measured up to 3.9e-4 (LIP flip at one thread; the same case stays under 3e-4 at two threads: the error
# moves with the summation order alone)
TOLERANCE = {False: 5e-4, True: 1e-2}
CALIBRATE = {"lip": "upernet_r101_mcibipp", "ade20k": "upernet_r101_mcibipp",  # the test images' ss sizes
             "cityscapes": "deeplabv3_r50_mcibipp"}
ORIGINAL_SIZES = [(45, 61), (57, 41)]  # (h, w): a landscape and a portrait image
# images compared per dataset: CityScapes' six scales of tall windows take ~100 window passes per image on each
# side, so only the landscape image, as its images are (portrait images under its windows: the toy tests below)
COMPARED = {"lip": 2, "ade20k": 2, "cityscapes": 1}


def _shrink(x, dataset: str):
    return None if x is None else tuple(max(int(round(v / SHRINK[dataset])), 1) for v in x)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per dataset: (official model, our params with the converted model, our model, data root, root), each
    dataset's built on first use (the fast tier, -m "not slow", runs LIP's alone)."""
    root = tmp_path_factory.mktemp("eval_parity")

    class Converted(dict):
        def __missing__(self, dataset):
            self[dataset] = _converted(dataset, root)
            return self[dataset]

    return Converted()


def _converted(dataset: str, root):
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus

    name = MODEL[dataset]
    cfg = official_config(name)
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    model_params = model_params_from_official(name, cfg)
    torch.manual_seed(0)  # per dataset: the same weights whichever dataset is built first
    official = MCIBIPlusPlus(cfg, mode="TEST")
    randomise_state(official)
    official.eval()
    data_root = root / "data"
    _prepared_images(data_root / dataset, seed=list(MODEL).index(dataset))
    test = build_test_transform(_shrunk_params(dataset, CALIBRATE[dataset], "ss", model_params).data)
    images = SegmentationDataset(data_root / dataset, "val", test)
    calibrate(official, [images[i]["image"][None] for i in range(len(images))])
    ours = build_segmentor(model_params)
    ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
    return official, model_params, ours, data_root, root


def _prepared_images(folder, seed: int) -> None:
    """A prepared dataset (our on-disk format) with two JPEG images of odd original sizes in split 'val'."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    ids = []
    for i, (h, w) in enumerate(ORIGINAL_SIZES):
        smooth = cv2.resize(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        image = np.clip(smooth.astype(int) + rng.integers(-20, 20, smooth.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / "images" / f"im{i}.jpg"), image)
        cv2.imwrite(str(folder / "labels" / f"im{i}.png"), np.zeros((h, w), np.uint8))
        ids.append(f"im{i}")
    (folder / "splits").mkdir()
    (folder / "splits" / "val.txt").write_text("\n".join(ids) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"image_ext": ".jpg", "splits": {"val": len(ids)},
                                                      "classes": list(get_spec(folder.name).classes)}))


def _shrunk_params(dataset: str, stem: str, protocol: str, model_params):
    """The committed params file with the converted model, one protocol, and every pixel size shrunk."""
    params = load_params(f"params/{dataset}/{stem}.yaml")
    proto = params.evaluate.protocols[protocol]

    def shrink_resize(r):
        return None if r is None else dataclasses.replace(r, size=_shrink(r.size, dataset))

    proto = dataclasses.replace(proto, test_resize=shrink_resize(proto.test_resize),
                                crop=_shrink(proto.crop, dataset), stride=_shrink(proto.stride, dataset))
    data = dataclasses.replace(params.data, test_resize=shrink_resize(params.data.test_resize))
    return dataclasses.replace(
        params, data=data, model=model_params,
        train=dataclasses.replace(params.train, num_workers=0),
        evaluate=dataclasses.replace(params.evaluate, protocols={protocol: proto}, **EXACT))


def _official_scores(official, cfg_inference: dict, image_file, resize: tuple, keep_ratio: bool) -> tuple:
    """(class scores (K, h, w), their largest magnitude) of the official test path for one original image."""
    from ssseg.modules.datasets.pipelines.transforms import Compose, Normalize, Resize, ToTensor

    image = cv2.imread(str(image_file))  # the official reader: BGR, Normalize converts to RGB
    h, w = image.shape[:2]
    pipeline = Compose([Resize(output_size=resize, keep_ratio=keep_ratio, scale_range=None),
                        Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]), ToTensor()])
    sample = pipeline({"image": image, "seg_target": np.zeros((h, w), np.float32), "height": h, "width": w})
    official.cfg["inference"] = cfg_inference
    with torch.no_grad():
        seg_logits_list = official.auginference(sample["image"][None])
        # ssseg/test.py: every pass resized to the original size, averaged, argmax
        seg_logit_list = [F.interpolate(s[0:1], size=(h, w), mode="bilinear", align_corners=official.align_corners)
                          for s in seg_logits_list]
        seg_logit = sum(seg_logit_list) / len(seg_logit_list)
    return seg_logit[0], seg_logit.abs().max().item()


@pytest.mark.parametrize("dataset,stem,protocol", [  # the fast tier (-m "not slow") runs LIP's single scale
    pytest.param(*key, marks=[] if key == ("lip", "upernet_r101_mcibipp", "ss") else [pytest.mark.slow])
    for key in OFFICIAL])
def test_evaluation_class_maps_equal_the_official_test_path(dataset, stem, protocol, converted, tmp_path):
    resize, keep_ratio, mode, crop, stride, scales, flip, probs = OFFICIAL[(dataset, stem, protocol)]
    official, model_params, ours, data_root, root = converted[dataset]
    params = _shrunk_params(dataset, stem, protocol, model_params)
    # the committed protocol is the official one (sizes compared before shrinking: _shrink is applied to both)
    full = load_params(f"params/{dataset}/{stem}.yaml").evaluate.protocols[protocol]
    test_resize = full.test_resize or load_params(f"params/{dataset}/{stem}.yaml").data.test_resize
    assert (sorted(test_resize.size), test_resize.keep_ratio) == (sorted(resize), keep_ratio)
    assert not keep_ratio and resize[0] == resize[1] or keep_ratio  # (h, w) order only matters without keep_ratio
    assert (full.mode, full.crop, full.stride, list(full.scales), full.flip, full.probs_before_resize) == (
        mode, crop, stride, scales, flip, probs)
    ckpt = root / f"{dataset}.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, ours, params)
    out_dir = tmp_path / "pred"
    count = COMPARED[dataset]
    assert export_predictions(params, ckpt, protocol, data_root, out_dir, split="val", device="cpu",
                              limit=count) == count
    cfg_inference = {"forward": {"mode": mode, "cropsize": _shrink(crop, dataset),
                                 "stride": _shrink(stride, dataset)},
                     "tta": {"multiscale": scales, "flip": flip, "use_probs_before_resize": probs}}
    # our scores through the same path (the checkpoint loaded as evaluate loads it, the dataset's test transform,
    # protocol_scores), whose argmax must be the exported PNG exactly
    model, layout = load_model(params, ckpt, torch.device("cpu"))
    proto = params.evaluate.protocols[protocol]
    dataset_ours = SegmentationDataset(data_root / dataset, "val", build_test_transform(params.data, proto.test_resize))
    # the PNG's values: class indices, CityScapes' labelIds (what its server reads)
    png_values = cityscapes_train_to_label_ids() if dataset == "cityscapes" else np.arange(256, dtype=np.uint8)
    for i, size in enumerate(ORIGINAL_SIZES[:count]):
        expected_scores, scale = _official_scores(official, cfg_inference, data_root / dataset / "images" /
                                                  f"im{i}.jpg", _shrink(resize, dataset), keep_ratio)
        with torch.inference_mode():
            image = dataset_ours[i]["image"][None].contiguous(memory_format=layout)
            scores = protocol_scores(params, model, image, proto, get_spec(dataset).flip_permutation(), size)[0]
        got = cv2.imread(str(out_dir / f"im{i}.png"), cv2.IMREAD_UNCHANGED)
        assert got.shape == size == tuple(expected_scores.shape[1:])
        assert np.array_equal(got, png_values[scores.argmax(dim=0).numpy()])  # the exported map: their argmax
        # every class score of every pixel equal up to float rounding of an equivalent computation (BatchNorm
        # folded into the convolutions, channels-last, flips and windows batched: ~1e-6 of the largest logit)
        error = float((scores - expected_scores).abs().max())
        assert error <= TOLERANCE[probs] * scale, f"scores differ by {error:.3g} (largest |score| {scale:.3g})"
        # so the class maps are equal wherever the official top-2 margin exceeds twice the pixel's own largest
        # score error (only then can the argmax change); a margin under it is a tie that rounding may break
        top2 = expected_scores.topk(2, dim=0).values
        pixel_error = (scores - expected_scores).abs().amax(dim=0)
        ties = ((top2[0] - top2[1]) <= 2 * pixel_error).numpy()
        expected = png_values[expected_scores.argmax(dim=0).numpy()]
        differ = (got != expected) & ~ties
        assert differ.sum() == 0, f"{differ.sum()} of {got.size} pixels differ ({ties.sum()} ties excluded)"
        assert ties.mean() < 0.05  # the tie exclusion stays marginal
        # non-trivial scores: they vary over the image far beyond the error, so a wrong flip, scale, window or
        # resize shows (the class map alone may be constant: averaging many passes of a random-weight model can
        # leave one class on top everywhere, depending on the RNG state the models were drawn in)
        spread = float((expected_scores.amax(dim=(1, 2)) - expected_scores.amin(dim=(1, 2))).max())
        assert spread > 50 * error


# --------------------------------------------------------------------------- sliding windows: (h, w) or (w, h)
# The committed CityScapes protocol on a 1024x2048 image, every size divided by 16 (windows 64x32, stride 21), on
# toy networks: the window layout is what is compared, and these run in milliseconds. Image sizes (h, w): the
# CityScapes shape, windows taller than the image, wider than it, larger on both sides in one reading and on one
# side in the other, a portrait image, and an image within both windows (single pass: the two readings agree).
WINDOW_SHRINK = 16
TOY_SIZES = [(64, 128), (40, 128), (64, 24), (20, 50), (100, 37), (16, 20)]


class _ToyNet(nn.Module):
    """Output stride 4 with zero padding: a pixel's scores depend on where its window starts and ends."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, k, 5, stride=4, padding=2)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.conv(x))


def _official_toy(net: nn.Module, cropsize: tuple, stride: tuple, scales: list, flip: bool, probs: bool):
    """The official segmentor's own ``inference`` / ``auginference`` (ssseg base.py) running ``net``."""
    from ssseg.modules.models.segmentors.base.base import BaseSegmentor

    class Official(nn.Module):
        inference = BaseSegmentor.inference
        auginference = BaseSegmentor.auginference

        def __init__(self) -> None:
            super().__init__()
            self.net, self.mode, self.align_corners = net, "TEST", False
            self.cfg = {"num_classes": 5, "dataset": {"train": {"data_pipelines": []}},
                        "inference": {"forward": {"mode": "slide", "cropsize": list(cropsize), "stride": list(stride)},
                                      "tta": {"multiscale": scales, "flip": flip, "use_probs_before_resize": probs}}}

        def forward(self, inputs) -> SimpleNamespace:
            return SimpleNamespace(seg_logits=self.net(inputs.images).logits)

    return Official().eval()


def _city_protocol(mode: str, stride: tuple[int, int] | None, tta: bool):
    """(params, protocol): the committed CityScapes ms+flip protocol shrunk, in ``mode``, stride replaced if given,
    single scale without flip unless ``tta``."""
    params = load_params("params/cityscapes/deeplabv3_r101_mcibipp.yaml")
    proto = params.evaluate.protocols["msflip"]
    crop = tuple(round(c / WINDOW_SHRINK) for c in proto.crop)
    stride = stride or tuple(round(c / WINDOW_SHRINK) for c in proto.stride)
    proto = dataclasses.replace(proto, mode=mode, crop=crop, stride=stride,
                                **({} if tta else {"scales": (1.0,), "flip": False}))
    return params, proto


def _toy_scores(proto, params, net, official, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, official) scores of ``image`` at its own size: ours through ``protocol_scores``, the official
    through ``auginference`` and the averaging of ssseg/test.py."""
    size = tuple(image.shape[-2:])
    with torch.no_grad():
        ours = protocol_scores(params, net, image, proto, list(range(5)), size)[0]
        passes = [F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                  for s in official.auginference(image)]
    return ours, (sum(passes) / len(passes))[0]


def _assert_same(ours: torch.Tensor, expected: torch.Tensor, probs: bool) -> None:
    """Scores equal up to float rounding (one convolution: far inside :data:`TOLERANCE`), class maps equal beyond
    ties (as the real-model test above)."""
    scale = float(expected.abs().max())
    error = float((ours - expected).abs().max())
    assert error <= 1e-5 * scale <= TOLERANCE[probs] * scale, f"scores differ by {error:.3g} (largest {scale:.3g})"
    top2 = expected.topk(2, dim=0).values
    ties = (top2[0] - top2[1]) <= 2 * (ours - expected).abs().amax(dim=0)
    assert torch.equal(ours.argmax(dim=0)[~ties], expected.argmax(dim=0)[~ties])
    assert ties.float().mean() < 0.01


@pytest.mark.parametrize("tta", [False, True], ids=["single-pass", "msflip"])
@pytest.mark.parametrize("stride", [None, (24, 10)], ids=["committed-stride", "non-square-stride"])
@pytest.mark.parametrize("size", TOY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_slide_modes_against_the_official_slideinference(size, stride, tta):
    """``slide`` gives the official scores for the same numbers (cropsize and stride read as (h, w), as the
    official ``slideinference`` reads them); ``slide_wh`` gives the official scores for the numbers transposed,
    and differs from ``slide`` wherever the two readings place different windows."""
    net = _ToyNet().eval()
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1]))
    params, slide = _city_protocol("slide", stride, tta)
    _, slide_wh = _city_protocol("slide_wh", stride, tta)
    crop, step = slide.crop, slide.stride
    assert crop[0] > crop[1]  # the committed CityScapes windows are tall: 1024 high, 512 wide before shrinking
    scales, flip, probs = list(slide.scales), slide.flip, slide.probs_before_resize
    official = _toy_scores(slide, params, net, _official_toy(net, crop, step, scales, flip, probs), image)
    _assert_same(*official, probs)
    transposed = _official_toy(net, crop[::-1], step[::-1], scales, flip, probs)  # the numbers read as (w, h)
    ours_wh, official_wh = _toy_scores(slide_wh, params, net, transposed, image)
    _assert_same(ours_wh, official_wh, probs)
    # slide_wh is not the official layout wherever the readings place other windows (at some scale)
    layouts_differ = any(
        slide_windows(h, w, crop, step) != slide_windows(h, w, crop[::-1], step[::-1])
        for h, w in (F.interpolate(image, scale_factor=s, mode="bilinear").shape[-2:] for s in scales))
    gap = float((ours_wh - official[1]).abs().max())
    if layouts_differ:
        assert gap > 100 * 1e-5 * float(official[1].abs().max())
        assert (ours_wh.argmax(dim=0) != official[1].argmax(dim=0)).any()
    else:  # e.g. an image within both windows: one window, the whole image, either way
        assert gap <= 1e-5 * float(official[1].abs().max())


def test_slide_wh_of_the_committed_cityscapes_protocol_runs_512_high_1024_wide_windows():
    """The two readings of [1024, 512] on a 1024x2048 CityScapes image: ``slide`` places the official 6 windows
    (1024 high, 512 wide, one row), ``slide_wh`` 3 rows of 5 windows 512 high and 1024 wide."""
    proto = load_params("params/cityscapes/deeplabv3_r101_mcibipp.yaml").evaluate.protocols["msflip"]
    assert (proto.mode, proto.crop, proto.stride) == ("slide", (1024, 512), (341, 341))
    boxes = slide_windows(1024, 2048, *proto.windows_hw())
    assert len(boxes) == 6 and {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes} == {(1024, 512)}
    wh = dataclasses.replace(proto, mode="slide_wh")
    assert wh.windows_hw() == ((512, 1024), (341, 341))
    boxes = slide_windows(1024, 2048, *wh.windows_hw())
    assert len(boxes) == 15 and {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes} == {(512, 1024)}
