"""From a heatmap to the answer a pathologist reports: lesions, their size class, the node's call,
the patient's pN stage. Pure: arrays and numbers in, frozen records out.

Definitions (CAMELYON17, after the AJCC/TNM rules): a lesion's size is its longest diameter;
isolated tumour cells (ITC) <= 0.2 mm, micro-metastasis > 0.2 and <= 2.0 mm, macro-metastasis
> 2.0 mm. A node's call is its largest lesion's class, or negative. pN from a patient's nodes:
pN0 (nothing), pN0(i+) (ITC only), pN1mi (micro, no macro), pN1 (metastases in 1-3 nodes, at least
one macro), pN2 (4-9 nodes, at least one macro); ITC-only nodes are not nodes with metastases.

A lesion is a connected (8-neighbour) region of cells at or above the threshold (the model
card's) that holds at least one cell at or above ``LesionConfig.seed_prob``: hysteresis, so that a
lone cell that barely crosses the threshold does not become a lesion while a lesion's paler rim
still counts to its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .config import LesionConfig
from .geometry import GridGeometry

CALLS = ("negative", "itc", "micro", "macro")
STAGES = ("pN0", "pN0(i+)", "pN1mi", "pN1", "pN2")


@dataclass(frozen=True)
class Lesion:
    id: int
    l0_centroid_xy: tuple[float, float]
    l0_bbox_xyxy: tuple[float, float, float, float]
    area_mm2: float
    longest_diameter_mm: float
    max_prob: float
    mean_prob: float
    n_cells: int
    size_class: str  # "itc", "micro" or "macro"
    score: float  # detection score for FROC: the lesion's highest probability
    l0_peak_xy: tuple[float, float] = (0.0, 0.0)  # centre of its most probable cell: the FROC detection point

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["l0_centroid_xy"] = list(self.l0_centroid_xy)
        d["l0_bbox_xyxy"] = list(self.l0_bbox_xyxy)
        d["l0_peak_xy"] = list(self.l0_peak_xy)
        return d


@dataclass(frozen=True)
class SlideCall:
    call: str  # one of CALLS
    score: float  # the slide's score for ROC: its highest tumour probability (0 without tissue)
    lesions: tuple[Lesion, ...]
    threshold: float
    seed_prob: float

    @property
    def largest_lesion_mm(self) -> float:
        return max((les.longest_diameter_mm for les in self.lesions), default=0.0)

    def summary(self) -> dict[str, Any]:
        """The keys a scan stores in ``attrs["wsi_scan"]["summary"]``."""
        return {
            "call": self.call,
            "score": self.score,
            "n_lesions": len(self.lesions),
            "largest_lesion_mm": self.largest_lesion_mm,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "threshold": self.threshold,
            "seed_prob": self.seed_prob,
            "lesions": [les.to_dict() for les in self.lesions],
        }


def size_class(longest_diameter_mm: float, cfg: LesionConfig = LesionConfig()) -> str:
    if longest_diameter_mm > cfg.macro_mm:
        return "macro"
    if longest_diameter_mm > cfg.itc_mm:
        return "micro"
    return "itc"


def longest_diameter_um(rows: np.ndarray, cols: np.ndarray, grid: GridGeometry, mpp_xy: tuple[float, float]) -> float:
    """The largest distance between two points of the union of the cells, in micrometers.

    The union of cells is a polygon whose farthest pair of points are two of its cells' corners,
    so the diameter is exact over the corners (taken on their convex hull, in um so that
    non-square pixels are honoured)."""
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    # every cell of a row lies between its leftmost and rightmost cells, so the hull of the
    # union is the hull of those two per row: the same diameter from ~8 corners a row, not 4 a cell
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    _, first = np.unique(rows, return_index=True)
    rows = np.concatenate([rows[first], rows[first]])
    cols = np.concatenate([np.minimum.reduceat(cols, first), np.maximum.reduceat(cols, first)])
    xs = np.concatenate([cols, cols + 1, cols, cols + 1]).astype(np.float64)
    ys = np.concatenate([rows, rows, rows + 1, rows + 1]).astype(np.float64)
    pts = np.unique(np.stack([(ox + xs * sx) * mpp_xy[0], (oy + ys * sy) * mpp_xy[1]], axis=1), axis=0)
    if len(pts) > 16:
        from scipy.spatial import ConvexHull

        # collinear corners (a single row of cells) have no hull: then all points stay
        with contextlib.suppress(Exception):
            pts = pts[ConvexHull(pts).vertices]
    d = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def lesion_labels(probs: np.ndarray, threshold: float, cfg: LesionConfig = LesionConfig()) -> np.ndarray:
    """(rows, cols) int32: 0 off lesions, k > 0 on the cells of the k-th candidate region that
    holds a seed cell (the ids are not yet ordered; ``find_lesions`` orders them)."""
    from scipy import ndimage

    finite = np.nan_to_num(probs, nan=-1.0)
    labels, n = ndimage.label(finite >= threshold, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32)
    # a region holds a seed exactly when one of its cells is one: the labels under the seed cells
    # (ndimage.maximum per label sorts every cell of the slide, seconds on a level-0 grid)
    keep = np.zeros(n + 1, dtype=bool)
    keep[labels[finite >= max(threshold, cfg.seed_prob)]] = True
    keep[0] = False
    return np.where(keep[labels], labels, 0).astype(np.int32)


def find_lesions(
    probs: np.ndarray,
    grid: GridGeometry,
    mpp_xy: tuple[float, float],
    threshold: float,
    cfg: LesionConfig = LesionConfig(),
    labels: np.ndarray | None = None,
) -> list[Lesion]:
    """Lesions of a heatmap, largest first (NaN cells, off tissue, are never part of one).
    With ``labels``, each lesion's cells are relabelled in place with its final id."""
    from scipy import ndimage

    finite = np.nan_to_num(probs, nan=-1.0)
    lab = lesion_labels(probs, threshold, cfg)
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    cell_mm2 = sx * mpp_xy[0] * sy * mpp_xy[1] / 1e6
    found = []
    keys = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        region = lab[sl] == k
        p = finite[sl][region]
        keys.append(k)
        rr, cc = np.nonzero(region)
        rows, cols = rr + sl[0].start, cc + sl[1].start
        diameter_mm = longest_diameter_um(rows, cols, grid, mpp_xy) / 1000.0
        found.append(
            Lesion(
                id=0,
                l0_centroid_xy=(ox + (cols.mean() + 0.5) * sx, oy + (rows.mean() + 0.5) * sy),
                l0_peak_xy=(ox + (cols[int(np.argmax(p))] + 0.5) * sx, oy + (rows[int(np.argmax(p))] + 0.5) * sy),
                l0_bbox_xyxy=(ox + cols.min() * sx, oy + rows.min() * sy, ox + (cols.max() + 1) * sx, oy + (rows.max() + 1) * sy),
                area_mm2=len(rows) * cell_mm2,
                longest_diameter_mm=diameter_mm,
                max_prob=float(p.max()),
                mean_prob=float(p.mean()),
                n_cells=len(rows),
                size_class=size_class(diameter_mm, cfg),
                score=float(p.max()),
            )
        )
    order = sorted(range(len(found)), key=lambda i: (-found[i].longest_diameter_mm, -found[i].score))
    if labels is not None:
        relabel = np.zeros(lab.max() + 1, dtype=np.int32)
        for new_id, i in enumerate(order, start=1):
            relabel[keys[i]] = new_id
        labels[...] = relabel[lab]
    return [Lesion(**{**asdict(found[i]), "id": new_id}) for new_id, i in enumerate(order, start=1)]


