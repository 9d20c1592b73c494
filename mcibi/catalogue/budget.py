"""What each model-zoo row costs to run: iterations, images seen, GPU-hours at an assumed rate, checkpoint disk."""

from __future__ import annotations

from dataclasses import dataclass

from mcibi.catalogue.generate import EXECUTION, SAMPLER
from mcibi.catalogue.rows import Row, rows_of
from mcibi.data.lookup import get_spec
from mcibi.spec.params import SamplerParams
from mcibi.spec.sampler import iterations_per_epoch

# ASSUMED training throughput (images per second per GPU) at a 512x512 crop on an A100/H100-class GPU in fp32/TF32
# with the MCIBI++ head, not measured: replace them with `bench/train.py --device cuda` figures. Other crops scale
# with their pixel count.
ASSUMED_IMAGES_PER_GPU_S = {"r50": 14.0, "r101": 10.0, "s101": 8.0, "hr48": 10.0, "swinl": 6.0}
# parameters of the built models (build_segmentor, pretrained false), for checkpoint sizes
PARAMETERS_M = {"r50": 73, "r101": 133, "s101": 137, "hr48": 106, "swinl": 275}


@dataclass(frozen=True)
class Budget:
    """What one run of a row costs, derived from its schedule (see :func:`budget`)."""

    iterations: int
    images: int
    gpu_hours: float
    checkpoint_gb: float


def budget(row: Row, rate: dict[str, float] | None = None) -> Budget:
    """Iterations = epochs x the training loop's iterations per epoch (the official 8-GPU DistributedSampler
    layout, ceil(N / 8) // (batch / 8); VSPW: N = videos, one frame per video per epoch, as the official sampler),
    images = iterations x batch, GPU-hours = images / (assumed images/s/GPU at 512x512 x 512^2 / crop pixels) /
    3600, checkpoint disk = parameters x 4 bytes x (the final weights + ``keep_checkpoints`` resumable ones holding
    SGD momentum (x2) or AdamW moments (x3))."""
    spec = get_spec(row.dataset)
    iterations = row.epochs * iterations_per_epoch(spec.splits[row.train_split], row.batch, SamplerParams(**SAMPLER))
    images = iterations * row.batch
    per_s = (rate or ASSUMED_IMAGES_PER_GPU_S)[row.backbone] * (512 * 512) / (row.crop[0] * row.crop[1])
    states = 3 if row.backbone == "swinl" else 2
    ckpt = PARAMETERS_M[row.backbone] * 1e6 * 4 * (1 + EXECUTION["keep_checkpoints"] * states) / 1e9
    return Budget(iterations, images, images / per_s / 3600, ckpt)


def budget_markdown(dataset: str) -> str:
    """A markdown table of the dataset's runs: iterations, images, GPU-hours (assumed rate), checkpoint disk."""
    lines = ["| experiment | iterations | images seen | GPU-hours (assumed rate) | checkpoints (GB) |",
             "|---|--:|--:|--:|--:|"]
    total_h = total_gb = 0.0
    for row in rows_of(dataset):
        b = budget(row)
        for stem in (row.stem, row.baseline_stem):
            if stem:
                lines.append(f"| `{stem}` | {b.iterations:,} | {b.images:,} | {b.gpu_hours:.0f} "
                             f"| {b.checkpoint_gb:.1f} |")
                total_h += b.gpu_hours
                total_gb += b.checkpoint_gb
    lines.append(f"| **all** | | | **{total_h:.0f}** | **{total_gb:.1f}** |")
    return "\n".join(lines) + "\n"
