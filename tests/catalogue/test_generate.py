"""The catalogue's YAML writer: what it writes reads back as the same values through the params loader."""

from mcibi.catalogue.generate import _yaml
from mcibi.spec.params import _read_yaml
from mcibi.spec.schema import layer_modeline


def test_strings_that_look_like_numbers_stay_strings(tmp_path):
    """The loader reads 1e-2 as a number (YAML 1.2); the writer quotes such a string, and writes floats as floats."""
    data = {"description": "1e-2", "name": "5E+4", "lr": 0.01, "min_lr": 1e-6, "size": [1.5e-05, 2]}
    text = _yaml("a header", data)
    assert text.splitlines()[:2] == [layer_modeline(), "# a header"]
    file = tmp_path / "p.yaml"
    file.write_text(text)
    assert _read_yaml(file) == data


def test_headers_speak_of_model_zoo_rows():
    """Each experiment file's header names the model-zoo row it carries (train.seed is the one seed)."""
    import re

    from mcibi.catalogue.generate import generate
    from mcibi.catalogue.official import load_official_configs
    from mcibi.catalogue.rows import DATASETS

    configs = load_official_configs()
    for ds in DATASETS:
        for name, text in generate(ds, configs).items():
            assert not re.search(r"(?i)seed (rows?|pages?|tables?|model zoo)", text), (ds, name)
            if name != "defaults.yaml":
                assert text.splitlines()[2].startswith("# Model-zoo row: crop "), (ds, name)
