"""The params files of the model-zoo rows: ``params/<dataset>/<framework>_<backbone>_<memory>.yaml`` plus one
``defaults.yaml`` per dataset, from the rows (:mod:`mcibi.catalogue.rows`) and the official configs shipped
in the package (:func:`mcibi.catalogue.official.load_official_configs`). The files are committed, and the test suite
checks that they are exactly what this module generates (``mcibi catalogue write|check``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mcibi.catalogue.rows import DATASET_TITLES, DATASETS, SECTIONS, Row, backbone_title, rows_of
from mcibi.data.lookup import get_spec
from mcibi.files import write_text
from mcibi.spec.params import DEFAULTS_FILE, EXPONENT_FLOAT, FLOAT_FIRST_CHARS, merge, to_dict
from mcibi.spec.schema import layer_modeline

# pipelines of mcibi.data.specs by crop (the 640 one for ADE20k's Swin-L row; LIP's HRNet row crops 512 from
# the 473 pipeline's 520x520 resize, as its model-zoo row states)
_PIPELINE = {("ade20k", (640, 640)): "640x640"}

# shared by every dataset: execution settings, not part of the model-zoo tables
EXECUTION = {
    "num_workers": 4, "log_every": 50, "channels_last": "auto", "precision": "fp32", "compile": False,
    "sync_batchnorm": True, "checkpoint_every": 2000, "keep_checkpoints": 2,
}
GPUS = 8  # the official runs: 8 GPUs share the total batch
# the official epoch: DistributedSampler over its 8 GPUs, a DataLoader of total / 8 images with drop_last on each
# (every official config's batch_size_per_gpu x 8 is its total batch), whatever GPU count our run uses
SAMPLER = {"kind": "distributed", "replicas": GPUS}


def _backbone(model: dict) -> str:
    """The model zoo's notation of a model section's backbone (R-50-D8, ...)."""
    return backbone_title(model["backbone"]["name"], model["backbone"]["output_stride"])


def _optimizer(cfg: dict, row: Row) -> tuple[dict, dict]:
    """(train.optimizer, train.schedule) from the official scheduler with the model-zoo row's learning rate."""
    sched, opt = cfg["scheduler"], cfg["scheduler"]["optimizer"]
    rules = opt.get("params_rules") or {}
    adamw = opt["type"] == "AdamW"
    optimizer = {
        "name": "adamw" if adamw else "sgd",
        "lr": row.lr,
        "momentum": float(opt.get("momentum", 0.9)),
        "weight_decay": float(opt["weight_decay"]),
        "betas": [float(b) for b in opt.get("betas", (0.9, 0.999))],
        # the official rules match parameter names: its 'norm' rule spares the backbone's norms (named norm*), not
        # the head's BatchNorms (named by position), so it is a name key here, not no_decay_norms
        "no_decay_norms": False,
        "no_decay_keys": sorted(k for k, v in rules.items() if v.get("wd_multiplier") == 0.0) or None,
        "backbone_lr_mult": float(rules.get("backbone_net", {}).get("lr_multiplier", 1.0)),
    }
    warm = sched.get("warmup_cfg") or {}
    schedule = {"power": float(sched.get("power", 0.9)),
                "min_lr": float(sched["min_lr"]) if "min_lr" in sched else round(row.lr * 0.01, 12),
                "warmup_iters": int(warm.get("iters", 0)), "warmup_ratio": float(warm.get("ratio", 1e-6))}
    return optimizer, schedule


def _protocols(row: Row, cfg: dict) -> dict:
    """The row's protocols as params; where the official config's active inference slides, every sliding protocol
    of the row must run its windows as its ``slideinference`` runs them: cropsize and stride read as (h, w), our
    ``slide`` mode (CityScapes' cropsize [1024, 512]: windows 1024 high, 512 wide)."""
    forward = cfg["inference"]["forward"]
    for name, proto in row.protocols.items():
        if forward["mode"] == "slide" and proto.mode != "whole":
            official = (tuple(forward["cropsize"]), tuple(forward["stride"]))
            if (proto.mode, proto.crop, proto.stride) != ("slide", *official):
                raise ValueError(f"mcibi/catalogue/rows.py: {row.dataset}/{row.stem} protocol '{name}' slides "
                                 f"{proto.mode} {proto.crop}/{proto.stride}, but the official {row.official_name} "
                                 f"runs windows {official[0]} and stride {official[1]} as (h, w): state them as "
                                 "mode 'slide' with those values.")
    return {name: proto.params() for name, proto in row.protocols.items()}


