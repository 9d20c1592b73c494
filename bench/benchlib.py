"""Shared pieces of the bench/ scripts: interleaved timing, the machine description, the instruction-set cap, and
the official sssegmentation model with our converted twin.

The scripts run as ``python bench/<name>.py`` (this folder is then first on ``sys.path``), so they import this
file as ``benchlib``.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# What ``--isa avx2`` sets before torch starts: ATen's vectorised kernels and oneDNN's convolutions/GEMMs stop at
# AVX2 (no AVX-512, no AMX), which is what a CPU without AVX-512/AMX runs.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
           "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
           "native": {}}


def cap_isa(isa: str) -> None:
    """Re-execute this script with the instruction-set cap of ``isa`` in its environment (it must be set before
    torch loads); a no-op when already set. Call before importing torch."""
    wanted = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    env = dict(os.environ, **wanted)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def cpu_model() -> str:
    """The CPU's model name (lscpu), or the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict:
    """Where the figures come from: CPU model and flags that matter, torch's kernel level, load, GPU."""
    import torch

    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        pass
    info = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags],
        "isa_cap": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    """The versions that decide the figures' rounding (the lock pins them all; these are the ones that compute)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "opencv-python-headless", "numpy", "timm")}


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device="cpu") -> dict[str, dict]:
    """Each function ``warmup`` times, then ``repeats`` rounds of one call of each in turn (so that a change of
    machine load hits all alike); wall-clock median / min and process-CPU median, in seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {k: {"median": round(statistics.median(wall[k]), 5), "min": round(min(wall[k]), 5),
                "cpu_median": round(statistics.median(cpu[k]), 5)} for k in fns}


def official_available() -> str | None:
    """None if sssegmentation imports, else why not (the scripts then time ours alone)."""
    try:
        import ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", reported verbatim
        return f"{type(exc).__name__}: {exc}"
    return None


def official_config(name: str, num_classes: int | None = None, path: Path | None = None) -> dict:
    """An official config (plain data), single-process BatchNorm, no ImageNet download."""
    from mcibi.catalogue.official import load_official_config

    cfg = copy.deepcopy(load_official_config(path, name))
    cfg["backbone"]["pretrained"] = False
    cfg["norm_cfg"] = {"type": "BatchNorm2d"}
    if num_classes:
        cfg["num_classes"] = num_classes
    return cfg


def official_and_ours(name: str, cfg: dict, seed: int = 0):
    """The official MCIBI++ model (TEST mode, eval) with non-trivial state (random BatchNorm statistics and memory,
    as tests/parity/test_parity.py) and our model holding its converted weights: the same function twice."""
    import torch
    from ssseg.modules.models.segmentors.mcibiplusplus.mcibiplusplus import MCIBIPlusPlus

    from mcibi.catalogue.official import model_params_from_official
    from mcibi.models import build_segmentor
    from mcibi.official.checkpoints import convert_official_checkpoint

    model_params = model_params_from_official(name, cfg)
    ours = build_segmentor(model_params).eval()
    torch.manual_seed(seed)
    official = MCIBIPlusPlus(copy.deepcopy(cfg), mode="TEST")
    with torch.no_grad():
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        official.memory_module.memory.data.copy_(torch.rand_like(official.memory_module.memory) + 0.1)
    official.eval()
    ours.load_state_dict(convert_official_checkpoint(official.state_dict(), model_params), strict=True)
    return official, ours, model_params


def override(params, assignments: list[str]):
    """Params with dotted ``key=value`` overrides (values parsed as YAML), validated again."""
    from mcibi.spec.params import params_from_dict, to_dict

    data = to_dict(params)
    for item in assignments:
        key, _, value = item.partition("=")
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if last not in node:
            raise SystemExit(f"--set {item}: no key '{key}' in {params.path}")
        node[last] = yaml.safe_load(value)
    return params_from_dict(data, f"{params.path} with --set")
