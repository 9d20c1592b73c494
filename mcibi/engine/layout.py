"""Memory layout and precision choices of a training step for the device it runs on."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# floats per SIMD register of ATen's CPU kernels: its softmax over contiguous rows is vectorised only for rows at
# least this long (shorter ones run a scalar loop, about 5x slower than the strided NCHW softmax)
CPU_VECTOR_FLOATS = {"AVX512": 16, "AVX2": 8}


def class_rows_are_fast(num_classes: int, device: torch.device) -> bool:
    """Whether the cross-entropy should run class-innermost (rows of ``num_classes``) rather than over NCHW."""
    if device.type != "cpu":
        return True
    return num_classes >= CPU_VECTOR_FLOATS.get(torch.backends.cpu.get_cpu_capability(), 10**9)


def nhwc_trains_fast(device: torch.device) -> bool:
    """Whether channels-last convolutions train faster than NCHW here: on CUDA (tensor cores) and on AVX-512 CPUs
    (demo step 0.54 vs 0.60 s), not on AVX2 CPUs, whose NHWC backward is slower (1.09x demo, 1.42x R-50-D8)."""
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

