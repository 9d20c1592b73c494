"""Official MCIBI++ checkpoints: read them safely and convert them to our parameter names."""

from __future__ import annotations

from pathlib import Path

import torch

from mcibi.models.checkpoint import CheckpointError

# ------------------------------------------------------------------------------ official checkpoint conversion
# The official toolbox names our modules the same way except the backbone (its ResNetV1c deep stem is
# ``stem.{0,1,3,4,6,7}``; timm's resnet*c is ``conv1.{0,1,3,4,6}`` + ``bn1``) and the fixed memory noise, which
# it redraws on every forward instead of storing.
_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4.",
         "stem.6.": "conv1.6.", "stem.7.": "bn1."}


def official_key_to_ours(key: str) -> str:
    """Our parameter name for an official MCIBI++ tensor name."""
    if key.startswith("backbone_net."):
        rest = key[len("backbone_net."):]
        for old, new in _STEM.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return "backbone.body." + rest
    return key


def convert_official_checkpoint(state_dict: dict[str, torch.Tensor], model_params) -> dict[str, torch.Tensor]:
    """Turn an official MCIBI++ state dict into ours for ``model_params`` (the ``model`` section of a params file).

    Strict: every official tensor must map to one of ours with the same shape and every one of ours must be
    provided (the fixed memory noise, which the official code does not store, is filled with the official
    draws). Errors name the offending tensors.
    """
    from mcibi.models import build_for_weights

    if isinstance(state_dict.get("model"), dict):  # a full training checkpoint: {'model': ..., 'optimizer': ...}
        state_dict = state_dict["model"]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    model = build_for_weights(model_params)
    ours = model.state_dict()
    if model_params.backbone.name.startswith("swin"):
        from mcibi.official.keys import official_swin_to_ours

        state_dict = official_swin_to_ours(state_dict)
    converted = {official_key_to_ours(k): v for k, v in state_dict.items()}
    derived = [k for k in ours if k.endswith("memory_module.noise")]
    for key in derived:
        converted.setdefault(key, ours[key])
    unexpected = sorted(k for k in converted if k not in ours)
    missing = sorted(k for k in ours if k not in converted)
    if unexpected or missing:
        raise CheckpointError(
            f"official checkpoint does not match {model_params.framework}/{model_params.backbone.name}: "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}, "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}. Check the params file matches the checkpoint."
        )
    wrong = [f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in converted.items()
             if tuple(v.shape) != tuple(ours[k].shape)]
    if wrong:
        raise CheckpointError(f"official checkpoint tensor shapes differ: {'; '.join(wrong[:8])}.")
    return {k: v.to(ours[k].dtype) if v.is_floating_point() else v for k, v in converted.items()}


def load_official_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ``.pth`` safely (``weights_only=True``: no pickled code runs) and return its tensors."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file. Give the path of the official .pth (`mcibi released download` "
                              "fetches the authors' released ones).")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{file}: cannot be read with weights_only=True ({exc}). It may hold pickled objects besides tensors; "
            "re-save only its 'model' state dict in a trusted environment."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict.")
    return state
