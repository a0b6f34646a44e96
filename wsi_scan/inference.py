"""Running a model: device choice, mixed precision, dense and patch execution on regions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
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


class Predictor:
    """A loaded model bound to a device and a mode; classifies the cells of block images.

    ``dense``: one forward pass over the whole block image; each output is one window's logit.
    ``patch``: the block's 96x96 windows of tissue cells, in batches (any classifier).
    Both see the very same pixels, so they agree to float precision.
    """

    def __init__(self, net: torch.nn.Module, card: Any, device: torch.device, mode: str,
                 tta: bool = False, batch_size: int = 256, amp: bool = True) -> None:
        if mode == "auto":
            mode = "dense" if card.dense_exact else "patch"
        if mode == "dense" and not card.dense_exact:
            raise UsageError(f"model {card.name!r} ({card.arch}) is not dense-exact; use --mode patch or auto")
        if mode not in ("dense", "patch"):
            raise UsageError(f"mode must be auto, dense or patch, found {mode!r}")
        self.card = card
        self.device = device
        self.mode = mode
        self.tta = tta
        self.batch_size = batch_size
        self.amp = amp and device.type == "cuda"
        self.net = net.to(device).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def _probs(self, rgb: np.ndarray) -> np.ndarray:
        from .model.transforms import predict_logits, to_input

        x = to_input(rgb, self.card, self.device)
        with autocast(self.device, self.amp):
            logits = predict_logits(self.net, x, self.tta)
        return torch.sigmoid(logits.float()).cpu().numpy()

    def predict_block(self, region: np.ndarray, cells: np.ndarray) -> np.ndarray:
        from .regions import block_windows

        out = np.full(cells.shape, np.nan, dtype=np.float32)
        if not cells.any():
            return out
        if self.mode == "dense":
            probs = self._probs(region)[0, 0]
            out[cells] = probs[cells]
            return out
        windows = block_windows(region, cells, self.card.input_px, self.card.cell_px)
        vals = [self._probs(windows[i : i + self.batch_size]).reshape(-1) for i in range(0, len(windows), self.batch_size)]
        out[cells] = np.concatenate(vals)
        return out
