"""Training throughput, peak memory and evaluation time per image per protocol for a params file (JSON out).

Times whole training iterations (forward, losses, backward, optimiser step, memory update: ``train_step``) on
random images at the params' crop size, for each requested variant of precision / layout / compile, and one
image per evaluation protocol at the params' test size. With CUDA it also counts the FLOPs of one iteration
(torch's FlopCounterMode) and reports achieved TFLOP/s against the GPU's dense peak for the variant's dtype.

    python bench/train.py params/demo/upernet_mcibipp.yaml                        # CPU, the params as they are
    # GPU, UperNet R-50-D8 MCIBI++ at 512x512, batch 8 (the issue's setting), 150 classes:
    python bench/train.py params/demo/upernet_mcibipp.yaml --device cuda --batch 8 --crop 512 512 \
        --eval-size 512 512 --variants fp32 bf16+cl bf16+cl+compile \
        --set model.backbone.name=resnet50c model.num_classes=150 data.name=ade20k \
        model.channels='{feats: 512, transform: 256, decoder: 512, aux: 512}'

Variants: ``fp32`` | ``bf16`` | ``fp16``, each optionally ``+cl`` (channels-last) and ``+compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from benchlib import override

from mcibi.engine.step import build_optimizer, train_step
from mcibi.evaluation.inference import predict_tta
from mcibi.models import build_segmentor
from mcibi.models.folding import fold_batchnorm
from mcibi.spec.params import ExperimentParams, load_params

# Dense (no sparsity) peak TFLOP/s by GPU name fragment: (bf16/fp16 tensor core, tf32 tensor core, fp32 CUDA core)
PEAK_TFLOPS = {
    "H200": (989.4, 494.7, 66.9),
    "H100 SXM": (989.4, 494.7, 66.9),
    "H100 80GB HBM3": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
}


def parse_variant(name: str) -> dict:
    """``bf16+cl+compile`` -> precision bf16, channels-last, compiled."""
    parts = name.split("+")
    if parts[0] not in ("fp32", "bf16", "fp16") or not set(parts[1:]) <= {"cl", "compile"}:
        raise SystemExit(f"unknown variant {name!r}: use fp32|bf16|fp16 with optional +cl and +compile")
    return {"precision": parts[0], "channels_last": "cl" in parts[1:], "compile": "compile" in parts[1:]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gpu_peak(device: torch.device, precision: str) -> float | None:
    """The GPU's dense peak TFLOP/s for the dtype the convolutions run in (fp32 = TF32 tensor cores if allowed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32 if torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def bench_training(params: ExperimentParams, variant: dict, device: torch.device, batch: int, crop: tuple[int, int],
                   iters: int, warmup: int) -> dict:
    """Images/s, seconds per iteration, peak memory and (CUDA) achieved TFLOP/s of ``train_step``."""
    p = dataclasses.replace(params, train=dataclasses.replace(params.train, precision=variant["precision"]))
    torch.manual_seed(0)
    model = build_segmentor(p.model).to(device)
    layout = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = build_optimizer(model, p)
    runner = torch.compile(model) if variant["compile"] else model
    scaler = torch.amp.GradScaler(device.type) if variant["precision"] == "fp16" else None
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *crop, generator=gen).to(device).contiguous(memory_format=layout)
    labels = torch.randint(0, p.model.num_classes, (batch, *crop), generator=gen).to(device)

    def step() -> None:
        train_step(runner, images, labels, optimizer, p.train.optimizer.lr, p, epoch=0, scaler=scaler)

    for _ in range(warmup):
        step()
    _sync(device)
    flops = None
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            train_step(model, images, labels, optimizer, p.train.optimizer.lr, p, epoch=0, scaler=scaler)
        flops = counter.get_total_flops()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    out = {"images_per_s": round(batch / median, 3), "s_per_iter_median": round(median, 5),
           "s_per_iter_min": round(min(times), 5), "peak_memory_mb": round(peak_memory_mb(device), 1)}
    if flops is not None:
        achieved = flops / median / 1e12
        peak = gpu_peak(device, variant["precision"])
        out |= {"tflop_per_iter": round(flops / 1e12, 4), "achieved_tflops": round(achieved, 2),
                "peak_tflops": peak, "fraction_of_peak": round(achieved / peak, 4) if peak else None}
    return out


def bench_evaluation(params: ExperimentParams, device: torch.device, size: tuple[int, int], images: int,
                     precision: str) -> dict:
    """Seconds per image of each protocol of ``params.evaluate`` on random images of ``size``."""
    torch.manual_seed(0)
    model = build_segmentor(params.model).to(device).eval()
    if params.evaluate.fold_batchnorm:
        model = fold_batchnorm(model)
    layout = torch.channels_last if params.evaluate.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2)).to(device).contiguous(
        memory_format=layout)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    results = {}
    for name, proto in params.evaluate.protocols.items():
        def once(proto=proto) -> None:
            amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                predict_tta(model, x, out_size=size, scales=proto.scales, flip=proto.flip, mode=proto.mode,
                            crop=proto.crop, stride=proto.stride, probs_before_resize=proto.probs_before_resize,
                            align_corners=params.model.align_corners, max_batch=params.evaluate.window_batch)

        once()
        _sync(device)
        times = []
        for _ in range(images):
            t = time.perf_counter()
            once()
            _sync(device)
            times.append(time.perf_counter() - t)
        results[name] = {"s_per_image_median": round(statistics.median(times), 5), "scales": list(proto.scales),
                         "flip": proto.flip, "mode": proto.mode,
                         "crop": list(proto.crop) if proto.crop else None,
                         "stride": list(proto.stride) if proto.stride else None}
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (and return) one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, help="images per iteration (default train.batch_per_device)")
    ap.add_argument("--crop", type=int, nargs=2, help="training crop h w (default data.crop_size)")
    ap.add_argument("--eval-size", type=int, nargs=2, help="evaluation image h w (default data.test_resize.size)")
    ap.add_argument("--iters", type=int, default=5, help="timed training iterations per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compile happens here)")
    ap.add_argument("--eval-images", type=int, default=3, help="timed images per protocol")
    ap.add_argument("--variants", nargs="+", default=["fp32"], help="fp32 | bf16 | fp16, each with +cl, +compile")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override params (YAML values)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = override(load_params(args.params), args.set)
    device = torch.device(args.device)
    batch = args.batch or params.train.batch_per_device
    crop = tuple(args.crop or params.data.crop_size)
    size = tuple(args.eval_size or params.data.test_resize.size)
    report: dict = {
        "bench": "train", "params": str(args.params), "overrides": args.set, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "model": {"framework": params.model.framework, "backbone": params.model.backbone.name,
                  "memory": params.model.memory.kind, "classes": params.model.num_classes},
        "batch": batch, "crop": list(crop), "iters": args.iters, "training": {},
    }
    for name in args.variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["training"][name] = bench_training(params, parse_variant(name), device, batch, crop, args.iters,
                                                  args.warmup)
        print(f"{name}: {report['training'][name]}", file=sys.stderr)
    if not args.no_eval:
        precision = args.eval_precision
        report["evaluation"] = {"image_size": list(size), "precision": precision,
                                "protocols": bench_evaluation(params, device, size, args.eval_images, precision)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
