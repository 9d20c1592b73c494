"""One command for a CUDA GPU (``bench/gpu.sh``): runs the bench scripts in turn and writes one JSON file.

On one CUDA GPU (the issue's setting: UperNet R-50-D8 MCIBI++, 150 classes, batch 8, crop 512x512), within
``--budget`` seconds (default 480):

1. ``train``: training step images/s, peak memory, TFLOP per iteration, achieved TFLOP/s and MFU (fraction of the
   GPU's dense peak for the dtype) for fp32, bf16, bf16 + channels-last and bf16 + channels-last + compile
   (``bench/train.py``);
2. ``official_step``: the official implementation's fp32 training step and eval forward on the same GPU against
   ours, interleaved (``bench/step.py --official``; needs sssegmentation importable, else recorded as skipped);
3. ``tta``: ms+flip evaluation seconds/image and images/s, ours against the official (``bench/tta.py``);
4. ``ddp_resume``: a one-process ``torchrun`` run over NCCL with SyncBatchNorm, a checkpoint and an exact
   resume (``bench/ddp_resume.py``).

``summary`` then gives bf16 (best variant) / official fp32 step, MFU, ms+flip images/s and whether the resume
matched. Without CUDA it runs the same four steps on the CPU at toy sizes (``"fallback": "cpu"``), which is what
CI checks; the figures are then only a smoke test, and the official R-50-D8 model is left to ``bench/step.py`` and
``bench/tta.py`` (too slow for CI). Every step runs in its own process with a timeout; a failing
step is recorded (its error tail) and the others still run.

    bench/gpu.sh                      # -> bench/results/gpu.json
    bench/gpu.sh --out /tmp/gpu.json --budget 420
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import ROOT, machine, official_available

PARAMS = "params/demo/upernet_mcibipp.yaml"
# The GPU setting, on top of the demo params (any params file works: --params / --set)
GPU_SET = ["model.backbone.name=resnet50c", "model.num_classes=150", "data.name=ade20k",
           "model.channels={feats: 512, transform: 256, decoder: 512, aux: 512}", "model.context_module=ppm"]
CPU_SET = ["model.channels={feats: 16, transform: 8, decoder: 16, aux: 16}"]
OFFICIAL = "mcibiplusplus_upernet_resnet50os8_ade20k"


def run_step(name: str, cmd: list[str], timeout: float, log: Path) -> dict:
    """Run one bench script; its JSON (last stdout object) or the error, with the seconds it took."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "stderr_tail": str(exc.stderr or "")[-2000:],
                "seconds": round(time.perf_counter() - start, 1)}
    with log.open("a") as fh:
        fh.write(f"==== {name}: {' '.join(cmd)}\n{proc.stderr}\n")
    out: dict = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1)}
    text = proc.stdout
    try:
        out["result"] = json.loads(text[text.index("{"):])
    except ValueError:
        out["error"] = f"exit {proc.returncode}, no JSON"
        out["stderr_tail"] = proc.stderr[-2000:]
    if proc.returncode != 0 and "stderr_tail" not in out:
        out["stderr_tail"] = proc.stderr[-2000:]
    return out


