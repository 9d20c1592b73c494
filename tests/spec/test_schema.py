"""The params JSON Schemas and reference page: generated from the dataclasses, committed as generated, and in
agreement with the loader on every committed params file and on the mistakes types can express."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from checkout import ROOT

from mcibi.spec.params import DEFAULTS_FILE, ParamsError, load_params, merge, to_dict
from mcibi.spec.schema import (
    COMPLETE_SCHEMA,
    LAYER_SCHEMA,
    REFERENCE_PAGE,
    check_schema_files,
    field_description,
    layer_modeline,
    params_schema,
)

FILES = sorted((ROOT / "params").glob("*/*.yaml"))
DEMO = ROOT / "params" / "demo"


def _validator(rel: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / rel).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _read(file: Path) -> dict:
    from mcibi.spec.params import _read_yaml

    return _read_yaml(file)


def test_committed_schemas_and_reference_are_what_the_dataclasses_generate():
    assert check_schema_files(ROOT) == [], "run `mcibi schema write`"


def test_every_params_file_as_written_validates_against_the_layer_schema():
    layer = _validator(LAYER_SCHEMA)
    assert len(FILES) > 50
    bad = {str(f.relative_to(ROOT)): [e.message for e in layer.iter_errors(_read(f))] for f in FILES}
    assert not {f: errs for f, errs in bad.items() if errs}


def test_every_experiment_merged_with_its_defaults_validates_against_the_complete_schema():
    complete = _validator(COMPLETE_SCHEMA)
    experiments = [f for f in FILES if f.name != DEFAULTS_FILE]
    for file in experiments:
        merged = merge(_read(file.parent / DEFAULTS_FILE), _read(file))
        assert not [e.message for e in complete.iter_errors(merged)], file
    # a part alone is not complete: the experiment file without its defaults lacks keys
    assert not complete.is_valid(_read(DEMO / "upernet_mcibipp.yaml"))
    assert _validator(LAYER_SCHEMA).is_valid(_read(DEMO / "upernet_mcibipp.yaml"))


def _demo_merged() -> dict:
    return merge(_read(DEMO / DEFAULTS_FILE), _read(DEMO / "upernet_mcibipp.yaml"))


MISTAKES = [  # (dotted key, value): mistakes of type, name or allowed value, which schema and loader both refuse
    ("model.memroy", {"kind": "none"}),
    ("train.epochs", "ten"),
    ("train.seed", True),
    ("train.optimizer.lr", "1e-2"),
    ("train.optimizer.lr", True),
    ("model.framework", "segformer"),
    ("model.backbone.pretrained", 1),
    ("model.classifier_kernel", True),
    ("train.channels_last", 1),
    ("data.crop_size", [96, 96, 3]),
    ("evaluate.protocols.ss.scales", []),
    ("evaluate.protocols.ss.mode", "slide_hw"),
    ("evaluate.protocols.extra", {}),
    ("model.init_from", 3),
    ("name", "demo/x"),
]


@pytest.mark.parametrize(("key", "value"), MISTAKES, ids=[f"{k}={v!r}" for k, v in MISTAKES])
def test_the_schema_refuses_what_the_loader_refuses(tmp_path, key, value):
    data = _demo_merged()
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    assert not _validator(COMPLETE_SCHEMA).is_valid(data)
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "exp.yaml").write_text(json.dumps(data))  # JSON is YAML, and quotes the string '1e-2'
    with pytest.raises(ParamsError, match=key.split(".")[0]):
        load_params(folder / "exp.yaml")


def test_whole_numbers_and_exponents_are_numbers_to_both():
    data = _demo_merged()
    data["train"]["epochs"] = 1e1  # YAML 1e1: a whole float, an 'integer' to JSON Schema and to the loader
    data["train"]["optimizer"]["lr"] = 1e-2
    assert _validator(COMPLETE_SCHEMA).is_valid(data)


def test_the_layer_schema_requires_nothing_and_the_complete_one_everything():
    layer, complete = params_schema(complete=False), params_schema(complete=True)
    assert '"required":' not in json.dumps(layer)
    assert complete["required"] == ["description", "data", "model", "train", "evaluate"]
    assert complete["$defs"]["ModelParams"]["required"][-1] == "init_from"  # stated in files, default or not
    for schema in (layer, complete):
        assert all(d["additionalProperties"] is False for d in schema["$defs"].values())
        assert set(schema["properties"]) == {"description", "data", "model", "train", "evaluate"}  # no name, path


def test_descriptions_come_from_the_field_comments():
    from mcibi.spec.params import DataParams, OptimizerParams, ProtocolParams

    assert field_description(OptimizerParams, "lr").startswith("base learning rate")  # trailing comment
    assert field_description(DataParams, "train_sampling").startswith("image: every training image once per epoch; "
                                                                      "frame_per_video:")  # the block above
    assert field_description(ProtocolParams, "mode").endswith("(w, h), the order of the official configs' Resize "
                                                             "sizes ([1024, 512]: windows 512 high, 1024 wide)")


def test_the_reference_page_lists_every_key_of_the_params():
    page = (ROOT / REFERENCE_PAGE).read_text()
    params = to_dict(load_params(ROOT / "params" / "lip" / "deeplabv3_hr48_mcibipp.yaml"))  # msflip resizes

    def keys(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.append(key)
            if isinstance(v, dict):
                out += keys(v, f"{key}.")
        return out

    listed = {k.replace(".protocols.<name>", ".protocols.msflip") for k in
              (line.split("`")[1] for line in page.splitlines() if line.startswith("| `"))}
    wanted = {k for k in keys(params) if "." in k or k == "description"}  # sections are headings (not name, path)
    wanted = {k for k in wanted if not k.startswith(("evaluate.protocols.ss", "evaluate.protocols.flip"))}
    assert wanted == listed
    assert "`mcibi schema write`" in page


def test_params_files_name_the_layer_schema_for_editors():
    line = layer_modeline()
    assert line.startswith("# yaml-language-server: $schema=")
    for file in FILES:
        assert file.read_text().splitlines()[0] == line, file
        assert (file.parent / line.split("=", 1)[1]).resolve() == (ROOT / LAYER_SCHEMA).resolve()


def test_a_field_without_a_comment_is_refused(monkeypatch):
    from mcibi.spec import schema

    comments = copy.deepcopy(schema._field_comments())
    comments["OptimizerParams"]["lr"] = ""
    monkeypatch.setattr(schema, "_field_comments", lambda: comments)
    with pytest.raises(schema.SchemaError, match=r"params\.py: field OptimizerParams\.lr has no comment"):
        params_schema()


def test_schema_command_checks_and_writes(tmp_path, caplog):
    from mcibi.cli import main

    assert main(["schema", "check", "--root", str(ROOT)]) == 0
    assert main(["schema", "check", "--root", str(tmp_path)]) == 1  # nothing generated there yet
    assert "mcibi schema write" in caplog.text
    assert main(["schema", "write", "--root", str(tmp_path)]) == 0
    assert (tmp_path / LAYER_SCHEMA).read_text() == (ROOT / LAYER_SCHEMA).read_text()
    assert main(["schema", "check", "--root", str(tmp_path)]) == 0
