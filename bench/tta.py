"""Multi-scale + flip evaluation per image, ours (``mcibi.inference.predict_tta``, the path ``mcibi evaluate`` takes)
against the official test-time path (sssegmentation 1.7.0: ``auginference`` then the per-image resize, average and
argmax of its ``test.py``), with the same converted weights, interleaved, medians; prints one JSON object.

Protocols (R-50-D8 UperNet MCIBI++, sizes at ``--size-scale 1``):

- ``lip_msflip_whole``: 473x473, 20 classes, scales 0.75/1/1.25, flip with the left/right part channels swapped,
  whole image, logits averaged;
- ``ade20k_msflip_whole``: 512x683, 150 classes, scales 0.5-1.75, flip, whole image, probabilities averaged;
- ``pascalcontext_msflip_slide``: 520x693, 59 classes, scales 0.5-1.75, flip, sliding window 480/320,
  probabilities averaged.

``--size-scale`` shrinks image, crop and stride alike (CPU default 0.25, so that a 2-core machine finishes in
minutes); ``--isa avx2`` caps the CPU kernels at AVX2. Besides seconds per image it reports how many pixels of the
two class maps agree and the largest difference of the averaged scores, and (CUDA) the peak memory of each side.

    python bench/tta.py --isa avx2 --threads 2 --repeats 3
    python bench/tta.py --device cuda --size-scale 1 --repeats 5
"""

from __future__ import annotations

import argparse
import sys

from benchlib import cap_isa

if __name__ == "__main__" and "--isa" in sys.argv:
    cap_isa(sys.argv[sys.argv.index("--isa") + 1])

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from benchlib import interleaved, machine, official_and_ours, official_available, official_config, sync  # noqa: E402

from mcibi.catalogue.official import model_params_from_official  # noqa: E402
from mcibi.evaluation.inference import predict_tta  # noqa: E402
from mcibi.models import build_segmentor  # noqa: E402
from mcibi.models.folding import fold_batchnorm  # noqa: E402

MS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
PROTOCOLS = {
    "lip_msflip_whole": {"config": "mcibiplusplus_upernet_resnet50os8_lip", "classes": 20, "size": (473, 473),
                         "scales": (0.75, 1.0, 1.25), "mode": "whole", "crop": None, "stride": None, "probs": False},
    "ade20k_msflip_whole": {"config": "mcibiplusplus_upernet_resnet50os8_ade20k", "classes": 150,
                            "size": (512, 683), "scales": MS, "mode": "whole", "crop": None, "stride": None,
                            "probs": True},
    "pascalcontext_msflip_slide": {"config": "mcibiplusplus_upernet_resnet50os8_ade20k", "classes": 59,
                                   "size": (520, 693), "scales": MS, "mode": "slide", "crop": (480, 480),
                                   "stride": (320, 320), "probs": True},
}


def _scaled(hw, f: float):
    return None if hw is None else tuple(max(8, round(v * f)) for v in hw)


def _flip_pairs(cfg: dict) -> list[tuple[int, int]]:
    for step in cfg["dataset"]["train"]["data_pipelines"]:
        if isinstance(step, (list, tuple)) and step[0] == "RandomFlip":
            return [tuple(p) for p in step[1].get("fixed_seg_target_pairs") or []]
    return []


