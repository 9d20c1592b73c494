"""The README's demo, timed: ``snakemake --cores N results/demo`` in a fresh clone of the repository, with the
wall time of every job (from Snakemake's log), the time after the last training job, and the demo table; prints
one JSON object and writes it to ``--out``.

A shared machine's speed drifts with its load, so the run is bracketed by two reference measurements taken in
the same minutes: the seconds ``import torch, timm`` takes in a fresh process (what every job pays before it
works) and the median demo training step (MCIBI++, 1 thread: what the training jobs repeat 240 times).

    python bench/demo.py                      # all cores, bench/results/demo.json
    python bench/demo.py --cores 2 --keep     # keep the working copy (its path is in the JSON)
    python bench/demo.py --isa avx2           # every job capped at AVX2, as on a CPU without AVX-512
    python bench/demo.py --epochs 1 --out bench/results/demo_reduced.json   # the reduced demo of the tests

The JSON records the table's mIoU figures and the versions that make them (torch, OpenCV, NumPy, timm): the demo
is seeded end to end, so the same environment on the same kind of CPU gives the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchlib import ISA_ENV, cap_isa, machine, versions

ROOT = Path(__file__).resolve().parents[1]

_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def parse_snakemake_log(text: str) -> list[dict]:
    """Jobs of a Snakemake log as ``{rule, jobid, wildcards, start, end, seconds}`` (times in seconds since the
    first stamp; the log stamps whole seconds), in order of start."""
    jobs: dict[int, dict] = {}
    stamp = first = None
    current = None  # the job whose description is being printed
    for line in text.splitlines():
        if m := _STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
            first = stamp if first is None else first
            current = None
        elif m := _START.match(line):
            current = {"rule": m.group(1), "start": stamp - first, "wildcards": ""}
        elif current is not None and (m := _JOBID.match(line)):
            current["jobid"] = int(m.group(1))
            jobs[current["jobid"]] = current
        elif current is not None and (m := _WILDCARDS.match(line)):
            current["wildcards"] = m.group(1)
        elif m := _FINISHED.match(line):
            job = jobs[int(m.group(1))]
            job["end"] = stamp - first
            job["seconds"] = job["end"] - job["start"]
    return sorted(jobs.values(), key=lambda j: (j["start"], j["jobid"]))


def summarise(jobs: list[dict]) -> dict:
    """Pipeline seconds (first job start to last job end), seconds per rule, and the time after the last
    training job ended (evaluations, figures and the table that wait for it)."""
    done = [j for j in jobs if "end" in j]
    end = max(j["end"] for j in done)
    trains = [j for j in done if j["rule"] == "train"]
    per_rule: dict[str, list] = {}
    for j in done:
        per_rule.setdefault(j["rule"], []).append({"wildcards": j["wildcards"], "seconds": j["seconds"]})
    return {
        "pipeline_s": end - min(j["start"] for j in done),
        "before_training_s": min(j["start"] for j in trains) if trains else None,
        "training_s": [j["seconds"] for j in trains],
        "after_training_s": end - max(j["end"] for j in trains) if trains else None,
        "jobs": per_rule,
    }


def _reference(python: str) -> dict:
    """Seconds of ``import torch, timm`` in a fresh process, and the median MCIBI++ demo training step."""
    t = time.perf_counter()
    subprocess.run([python, "-c", "import torch, timm"], check=True)
    imports = time.perf_counter() - t
    code = (
        "import statistics, time, torch\n"
        "torch.set_num_threads(1)\n"
        "from mcibi.spec.params import load_params\n"
        "from mcibi.models import build_segmentor\n"
        "from mcibi.engine.step import build_optimizer, train_step\n"
        f"p = load_params({str(ROOT / 'params' / 'demo' / 'upernet_mcibipp.yaml')!r})\n"
        "torch.manual_seed(0)\n"
        "m = build_segmentor(p.model)\n"
        "opt = build_optimizer(m, p)\n"
        "x, y = torch.randn(8, 3, 96, 96), torch.randint(0, 8, (8, 96, 96))\n"
        "ts = []\n"
        "for i in range(8):\n"
        "    t = time.perf_counter()\n"
        "    train_step(m, x, y, opt, 0.01, p, epoch=0)\n"
        "    ts.append(time.perf_counter() - t)\n"
        "print(statistics.median(ts[2:]))\n"
    )
    step = float(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)
    return {"import_torch_timm_s": round(imports, 2), "demo_train_step_s": round(step, 3)}


def table_miou(table: str) -> dict[str, list[float]]:
    """{experiment: [mIoU, mIoU (flip), mIoU (ms+flip)]} of a demo ``table.md`` (its rows in the params' order:
    baseline, then MCIBI++)."""
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| UperNet")]
    names = {"-": "upernet_baseline", "MCIBI++": "upernet_mcibipp"}
    return {names[r[2].strip()]: [float(c.strip().rstrip("%")) for c in r[7:10]] for r in rows}


def _set_epochs(defaults: Path, epochs: int) -> None:
    """Train the demo for ``epochs`` epochs (the line ``epochs: N`` of its defaults; comments kept)."""
    text = defaults.read_text()
    new = re.sub(r"^(  epochs: )\d+", rf"\g<1>{epochs}", text, count=1, flags=re.M)
    if new == text:
        raise SystemExit(f"{defaults}: no 'epochs:' line under train to set")
    defaults.write_text(new)


def _fresh_clone(dest: Path) -> None:
    """A clone of the repository (DVC needs a git repository) with the working tree's tracked files copied over
    it, so that uncommitted edits are timed too."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", default="all", help="snakemake --cores (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo.json")
    ap.add_argument("--keep", action="store_true", help="keep the working copy")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), default="native",
                    help="cap the CPU kernels of every job (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--epochs", type=int, help="train this many epochs instead of the demo's (the tests run 1)")
    a = ap.parse_args()
    cap_isa(a.isa)  # the jobs and the reference measurements inherit the cap

    bindir = Path(sys.executable).parent
    snakemake = shutil.which("snakemake", path=str(bindir)) or shutil.which("snakemake")
    if snakemake is None:
        raise SystemExit("snakemake is not installed next to this Python: pip install -e . first")
    work = Path(tempfile.mkdtemp(prefix="mcibi-demo-")) / "mcibi"
    _fresh_clone(work)
    if a.epochs is not None:
        _set_epochs(work / "params" / "demo" / "defaults.yaml", a.epochs)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    before = _reference(sys.executable)
    t = time.perf_counter()
    proc = subprocess.run([snakemake, "--cores", a.cores, "results/demo"], cwd=work, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    after = _reference(sys.executable)
    (work / "demo.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed (rc {proc.returncode}); its log: {work / 'demo.log'}")
    table = (work / "results" / "demo" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| UperNet")]
    report = {
        "bench": "demo",
        "command": " ".join(["python", "bench/demo.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        "cores": a.cores,
        "epochs": a.epochs,
        "snakemake_wall_s": round(wall, 1),
        **summarise(parse_snakemake_log(proc.stdout + proc.stderr)),
        "reference_before": before,
        "reference_after": after,
        "table_rows": [" | ".join(row.split("|")[1:10]).strip() for row in rows],
        "miou": table_miou(table),
        "workdir": str(work) if a.keep else None,
    }
    if not a.keep:
        shutil.rmtree(work.parent, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
