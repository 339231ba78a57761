"""Device and precision selection: CUDA (bf16 autocast when supported) or CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def pick_device(preference: str | None = None) -> torch.device:
    """``$FEDTUNE_DEVICE`` or ``preference`` if given, else CUDA when present, else CPU."""
    choice = preference or os.environ.get("FEDTUNE_DEVICE", "")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA devices that support it (fp16 otherwise); full precision on CPU."""
    if device.type != "cuda":
        yield
        return
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield
