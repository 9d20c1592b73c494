"""The experiment catalogue, by concern: :mod:`~mcibi.catalogue.rows` (the model-zoo rows, their baselines and the
workflow's experiment selection), :mod:`~mcibi.catalogue.published` (the published mIoU),
:mod:`~mcibi.catalogue.generate` (the params files), :mod:`~mcibi.catalogue.budget` (what each run costs) and
:mod:`~mcibi.catalogue.custom` (a custom dataset's params from a model-zoo row).

    mcibi catalogue write      # regenerate params/<dataset>/ for the seven datasets
    mcibi catalogue check      # exit 1 if a committed file differs from the generated one
    mcibi catalogue budget     # iterations, images, GPU-hours, checkpoint disk per experiment
"""
