"""Predict and score a model on labelled patches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..inference import autocast, resolve_device
from ..io.checkpoint import LoadedModel
from ..io.datasets import PatchSet
from ..model.card import ModelCard
from ..model.transforms import predict_logits, to_input
from .data import RowsDataset, make_loader
from .metrics import BinaryMetrics, binary_metrics


@torch.inference_mode()
def predict_probs(
    net: torch.nn.Module,
    card: ModelCard,
    ds: RowsDataset,
    device: torch.device,
    batch_size: int = 256,
    tta: bool = False,
    workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    net.eval()
    out: list[np.ndarray] = []
    loader = make_loader(ds, epoch=0, seed=0, batch_size=batch_size, workers=workers, shuffle=False)
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        with autocast(device):
            logits = predict_logits(net, to_input(x, card, device), tta=tta)
        out.append(torch.sigmoid(logits.float()).reshape(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class Evaluation:
    metrics: BinaryMetrics
    probs: np.ndarray
    labels: np.ndarray
    dataset: str
    tta: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics.to_dict(), "dataset": self.dataset, "tta": self.tta}


def evaluate_patchset(
    model: LoadedModel,
    ps: PatchSet,
    device: str = "auto",
    batch_size: int = 256,
    tta: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Evaluation:
    dev = resolve_device(device)
    net = model.net.to(dev).to(memory_format=torch.channels_last)
    rows = np.stack([np.zeros(len(ps), dtype=np.int64), np.arange(len(ps))], axis=1)
    probs = predict_probs(
        net, model.card, RowsDataset([ps], rows), dev, batch_size, tta, workers, progress, desc=ps.name
    )
    labels = ps.labels
    return Evaluation(binary_metrics(labels, probs, model.card.threshold), probs, labels, ps.name, tta)
