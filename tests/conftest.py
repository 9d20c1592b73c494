"""Suite-wide pytest hooks: a closing summary of every skipped test and why (so a fresh clone's run says it)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """List each skipped test with its reason, or say that none was skipped."""
    del exitstatus
    skipped = terminalreporter.stats.get("skipped", [])
    deselected = terminalreporter.stats.get("deselected", [])
    cluster = sum(1 for item in deselected if getattr(item, "get_closest_marker", lambda _: None)("cluster"))
    terminalreporter.section("skipped tests")
    if "cluster" not in (config.option.markexpr or ""):  # tests/cluster/conftest.py: root and a local SLURM
        count = f"{cluster} " if cluster else ""  # (pytest-xdist's workers deselect them: no count here then)
        terminalreporter.write_line(f"the {count}SLURM cluster tests (tests/cluster) are deselected: CI runs them in "
                                    "its own step, `.ci/cluster` (pytest tests/cluster -m cluster -n 0; "
                                    "docs/scaling.md)")
    if len(deselected) > cluster:
        terminalreporter.write_line(f"{len(deselected) - cluster} deselected (-m/-k): this is not the whole suite")
    if not skipped:
        terminalreporter.write_line("none skipped: every selected test ran (the official toolbox parity tests "
                                    "included)")
        return
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores as torch threads (no oversubscription)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