def call_slide(
    probs: np.ndarray, grid: GridGeometry, mpp_xy: tuple[float, float], threshold: float, cfg: LesionConfig = LesionConfig()
) -> SlideCall:
    """The node's call (its largest lesion's class, or negative) with the lesions behind it."""
    lesions = find_lesions(probs, grid, mpp_xy, threshold, cfg)
    finite = probs[np.isfinite(probs)]
    call = lesions[0].size_class if lesions else "negative"
    return SlideCall(call, float(finite.max()) if finite.size else 0.0, tuple(lesions), threshold, max(threshold, cfg.seed_prob))


def pn_stage(calls: Iterable[str]) -> str:
    """The patient's pN stage from the calls of their lymph nodes (CAMELYON17's rules)."""
    calls = list(calls)
    unknown = [c for c in calls if c not in CALLS]
    if unknown:
        raise ValueError(f"unknown node calls {unknown}; expected {', '.join(CALLS)}")
    n_meta = sum(c in ("micro", "macro") for c in calls)
    if "macro" in calls:
        return "pN1" if n_meta <= 3 else "pN2"
    if "micro" in calls:
        return "pN1mi"
    if "itc" in calls:
        return "pN0(i+)"
    return "pN0"


def quadratic_weighted_kappa(reference: Sequence[str], predicted: Sequence[str], categories: Sequence[str] = STAGES) -> float:
    """Cohen's kappa with quadratic weights over ordered categories (CAMELYON17's metric)."""
    if len(reference) != len(predicted) or not reference:
        raise ValueError("kappa needs two equally long, non-empty lists")
    k = len(categories)
    index = {c: i for i, c in enumerate(categories)}
    observed = np.zeros((k, k))
    for a, b in zip(reference, predicted):
        observed[index[a], index[b]] += 1
    weights = np.array([[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)])
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    denom = (weights * expected).sum()
    return 1.0 if denom == 0 else float(1.0 - (weights * observed).sum() / denom)


def stage_patients(node_calls: Mapping[str, str], patients: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One row per patient: the call of each node (slide) and the pN stage. A slide missing from
    ``node_calls`` is an error, never a silent negative."""
    rows = []
    for patient in sorted(patients):
        slides = list(patients[patient])
        missing = [s for s in slides if s not in node_calls]
        if missing:
            raise KeyError(f"patient {patient}: no result for {', '.join(missing)}")
        calls = [node_calls[s] for s in slides]
        rows.append(
            {
                "patient": patient,
                "stage": pn_stage(calls),
                "nodes": dict(zip(slides, calls)),
                "nodes_with_metastases": sum(c in ("micro", "macro") for c in calls),
            }
        )
    return rows
