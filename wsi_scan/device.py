"""Where a network runs: the device asked for, and mixed precision on it. Shared by scanning
(``inference.py``) and training (``train/``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda, found {name!r}")
    return torch.device(name)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA where supported (fp16 otherwise); nothing on the CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield
    else:
        yield
