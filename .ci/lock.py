#!/usr/bin/env python3
"""The locked environment: ``requirements.lock`` (every package, hashes) and the conda file generated from it.

``pyproject.toml`` states the supported ranges; the lock is what the README's commands, ``.ci/run`` and the
workflow install. uv resolves it (universal markers, one version per package on every platform and Python, and
the hashes PyPI publishes); plain pip installs it, so installing needs nothing but the package registry.

    python .ci/lock.py upgrade [PACKAGE ...]   newest versions in the ranges (or of PACKAGE only); a fresh venv
                                               runs the test suite, and the lock is written only if it passes
    python .ci/lock.py compile                 after editing pyproject.toml: resolve, keeping current pins
    python .ci/lock.py env                     regenerate workflow/envs/mcibi.yaml from the lock

Run them with the project's venv (``.venv/bin/python``), which has the locked uv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
CONDA_ENV = ROOT / "workflow" / "envs" / "mcibi.yaml"
EXTRAS = ("test",)  # the lock holds the runtime dependencies and the test extra: one environment for both commands
PYTHON = "3.11"  # the oldest supported Python; the universal lock holds for newer ones too
COMPILE = ["pip", "compile", "pyproject.toml", *(f"--extra={e}" for e in EXTRAS), "--universal",
           f"--python-version={PYTHON}", "--fork-strategy=fewest", "--generate-hashes",
           "--custom-compile-command=python .ci/lock.py compile"]
INSTALL = ("pip install -r requirements.lock && pip install --no-deps --no-build-isolation -e .")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]*?))?\s*\\?$")


def read_pins(text: str) -> dict[str, tuple[str, str | None]]:
    """{normalised name: (version, environment marker or None)} of a uv/pip-compile requirements lock."""
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line)
        if m:
            pins[normalise(m.group(1))] = (m.group(2), m.group(3) or None)
    return pins


def normalise(name: str) -> str:
    """The PEP 503 form of a distribution name (``ruamel.yaml`` and ``ruamel_yaml`` are ``ruamel-yaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def conda_env(lock_text: str) -> str:
    """``workflow/envs/mcibi.yaml`` for ``snakemake --sdm conda``: Python and every locked pin (markers kept, hashes
    dropped: conda's pip section also installs the project itself, which has no hash)."""
    lines = ["# Generated from requirements.lock by `python .ci/lock.py env`; do not edit "
             "(tests/project/test_lock.py).",
             "# Conda environment for `snakemake --sdm conda`: the locked versions, then the project itself.",
             "channels: [conda-forge]",
             "dependencies:",
             f"  - python={PYTHON}",
             "  - pip",
             "  - pip:"]
    for name, (version, marker) in sorted(read_pins(lock_text).items()):
        pin = f"{name}=={version}" + (f" ; {marker}" if marker else "")
        lines.append(f"      - \"{pin}\"")
    lines.append("      - -e ../..")
    return "\n".join(lines) + "\n"


def diff(old: dict, new: dict) -> list[str]:
    """Lines saying what changed between two pin sets."""
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name, (None,))[0], new.get(name, (None,))[0]
        if a != b:
            out.append(f"  {name}: {a or '(new)'} -> {b or '(removed)'}")
    return out


def _uv() -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        sys.exit(f"{Path(__file__).name}: uv is not installed; run this with the project's venv (.venv/bin/python "
                 f".ci/lock.py ...), which installs it from the lock.")
    return uv


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve(upgrade: list[str] | None) -> str:
    """The lock text uv resolves from pyproject.toml: current pins kept, all upgraded (``upgrade == []``) or the
    named packages upgraded."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "requirements.lock"
        if LOCK.exists():
            shutil.copy(LOCK, out)  # uv keeps the pins of an existing output file unless told to upgrade
        flags = [] if upgrade is None else ["--upgrade"] if not upgrade else [f"--upgrade-package={p}" for p in upgrade]
        subprocess.run([_uv(), *COMPILE, *flags, f"--output-file={out}", "--quiet"], cwd=ROOT, check=True)
        return out.read_text()


def run_suite(lock_text: str) -> bool:
    """Install ``lock_text`` into a fresh venv as the README does, and run the test suite with it."""
    with tempfile.TemporaryDirectory(prefix="mcibi-lock-") as tmp:
        venv, lock = Path(tmp) / "venv", Path(tmp) / "requirements.lock"
        lock.write_text(lock_text)
        py = venv / "bin" / "python"
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(py), "-m", "pip", "install", "-q", "-r", str(lock)],
                 [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
                 [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider"]]
        for step in steps:
            print("$", " ".join(step[2:] if step[0] == str(py) else step[1:]), flush=True)
            if subprocess.run(step, cwd=ROOT).returncode != 0:
                return False
        # the editable install wrote a .pth into the throwaway venv only; the project's own venv is untouched
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="newest versions in the ranges; test; write the lock only if the suite passes")
    up.add_argument("packages", nargs="*", help="upgrade only these (default: every package)")
    up.add_argument("--no-test", action="store_true", help="write the new lock without running the suite")
    sub.add_parser("compile", help="resolve after editing pyproject.toml, keeping current pins where they still fit")
    sub.add_parser("env", help="regenerate workflow/envs/mcibi.yaml from the lock")
    args = parser.parse_args(argv)

    old = LOCK.read_text() if LOCK.exists() else ""
    if args.command == "env":
        _write(CONDA_ENV, conda_env(old))
        print(f"wrote {os.path.relpath(CONDA_ENV, ROOT)}")
        return 0
    new = resolve(args.packages if args.command == "upgrade" else None)
    changes = diff(read_pins(old), read_pins(new))
    if not changes and new == old:
        print("requirements.lock is up to date: nothing to upgrade in the ranges of pyproject.toml.")
        return 0
    print("Changes against requirements.lock:", *(changes or ["  (hashes or markers only)"]), sep="\n")
    old_env = CONDA_ENV.read_text() if CONDA_ENV.exists() else None
    _write(LOCK, new)  # in place while the suite runs: the suite checks its environment against the lock
    _write(CONDA_ENV, conda_env(new))
    if args.command == "upgrade" and not args.no_test:
        print("\nRunning the test suite in a fresh venv installed from the new lock ...", flush=True)
        passed = False
        try:
            passed = run_suite(new)
        finally:
            if not passed:
                _write(LOCK, old)
                if old_env is not None:
                    _write(CONDA_ENV, old_env)
        if not passed:
            print("\nThe suite failed with the new versions: requirements.lock is unchanged. Pin the offending "
                  "package in pyproject.toml (or fix the code), then run this again. A release that only moves the "
                  "recorded demo figures: write the lock with --no-test, reinstall, rerun the bench/demo.py commands "
                  "the failing test names, then the suite.", file=sys.stderr)
            return 1
    print(f"\nwrote requirements.lock and {os.path.relpath(CONDA_ENV, ROOT)}; reinstall with: {INSTALL}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
