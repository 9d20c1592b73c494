"""The bench/ scripts run their CPU paths and print the JSON the README reports (figures are not checked: speed
is measured by the scripts, never by timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkout import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402  (bench/gpu.py)

from mcibi.evaluation.inference import predict_slide  # noqa: E402


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_bench_rejects_unknown_override():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"),
                           str(ROOT / "params" / "demo" / "upernet_mcibipp.yaml"), "--set", "train.nope=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "no key 'train.nope'" in proc.stderr


@pytest.mark.slow
def test_gpu_bench_cpu_fallback_writes_one_json(tmp_path):
    """bench/gpu.sh without CUDA: every step runs at toy sizes, one JSON file with the summary."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", "--out", str(out), "--budget", "840"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fallback"] == "cpu" and report["machine"]["cpu"]
    steps = report["steps"]
    for name in ("train", "tta", "ddp_resume"):
        assert steps[name]["ok"], (name, steps[name])
    assert "skipped" in steps["official_step"]
    assert set(steps["train"]["result"]["training"]) == {"fp32", "bf16+cl"}
    ddp = steps["ddp_resume"]["result"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1 and ddp["max_weight_diff_after_resume"] == 0.0
    assert ddp["losses"][-1:] == ddp["resumed_losses"][-1:]
    summary = report["summary"]
    assert summary["resume_matches"] is True and summary["fp32_images_per_s"] > 0
    assert summary["msflip_lip_msflip_whole_images_per_s"] > 0


def test_gpu_summary_ratios():
    """The headline ratios: best bf16 variant against the official fp32 step, MFU, ms+flip images/s."""
    steps = {
        "train": {"result": {"training": {"fp32": {"images_per_s": 10.0, "fraction_of_peak": 0.2},
                                          "bf16+cl": {"images_per_s": 30.0, "fraction_of_peak": 0.4}}}},
        "official_step": {"result": {"seconds": {"official.train_step": {"median": 0.8}},
                                     "speedup": {"train_step": 1.3},
                                     "peak_memory_mb": {"official.train_step": 9000.0}}},
        "tta": {"result": {"protocols": {"ade": {"seconds_per_image": {"ours": {"median": 0.5}}, "speedup": 2.5}}}},
        "ddp_resume": {"result": {"backend": "nccl", "sync_batchnorm": True, "resume_matches": True}},
    }
    s = gpu.summarise(steps, batch=8)
    assert s["official_fp32_images_per_s"] == 10.0 and s["best_bf16_vs_official_fp32"] == 3.0
    assert s["bf16+cl_mfu"] == 0.4 and s["msflip_ade_images_per_s"] == 2.0 and s["msflip_ade_vs_official"] == 2.5
    assert s["official_fp32_peak_memory_mb"] == 9000.0 and s["sync_batchnorm"] and s["ddp_backend"] == "nccl"


def test_slide_windows_in_batches_give_the_same_scores():
    """predict_slide adds each batch of windows into the sum as it goes (bounded memory): any batch size gives
    exactly the scores of one batch holding every window."""
    scale = torch.linspace(0.5, 2.0, 5).view(1, 5, 1, 1)

    class Out(torch.nn.Module):  # per-image arithmetic only, so batch composition cannot change a bit
        def forward(self, x):
            logits = torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :2] ** 2], dim=1) * scale, 2)
            return type("O", (), {"logits": logits})()

    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        ref = predict_slide(Out(), x, crop=(16, 16), stride=(10, 12), probs=True, max_batch=100)
        for batch in (1, 3):
            assert torch.equal(predict_slide(Out(), x, crop=(16, 16), stride=(10, 12), probs=True, max_batch=batch),
                               ref)


@pytest.mark.slow
def test_data_bench_times_both_pipelines_on_the_same_files():
    """bench/data.py at its smallest: our pipeline and the official one over the same written files."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--settings", "lip_473", "--images", "2",
                           "--batch", "1", "--repeats", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    setting = json.loads(proc.stdout)["settings"]["lip_473"]
    assert setting["ours_images_per_s"] > 0 and setting["official_images_per_s"] > 0 and setting["speedup"] > 0
    assert setting["workers_per_gpu"] >= 1 and setting["crop"] == [473, 473]


def test_demo_bench_reads_job_times_from_the_snakemake_log():
    import demo  # bench/demo.py

    log = """Using workflow specific profile profiles/default for setting default command line arguments.

[Mon Nov 30 14:06:07 2026]
localrule train:
    input: data/demo/verified.json
    jobid: 6
    wildcards: dataset=demo, experiment=upernet_baseline
    threads: 1

[Mon Nov 30 14:06:07 2026]
localrule train:
    jobid: 13
    wildcards: dataset=demo, experiment=upernet_mcibipp
[Mon Nov 30 14:08:29 2026]
Finished jobid: 6 (Rule: train)
[Mon Nov 30 14:08:29 2026]
rule evaluate:
    jobid: 9
    reason: Missing output files
    wildcards: dataset=demo, experiment=upernet_baseline, protocol=msflip
    priority: 6
[Mon Nov 30 14:08:50 2026]
Finished jobid: 13 (Rule: train)
[Mon Nov 30 14:09:01 2026]
Finished jobid: 9 (Rule: evaluate)
"""
    jobs = demo.parse_snakemake_log(log)
    assert [(j["rule"], j["jobid"], j["seconds"]) for j in jobs] == [("train", 6, 142), ("train", 13, 163),
                                                                     ("evaluate", 9, 32)]
    assert jobs[2]["wildcards"] == "dataset=demo, experiment=upernet_baseline, protocol=msflip"
    summary = demo.summarise(jobs)
    assert summary["pipeline_s"] == 174 and summary["training_s"] == [142, 163]
    assert summary["before_training_s"] == 0 and summary["after_training_s"] == 11
