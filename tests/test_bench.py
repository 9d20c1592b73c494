"""bench/train.py runs its CPU path and prints the figures the README reports."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_bench_cpu_json():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), str(ROOT / "params" / "demo" / "upernet_mcibipp.yaml"),
         "--iters", "1", "--warmup", "0", "--batch", "2", "--crop", "32", "32", "--eval-size", "40", "40",
         "--eval-images", "1", "--threads", "1", "--variants", "fp32", "bf16+cl",
         "--set", "model.channels={feats: 16, transform: 8, decoder: 16, aux: 16}", "evaluate.window_batch=1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert set(report["training"]) == {"fp32", "bf16+cl"} and report["batch"] == 2 and report["crop"] == [32, 32]
    for figures in report["training"].values():
        assert figures["images_per_s"] > 0 and figures["peak_memory_mb"] > 0 and "achieved_tflops" not in figures
    protocols = report["evaluation"]["protocols"]
    assert set(protocols) == {"ss", "flip", "msflip"} and protocols["msflip"]["scales"] == [0.75, 1.0, 1.25]
    assert all(p["s_per_image_median"] > 0 for p in protocols.values())


def test_train_bench_rejects_unknown_override():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"),
                           str(ROOT / "params" / "demo" / "upernet_mcibipp.yaml"), "--set", "train.nope=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "no key 'train.nope'" in proc.stderr
