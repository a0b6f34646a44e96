"""Eval-time input transform and test-time augmentation, shared by scanning and evaluation.

The normalisation comes from the model card, so training and inference cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .card import ModelCard


def to_input(rgb: np.ndarray | torch.Tensor, card: ModelCard, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) in channels-last memory."""
    t = torch.as_tensor(rgb)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    t = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(card.mean, device=t.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(card.std, device=t.device).view(1, 3, 1, 1) * 255.0
    return ((t - mean) / std).contiguous(memory_format=torch.channels_last)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 rotations/flips of the last two axes (k in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    if k >= 4:
        x = x.flip(-1)
    return x


def predict_logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Logits (N, 1, h, w); with ``tta`` the mean probability of the 8 dihedral views, as a logit.

    A dihedral transform of a region maps the window grid onto itself (the region is
    96 + 32n px on each side), so transforming the output back keeps dense TTA exact. A network
    whose logits the 8 views do not change (``dihedral_invariant``: the p4m one) runs once: the
    8 passes would cost 8x for the same numbers, to rounding; in an ensemble, such members run
    once and the others 8 times.
    """
    if not tta or getattr(net, "dihedral_invariant", False):
        return net(x).float()
    # an ensemble with invariant members (``tta_parts``): their share of the mean logit is the
    # same in every view, so it runs once and only the other members run 8 times
    parts = getattr(net, "tta_parts", None)
    split = parts() if callable(parts) else None
    fixed, varying = (None, net) if split is None else (split[0](x).float(), split[1])
    probs = None
    for k in range(8):
        logit = dihedral_inverse(varying(dihedral(x, k)).float(), k)
        p = torch.sigmoid(logit if fixed is None else logit + fixed)
        probs = p if probs is None else probs + p
    assert probs is not None
    p = (probs / 8.0).clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)