def _peak(device: torch.device, fn) -> float:
    """Peak CUDA memory (MiB) one call allocates beyond what is already held."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def bench_protocol(name: str, spec: dict, args, device: torch.device) -> dict:
    """Time one protocol on one random image, ours and (if importable) the official; check the predictions."""
    size, crop, stride = _scaled(spec["size"], args.size_scale), _scaled(spec["crop"], args.size_scale), \
        _scaled(spec["stride"], args.size_scale)
    cfg = official_config(spec["config"], spec["classes"])
    pairs = _flip_pairs(cfg)
    cfg["inference"] = {"forward": {"mode": spec["mode"], "cropsize": list(crop) if crop else None,
                                    "stride": list(stride) if stride else None},
                        "tta": {"multiscale": list(spec["scales"]), "flip": True,
                                "use_probs_before_resize": spec["probs"], "fixed_seg_target_pairs": pairs or None}}
    if args.official:
        official, ours, model_params = official_and_ours(spec["config"], cfg)
        official = official.to(device)
    else:  # ours alone, random weights
        torch.manual_seed(0)
        model_params = model_params_from_official(spec["config"], cfg)
        ours = build_segmentor(model_params).eval()
    ours = ours.to(device)
    fast = fold_batchnorm(ours).to(memory_format=torch.channels_last)  # evaluate.fold_batchnorm / channels_last
    perm = list(range(spec["classes"]))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    align = model_params.align_corners
    out: dict = {}

    def run_ours(model, layout) -> torch.Tensor:
        with torch.inference_mode():
            scores = predict_tta(model, image.contiguous(memory_format=layout), out_size=size, scales=spec["scales"],
                                 flip=True, flip_permutation=perm if pairs else None, mode=spec["mode"], crop=crop,
                                 stride=stride, probs_before_resize=spec["probs"], align_corners=align,
                                 max_batch=args.window_batch)
            out["ours_scores"] = scores
            return scores.argmax(dim=1)[0].cpu()

    def run_official() -> torch.Tensor:  # ssseg/test.py's per-image path
        with torch.no_grad():
            passes = official.auginference(image)
            resized = [F.interpolate(s[0:1], size=size, mode="bilinear", align_corners=align) for s in passes]
            score = sum(resized) / len(resized)
            out["official_scores"] = score
            return torch.argmax(score[0], dim=0).cpu()

    timers = {"ours": lambda: run_ours(fast, torch.channels_last)}
    if args.plain:
        timers["ours_plain"] = lambda: run_ours(ours, torch.contiguous_format)
    result = {"image": list(size), "classes": spec["classes"], "scales": list(spec["scales"]), "flip": True,
              "mode": spec["mode"], "crop": list(crop) if crop else None, "stride": list(stride) if stride else None,
              "probs_before_resize": spec["probs"], "passes": 2 * len(spec["scales"])}
    if args.official:
        timers["official"] = run_official
        pred_official = run_official()
        pred_ours = run_ours(fast, torch.channels_last)
        got = out["ours_scores"]
        ref = out["official_scores"].to(got.device)
        result["pixels_equal"] = round(float((pred_official == pred_ours).float().mean()), 6)
        result["max_abs_score_diff"] = float((ref - got).abs().max())
        result["score_scale"] = float(ref.abs().max())
        if device.type == "cuda":
            result["peak_memory_mb"] = {"ours": _peak(device, timers["ours"]),
                                        "official": _peak(device, run_official)}
    result["seconds_per_image"] = interleaved(timers, args.repeats, args.warmup, device)
    if args.official:
        s = result["seconds_per_image"]
        result["speedup"] = round(s["official"]["median"] / s["ours"]["median"], 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--size-scale", type=float, help="image, crop and stride factor (default: 1 on CUDA, 0.25 CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window-batch", type=int, default=8, help="evaluate.window_batch for ours")
    ap.add_argument("--isa", choices=["avx2", "avx512", "native"], default="native",
                    help="cap the CPU kernels (re-executes with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--plain", action="store_true", help="also time ours without BatchNorm folding / channels-last")
    ap.add_argument("--no-official", dest="official", action="store_false")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.size_scale is None:
        args.size_scale = 1.0 if device.type == "cuda" else 0.25
    why = official_available() if args.official else "--no-official"
    args.official = why is None
    report = {"bench": "tta", "device": str(device), "machine": machine(args.threads), "size_scale": args.size_scale,
              "repeats": args.repeats, "official": "sssegmentation 1.7.0" if why is None else f"not timed: {why}",
              "protocols": {}}
    for name in args.protocols:
        report["protocols"][name] = bench_protocol(name, PROTOCOLS[name], args, device)
        print(f"{name}: {report['protocols'][name].get('speedup')}", file=sys.stderr)
    report["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
