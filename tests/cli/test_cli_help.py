"""`mcibi --help` lists the commands in groups, one line each, what users run first and the workflow's plumbing
last; every command the workflow's rules call still parses; docs/cli.md's command reference is the parser's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from checkout import ROOT

from mcibi.cli import GROUPS, REFERENCE_BEGIN, build_parser, main, reference_markdown


def test_help_lists_the_groups_with_one_line_per_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    titles = [title for title, _ in GROUPS]
    assert [text.index(f"\n{t}:\n") for t in titles] == sorted(text.index(f"\n{t}:\n") for t in titles)
    assert titles[0].startswith("Train") and titles[-1].startswith("Workflow plumbing")
    parser = build_parser()
    listed = [p.prog.split()[-1] for _, parsers in parser.command_groups for p in parsers]
    lines = {name: [line for line in text.splitlines() if re.match(rf"  {re.escape(name)}\s", line)]
             for name in listed}
    assert all(len(found) == 1 and len(found[0]) <= 100 for found in lines.values()), lines
    plumbing = text[text.index(titles[-1]):]
    assert all(name in plumbing for name in ("dvc-commit", "mlflow-init")) and "  train " not in plumbing
    assert text.index("  train ") < text.index("  dvc-commit ")


def test_every_command_is_in_one_group_and_the_rules_commands_parse():
    parser = build_parser()
    listed = [p.prog.split()[-1] for _, parsers in parser.command_groups for p in parsers]
    assert len(listed) == len(set(listed)) == 21
    rules = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    calls = re.findall(r"(?:\bmcibi|\{params\.launcher\}) ([a-z][a-z-]+)([^\"\n]*)", rules)
    assert {"train", "evaluate", "export", "dvc-commit", "mlflow-init", "figures", "table"} <= {c for c, _ in calls}
    sub = {p.prog.split()[-1]: p for _, parsers in parser.command_groups for p in parsers}
    for command, rest in calls:
        assert command in listed, command
        flags = {f for a in sub[command]._actions for f in a.option_strings}
        assert set(re.findall(r"(--[a-z][a-z-]*)", rest)) <= flags, (command, rest)
    for argv, key, value in ((["train", "p.yaml", "--no-mlflow"], "no_mlflow", True),
                             (["train", "p.yaml", "--no-tracking"], "no_mlflow", True),
                             (["evaluate", "p.yaml", "--checkpoint", "m.pt", "--protocol", "ss", "--no-mlflow"],
                              "no_mlflow", True),
                             (["figures", "p.yaml", "--run-dir", "r", "--no-tracking"], "no_mlflow", True),
                             (["new-dataset", "d.yaml", "--from", "lip/x"], "row", "lip/x"),
                             (["log-run", "runs/demo/x"], "run_dir", Path("runs/demo/x")),
                             (["dvc-commit", "--record", "r.txt"], "target", "data.dvc")):
        assert getattr(parser.parse_args(argv), key) == value


def test_docs_command_reference_is_generated_from_the_parser():
    page = (ROOT / "docs" / "cli.md").read_text()
    assert REFERENCE_BEGIN in page
    assert reference_markdown() in page, ("docs/cli.md's command reference differs from the parser: run "
                                          "`python -c 'from mcibi.cli import update_reference; update_reference()'`")
