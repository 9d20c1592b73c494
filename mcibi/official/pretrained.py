"""The official ImageNet initialisations (``model.backbone.pretrained: official``): the exact files the official
toolbox (sssegmentation 1.7.0) downloads for each model-zoo backbone, fetched once into a cache (resumable, checked),
their tensor names converted strictly to our timm backbones'.

The official code loads these files with ``load_state_dict(strict=False)``; here every tensor of our backbone must
come from the file (the Swin output norms excepted: the official ones are not in the file either and start as
identities) and every tensor of the file must be used or be one of the listed ImageNet-classifier/constant
tensors, so a wrong file or a renamed layer is an error instead of a silently random backbone.

:func:`build_pretrained_segmentor` is the caller-level builder: the architecture (:mod:`mcibi.models.build`, which
never loads these files), then the official file loaded into its backbone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mcibi.models.build import build_segmentor
from mcibi.official.checkpoints import load_official_file
from mcibi.official.keys import IMAGENET_KEY, IMAGENET_UNUSED
from mcibi.official.mirrors import PRETRAINED_MIRROR_ENV, fetch_first, machine_lock, mirror_from_env

if TYPE_CHECKING:
    from mcibi.models.segmentor import MemorySegmentor
    from mcibi.spec.params import ModelParams

log = logging.getLogger(__name__)

CACHE_ENV = "MCIBI_PRETRAINED_DIR"  # where the files are cached (default ~/.cache/mcibi/pretrained)


@dataclass(frozen=True)
class OfficialWeights:
    """One official ImageNet file: where the official code gets it, how its names map, what it holds besides."""

    structure_type: str  # the official backbone's structure_type (its DEFAULT_MODEL_URLS key)
    url: str  # from the official backbone module's DEFAULT_MODEL_URLS
    family: str  # resnet (ResNetV1c and ResNeSt: deep stem 'stem.*'), hrnet, swin (original Swin release format)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def sha256_prefix(self) -> str | None:
        """The first hex digits of the file's sha256 that its name carries (open-mmlab's ``<name>-<sha256[:8]>``
        convention, the one torch.hub checks); None for files without one (the Swin release)."""
        m = re.search(r"-([0-9a-f]{8,})\.pth$", self.filename)
        return m[1] if m else None


# our timm backbone name (without its pretrained tag) -> the official file of the model-zoo configs' structure_type
OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "resnet50c": OfficialWeights(
        "resnet50conv3x3stem", "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
        "resnet"),
    "resnet101c": OfficialWeights(
        "resnet101conv3x3stem", "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
        "resnet"),
    "resnest101e": OfficialWeights(
        "resnest101", "https://download.openmmlab.com/pretrain/third_party/resnest101_d2-f3b931b2.pth", "resnet"),
    "hrnet_w48": OfficialWeights(
        "hrnetv2_w48", "https://download.openmmlab.com/pretrain/third_party/hrnetv2_w48-d2186c55.pth", "hrnet"),
    "swin_large_patch4_window12_384": OfficialWeights(
        "swin_large_patch4_window12_384_22k",
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_large_patch4_window12_384_22k.pth",
        "swin"),
}


class PretrainedError(RuntimeError):
    """An official ImageNet file is missing, corrupt or does not fit the backbone."""


def official_weights_for(name: str) -> OfficialWeights:
    """The official file for a timm backbone name (its pretrained tag is ignored)."""
    base = name.split(".", 1)[0]
    if base not in OFFICIAL_WEIGHTS:
        raise PretrainedError(
            f"backbone '{name}': no official ImageNet file is known for it (known: {', '.join(OFFICIAL_WEIGHTS)}). "
            "Use pretrained: true (timm's weights) or false.")
    return OFFICIAL_WEIGHTS[base]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mcibi" / "pretrained")


def fetch_official_weights(weights: OfficialWeights, dest: str | Path | None = None) -> Path:
    """The cached official file, downloaded first if needed (``.part`` + HTTP Range resume, then checked).

    The check: the sha256 prefix in the file's name where it has one; otherwise the sha256 recorded at the first
    download (``<file>.sha256.json``, logged as unverified by any published sum). A file that fails is deleted.
    """
    folder = Path(dest) if dest is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with machine_lock(folder, weights.filename):
        return _fetch_locked(weights, folder)


def _fetch_locked(weights: OfficialWeights, folder: Path) -> Path:
    from mcibi.data.download import ArchiveError, checksums

    final = folder / weights.filename
    record = folder / f"{weights.filename}.sha256.json"
    if not final.is_file():
        try:
            _, part = fetch_first([weights.url], final, mirror_from_env(PRETRAINED_MIRROR_ENV))
        except ArchiveError as exc:
            raise PretrainedError(f"{exc}. Or place {weights.filename} (from {weights.url}) in {folder}/.") from exc
        sha = checksums(part)["sha256"]
        prefix = weights.sha256_prefix
        if prefix and not sha.startswith(prefix):
            part.unlink()
            raise PretrainedError(f"{weights.url}: sha256 {sha} does not start with {prefix} as its name says; the "
                                  "download was corrupt and was deleted. Run again.")
        if not prefix:
            log.warning("%s: no published checksum; recording sha256 %s in %s", weights.filename, sha, record)
            record.write_text(json.dumps({"sha256": sha, "url": weights.url, "verified": False}) + "\n")
        os.replace(part, final)
        return final
    sha = checksums(final)["sha256"]
    expected = weights.sha256_prefix or (json.loads(record.read_text())["sha256"] if record.is_file() else None)
    if expected is None:
        log.warning("%s: placed by hand, no checksum to check it against; recording sha256 %s", final, sha)
        record.write_text(json.dumps({"sha256": sha, "url": weights.url, "verified": False}) + "\n")
    elif not sha.startswith(expected):
        raise PretrainedError(f"{final}: sha256 {sha} does not match {expected}. Delete the file and run again.")
    return final


def read_official_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official ImageNet file, read safely (:func:`mcibi.official.checkpoints.load_official_file`),
    unwrapped from 'state_dict' or 'model' and stripped of 'module.'/'backbone.' prefixes as the official loader
    does."""
    state = load_official_file(path, error=PretrainedError, advice="Delete it, run again.")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def official_backbone_to_ours(state: dict[str, torch.Tensor], family: str,
                              ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an official ImageNet state dict to the tensors of our timm ``body`` (``ours``: its state dict).

    Strict: every tensor of ``ours`` must be provided with the same shape and every file tensor must map to one
    of ours or be one of the family's unused tensors; errors list the offenders.
    """
    rename = IMAGENET_KEY[family]
    converted: dict[str, torch.Tensor] = {}
    unused, unknown = [], []
    for key, value in state.items():
        if IMAGENET_UNUSED[family].match(key):
            unused.append(key)
            continue
        new = rename(key)
        if new in ours:
            converted[new] = value
        else:
            unknown.append(key)
    missing = sorted(k for k in ours if k not in converted)
    wrong = [f"{k} {tuple(v.shape)} (ours {tuple(ours[k].shape)})" for k, v in converted.items()
             if tuple(v.shape) != tuple(ours[k].shape)]
    if unknown or missing or wrong:
        raise PretrainedError(f"official {family} weights do not fit the backbone: unexpected {unknown[:6]}, missing "
                              f"{missing[:6]}, shapes {wrong[:6]}. Is the file the one for this backbone?")
    log.info("official weights: %d tensors loaded, %d classifier/constant tensors unused", len(converted), len(unused))
    return {k: v.to(ours[k].dtype) for k, v in converted.items()}


def load_official_backbone(body: nn.Module, name: str, path: str | Path | None = None) -> None:
    """Load the official ImageNet file for timm backbone ``name`` into its features model ``body`` (in place);
    ``path`` defaults to the cached download."""
    weights = official_weights_for(name)
    file = Path(path) if path is not None else fetch_official_weights(weights)
    ours = body.state_dict()
    body.load_state_dict(official_backbone_to_ours(read_official_file(file), weights.family, ours), strict=True)


def build_pretrained_segmentor(params: ModelParams) -> MemorySegmentor:
    """The segmentor of ``params`` (the ``model`` section of an experiment file) with its backbone's ImageNet
    initialisation: random (``pretrained: false``), timm's weights (``true``) or the official file (``official``),
    downloaded once into the cache and loaded strictly into the built backbone. Loading draws no random numbers, so
    every other tensor is initialised exactly as in a model built without it."""
    if params.backbone.pretrained != "official":
        return build_segmentor(params)
    model = build_segmentor(dataclasses.replace(params, backbone=dataclasses.replace(params.backbone,
                                                                                     pretrained=False)))
    load_official_backbone(model.backbone.body, params.backbone.name)
    return model