def experiment_dict(row: Row, cfg: dict, baseline: bool = False) -> dict:
    """The complete (merged) params of one row, or of its baseline."""
    from mcibi.catalogue.official import model_params_from_official

    spec = get_spec(row.dataset)
    data = spec.data_params(_PIPELINE.get((row.dataset, row.crop)))
    data.update(train_split=row.train_split, eval_split=row.eval_split, crop_size=list(row.crop))
    model = to_dict(model_params_from_official(row.official_name, cfg, pretrained="official"))
    if baseline:
        model["memory"]["kind"] = "none"
    optimizer, schedule = _optimizer(cfg, row)
    per_device = row.batch // GPUS  # every model-zoo batch (8, 16, 32, 40) is a multiple of 8
    title = f"{DATASET_TITLES[row.dataset]}, {SECTIONS[row.section]}"
    what = (f"{'Baseline without memory for' if baseline else 'MCIBI++:'} {row.framework} "
            f"{_backbone(model)} ({title})")
    desc = f"{what}; model switches from the official {row.official_name}"
    if row.note:
        desc += f". Note: {row.note}"
    return {
        "description": desc,
        "data": data,
        "model": model,
        "train": {
            "seed": 0, "total_batch_size": row.batch, "batch_per_device": per_device, "epochs": row.epochs,
            "sampler": dict(SAMPLER), "optimizer": optimizer, "schedule": schedule,
            "loss_weights": {"cls": 1.0, "cwi": 1.0, "pr": 0.4, "aux": 0.4, "memory": 1.0},
            **EXECUTION,
            "resources": {"gpus": GPUS, "cpus_per_gpu": 4, "mem_mb": 128000, "runtime": 1440},
        },
        "evaluate": {
            "protocols": _protocols(row, cfg),
            "channels_last": True, "fold_batchnorm": True, "window_batch": 8,
            "resources": {"gpus": 1, "cpus_per_gpu": 8, "mem_mb": 64000, "runtime": 720},
        },
    }


# keys every experiment file states itself (what its model-zoo row is about), never taken from defaults.yaml
_ROW_KEYS = {("description",), ("data", "train_split"), ("data", "eval_split"), ("data", "crop_size"), ("model",),
             ("train", "total_batch_size"), ("train", "batch_per_device"), ("train", "epochs"),
             ("train", "optimizer"), ("train", "schedule"), ("train", "resources"), ("evaluate", "protocols")}


def _split(d: dict, prefix: tuple = ()) -> tuple[dict, dict]:
    """(row part, shareable part) of a params dict by :data:`_ROW_KEYS`."""
    own, shared = {}, {}
    for k, v in d.items():
        key = (*prefix, k)
        if key in _ROW_KEYS:
            own[k] = v
        elif isinstance(v, dict) and any(r[: len(key)] == key for r in _ROW_KEYS):
            o, s = _split(v, key)
            if o:
                own[k] = o
            if s:
                shared[k] = s
        else:
            shared[k] = v
    return own, shared


def _atomic(d: dict) -> bool:
    """A mapping of scalars (a resize, a protocol, a backbone): shared or stated whole, never split."""
    return not any(isinstance(v, dict) for v in d.values())


def _common(dicts: list[dict]) -> dict:
    """The keys (deeply) whose values are equal in every dict."""
    out = {}
    for k, v in dicts[0].items():
        vals = [d.get(k) for d in dicts]
        if all(isinstance(x, dict) and not _atomic(x) for x in vals):
            sub = _common(vals)
            if sub:
                out[k] = sub
        elif all(x == v for x in vals) and all(k in d for d in dicts):
            out[k] = v
    return out


