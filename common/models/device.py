"""Device and precision selection: CUDA (bf16 autocast when supported) or CPU (bf16 autocast on CPUs that
multiply bf16 natively, full precision elsewhere).

``FEDTUNE_PRECISION`` = ``auto`` (default) | ``bf16`` | ``fp32`` overrides the choice. Under DP the per-example
gradients are cast to fp32 before Opacus clips them (``client/trainer.py``), so low precision never loosens
the clipping bound the accountant assumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fedtune.common import runtime
from fedtune.common.errors import ConfigError


def pick_device(preference: str | None = None) -> torch.device:
    """``$FEDTUNE_DEVICE`` or ``preference`` if given, else CUDA when present, else CPU."""
    choice = preference or runtime.raw(runtime.DEVICE)
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(probe()) for probe in probes if callable(probe))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` (None = full precision), after ``$FEDTUNE_PRECISION``."""
    choice = runtime.precision()
    if choice not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"{runtime.PRECISION.name}={choice!r} is not a precision: use auto, bf16 or fp32")
    if choice == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if choice == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" or cpu_has_bf16() else None


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision on ``device`` as :func:`autocast_dtype` picks it (parameters stay fp32)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
