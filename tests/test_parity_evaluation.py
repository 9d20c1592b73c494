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
folded, channels-last and batched windows the scores still agree to 1e-2 of the largest (tests/test_folding.py
proves folding equal on its own).

The protocols are the committed params files' (``params/<dataset>/*.yaml``), compared with the official values
(the config's active block, or its commented TTA block) in :data:`OFFICIAL`; all pixel sizes are divided by
:data:`SHRINK` on both sides so that a CPU runs it in seconds (the arithmetic does not depend on the sizes).
"""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_support import calibrate, official_config, randomise_state

from mcibi.checkpoint import convert_official_checkpoint, save_checkpoint
from mcibi.data.dataset import SegmentationDataset
from mcibi.data.lookup import get_spec
from mcibi.data.transforms import build_test_transform
from mcibi.evaluation import export_predictions, load_model, protocol_scores
from mcibi.models import build_segmentor
from mcibi.official import model_params_from_official
from mcibi.params import load_params

SHRINK = 12
# the model each dataset's checks run (any official model will do: the protocol is what is compared)
MODEL = {"lip": "mcibiplusplus_resnet50os8_lip", "ade20k": "mcibiplusplus_aspp_resnet50os8_ade20k"}
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
                                                   [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], True, True),
}
EXACT = {"fold_batchnorm": False, "channels_last": False, "window_batch": 1}
# largest |our score - official score| over the largest |score|, from float rounding alone (flips batched with
# their image, windows and images one by one as the official): logits, and probabilities averaged over passes
TOLERANCE = {False: 3e-4, True: 1e-2}
CALIBRATE = {"lip": "upernet_r101_mcibipp", "ade20k": "upernet_r101_mcibipp"}  # the test images' ss sizes
ORIGINAL_SIZES = [(45, 61), (57, 41)]  # (h, w): a landscape and a portrait image


def _shrink(x):
    return None if x is None else tuple(max(int(round(v / SHRINK)), 1) for v in x)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per dataset: (official model, our params with the converted model, its checkpoint, data root)."""
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus

    root = tmp_path_factory.mktemp("eval_parity")
    out = {}
    for dataset, name in MODEL.items():
        cfg = official_config(name)
        cfg["backbone"]["pretrained"] = False
        cfg["norm_cfg"] = {"type": "BatchNorm2d"}
        model_params = model_params_from_official(name, cfg)
        torch.manual_seed(0)
        official = MCIBIPlusPlus(cfg, mode="TEST")
        randomise_state(official)
        official.eval()
        data_root = root / "data"
        _prepared_images(data_root / dataset, seed=len(out))
        test = build_test_transform(_shrunk_params(dataset, CALIBRATE[dataset], "ss", model_params).data)
        images = SegmentationDataset(data_root / dataset, "val", test)
        calibrate(official, [images[i]["image"][None] for i in range(len(images))])
        ours = build_segmentor(model_params)
        ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
        out[dataset] = (official, model_params, ours, data_root, root)
    return out


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
        return None if r is None else dataclasses.replace(r, size=_shrink(r.size))

    proto = dataclasses.replace(proto, test_resize=shrink_resize(proto.test_resize), crop=_shrink(proto.crop),
                                stride=_shrink(proto.stride))
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


@pytest.mark.parametrize("dataset,stem,protocol", list(OFFICIAL))
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
    assert export_predictions(params, ckpt, protocol, data_root, out_dir, split="val", device="cpu") == 2
    cfg_inference = {"forward": {"mode": mode, "cropsize": _shrink(crop), "stride": _shrink(stride)},
                     "tta": {"multiscale": scales, "flip": flip, "use_probs_before_resize": probs}}
    # our scores through the same path (the checkpoint loaded as evaluate loads it, the dataset's test transform,
    # protocol_scores), whose argmax must be the exported PNG exactly
    model, layout = load_model(params, ckpt, torch.device("cpu"))
    proto = params.evaluate.protocols[protocol]
    dataset_ours = SegmentationDataset(data_root / dataset, "val", build_test_transform(params.data, proto.test_resize))
    for i, size in enumerate(ORIGINAL_SIZES):
        expected_scores, scale = _official_scores(official, cfg_inference, data_root / dataset / "images" /
                                                  f"im{i}.jpg", _shrink(resize), keep_ratio)
        with torch.inference_mode():
            image = dataset_ours[i]["image"][None].contiguous(memory_format=layout)
            scores = protocol_scores(params, model, image, proto, get_spec(dataset).flip_permutation(), size)[0]
        got = cv2.imread(str(out_dir / f"im{i}.png"), cv2.IMREAD_UNCHANGED)
        assert got.shape == size == tuple(expected_scores.shape[1:])
        assert np.array_equal(got, scores.argmax(dim=0).numpy())  # the exported map is these scores' argmax
        # every class score of every pixel equal up to float rounding of an equivalent computation (BatchNorm
        # folded into the convolutions, channels-last, flips and windows batched: ~1e-6 of the largest logit)
        error = float((scores - expected_scores).abs().max())
        assert error <= TOLERANCE[probs] * scale, f"scores differ by {error:.3g} (largest |score| {scale:.3g})"
        # so the class maps are equal wherever the official top-2 margin exceeds twice the pixel's own largest
        # score error (only then can the argmax change); a margin under it is a tie that rounding may break
        top2 = expected_scores.topk(2, dim=0).values
        pixel_error = (scores - expected_scores).abs().amax(dim=0)
        ties = ((top2[0] - top2[1]) <= 2 * pixel_error).numpy()
        expected = expected_scores.argmax(dim=0).numpy()
        differ = (got != expected) & ~ties
        assert differ.sum() == 0, f"{differ.sum()} of {got.size} pixels differ ({ties.sum()} ties excluded)"
        assert ties.mean() < 0.05  # the tie exclusion stays marginal
        # non-trivial scores: they vary over the image far beyond the error, so a wrong flip, scale, window or
        # resize shows (the class map alone may be constant: averaging many passes of a random-weight model can
        # leave one class on top everywhere, depending on the RNG state the models were drawn in)
        spread = float((expected_scores.amax(dim=(1, 2)) - expected_scores.amin(dim=(1, 2))).max())
        assert spread > 50 * error
