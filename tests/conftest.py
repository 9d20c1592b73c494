"""Suite-wide pytest hooks: a closing summary of every skipped test and why (so a fresh clone's run says it)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """List each skipped test with its reason, or say that none was skipped."""
    del exitstatus, config
    skipped = terminalreporter.stats.get("skipped", [])
    deselected = len(terminalreporter.stats.get("deselected", []))
    terminalreporter.section("skipped tests")
    if deselected:
        terminalreporter.write_line(f"{deselected} deselected (-m/-k): this is not the whole suite")
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