def summarise(steps: dict, batch: int) -> dict:
    """The headline figures, from whichever steps succeeded."""
    s: dict = {}
    train = (steps.get("train") or {}).get("result", {}).get("training", {})
    for name, fig in train.items():
        s[f"{name}_images_per_s"] = fig["images_per_s"]
        if fig.get("fraction_of_peak") is not None:
            s[f"{name}_mfu"] = fig["fraction_of_peak"]
    official = (steps.get("official_step") or {}).get("result")
    if official:
        sec = official["seconds"]
        s["official_fp32_images_per_s"] = round(batch / sec["official.train_step"]["median"], 3)
        s["ours_fp32_vs_official_fp32"] = official["speedup"]["train_step"]
        bf16 = [v for k, v in train.items() if k.startswith("bf16")]
        if bf16:
            best = max(v["images_per_s"] for v in bf16)
            s["best_bf16_vs_official_fp32"] = round(best / s["official_fp32_images_per_s"], 3)
        if "peak_memory_mb" in official:
            s["official_fp32_peak_memory_mb"] = official["peak_memory_mb"].get("official.train_step")
    tta = (steps.get("tta") or {}).get("result")
    if tta:
        for name, p in tta["protocols"].items():
            sec = p["seconds_per_image"]
            s[f"msflip_{name}_images_per_s"] = round(1 / sec["ours"]["median"], 3)
            if "speedup" in p:
                s[f"msflip_{name}_vs_official"] = p["speedup"]
    ddp = (steps.get("ddp_resume") or {}).get("result")
    if ddp:
        s["ddp_backend"] = ddp["backend"]
        s["sync_batchnorm"] = ddp["sync_batchnorm"]
        s["resume_matches"] = ddp["resume_matches"]
    return s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    ap.add_argument("--params", default=PARAMS)
    ap.add_argument("--cpu", action="store_true", help="the CPU fallback even if CUDA is available")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    py = sys.executable
    bench = ROOT / "bench"
    why_not_official = official_available()
    if cuda:
        batch, crop, sets = 8, 512, GPU_SET
        steps_cmd = {
            "train": [py, str(bench / "train.py"), args.params, "--device", "cuda", "--batch", str(batch), "--crop",
                      str(crop), str(crop), "--iters", "10", "--warmup", "3", "--no-eval", "--variants", "fp32",
                      "bf16", "bf16+cl", "bf16+cl+compile", "--set", *sets],
            "official_step": [py, str(bench / "step.py"), args.params, "--official", OFFICIAL, "--classes", "150",
                              "--device", "cuda", "--batch", str(batch), "--crop", str(crop), "--repeats", "5",
                              "--warmup", "2", "--skip-memory"],
            "tta": [py, str(bench / "tta.py"), "--device", "cuda", "--size-scale", "1", "--repeats", "3"],
            "ddp_resume": [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(bench / "ddp_resume.py"), args.params, "--batch", "4", "--crop", "256", "256",
                           "--iters", "3", "--more", "2", "--set", *sets],
        }
        shares = {"train": 0.45, "official_step": 0.2, "tta": 0.2, "ddp_resume": 0.15}
    else:
        batch, crop, sets = 2, 32, CPU_SET
        steps_cmd = {
            "train": [py, str(bench / "train.py"), args.params, "--batch", str(batch), "--crop", str(crop), str(crop),
                      "--iters", "1", "--warmup", "0", "--no-eval", "--threads", "1", "--variants", "fp32", "bf16+cl",
                      "--set", *sets],
            "tta": [py, str(bench / "tta.py"), "--protocols", "lip_msflip_whole", "--size-scale", "0.07",
                    "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-official"],
            "ddp_resume": [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(bench / "ddp_resume.py"), args.params, "--batch", "2", "--crop", "32", "32",
                           "--iters", "2", "--more", "1", "--set", *sets],
        }
        shares = {"train": 1 / 3, "tta": 1 / 3, "ddp_resume": 1 / 3}
    report: dict = {"bench": "gpu", "fallback": None if cuda else "cpu", "machine": machine(),
                    "setting": {"params": args.params, "set": sets, "batch": batch, "crop": crop,
                                "official_config": OFFICIAL},
                    "official": "sssegmentation 1.7.0" if why_not_official is None else f"skipped: {why_not_official}",
                    "steps": {}}
    log = args.out.with_suffix(".log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    start = time.perf_counter()
    for name, cmd in steps_cmd.items():
        left = args.budget - (time.perf_counter() - start)
        if name == "official_step" and why_not_official is not None:
            report["steps"][name] = {"ok": False, "skipped": why_not_official}
            continue
        if left <= 5:
            report["steps"][name] = {"ok": False, "skipped": "out of budget"}
            continue
        later = sum(shares[k] for k in list(steps_cmd)[list(steps_cmd).index(name):])
        report["steps"][name] = run_step(name, cmd, left * shares[name] / later, log)
        print(f"{name}: ok={report['steps'][name]['ok']} in {report['steps'][name]['seconds']} s", file=sys.stderr)
    if not cuda:
        report["steps"]["official_step"] = {"ok": False, "skipped": "CPU fallback (bench/step.py --official times the "
                                                                   "official R-50-D8 step on a CPU)"}
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["summary"] = summarise(report["steps"], batch)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