def _minus(d: dict, base: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not _atomic(v):
            sub = _minus(v, base[k])
            if sub:
                out[k] = sub
        elif k not in base or base[k] != v:
            out[k] = v
    return out


class _Dumper(yaml.SafeDumper):
    """Block mappings, except small mappings of scalars (a backbone, a protocol) and lists of scalars, which
    stay on one line."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(x, dict | list) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flat = all(not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(x, dict | list) for x in v))
               for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flat and len(data) <= 7)


_Dumper.add_representer(list, _list)
_Dumper.add_representer(dict, _dict)
# quote the strings the params loader would read as numbers (1e-2), so that they stay strings
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, FLOAT_FIRST_CHARS)


def _yaml(header: str, data: dict) -> str:
    """A params file: the editor modeline (the schema of a params file), the header as comments, then ``data``."""
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
    head = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return f"{layer_modeline()}\n{head}{body}"


def generate(dataset: str, configs: dict) -> dict[str, str]:
    """File name -> text of every params file of ``dataset`` (``defaults.yaml`` and one file per experiment)."""
    full: dict[str, dict] = {}
    rows = {}
    for row in rows_of(dataset):
        cfg = configs[row.official_name]
        full[row.stem] = experiment_dict(row, cfg)
        rows[row.stem] = (row, False)
        if row.baseline_stem:
            full[row.baseline_stem] = experiment_dict(row, cfg, baseline=True)
            rows[row.baseline_stem] = (row, True)
    parts = {stem: _split(d) for stem, d in full.items()}
    defaults = _common([shared for _, shared in parts.values()])
    files = {DEFAULTS_FILE: _yaml(
        f"Shared settings of the {DATASET_TITLES[dataset]} experiments (the one defaults layer of params/{dataset}/).\n"
        "Generated by `mcibi catalogue write` from the model zoo and the official configs; edit the\n"
        "catalogue (mcibi/catalogue/), not this file. Every experiment file here is merged over it, then\n"
        "validated strictly. Execution settings (precision, channels_last, workers, resources) do not change the\n"
        "trajectory's arithmetic beyond rounding; precision fp32 as the official runs (8 GPUs).", defaults)}
    for stem, (own, shared) in parts.items():
        row, baseline = rows[stem]
        body = merge(_minus(shared, defaults), own)
        ordered = {k: body[k] for k in ("description", "data", "model", "train", "evaluate") if k in body}
        title = f"{DATASET_TITLES[dataset]} / {SECTIONS[row.section]}: {row.framework} {_backbone(full[stem]['model'])}"
        head = (f"{title}, "
                f"{'baseline without memory' if baseline else 'MCIBI++'}\n"
                f"Model-zoo row: crop {row.crop[0]}x{row.crop[1]}, LR/POLICY/BS/EPOCH {row.lr:g}/poly/{row.batch}/"
                f"{row.epochs}, {row.train_split}/{row.eval_split}, columns "
                + ", ".join(row.protocols) + f". Model: official {row.official_name}.\n"
                "Generated by `mcibi catalogue write`; do not edit by hand.")
        files[f"{stem}.yaml"] = _yaml(head, ordered)
    return files


def write_catalogue(params_root: str | Path, configs: dict, datasets: tuple[str, ...] = DATASETS) -> list[Path]:
    """Write every dataset's params files (atomically); return the paths written."""
    written = []
    for ds in datasets:
        for name, text in generate(ds, configs).items():
            path = Path(params_root) / ds / name
            write_text(path, text)
            written.append(path)
    return written


def check_catalogue(params_root: str | Path, configs: dict, datasets: tuple[str, ...] = DATASETS) -> list[str]:
    """Files that differ from (or are missing against) what :func:`generate` writes."""
    bad = []
    for ds in datasets:
        for name, text in generate(ds, configs).items():
            path = Path(params_root) / ds / name
            if not path.is_file() or path.read_text() != text:
                bad.append(str(path))
    return bad
