"""Training targets, and a teacher's share in them (knowledge distillation).

A teacher (a model file: often an ensemble, too costly to scan with) scores every training patch
once, single view, before the first epoch. The student's target for a patch is then

    (1 - w) * smoothed label + w * teacher probability

with ``w`` = ``TrainConfig.distill_weight``: Hinton et al.'s (2015) blend of hard and soft
targets, with the sigmoid's temperature left at 1. The soft part carries what the teacher knows
about patches whose label says less than their pixels (a tumour centre of a few cells, a germinal
centre that looks like tumour). The scores are kept in the training state, so a resumed run uses
the same ones even when the teacher's file has changed since.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, ModelError
from ..io.datasets import PatchSet
from ..io.model_files import load_model, resolve_model
from .data import RowsDataset, Splits
from .evaluate import predict_probs


def smoothed_targets(labels: np.ndarray, label_smoothing: float) -> np.ndarray:
    """Labels moved ``label_smoothing / 2`` towards 0.5, float32, as the loss takes them."""
    t = torch.from_numpy(np.asarray(labels)).float() * (1 - label_smoothing) + 0.5 * label_smoothing
    return t.numpy()


def training_targets(labels: np.ndarray, label_smoothing: float, teacher_probs: np.ndarray | None, weight: float) -> np.ndarray:
    """Each training patch's target: the smoothed label, blended with the teacher's score."""
    t = smoothed_targets(labels, label_smoothing)
    if teacher_probs is None:
        return t
    if teacher_probs.shape != t.shape:
        raise ValueError(f"{teacher_probs.shape[0]} teacher scores for {t.shape[0]} training patches")
    return ((1 - weight) * torch.from_numpy(t) + weight * torch.from_numpy(teacher_probs.astype(np.float32))).numpy()


def teacher_record(path: Path, sha256: str, card: Any) -> dict[str, Any]:
    """What the student's card says about its teacher."""
    return {"file": path.name, "name": card.name, "sha256": sha256, "valid": card.metrics.get("valid")}


def teacher_filters(card: Any) -> list[dict[str, Any]]:
    """The teacher's record of the patches it was trained on (seen.py), as its card holds it."""
    return list((card.training.get("data") or {}).get("seen_patches") or [])


def refuse_teacher_that_saw_validation(
    filters: list[dict[str, Any]], sets: Sequence[PatchSet], valid: np.ndarray, name: str
) -> None:
    """A teacher trained on the validation patches would pass them into the student's targets:
    the validation AUC, the epoch it keeps and the threshold would measure memory."""
    from .seen import PatchFilter, sample_indices, seen_share

    if not filters:
        return
    pick = valid[sample_indices(len(valid))]
    share = seen_share([PatchFilter.from_dict(f) for f in filters], (sets[s].read(int(i)) for s, i in pick))
    if share.clearly_seen:
        raise DataError(
            f"--teacher {name} was trained on this run's validation patches ({share.describe()}); its scores would "
            "carry them into training: give a teacher trained without them, or another validation split"
        )


def check_teacher_contract(card: Any, name: str) -> None:
    """The teacher scores the training patches as they are (PCam's window, cell and pixel size):
    a teacher whose card says it reads another scale, or names its classes otherwise, would score
    them at a scale it never saw (the check ``ensemble`` makes of its members)."""
    from ..model.card import CONTRACT_FIELDS, ModelCard

    student = ModelCard(arch="dense-cnn")
    for key in CONTRACT_FIELDS:
        got, want = getattr(card, key), getattr(student, key)
        if got != want:
            raise ModelError(
                f"--teacher {name}: its card's {key} is {got!r}, training here makes {want!r}; expected a teacher "
                "trained on patches like these (PCam's window and pixel size)"
            )


def score_training_patches(
    spec: str,
    splits: Splits,
    train_rows: np.ndarray,
    decoded: np.ndarray | None,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """The teacher's single-view score of every training row (float32, in row order), its record
    for the card and its seen-patch filters; refused when it saw the validation patches."""
    try:
        teacher = load_model(spec)
    except ModelError as exc:
        raise ModelError(f"--teacher: {exc}") from None
    check_teacher_contract(teacher.card, spec)
    filters = teacher_filters(teacher.card)
    refuse_teacher_that_saw_validation(filters, splits.sets, splits.valid, spec)
    net = teacher.net.to(device).to(memory_format=torch.channels_last)
    ds = RowsDataset(splits.sets, train_rows, decoded=decoded)
    probs = predict_probs(net, teacher.card, ds, device, batch_size, progress=progress, desc="teacher").astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(probs)))
    if bad:
        raise ModelError(
            f"--teacher {spec} gives no finite score for {bad} of {len(probs)} training patches; choose another teacher"
        )
    return probs, teacher_record(resolve_model(spec), teacher.sha256, teacher.card), filters
