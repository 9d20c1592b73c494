"""Per-dataset facts the rest of the code reads: classes, ignore index, flip pairs, splits.

The prepared on-disk format (written by :mod:`mcibi.data.prepare`, read by :mod:`mcibi.data.dataset`) is the
same for every dataset::

    <data_root>/<name>/
        manifest.json          name, classes, ignore_index, flip_pairs, image_ext, splits {split: count}
        images/<id><image_ext> RGB images (PNG or JPEG)
        labels/<id>.png        single-channel uint8 PNG of class indices, ignore_index = 255
        splits/<split>.txt     one <id> per line (ids may contain '/')
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255  # the one ignore value used on disk, in losses, metrics and the memory update


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about one dataset."""

    name: str
    classes: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]  # class ids swapped by a horizontal flip (left/right parts)
    splits: dict[str, int]  # documented number of images per split
    image_ext: str
    archives: dict[str, str | None]  # archive file name -> recorded sha256 (None: nothing published)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def flip_permutation(self) -> list[int]:
        """Class index permutation that a horizontal flip applies (identity except the flip pairs)."""
        perm = list(range(self.num_classes))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


DEMO = DatasetSpec(
    name="demo",
    classes=(
        "background",
        "torso",
        "left_arm",
        "right_arm",
        "amber_disk",
        "ochre_disk",
        "square",
        "triangle",
    ),
    flip_pairs=((2, 3),),
    splits={"train": 240, "val": 60},
    image_ext=".png",
    archives={"demo.tar": "5cc1b203447fecd711a96ddd349d7b886f058d26c83f33f1939cc2c39de83e82"},
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (DEMO,)}


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name; the KeyError lists the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})") from None
