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
