"""Binary classification metrics, in plain NumPy (no scikit-learn at run time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as one half)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(1, int(y.sum()))]
    fpr = np.r_[0.0, fps / max(1, int((~y).sum()))]
    return fpr, tpr


@dataclass(frozen=True)
class BinaryMetrics:
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    threshold: float
    n: int
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict[str, Any]:
        import math

        # JSON has no NaN: a metric that is undefined (one class only) is null
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        d["confusion_matrix"] = [[self.tn, self.fp], [self.fn, self.tp]]
        return d


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> BinaryMetrics:
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(probs, dtype=np.float64).ravel() >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    n = int(y.size)
    return BinaryMetrics(
        auc=roc_auc(y, probs),
        accuracy=(tp + tn) / n if n else float("nan"),
        sensitivity=tp / (tp + fn) if tp + fn else float("nan"),
        specificity=tn / (tn + fp) if tn + fp else float("nan"),
        threshold=float(threshold),
        n=n,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC.

    Positives and negatives are resampled separately (a stratified bootstrap), so that every
    replicate has both classes and the class balance of the data."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    yy = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    aucs = np.empty(n_boot)
    for b in range(n_boot):
        aucs[b] = roc_auc(yy, np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """The lowest threshold (rounded up to 1e-4) at which at least ``specificity`` of the negatives
    score below it: the most sensitive operating point that keeps that specificity."""
    y = np.asarray(labels).astype(bool).ravel()
    neg = np.sort(np.asarray(scores, dtype=np.float64).ravel()[~y])
    if neg.size == 0:
        raise ValueError("no negatives to choose a threshold on")
    k = int(np.ceil(specificity * neg.size - 1e-9))  # negatives that must score below the threshold
    if k <= 0:
        return 0.0
    t = float(np.floor(neg[k - 1] * 1e4) + 1) / 1e4  # strictly above the k-th lowest negative
    return min(t, 1.0)
