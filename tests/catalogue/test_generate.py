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
