"""The locked environment: the lock satisfies pyproject.toml's ranges, the conda file is generated from it, and the
environment the tests run in is the lock (so CI tests what a fresh clone installs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib

import pytest
from checkout import ROOT, load_script
from packaging.markers import Marker
from packaging.requirements import Requirement

LOCK = load_script(".ci/lock.py", "lock")
PINS = LOCK.read_pins((ROOT / "requirements.lock").read_text())


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in LOCK.EXTRAS:
        listed += project["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def test_read_pins_takes_versions_and_markers():
    text = ("# header\nnumpy==2.4.6 \\\n    --hash=sha256:ab \\\n    --hash=sha256:cd\n    # via pandas\n"
            "pywin32==312 ; sys_platform == 'win32' \\\n    --hash=sha256:ef\nruamel.yaml==0.19.1\n")
    assert LOCK.read_pins(text) == {"numpy": ("2.4.6", None), "pywin32": ("312", "sys_platform == 'win32'"),
                                    "ruamel-yaml": ("0.19.1", None)}
    assert LOCK.diff({"a": ("1", None), "b": ("2", None)}, {"b": ("3", None), "c": ("1", None)}) == [
        "  a: 1 -> (removed)", "  b: 2 -> 3", "  c: (new) -> 1"]


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_lock_pins_each_dependency_inside_the_pyproject_range(requirement):
    name = LOCK.normalise(requirement.name)
    assert name in PINS, f"requirements.lock has no {name}: run `.venv/bin/python .ci/lock.py compile`"
    version, _ = PINS[name]
    assert requirement.specifier.contains(version, prereleases=True), (
        f"requirements.lock pins {name}=={version} outside pyproject.toml's {requirement}: run "
        f"`.venv/bin/python .ci/lock.py compile`")


def test_every_locked_package_has_hashes():
    text = (ROOT / "requirements.lock").read_text()
    blocks = [b for b in text.split("\n") if b and not b.startswith((" ", "#"))]
    assert blocks and len(blocks) == len(PINS)
    assert all(b.rstrip().endswith("\\") for b in blocks), "a pin without --hash lines"


def test_conda_env_is_generated_from_the_lock():
    expected = LOCK.conda_env((ROOT / "requirements.lock").read_text())
    assert (ROOT / "workflow" / "envs" / "mcibi.yaml").read_text() == expected, (
        "workflow/envs/mcibi.yaml drifted from requirements.lock: run `.venv/bin/python .ci/lock.py env`")


def test_the_installed_environment_is_the_lock():
    """What the tests run with is what the lock says (every package whose marker applies here), so a pass in CI
    is a pass for a fresh clone installed as the README says."""
    wrong = []
    for name, (version, marker) in PINS.items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != version:
            wrong.append(f"{name} {installed or '(missing)'} (lock: {version})")
    assert not wrong, ("this environment is not requirements.lock; reinstall it as the README says "
                       f"({LOCK.INSTALL}): " + ", ".join(wrong))


def test_upgrade_keeps_the_lock_unless_the_suite_passes(tmp_path, monkeypatch, capsys):
    """The new lock is in place while the suite runs (the suite checks its environment against it); a failing
    suite restores the old lock and conda file, a passing one keeps the new ones."""
    old = (ROOT / "requirements.lock").read_text()
    version = PINS["opencv-python-headless"][0]
    new = old.replace(f"opencv-python-headless=={version}", "opencv-python-headless==99.0")
    lock, env = tmp_path / "requirements.lock", tmp_path / "mcibi.yaml"
    lock.write_text(old)
    env.write_text("the old conda file\n")
    monkeypatch.setattr(LOCK, "LOCK", lock)
    monkeypatch.setattr(LOCK, "CONDA_ENV", env)
    monkeypatch.setattr(LOCK, "resolve", lambda upgrade: new)
    in_place = []
    monkeypatch.setattr(LOCK, "run_suite", lambda text: in_place.append(lock.read_text() == text == new) or False)
    assert LOCK.main(["upgrade"]) == 1
    assert lock.read_text() == old and env.read_text() == "the old conda file\n" and in_place == [True]
    assert f"opencv-python-headless: {version} -> 99.0" in capsys.readouterr().out
    monkeypatch.setattr(LOCK, "run_suite", lambda text: True)
    assert LOCK.main(["upgrade"]) == 0
    assert lock.read_text() == new and env.read_text() == LOCK.conda_env(new)
