"""Memory layout and precision choices of a training step for the device it runs on."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# floats per SIMD register of ATen's CPU kernels: its softmax over contiguous rows is vectorised only for rows at
# least this long (shorter ones run a scalar loop, slower than the strided NCHW softmax)
CPU_VECTOR_FLOATS = {"AVX512": 16, "AVX2": 8}


def class_rows_are_fast(num_classes: int, device: torch.device) -> bool:
    """Whether the cross-entropy should run class-innermost (rows of ``num_classes``) rather than over NCHW."""
    if device.type != "cpu":
        return True
    return num_classes >= CPU_VECTOR_FLOATS.get(torch.backends.cpu.get_cpu_capability(), 10**9)


def nhwc_trains_fast(device: torch.device) -> bool:
    """Whether channels-last convolutions train faster than NCHW here: on CUDA (tensor cores) and on AVX-512 CPUs,
    not on AVX2 CPUs, whose NHWC backward is slower (``bench/results/step_avx2_nhwc_upernet_resnet50os8_lip_20.json``
    against ``step_avx2_nchw_upernet_resnet50os8_lip_20.json``)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def train_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last`` resolved for ``device``: true and false as they are, ``auto`` where NHWC is faster."""
    return nhwc_trains_fast(device) if setting == "auto" else bool(setting)



def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (fp32: none); losses are taken in fp32 inside it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])

