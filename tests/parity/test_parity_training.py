"""Training parity with the official code (sssegmentation 1.7.0): the data pipeline and one training step.

Data pipeline: with the random draws fixed, our transforms give the official tensors.

Both sides draw from one scripted sequence of uniforms in [0, 1): ours through a Generator stand-in, the
official transforms through ``numpy.random`` patched the same way, so the test also proves that both draw the
same number of values in the same order with the same meaning (scale, crop box, flip, rotation angle and every
photometric parameter). Training transforms: the official LIP and ADE20k pipelines (their train
``data_pipelines`` from the official configs, sizes shrunk); test transform: the official test pipeline, exactly.

Training step: the official scheduler, optimiser (with its parameter rules) and TRAIN-mode forward (losses,
memory update) against our ``train_step``, stage by stage: loss terms, gradients, learning rates, the update
and optimiser state from the same gradients, the memory and BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_support import official_config, randomise_state

from mcibi.data.lookup import get_spec
from mcibi.data.specs import IGNORE_INDEX
from mcibi.data.transforms import build_test_transform, build_train_transform, photometric_distortion
from mcibi.spec.params import load_params


class Script:
    """A fixed sequence of uniforms in [0, 1) served as the draws of a Generator or of ``numpy.random``."""

    def __init__(self, values) -> None:
        self.values = list(values)
        self.used = 0

    def _u(self) -> float:
        u = self.values[self.used]
        self.used += 1
        return u

    # numpy.random.Generator (ours)
    def random(self) -> float:
        return self._u()

    def uniform(self, low=0.0, high=1.0, size=None) -> float:
        assert size is None
        return low + (high - low) * self._u()

    def integers(self, low, high=None) -> int:
        if high is None:
            low, high = 0, low
        return int(low + int(self._u() * (high - low)))

    # numpy.random module functions (the official transforms)
    def randint(self, low, high=None, size=None) -> int:
        assert size is None
        return self.integers(low, high)

    def rand(self) -> float:
        return self._u()

    def random_sample(self) -> float:
        return self._u()


def _patch_numpy(monkeypatch, script: Script) -> None:
    for name in ("randint", "rand", "random_sample", "uniform"):
        monkeypatch.setattr(np.random, name, getattr(script, name))


def _image_and_label(h: int, w: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(int) + rng.integers(-30, 30, image.shape), 0, 255).astype(np.uint8)
    label = cv2.resize(rng.integers(0, classes, (5, 7), dtype=np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    label[:3, :5] = IGNORE_INDEX
    return image, label  # image RGB


def _official_pipeline(cfg: dict, split: str, shrink: dict):
    from ssseg.modules.datasets.pipelines.transforms import BuildDataTransform, Compose

    transforms = []
    for name, kwargs in cfg["dataset"][split]["data_pipelines"]:
        if name == "EdgeExtractor":  # edge targets: unused by MCIBI++
            continue
        kwargs = {**kwargs, **shrink.get(name, {})}
        transforms.append(BuildDataTransform({"type": name, **kwargs}))
    return Compose(transforms)


CASES = {  # official config, our params file, shrunk sizes (both sides)
    "lip": ("mcibiplusplus_upernet_resnet101os8_lip", "lip/upernet_r101_mcibipp", (52, 52), (47, 47)),
    "ade20k": ("mcibiplusplus_upernet_resnet101os8_ade20k", "ade20k/upernet_r101_mcibipp", (128, 32), (32, 32)),
}


@pytest.mark.parametrize("dataset", list(CASES))
@pytest.mark.parametrize("draw_seed", range(6))
def test_training_transform_gives_the_official_tensors(dataset, draw_seed, monkeypatch):
    name, stem, resize, crop = CASES[dataset]
    cfg = official_config(name)
    params = load_params(f"params/{stem}.yaml")
    # the committed pipeline is the official one (sizes as (h, w); the official output_size is (w, h) with keep_ratio)
    off = dict(cfg["dataset"]["train"]["data_pipelines"])
    d = params.data
    assert sorted(d.train_resize.size) == sorted(off["Resize"]["output_size"])
    assert (d.train_resize.keep_ratio, list(d.train_resize.ratio_range)) == (off["Resize"]["keep_ratio"],
                                                                              off["Resize"]["scale_range"])
    assert list(d.crop_size) == off["RandomCrop"]["crop_size"] == off["Padding"]["output_size"]
    assert d.cat_max_ratio == off["RandomCrop"]["one_category_max_ratio"] and d.flip_prob == off["RandomFlip"]["prob"]
    assert [tuple(p) for p in off["RandomFlip"].get("fixed_seg_target_pairs") or []] == [
        tuple(sorted(p, reverse=True)) for p in get_spec(dataset).flip_pairs]
    rotation = off.get("RandomRotation")
    assert (d.rotation.prob, d.rotation.max_degrees) == ((rotation["prob"], rotation["angle_upper"]) if rotation
                                                          else (0.0, 0.0))
    assert d.photometric == ("PhotoMetricDistortion" in off)
    # shrunk sizes on both sides
    data = dataclasses.replace(d, train_resize=dataclasses.replace(d.train_resize, size=resize), crop_size=crop)
    shrink = {"Resize": {"output_size": list(resize)}, "RandomCrop": {"crop_size": list(crop)},
              "Padding": {"output_size": list(crop)}}
    spec = get_spec(dataset)
    image, label = _image_and_label(61, 45 if draw_seed % 2 else 83, spec.num_classes, draw_seed)
    draws = np.random.default_rng(100 + draw_seed).random(64)

    ours_script = Script(draws)
    got_image, got_label = build_train_transform(data, spec.flip_pairs)(image, label, ours_script)

    official_script = Script(draws)
    _patch_numpy(monkeypatch, official_script)
    official_label = np.where(label == IGNORE_INDEX, -100.0, label.astype(np.float32)).astype(np.float32)
    # the intended arithmetic: the official photometric steps on RGB (the official runs them on BGR, see below)
    sample = {"image": image[:, :, ::-1].copy(), "seg_target": official_label, "height": 61, "width": image.shape[1]}
    pipeline = _official_pipeline(cfg, "train", shrink)
    for t in pipeline.transforms:
        if type(t).__name__ == "PhotoMetricDistortion":  # BGR -> RGB around it, back after
            t_call = t.__call__

            def rgb_call(meta, t_call=t_call):
                meta["image"] = np.ascontiguousarray(meta["image"][:, :, ::-1])
                meta = t_call(meta)
                meta["image"] = np.ascontiguousarray(meta["image"][:, :, ::-1])
                return meta
            t.__call__ = rgb_call
    sample = Compose_call(pipeline, sample)
    assert official_script.used == ours_script.used  # the same draws, in the same order
    expected_label = torch.where(sample["seg_target"] == -100, IGNORE_INDEX, sample["seg_target"]).long()
    differ = got_label != expected_label
    assert not differ.any(), f"{int(differ.sum())} label pixels differ: {got_label[differ]} vs {expected_label[differ]}"
    assert torch.equal(got_image, sample["image"])


def Compose_call(pipeline, sample):  # noqa: N802 - Compose calls t(meta): route through our wrappers
    for t in pipeline.transforms:
        sample = t.__call__(sample) if "__call__" in vars(t) else t(sample)
    return sample


@pytest.mark.parametrize("draw_seed", range(8))
def test_photometric_distortion_matches_the_official_steps(draw_seed, monkeypatch):
    """Intended arithmetic (official steps on RGB) exactly; the official pipeline's BGR order differs only by the
    hue step's direction, so without a hue step it gives the same image too."""
    from ssseg.modules.datasets.pipelines.transforms import PhotoMetricDistortion

    image, _ = _image_and_label(40, 50, 2, draw_seed)
    draws = np.random.default_rng(200 + draw_seed).random(16)
    got = photometric_distortion(image, Script(draws))
    script = Script(draws)
    _patch_numpy(monkeypatch, script)
    expected = PhotoMetricDistortion()({"image": image.copy()})["image"]
    assert np.array_equal(got, expected)
    # as the official pipeline runs it, on BGR: its HSV round trips see R and B swapped (another hue, quantised
    # differently), so the image is the same exactly when no saturation or hue step ran (seeds 0-7 have both)
    real, conversions = cv2.cvtColor, []
    with monkeypatch.context() as m:
        m.setattr(cv2, "cvtColor", lambda img, code, *a: (conversions.append(code), real(img, code, *a))[1])
        photometric_distortion(image, Script(draws))
    script = Script(draws)
    _patch_numpy(monkeypatch, script)
    bgr = PhotoMetricDistortion()({"image": image[:, :, ::-1].copy()})["image"][:, :, ::-1]
    if not conversions:
        assert np.array_equal(bgr, got)


