"""Time one training step (forward, losses, backward, SGD, memory update), one eval forward and the memory
module (read, update) for a params file — and, with ``--official NAME``, the official implementation on the
same inputs, interleaved repetition by repetition so that a change of machine load hits both alike.

Prints one JSON object (wall seconds median/min, process CPU seconds, speedups = official / ours on medians).
``memory_read_update`` is the whole memory module; ``memory_specific`` leaves out its attention and output
convolutions (identical arithmetic on both sides) and times the rest: class representations, aggregation, update.
Examples (the issue's CPU setting is the default: batch 2, crop 256, 2 threads):

    python bench/step.py params/demo/upernet_mcibipp.yaml
    python bench/step.py params/demo/upernet_mcibipp.yaml --official mcibiplusplus_upernet_resnet50os8_lip \
        --classes 150 --channels-last --fold-bn
    # GPU: bf16 autocast + channels-last
    python bench/step.py params/demo/upernet_mcibipp.yaml --official mcibiplusplus_upernet_resnet50os8_lip \
        --device cuda --batch 8 --crop 512 --bf16 --channels-last --fold-bn

``--official`` builds our model from that official config (so both compute the same architecture) and needs
the official toolbox importable (see the README's parity section); without it only ours is timed.
"""

from __future__ import annotations

import argparse
import sys

from benchlib import cap_isa

if __name__ == "__main__" and "--isa" in sys.argv:  # before torch loads
    cap_isa(sys.argv[sys.argv.index("--isa") + 1])

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchlib import interleaved, machine  # noqa: E402

from mcibi.catalogue.official import load_official_config, model_params_from_official  # noqa: E402
from mcibi.engine.step import build_optimizer, train_step  # noqa: E402
from mcibi.models import build_segmentor  # noqa: E402
from mcibi.models.folding import fold_batchnorm  # noqa: E402
from mcibi.spec.params import ChannelParams, load_params  # noqa: E402

Timer = Callable[[], None]


class _KeepContext(torch.nn.Module):
    """Stands in for a self-attention block: returns the key/value map unchanged."""

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return context


