"""Slide-level metrics of the CAMELYON challenges, written after their public evaluation code.

FROC (CAMELYON16, ``Evaluation_FROC.py``): per slide, each detection (x, y, score) hits the
annotated tumour region under it. A region's best hit counts once; detections in regions of
isolated tumour cells (ITC) are ignored, neither hits nor false positives; a detection on no
region is a false positive. Sensitivity (hit non-ITC regions / all non-ITC regions) against the
mean number of false positives per slide, as the score threshold falls; the FROC score is the
mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide, read off the curve by
linear interpolation (``np.interp``) as the challenge code does.

Quadratic-weighted kappa of pN stages (CAMELYON17) lives beside the stages, in ``lesions.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class SlideDetections:
    """One slide's detections, already matched to its annotated regions.

    ``hits[i]`` is the label (1..n_regions) of the region under detection i, 0 for none;
    ``itc`` the labels of regions too small to count (ITC)."""

    hits: Sequence[int]
    scores: Sequence[float]
    n_regions: int
    itc: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Froc:
    score: float  # mean sensitivity at FP_RATES
    sensitivities: tuple[float, ...]  # at each of FP_RATES
    fps_per_slide: np.ndarray  # the curve: x
    sensitivity: np.ndarray  # the curve: y


def froc(slides: Sequence[SlideDetections], fp_rates: Sequence[float] = FP_RATES) -> Froc:
    """The challenge's ``computeFROC`` step by step, quirks included: a missed region scores 0;
    the thresholds are every distinct score but the lowest; the point (0 FP, 0 sensitivity)
    closes the curve; sensitivities are read with ``np.interp`` on the curve as it stands
    (equal false-positive rates included)."""
    if not slides:
        raise ValueError("FROC needs at least one slide")
    tp_probs: list[float] = []
    fp_probs: list[float] = []
    for s in slides:
        best = {k: 0.0 for k in range(1, s.n_regions + 1) if k not in s.itc}
        for label, score in zip(s.hits, s.scores):
            if label == 0:
                fp_probs.append(float(score))
            elif label in best:
                best[label] = max(best[label], float(score))
            elif label not in s.itc:
                raise ValueError(f"detection on region {label}, but the slide has {s.n_regions} regions")
        tp_probs.extend(best.values())
    fp = np.asarray(fp_probs, dtype=float)
    tp = np.asarray(tp_probs, dtype=float)
    thresholds = sorted(set(fp_probs) | set(tp_probs))[1:]
    total_fps = [int((fp >= t).sum()) for t in thresholds] + [0]
    total_tps = [int((tp >= t).sum()) for t in thresholds] + [0]
    fps = np.asarray(total_fps, dtype=float) / len(slides)
    sens = np.asarray(total_tps, dtype=float) / max(1, len(tp_probs))
    at = tuple(float(np.interp(r, fps[::-1], sens[::-1])) for r in fp_rates)
    return Froc(float(np.mean(at)), at, fps[::-1], sens[::-1])
