"""Predict and score a model on labelled patches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..device import autocast, resolve_device
from ..errors import ModelError
from ..io.datasets import PatchSet
from ..io.model_files import LoadedModel
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


def check_not_empty(ps: PatchSet) -> None:
    if len(ps) == 0:
        from ..errors import DataError

        raise DataError(f"{ps.name} holds no patches; expected labelled 96x96 patches to score")


def evaluate_patchset(
    model: LoadedModel,
    ps: PatchSet,
    device: str = "auto",
    batch_size: int = 256,
    tta: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Evaluation:
    check_not_empty(ps)
    dev = resolve_device(device)
    net = model.net.to(dev).to(memory_format=torch.channels_last)
    rows = np.stack([np.zeros(len(ps), dtype=np.int64), np.arange(len(ps))], axis=1)
    probs = predict_probs(net, model.card, RowsDataset([ps], rows), dev, batch_size, tta, workers, progress, desc=ps.name)
    bad = int(np.count_nonzero(~np.isfinite(probs)))
    if bad:
        raise ModelError(
            f"{model.path}: the network gives non-finite outputs (NaN or infinity) on {bad} of {len(ps)} patches of "
            f"{ps.name}; a score cannot be computed from them: the model or its weights are damaged"
        )
    labels = ps.labels
    return Evaluation(binary_metrics(labels, probs, model.card.threshold), probs, labels, ps.name, tta)


EVALUATION_FILES = ("predictions.csv", "roc.png", "metrics.json")


def check_evaluation_folder(out_dir: Path, protect: Sequence[Path] = (), fresh: bool = False, overwrite: bool = True) -> None:
    """Refuse, before any scoring, a folder whose files ``write_evaluation`` may not replace (a
    user's file of one of their names, a link), a folder inside a heatmap store or one that is a
    link, or one that is or lies in a data folder of ``protect``, and without ``overwrite`` one
    that holds an earlier evaluation (another model's numbers, perhaps an hour of TTA); then
    create it (``fresh``: and remove an earlier evaluation's files, ``check_figure_folder``)."""
    from ..errors import OutputExistsError
    from .plots import check_figure_folder

    check_figure_folder(out_dir, EVALUATION_FILES, protect=protect, fresh=fresh)
    earlier = [n for n in EVALUATION_FILES if (out_dir / n).exists()]
    if earlier and not overwrite:
        raise OutputExistsError(
            f"--out {out_dir} holds an earlier evaluation ({', '.join(earlier)}); pass --overwrite to replace it or "
            "choose another --out"
        )


def write_evaluation(out_dir: Path, ev: Evaluation, ps: PatchSet, threshold: float, info: dict[str, Any]) -> list[Path]:
    """``predictions.csv`` (one row per patch), ``roc.png`` and ``metrics.json`` in ``out_dir``; like the
    training report's figures, files of these names are replaced only when wsi-scan wrote them.
    Undefined numbers (the AUC of one class) are null in the JSON."""
    from ..io.exports import write_json, write_predictions_csv
    from ..io.outputs import output_set
    from .plots import roc_figure

    check_evaluation_folder(out_dir, fresh=True)
    ids = [(ps.name, i, ps.patch_id(i)) for i in range(len(ps))]
    with output_set([out_dir / n for n in EVALUATION_FILES], "evaluation"):
        written = [write_predictions_csv(out_dir / "predictions.csv", ids, ev.labels, ev.probs, None, threshold, True)]
        lo, hi = info.get("auc_ci95", (float("nan"), float("nan")))
        written.append(
            roc_figure(
                out_dir / "roc.png",
                ev.labels,
                ev.probs,
                f"AUC {ev.metrics.auc:.4f} (95% CI {lo:.4f}-{hi:.4f})",
                f"ROC, {ps.name}{' (TTA)' if ev.tta else ''}",
                "",
            )
        )
        written.append(write_json(out_dir / "metrics.json", json_safe(info), True))
    return written


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN (a one-class AUC is undefined)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def trained_on(card: ModelCard, ps: PatchSet) -> str | None:
    """What of ``ps`` the model of ``card`` was trained on, in words, or None: a whole training
    split (same patches by fingerprint, or for cards written before fingerprints, the same name
    and count), else, where the card has a filter of its training patches, the share of a seeded
    sample of ``ps`` that it clearly recognises (a part of a split, or a mix; seen.py)."""
    fp = None
    data = card.training.get("data", {})
    for src in data.get("sources", []):
        seen = src.get("splits", {}).get("train") if isinstance(src, dict) else None
        if not isinstance(seen, dict):
            continue
        if "fingerprint" in seen:
            fp = fp or ps.fingerprint()
            if seen["fingerprint"] == fp:
                return str(seen.get("name", "?"))
        elif seen.get("name") == ps.name and seen.get("n") == len(ps):
            return str(seen["name"])
    filters = data.get("seen_patches", [])
    if filters:
        from .seen import PatchFilter, sample_indices, seen_share

        share = seen_share([PatchFilter.from_dict(f) for f in filters], (ps.read(int(i)) for i in sample_indices(len(ps))))
        if share.clearly_seen:
            return share.describe()
    return None