class _FirstHalf(torch.nn.Module):
    """Stands in for the memory's output convolution: returns the first half of the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] // 2]


def _without_shared_convs(memory: torch.nn.Module) -> torch.nn.Module:
    """A copy of a memory module (ours or the official) whose attention and output convolutions — the same
    arithmetic in both implementations — are replaced by pass-throughs, leaving what is memory-specific:
    building the class representations, the soft aggregation W·M and the concatenation."""
    light = copy.deepcopy(memory)
    light.self_attention = _KeepContext()
    light.bottleneck = _FirstHalf()
    if getattr(light, "downsample_before_sa", None) is not None:
        light.downsample_before_sa = torch.nn.Identity()
    return light


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def ours(model_params, params, images, labels, args, device) -> dict[str, Timer]:
    """Timers for our training step, eval forward and memory read / update."""
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_segmentor(model_params).to(device).to(memory_format=layout)
    optimizer = build_optimizer(model, params)
    x = images.contiguous(memory_format=layout)

    def train() -> None:
        with _autocast(device, args.bf16):
            train_step(model, x, labels, optimizer, 0.01, params, epoch=0)

    eval_model = fold_batchnorm(model) if args.fold_bn else copy.deepcopy(model).eval()  # both copy
    eval_model = eval_model.to(memory_format=layout)

    def forward() -> None:
        with torch.inference_mode(), _autocast(device, args.bf16):
            eval_model(x)

    timers = {"train_step": train, "eval_forward": forward}
    mem = eval_model.memory_module
    if mem is not None:
        b, size = images.shape[0], (args.crop // 8, args.crop // 8)
        feats = torch.randn(b, model_params.channels.feats, *size, device=device).contiguous(memory_format=layout)
        logits = torch.randn(b, model_params.num_classes, *size, device=device)

        def read() -> None:
            with torch.inference_mode(), _autocast(device, args.bf16):
                mem(feats, logits)

        def update() -> None:
            with torch.no_grad():
                mem.update(feats, labels, momentum=0.1, resolution=model_params.memory.update_resolution)

        light = _without_shared_convs(mem)

        def aggregate() -> None:
            with torch.inference_mode(), _autocast(device, args.bf16):
                light(feats, logits)

        timers |= {"memory_read": read, "memory_update": update, "memory_aggregate": aggregate}
    return timers


def official(cfg: dict, images, labels, args, device) -> dict[str, Timer]:
    """The same timers on the official sssegmentation model (its training forward includes its update)."""
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus
    from ssseg.modules.utils import SSSegInputStructure

    cfg = copy.deepcopy(cfg)
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    torch.manual_seed(0)
    model = MCIBIPlusPlus(cfg, mode="TRAIN").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    targets = labels.float().masked_fill(labels == 255, -100)
    meta = SSSegInputStructure(images=images, seg_targets=targets, mode="TRAIN")

    def train() -> None:
        model.train()
        model.mode = "TRAIN"
        with _autocast(device, args.bf16):
            loss = model(meta, learning_rate=0.01, epoch=0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward() -> None:
        model.eval()
        model.mode = "TEST"
        with torch.inference_mode(), _autocast(device, args.bf16):
            model(SSSegInputStructure(images=images, mode="TEST"))

    mem = model.memory_module
    b, size = images.shape[0], (args.crop // 8, args.crop // 8)
    feats = torch.randn(b, cfg["head"]["feats_channels"], *size, device=device)
    logits = torch.randn(b, cfg["num_classes"], *size, device=device)
    momentum_cfg = {"base_momentum": 0.1, "base_lr": None, "adjust_by_learning_rate": False}

    def read() -> None:
        mem.eval()
        with torch.inference_mode(), _autocast(device, args.bf16):
            mem(feats, logits)

    def update() -> None:  # the official forward upsamples R to the image size for its update
        with torch.no_grad():
            full = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            mem.update(full, targets, ignore_index=-100, learning_rate=0.01, momentum_cfg=momentum_cfg)

    light = _without_shared_convs(mem).eval()

    def aggregate() -> None:
        with torch.inference_mode(), _autocast(device, args.bf16):
            light(feats, logits)

    return {"train_step": train, "eval_forward": forward, "memory_read": read, "memory_update": update,
            "memory_aggregate": aggregate}


# op-name fragments -> category of the profile (first match wins; self CPU time, so nothing is counted twice)
PROFILE_GROUPS = (
    ("convolution", ("conv", "mkldnn_convolution", "slow_conv")),
    ("batchnorm", ("batch_norm",)),
    ("upsample/interpolate", ("upsample", "grid_sampler")),
    ("softmax/log-softmax/loss", ("softmax", "nll_loss", "cross_entropy")),
    ("matmul/einsum (attention, memory)", ("bmm", "matmul", "einsum", "addmm", " mm", "aten::mm", "baddbmm")),
    ("optimiser", ("sgd", "_foreach", "fused")),
    ("elementwise", ("add", "mul", "relu", "threshold", "div", "sub", "clamp", "where", "dropout", "fill", "zero")),
    ("copies/layout", ("copy", "contiguous", "cat", "clone", "to_dense", "reorder", "permute", "empty_strided")),
)


def profile(fn: Timer, top: int = 12) -> dict:
    """Self CPU time of one call of ``fn`` by category (PROFILE_GROUPS) and its most expensive ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        group = next((g for g, keys in PROFILE_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"self_cpu_s": round(total / 1e6, 3),
            "share": {g: round(v / total, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ops_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", help="override the timm backbone (e.g. resnet50c)")
    ap.add_argument("--classes", type=int, help="override the number of classes (e.g. 20, 150)")
    ap.add_argument("--official-channels", action="store_true", help="feats 512, transform 256, decoder 512, aux 512")
    ap.add_argument("--channels-last", action="store_true", help="ours: NHWC activations (train and eval)")
    ap.add_argument("--fold-bn", action="store_true", help="ours: BatchNorm folded into convolutions for eval")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both (GPU)")
    ap.add_argument("--isa", choices=["avx2", "avx512", "native"], default="native",
                    help="cap the CPU kernels (re-executes with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--skip-memory", action="store_true", help="time only the train step and the eval forward")
    ap.add_argument("--profile", action="store_true", help="add a profile (self CPU time by op category) of one "
                                                           "train step and one eval forward per side")
    ap.add_argument("--official", help="an official config name: build our model from it and time the official "
                                       "implementation too (needs sssegmentation)")
    ap.add_argument("--official-configs", default=None, help="official configs dump (default: the copy in mcibi)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = load_params(args.params)
    model_params = params.model
    if args.backbone:
        model_params = dataclasses.replace(model_params, backbone=dataclasses.replace(model_params.backbone,
                                                                                      name=args.backbone))
    if args.classes:
        model_params = dataclasses.replace(model_params, num_classes=args.classes)
    if args.official_channels:
        model_params = dataclasses.replace(model_params, channels=ChannelParams(512, 256, 512, 512))
    official_cfg = None
    if args.official:
        official_cfg = load_official_config(args.official_configs, args.official)
        if args.classes:
            official_cfg["num_classes"] = args.classes
        model_params = model_params_from_official(args.official, official_cfg)
    params = dataclasses.replace(params, model=model_params)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=gen).to(device)
    labels = torch.randint(0, model_params.num_classes, (args.batch, args.crop, args.crop), generator=gen).to(device)
    labels[:, :8] = 255

    timers = {f"ours.{k}": fn for k, fn in ours(model_params, params, images, labels, args, device).items()}
    if official_cfg is not None:
        timers |= {f"official.{k}": fn for k, fn in official(official_cfg, images, labels, args, device).items()}
    load_before = os.getloadavg()[0]
    times: dict[str, dict] = {}
    whats = ("train_step", "eval_forward") if args.skip_memory else \
        ("train_step", "eval_forward", "memory_read", "memory_update", "memory_aggregate")
    peak: dict[str, float] = {}
    if device.type == "cuda":  # peak memory of one call of the step and the forward, per side
        for name, fn in timers.items():
            if name.endswith((".train_step", ".eval_forward")):
                fn()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize(device)
                peak[name] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    for what in whats:
        group = {k: fn for k, fn in timers.items() if k.endswith(f".{what}")}
        if group:
            if args.repeats > 0:  # --repeats 0: no timing (e.g. only --profile)
                times |= interleaved(group, args.repeats, args.warmup, device)
            else:
                for fn in group.values():
                    for _ in range(args.warmup):
                        fn()
    result = {
        "params": args.params,
        "official_config": args.official,
        "framework": model_params.framework,
        "backbone": model_params.backbone.name,
        "memory": model_params.memory.kind,
        "update_resolution": model_params.memory.update_resolution,
        "classes": model_params.num_classes,
        "batch": args.batch,
        "crop": args.crop,
        "threads": args.threads,
        "device": str(device),
        "machine": machine(args.threads),
        "channels_last": args.channels_last,
        "fold_bn": args.fold_bn,
        "bf16": args.bf16,
        "torch": torch.__version__,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": times,
    }
    if peak:
        result["peak_memory_mb"] = peak
    for side in ("ours", "official"):
        for total, parts in (("memory_read_update", ("memory_read", "memory_update")),
                             ("memory_specific", ("memory_aggregate", "memory_update"))):
            if all(f"{side}.{part}" in times for part in parts):
                times[f"{side}.{total}"] = {stat: sum(times[f"{side}.{part}"][stat] for part in parts)
                                            for stat in ("median", "min", "cpu_median")}
    if official_cfg is not None and times:
        result["speedup"] = {what: round(times[f"official.{what}"]["median"] / times[f"ours.{what}"]["median"], 3)
                             for what in ("train_step", "eval_forward", "memory_read", "memory_update",
                                          "memory_read_update", "memory_aggregate", "memory_specific")
                             if f"ours.{what}" in times}
    if args.profile:
        result["profile"] = {name: profile(fn) for name, fn in timers.items()
                             if name.endswith((".train_step", ".eval_forward"))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
