"""Strict params loading: complete files load, every kind of mistake names the file and the key."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from checkout import ROOT

from mcibi.spec.params import ParamsError, experiment_files, load_params, params_from_dict, to_dict

DEMO = ROOT / "params" / "demo"


def _copy_demo(tmp_path: Path, experiment: dict) -> Path:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "defaults.yaml").write_text((DEMO / "defaults.yaml").read_text())
    file = folder / "exp.yaml"
    file.write_text(yaml.safe_dump(experiment))
    return file


def test_every_demo_file_loads():
    files = experiment_files(ROOT / "params", "demo")
    assert {f.stem for f in files} >= {"upernet_baseline", "upernet_mcibipp"}
    for f in files:
        p = load_params(f)
        assert p.name == f"demo/{f.stem}"
        assert p.model.num_classes == 8
        assert set(p.evaluate.protocols) == {"ss", "flip", "msflip"}


def test_baseline_and_memory_differ_only_in_memory_kind():
    base = load_params(DEMO / "upernet_baseline.yaml")
    mem = load_params(DEMO / "upernet_mcibipp.yaml")
    assert base.model.memory.kind == "none" and mem.model.memory.kind == "mcibi++"
    assert base.train == mem.train and base.data == mem.data and base.evaluate == mem.evaluate


def test_frozen_and_typed():
    p = load_params(DEMO / "upernet_mcibipp.yaml")
    with pytest.raises(AttributeError):
        p.train.seed = 3  # type: ignore[misc]
    assert isinstance(p.data.crop_size, tuple) and p.data.crop_size == (96, 96)
    assert isinstance(p.train.optimizer.lr, float)


def test_unknown_key_names_file_and_key(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "fcn", "memroy": {"kind": "none"}}})
    with pytest.raises(ParamsError, match=r"exp\.yaml: unknown key 'model\.memroy'"):
        load_params(file)


def test_wrong_type_names_file_and_key(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "fcn"}, "train": {"epochs": "ten"}})
    with pytest.raises(ParamsError, match=r"exp\.yaml: key 'train\.epochs': expected an integer"):
        load_params(file)


def test_bool_is_not_an_int(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "fcn"}, "train": {"seed": True}})
    with pytest.raises(ParamsError, match="train.seed"):
        load_params(file)


def test_missing_key_names_file_and_key(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x"})  # model.framework is in no layer
    with pytest.raises(ParamsError, match=r"exp\.yaml: missing required key 'model\.framework'"):
        load_params(file)


def test_literal_choices_are_listed(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "segformer"}})
    with pytest.raises(ParamsError, match=r"model\.framework.*one of \['fcn', 'psnet', 'upernet', 'deeplabv3'\]"):
        load_params(file)


def test_num_classes_must_match_dataset(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "fcn", "num_classes": 5}})
    with pytest.raises(ParamsError, match="has 8 classes"):
        load_params(file)


def test_slide_protocol_needs_crop(tmp_path):
    proto = {"test_resize": None, "scales": [1.0], "flip": False, "mode": "slide", "crop": None, "stride": None,
             "probs_before_resize": False}
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "fcn"},
                                 "evaluate": {"protocols": {"ss": proto}}})
    with pytest.raises(ParamsError, match="slide mode"):
        load_params(file)


def test_slide_wh_reads_crop_and_stride_as_width_height(tmp_path):
    """``slide`` states windows as (h, w) (the official slideinference's reading), ``slide_wh`` as (w, h); both
    reach inference as (h, w), and the same checks apply to both."""
    window = {"crop": [96, 48], "stride": [64, 40]}
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "upernet"},
                                 "evaluate": {"protocols": {"msflip": {"mode": "slide_wh", **window}}}})
    wh = load_params(file).evaluate.protocols["msflip"]
    assert (wh.mode, wh.crop, wh.stride) == ("slide_wh", (96, 48), (64, 40))
    assert wh.windows_hw() == ((48, 96), (40, 64))
    assert dataclasses.replace(wh, mode="slide").windows_hw() == ((96, 48), (64, 40))
    assert load_params(DEMO / "upernet_mcibipp.yaml").evaluate.protocols["ss"].windows_hw() is None  # whole
    with pytest.raises(ValueError, match="'slide_wh' needs both crop and stride"):  # never silently whole
        dataclasses.replace(wh, crop=None).windows_hw()


@pytest.mark.parametrize(("protocol", "message"), [
    ({"mode": "slide_hw"}, r"key 'evaluate\.protocols\.msflip\.mode': must be one of \['whole', 'slide', 'slide_wh'\]"),
    ({"mode": "slide_wh", "crop": None}, r"protocol 'msflip' uses slide_wh mode: set both 'crop' and 'stride'"),
    ({"mode": "slide_wh", "crop": [96, 48], "stride": [64, 64]},
     r"key 'evaluate\.protocols\.msflip\.stride' \[64, 64\] exceeds the window \[96, 48\]"),
], ids=["unknown-mode", "no-crop", "stride-beyond-window"])
def test_slide_wh_is_validated_like_slide(tmp_path, protocol, message):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "upernet"},
                                 "evaluate": {"protocols": {"msflip": protocol}}})
    with pytest.raises(ParamsError, match=rf"^{file}: .*{message}"):
        load_params(file)


def test_roundtrip_through_plain_dict():
    p = load_params(DEMO / "upernet_mcibipp.yaml")
    assert params_from_dict(to_dict(p), "checkpoint") == p


def test_defaults_file_is_not_an_experiment():
    with pytest.raises(ParamsError, match="defaults layer"):
        load_params(DEMO / "defaults.yaml")


BAD_VALUES = [  # (override of the experiment file, dotted key the error must name)
    ({"model": {"backbone": {"name": "resnet5O"}}}, "model.backbone.name"),
    ({"data": {"train_split": "test"}}, "data.train_split"),
    ({"data": {"eval_split": "testing"}}, "data.eval_split"),
    ({"data": {"test_resize": {"size": [0, 128]}}}, "data.test_resize.size"),
    ({"train": {"schedule": {"min_lr": 0.5}}}, "train.schedule.min_lr"),
    ({"train": {"optimizer": {"momentum": -0.9}}}, "train.optimizer.momentum"),
    ({"train": {"optimizer": {"weight_decay": -1e-4}}}, "train.optimizer.weight_decay"),
    ({"data": {"flip_prob": 1.5}}, "data.flip_prob"),
    ({"data": {"rotation": {"prob": -0.1, "max_degrees": 10}}}, "data.rotation.prob"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"data": {"train_resize": {"ratio_range": [2.0, 0.5]}}}, "data.train_resize.ratio_range"),
    ({"data": {"crop_size": [1024, 1024]}}, "data.crop_size"),
    ({"evaluate": {"protocols": {"ss": {"scales": [0.0]}}}}, "evaluate.protocols.ss.scales"),
    ({"train": {"loss_weights": {"aux": -0.4}}}, "train.loss_weights.aux"),
    ({"train": {"channels_last": 1}}, "train.channels_last"),  # false, true or auto; not 0 or 1
    ({"model": {"backbone": {"pretrained": 1}}}, "model.backbone.pretrained"),  # false, true or official
    ({"train": {"sampler": {"kind": "shuffled"}}}, "train.sampler.kind"),
    ({"train": {"sampler": {"kind": "loader", "replicas": 8}}}, "train.sampler.replicas"),  # one stream
    ({"train": {"sampler": {"kind": "distributed", "replicas": 3}}}, "train.sampler.replicas"),  # batch 8
    ({"train": {"sampler": {"kind": "distributed", "replicas": 0}}}, "train.sampler.replicas"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_out_of_range_values_are_rejected_naming_file_and_key(tmp_path, override, key):
    override = dict(override)
    model = {"framework": "upernet", **override.pop("model", {})}
    file = _copy_demo(tmp_path, {"description": "x", "model": model, **override})
    with pytest.raises(ParamsError, match=rf"^{file}: key '{key}'") as err:
        load_params(file)
    assert err.value.key == key


def test_an_error_in_the_defaults_layer_names_defaults_yaml(tmp_path):
    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "upernet"}})
    defaults = file.parent / "defaults.yaml"
    data = yaml.safe_load(defaults.read_text())
    data["train"]["optimizer"]["weight_decay"] = -1.0
    defaults.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=rf"^{defaults} \(the defaults layer of exp\.yaml\): key "
                       r"'train\.optimizer\.weight_decay'.*Fix it in"):
        load_params(file)
    data["train"]["optimizer"]["weight_decay"] = "lots"  # a type error, and an unknown key, likewise
    defaults.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=rf"^{defaults} \(the defaults layer"):
        load_params(file)
    data["train"]["optimizer"]["weight_decay"] = 0.0
    data["train"]["optimiser_typo"] = 1
    defaults.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=rf"^{defaults} \(the defaults layer.*unknown key 'train\.optimiser_typo'"):
        load_params(file)


def test_validate_command_rejects_an_unknown_backbone(tmp_path, caplog):
    from mcibi.cli import main

    file = _copy_demo(tmp_path, {"description": "x", "model": {"framework": "upernet",
                                                               "backbone": {"name": "resnet_10t"}}})
    assert main(["validate", str(file)]) == 1
    assert "model.backbone.name" in caplog.text and "resnet10t" in caplog.text  # did you mean


def _write_demo(tmp_path: Path, text: str) -> Path:
    """An experiment file written as a person types it (YAML text, not a dump), over the demo defaults."""
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "defaults.yaml").write_text((DEMO / "defaults.yaml").read_text())
    file = folder / "exp.yaml"
    file.write_text("description: x\nmodel: {framework: upernet}\n" + text)
    return file


@pytest.mark.parametrize(("written", "value"), [("1e-2", 0.01), ("1E-2", 0.01), ("1.0e-2", 0.01), ("10e-3", 0.01),
                                                ("2.5e+0", 2.5), ("5e4", 50000.0), (".5e-1", 0.05)])
def test_numbers_in_exponent_notation_are_floats(tmp_path, written, value):
    """YAML 1.2 (and a person) reads 1e-2 as a number; PyYAML's YAML 1.1 resolver alone reads it as a string."""
    file = _write_demo(tmp_path, f"train:\n  optimizer:\n    lr: {written}\n")
    lr = load_params(file).train.optimizer.lr
    assert isinstance(lr, float) and lr == pytest.approx(value)


def test_whole_numbers_written_as_floats_are_integers(tmp_path):
    file = _write_demo(tmp_path, "train:\n  epochs: 1e1\n  resources: {gpus: 0, cpus_per_gpu: 1, mem_mb: 4e3, "
                                 "runtime: 60.0}\n")
    t = load_params(file).train
    assert (t.epochs, t.resources.mem_mb, t.resources.runtime) == (10, 4000, 60)
    assert all(type(v) is int for v in (t.epochs, t.resources.mem_mb, t.resources.runtime))
    file.write_text(file.read_text().replace("epochs: 1e1", "epochs: 2.5"))
    with pytest.raises(ParamsError, match=rf"^{file}: key 'train\.epochs': expected an integer, got 2\.5"):
        load_params(file)


def test_a_quoted_number_stays_a_string(tmp_path):
    file = _write_demo(tmp_path, "train:\n  optimizer:\n    lr: '1e-2'\n")
    with pytest.raises(ParamsError, match=rf"^{file}: key 'train\.optimizer\.lr': expected a number, got '1e-2'"):
        load_params(file)


@pytest.mark.parametrize(("text", "key"), [
    ("train:\n  optimizer:\n    lr: .nan\n", "train.optimizer.lr"),
    ("train:\n  optimizer:\n    lr: .inf\n", "train.optimizer.lr"),
    ("train:\n  optimizer:\n    lr: .NaN\n", "train.optimizer.lr"),
    ("train:\n  schedule: {power: 0.9, min_lr: -.inf, warmup_iters: 0, warmup_ratio: 1.0e-6}\n",
     "train.schedule.min_lr"),
    ("train:\n  epochs: .inf\n", "train.epochs"),
    ("evaluate:\n  protocols:\n    ss: {test_resize: null, scales: [1.0, .nan], flip: false, mode: whole, crop: null, "
     "stride: null, probs_before_resize: false}\n", r"evaluate.protocols.ss.scales[1]"),
], ids=["nan", "inf", "NaN", "minus-inf", "int-inf", "list-item"])
def test_nan_and_infinity_are_refused_naming_file_and_key(tmp_path, text, key):
    file = _write_demo(tmp_path, text)
    with pytest.raises(ParamsError, match=rf"^{file}: key '{re.escape(key)}': expected (a finite number|an integer), "
                       r"got -?(nan|inf)") as err:
        load_params(file)
    assert err.value.key == key and "Fix the value in the params file" in str(err.value)


def test_nan_in_the_defaults_layer_names_defaults_yaml(tmp_path):
    file = _write_demo(tmp_path, "")
    defaults = file.parent / "defaults.yaml"
    defaults.write_text(defaults.read_text().replace("weight_decay: 0.0005", "weight_decay: .nan"))
    with pytest.raises(ParamsError, match=rf"^{defaults} \(the defaults layer of exp\.yaml\): key "
                       r"'train\.optimizer\.weight_decay': expected a finite number, got nan.*Fix it in"):
        load_params(file)
