"""Time one training step (forward, losses, backward, SGD, memory update) and one eval forward for a params file.

Prints one JSON object. Example (the issue's CPU setting: batch 2, crop 256, 2 threads):

    python bench/step.py params/demo/upernet_mcibipp.yaml --batch 2 --crop 256 --threads 2
    python bench/step.py params/demo/upernet_mcibipp.yaml --backbone resnet50c --official-channels --classes 150
    # against the official implementation (sssegmentation importable), same architecture and inputs:
    python bench/step.py params/demo/upernet_mcibipp.yaml --official mcibiplusplus_upernet_resnet50os8_lip
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from mcibi.models import build_segmentor
from mcibi.official import load_official_config, model_params_from_official
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
    ap.add_argument("--official", help="an official config name: build the model from it and time the official "
                                       "implementation too (needs sssegmentation)")
    ap.add_argument("--official-configs", default=str(Path(__file__).resolve().parents[2] / "shared" / "reference"
                                                      / "official_configs.yaml"))
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
    if official_cfg is not None:
        result["official"] = time_official(official_cfg, images, labels, args, device)
        for key in ("train_step_s", "eval_forward_s"):
            result[f"speedup_{key.removesuffix('_s')}"] = result["official"][key]["median"] / result[key]["median"]
        if "memory_read_update_s" in result:
            result["speedup_memory_read_update"] = (result["official"]["memory_read_update_s"]["median"]
                                                    / result["memory_read_update_s"]["median"])
    print(json.dumps(result, indent=2))


def time_official(cfg: dict, images, labels, args, device) -> dict:
    """The same measurements on the official sssegmentation model (training forward includes its memory update)."""
    import copy

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

    def step():
        model.train()
        model.mode = "TRAIN"
        loss = model(meta, learning_rate=0.01, epoch=0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    train = _timed(step, args.repeats, args.warmup, device)
    model.eval()
    model.mode = "TEST"

    def forward():
        with torch.inference_mode():
            model(SSSegInputStructure(images=images, mode="TEST"))

    evaluation = _timed(forward, args.repeats, args.warmup, device)
    mem = model.memory_module
    c = cfg["head"]["feats_channels"]
    feats = torch.randn(images.shape[0], c, args.crop // 8, args.crop // 8, device=device)
    logits = torch.randn(images.shape[0], cfg["num_classes"], args.crop // 8, args.crop // 8, device=device)
    full = torch.nn.functional.interpolate(feats, size=labels.shape[-2:], mode="bilinear")

    def memory_read_update():
        with torch.no_grad():
            mem(feats, logits)
            mem.update(full, targets, ignore_index=-100, learning_rate=0.01,
                       momentum_cfg={"base_momentum": 0.1, "base_lr": None, "adjust_by_learning_rate": False})

    mem_times = _timed(memory_read_update, args.repeats, args.warmup, device)
    return {"train_step_s": {"median": statistics.median(train), "min": min(train)},
            "eval_forward_s": {"median": statistics.median(evaluation), "min": min(evaluation)},
            "memory_read_update_s": {"median": statistics.median(mem_times), "min": min(mem_times)}}


if __name__ == "__main__":
    main()
