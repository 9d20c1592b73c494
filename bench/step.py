"""Time one training step (forward, losses, backward, SGD, memory update) and one eval forward for a params file.

Prints one JSON object. Example (the issue's CPU setting: batch 2, crop 256, 2 threads):

    python bench/step.py params/demo/upernet_mcibipp.yaml --batch 2 --crop 256 --threads 2
    python bench/step.py params/demo/upernet_mcibipp.yaml --backbone resnet50c --official-channels --classes 150
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from mcibi.models import build_segmentor
from mcibi.params import ChannelParams, load_params
from mcibi.training import build_optimizer, train_step


def _timed(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", help="override the timm backbone (e.g. resnet50c)")
    ap.add_argument("--classes", type=int, help="override the number of classes (e.g. 20, 150)")
    ap.add_argument("--official-channels", action="store_true", help="feats 512, transform 256, decoder 512, aux 512")
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
    params = dataclasses.replace(params, model=model_params)
    torch.manual_seed(0)
    model = build_segmentor(model_params).to(device)
    optimizer = build_optimizer(model, params)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = torch.randint(0, model_params.num_classes, (args.batch, args.crop, args.crop), device=device)
    labels[:, :8] = 255

    train = _timed(lambda: train_step(model, images, labels, optimizer, 0.01, params, epoch=0), args.repeats,
                   args.warmup, device)
    model.eval()

    def forward():
        with torch.inference_mode():
            model(images)

    evaluation = _timed(forward, args.repeats, args.warmup, device)
    result = {
        "params": args.params,
        "framework": model_params.framework,
        "backbone": model_params.backbone.name,
        "memory": model_params.memory.kind,
        "classes": model_params.num_classes,
        "batch": args.batch,
        "crop": args.crop,
        "threads": args.threads,
        "device": str(device),
        "train_step_s": {"median": statistics.median(train), "min": min(train)},
        "eval_forward_s": {"median": statistics.median(evaluation), "min": min(evaluation)},
        "torch": torch.__version__,
    }
    if model.memory_module is not None:
        mem = model.memory_module
        feats = torch.randn(args.batch, model_params.channels.feats, args.crop // 8, args.crop // 8, device=device)
        logits = torch.randn(args.batch, model_params.num_classes, args.crop // 8, args.crop // 8, device=device)

        def memory_read_update():
            with torch.no_grad():
                mem(feats, logits)
                mem.update(feats, labels, momentum=0.1, resolution=model_params.memory.update_resolution)

        mem_times = _timed(memory_read_update, args.repeats, args.warmup, device)
        result["memory_read_update_s"] = {"median": statistics.median(mem_times), "min": min(mem_times)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