@pytest.mark.parametrize("dataset", list(CASES))
def test_test_transform_gives_the_official_tensor_exactly(dataset):
    name, stem, _, _ = CASES[dataset]
    cfg = official_config(name)
    params = load_params(f"params/{stem}.yaml")
    test_resize = dataclasses.replace(params.data.test_resize, size=tuple(s // 8 for s in params.data.test_resize.size))
    data = dataclasses.replace(params.data, test_resize=test_resize)
    official_resize = cfg["dataset"]["test"]["data_pipelines"][0][1]
    assert sorted(official_resize["output_size"]) == sorted(params.data.test_resize.size)
    assert official_resize["keep_ratio"] == params.data.test_resize.keep_ratio
    pipeline = _official_pipeline(cfg, "test", {"Resize": {"output_size": [s // 8 for s in
                                                                            official_resize["output_size"]]}})
    for h, w in ((61, 45), (47, 83)):
        image, label = _image_and_label(h, w, 5, h)
        got, got_label = build_test_transform(data)(image, label, None)
        sample = pipeline({"image": image[:, :, ::-1].copy(), "seg_target": label.astype(np.float32),
                           "height": h, "width": w})
        assert torch.equal(got, sample["image"])
        assert np.array_equal(got_label.numpy(), label)


# ------------------------------------------------------------------------------------------- the training step
STEP_MODEL = "mcibiplusplus_ppm_resnet50os8_lip"  # cls, cwi, pr and aux losses; memory; BN in train mode
OPTIMISERS = {  # our params file whose optimiser + schedule is applied; the official config that states them
    "sgd": ("lip/upernet_r101_mcibipp", "mcibiplusplus_upernet_resnet101os8_lip"),
    "adamw_swinl_rules": ("ade20k/upernet_swinl_mcibipp", "mcibiplusplus_upernet_swinlarge_ade20k"),
}


def _copy_official_state(official, official_optimizer, ours, optimizer, model_params) -> None:
    """Load the official model's state and its optimiser's per-parameter state (momentum buffers, Adam moments
    and step) into ours. A second step is compared from one state: this random-weight network is so
    ill-conditioned that a 1e-7 relative change of its weights (one step's float32 rounding) moves some
    gradients by 7% (ReLUs at 5x5 resolution change side), even in float64."""
    from mcibi.official.checkpoints import convert_official_checkpoint
    from mcibi.official.keys import official_key_to_ours

    ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
    names = {id(p): n for n, p in official.named_parameters()}
    mine = dict(ours.named_parameters())
    copied = 0
    for param, state in official_optimizer.state.items():
        if id(param) not in names or not state:
            continue
        target = mine[official_key_to_ours(names[id(param)])]
        optimizer.state[target] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        copied += 1
    assert copied == len(mine)  # every trainable parameter has its state after the first step


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("optimiser", list(OPTIMISERS))
def test_training_step_equals_the_official(optimiser, monkeypatch):
    """Same weights, same batch (dropout off, BN in train mode), at iteration 0 and at a mid-schedule iteration
    (inside the Swin-L rows' 1500-iteration warm-up for AdamW; SGD past its first momentum step): every loss term
    and gradient within 1e-4 relative, the same learning rate per group, and from the same gradients the same
    update (1e-5 plus float32 resolution), optimiser state (1e-5), weights, memory and BN statistics (1e-4)."""
    from ssseg.modules.models.optimizers import BuildOptimizer
    from ssseg.modules.models.schedulers import BuildScheduler
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus
    from ssseg.modules.utils import SSSegInputStructure

    from mcibi.catalogue.official import model_params_from_official
    from mcibi.engine.optim import scheduled_lr
    from mcibi.engine.step import build_optimizer, train_step
    from mcibi.models import build_segmentor
    from mcibi.official.checkpoints import convert_official_checkpoint
    from mcibi.official.keys import official_key_to_ours

    stem, opt_config = OPTIMISERS[optimiser]
    cfg = official_config(STEP_MODEL)
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    for dec in cfg["head"]["decoder"].values():
        dec["dropout"] = 0.0
    cfg["auxiliary"]["dropout"] = 0.0
    cfg["scheduler"] = official_config(opt_config)["scheduler"]
    model_params = model_params_from_official(STEP_MODEL, cfg)
    params = load_params(f"params/{stem}.yaml")
    params = dataclasses.replace(params, model=model_params, data=dataclasses.replace(
        load_params("params/lip/upernet_r101_mcibipp.yaml").data))
    # the committed optimiser and schedule are the official ones
    sched, opt = cfg["scheduler"], cfg["scheduler"]["optimizer"]
    ours_opt, ours_sched = params.train.optimizer, params.train.schedule
    assert (ours_opt.name, ours_opt.lr, ours_opt.weight_decay) == (opt["type"].lower(), opt["lr"], opt["weight_decay"])
    assert ours_sched.power == sched["power"]
    assert ours_sched.min_lr == sched.get("min_lr", opt["lr"] * 0.01)
    assert ours_sched.warmup_iters == (sched.get("warmup_cfg") or {}).get("iters", 0)

    torch.manual_seed(0)
    official = MCIBIPlusPlus(cfg, mode="TRAIN")
    # non-zero norm affines and memory: relative errors are then measured against values of a real magnitude
    # (a zero-initialised bias moved by AdamW's first, sign-like step of ±lr has no meaningful relative error)
    randomise_state(official)
    ours = build_segmentor(model_params)
    ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
    official.train()
    optimizer = build_optimizer(ours, params)
    official_optimizer = BuildOptimizer(official, dict(opt))
    iters_per_epoch = 20
    max_iters = sched["max_epochs"] * iters_per_epoch
    scheduler = BuildScheduler(official_optimizer, {**sched, "lr": opt["lr"], "iters_per_epoch": iters_per_epoch,
                                                    "params_rules": opt["params_rules"]})
    # our max_iters is epochs x iterations per epoch as well (training.py)
    assert params.train.epochs == sched["max_epochs"]
    # at our optimiser step: every gradient equals the official one (1e-4 of the tensor's largest); the step is then
    # taken from the official gradients, so that the update below isolates the optimiser and its rules (AdamW's
    # lr * m / (sqrt(v) + eps) is sign-like for small gradients: their float32 noise would move weights by 2 lr)
    official_names = {official_key_to_ours(n): p for n, p in official.named_parameters() if p.requires_grad}
    unwrapped_step, gradient_errors = optimizer.step, []

    def step_checking_gradients(*args, **kwargs):
        for name, param in ours.named_parameters():
            reference = official_names[name].grad
            gradient_errors.append((_max_rel(param.grad, reference), name))
            param.grad.copy_(reference)
        return unwrapped_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step_checking_gradients)
    gen = torch.Generator().manual_seed(3)
    for it in (0, 700):
        if it:  # mid-schedule: both sides continue from the official state (weights, statistics, memory, moments)
            _copy_official_state(official, official_optimizer, ours, optimizer, model_params)
        # images of different contrast and brightness, so that BatchNorm after the global pooling of the PPM
        # (two values per channel) is well conditioned
        images = torch.randn(2, 3, 33, 33, generator=gen) * torch.tensor([0.5, 2.0])[:, None, None, None]
        images = images + torch.tensor([-1.0, 1.0])[:, None, None, None]
        labels = torch.randint(0, 20, (2, 5, 5), generator=gen)
        labels = F.interpolate(labels[:, None].float(), size=(33, 33), mode="nearest")[:, 0].long()
        labels[:, :4, :4] = IGNORE_INDEX
        scheduler.cur_iter = it
        official_lr = scheduler.updatelr()
        lr = scheduled_lr(ours_opt.lr, ours_sched, it, max_iters)
        assert lr == pytest.approx(official_lr, rel=1e-12)
        official_optimizer.zero_grad()
        before = {k: v.clone() for k, v in ours.state_dict().items()}  # the official state, converted
        targets = torch.where(labels == IGNORE_INDEX, -100, labels)
        loss, log = official(SSSegInputStructure(mode="TRAIN", images=images, seg_targets=targets),
                             learning_rate=official_lr, epoch=1).getsetvariables().values()
        loss.backward()
        scheduler.step()
        gradient_errors.clear()
        got = train_step(ours, images, labels, optimizer, lr, params, epoch=1)
        worst = max(gradient_errors)
        assert worst[0] < 1e-4, f"iteration {it}: the gradient of {worst[1]} differs by {worst[0]:.2e} relative"
        for term in ("cls", "cwi", "pr", "aux"):
            assert got[term] == pytest.approx(log[f"loss_{term}"], rel=1e-4), term
        assert got["total"] == pytest.approx(log["loss_total"], rel=1e-4)
        # the same learning rates (per-group multipliers); weight decay per parameter shows in the weights below
        assert sorted({round(g["lr"], 15) for g in optimizer.param_groups}) == pytest.approx(
            sorted({round(g["lr"], 15) for g in official_optimizer.param_groups if g["params"][0].requires_grad}))
        expected = convert_official_checkpoint(official.state_dict(), model_params)
        mine = ours.state_dict()
        worst = max((_max_rel(mine[k], v), k) for k, v in expected.items() if v.is_floating_point())
        assert worst[0] < 1e-4, f"iteration {it}: {worst[1]} differs by {worst[0]:.2e} relative"
        # each parameter's update from the same gradients: the learning rate, its multipliers, momentum, betas and
        # (no) weight decay per parameter, to 1e-5 of the largest update plus the weights' float32 resolution
        for name, param in ours.named_parameters():
            got_update, want_update = mine[name] - before[name], expected[name] - before[name]
            ulp = torch.finfo(torch.float32).eps * torch.maximum(before[name].abs(), expected[name].abs())
            excess = (got_update - want_update).abs() - 2 * ulp - 1e-5 * want_update.abs().max()
            assert excess.max() <= 0, f"iteration {it}: the update of {name} differs by {float(excess.max()):.2e}"
            # the optimiser's state after the step (momentum buffer; AdamW's moments), where a weight decay of 1e-4
            # of a weight shows above float32 resolution
            official_state = official_optimizer.state[official_names[name]]
            for key, value in optimizer.state[param].items():
                if key != "step":
                    assert _max_rel(value, official_state[key]) < 1e-5, f"iteration {it}: {key} of {name}"


@pytest.mark.slow
def test_swin_l_parameter_rules_equal_the_official():
    """Every parameter of the Swin-L MCIBI++ model gets the official weight decay and learning rate from our
    AdamW rules (no decay on norms, position embeddings and relative position tables), parameter by parameter."""
    from ssseg.modules.models.optimizers import BuildOptimizer
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus

    from mcibi.catalogue.official import model_params_from_official
    from mcibi.engine.step import build_optimizer
    from mcibi.models import build_segmentor
    from mcibi.official.checkpoints import convert_official_checkpoint

    stem, name = OPTIMISERS["adamw_swinl_rules"]
    cfg = official_config(name)
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    opt = cfg["scheduler"]["optimizer"]
    model_params = model_params_from_official(name, cfg)  # first: the official constructor edits cfg in place
    official = MCIBIPlusPlus(cfg, mode="TRAIN")
    official_optimizer = BuildOptimizer(official, dict(opt))
    params = dataclasses.replace(load_params(f"params/{stem}.yaml"), model=model_params)
    ours = build_segmentor(model_params)
    optimizer = build_optimizer(ours, params)
    # each official parameter filled with the index of its group: converted like weights, they say which official
    # group (weight decay, lr) each of ours must match, whatever the renaming and reordering of the conversion
    groups = official_optimizer.param_groups
    index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    trainable = {k: p for k, p in official.named_parameters() if p.requires_grad}
    filled = {k: torch.full_like(v, float(index[id(trainable[k])])) if k in trainable else v
              for k, v in official.state_dict().items()}
    want = convert_official_checkpoint(filled, model_params)
    mine = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    wrong = []
    for n, p in ours.named_parameters():
        official_groups = [groups[int(i)] for i in want[n].unique().tolist()]
        g = mine[id(p)]
        if any((o["weight_decay"], o["lr"]) != (g["weight_decay"], g["lr"] * g.get("lr_mult", 1.0))
               for o in official_groups):
            wrong.append(n)
    assert not wrong, f"weight decay or lr differs from the official for {len(wrong)} parameters: {wrong[:5]}"
    decayed = {n for n, p in ours.named_parameters() if any(p is q for g in optimizer.param_groups
                                                           if g["weight_decay"] for q in g["params"])}
    assert decayed and len(decayed) < len(list(ours.parameters()))  # both kinds occur
