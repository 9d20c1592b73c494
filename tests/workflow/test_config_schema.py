"""The workflow config's schema describes every key, its defaults are the shipped config's values, and the
configuration table of docs/pipeline.md is the one generated from it (.ci/config_docs.py)."""


import pytest
import yaml
from checkout import ROOT, load_script

SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _config_docs():
    return load_script(".ci/config_docs.py", "config_docs")


def test_every_key_of_the_schema_is_described():
    keys = _config_docs().keys(SCHEMA)
    assert {k for k, _ in keys} >= set(SCHEMA["properties"]) | {"experiments.<dataset>", "seeds.<dataset>"}
    undescribed = [k for k, sub in keys if len(sub.get("description", "").split()) < 3]
    assert not undescribed, f"workflow/schemas/config.schema.yaml: keys without a description: {undescribed}"


def test_schema_defaults_are_the_shipped_config():
    config = yaml.safe_load((ROOT / "workflow" / "config.yaml").read_text())
    assert set(config) == set(SCHEMA["properties"]) == set(SCHEMA["required"])
    with_default = {k: sub["default"] for k, sub in SCHEMA["properties"].items() if "default" in sub}
    assert set(with_default) == set(config) - {"experiments"}  # the selection per dataset: all
    assert with_default == {k: config[k] for k in with_default}
    assert SCHEMA["properties"]["experiments"]["additionalProperties"]["default"] == "all"
    assert set(config["experiments"].values()) == {"all"}


def test_docs_hold_the_generated_configuration_table():
    docs = _config_docs()
    page = docs.PAGE.read_text()
    assert docs.render(page, SCHEMA) == page, "docs/pipeline.md is stale: run python .ci/config_docs.py"
    assert "| `seeds` | integer ≥ 1 or map of dataset → integer ≥ 1 | `1` | Runs per experiment" in page
    assert docs.main(["--check"]) == 0


def test_config_docs_finds_a_stale_table(tmp_path, monkeypatch):
    docs = _config_docs()
    stale = docs.PAGE.read_text().replace("| `overlay_images` |", "| `overlay_image` |")
    monkeypatch.setattr(docs, "PAGE", tmp_path / "pipeline.md")
    docs.PAGE.write_text(stale)
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0 and "| `overlay_images` |" in docs.PAGE.read_text()
    docs.PAGE.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        docs.main([])
