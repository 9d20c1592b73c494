"""Dataset specs by name: the built-in ones (:mod:`mcibi.data.specs`) and the custom datasets registered as
``datasets/<name>.yaml`` (:mod:`mcibi.data.custom`). Imports neither torch nor pandas (the workflow's parse step
reads specs through it)."""

from __future__ import annotations

from mcibi.data.custom import custom_spec, registered_datasets
from mcibi.data.specs import DATASETS, DatasetSpec


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name: a built-in one, or a custom dataset registered as ``datasets/<name>.yaml``
    (:mod:`mcibi.data.custom`); the KeyError lists the valid names."""
    if name in DATASETS:
        return DATASETS[name]
    spec = custom_spec(name)
    if spec is None:
        known = sorted(DATASETS) + registered_datasets()
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(known)}; a custom dataset needs "
                       f"datasets/{name}.yaml, see `mcibi new-dataset`)")
    return spec


def resolve(dataset: str | DatasetSpec) -> DatasetSpec:
    """A spec from a name or a spec (tests pass modified specs, e.g. miniature split sizes or checksums)."""
    return dataset if isinstance(dataset, DatasetSpec) else get_spec(dataset)
