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

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import LesionConfig

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
    """The challenge's ``computeFROC`` step by step: a missed region scores 0; the thresholds are
    the distinct scores; the point (0 FP, 0 sensitivity) closes the curve; sensitivities are read
    with ``np.interp`` on the curve as it stands (equal false-positive rates included).

    One difference, on purpose: the challenge code drops the lowest distinct score from the
    thresholds (meant for the 0 of missed regions), which gives a perfect detector whose scores
    are all equal a FROC of 0; here only a 0 is dropped."""
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
    thresholds = [t for t in sorted(set(fp_probs) | set(tp_probs)) if t > 0]
    total_fps = [int((fp >= t).sum()) for t in thresholds] + [0]
    total_tps = [int((tp >= t).sum()) for t in thresholds] + [0]
    fps = np.asarray(total_fps, dtype=float) / len(slides)
    sens = np.asarray(total_tps, dtype=float) / max(1, len(tp_probs))
    at = tuple(float(np.interp(r, fps[::-1], sens[::-1])) for r in fp_rates)
    return Froc(float(np.mean(at)), at, fps[::-1], sens[::-1])


# ----------------------------------------------------------------------------- whole cohorts

#: the challenge's evaluation masks: level 5 of 0.243 um/px (7.8 um/px) here 8 um/px; tumour
#: regions dilated by 75 um; regions whose major axis is under 275 um (200 um + the dilation) are ITC
EVAL_MASK_UM = 8.0
EVAL_DILATE_UM = 75.0
EVAL_ITC_UM = 275.0


def evaluation_regions(
    tumour: Sequence[object], exclusion: Sequence[object], level0_wh: tuple[int, int], slide_mpp: float
) -> tuple[np.ndarray, float, frozenset[int]]:
    """Labelled evaluation mask of a slide (0 = no tumour), its level-0 px per mask px and the ITC labels.

    ``slide_mpp`` is the slide's level-0 um/px; the polygons are in level-0 px."""
    from PIL import Image, ImageDraw
    from scipy import ndimage
    from skimage import measure

    l0_per_mask_px = EVAL_MASK_UM / slide_mpp
    w, h = max(1, int(np.ceil(level0_wh[0] / l0_per_mask_px))), max(1, int(np.ceil(level0_wh[1] / l0_per_mask_px)))
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for value, polys in ((1, tumour), (0, exclusion)):
        for poly in polys:
            for ring, fill in [(poly.exterior, value)] + [(r, 1 - value) for r in poly.interiors]:  # type: ignore[attr-defined]
                draw.polygon([(x / l0_per_mask_px, y / l0_per_mask_px) for x, y in ring.coords], fill=fill)
    mask = np.asarray(img, dtype=bool)
    if mask.any():
        mask = ndimage.distance_transform_edt(~mask) < EVAL_DILATE_UM / EVAL_MASK_UM
    labels = measure.label(mask, connectivity=2)
    itc = frozenset(int(r.label) for r in measure.regionprops(labels) if r.axis_major_length * EVAL_MASK_UM < EVAL_ITC_UM)
    return labels.astype(np.int32), l0_per_mask_px, itc


def reference_call(tumour: Sequence[object], exclusion: Sequence[object], slide_mpp: float) -> str:
    """The class of the largest annotated region (longest diameter on its polygon), or negative;
    ``slide_mpp``, the slide's level-0 um/px, turns the polygons' level-0 px into um."""
    import shapely

    from .lesions import size_class

    if not tumour:
        return "negative"
    geom = shapely.union_all(list(tumour))
    if exclusion:
        geom = geom.difference(shapely.union_all(list(exclusion)))
    best = 0.0
    for part in getattr(geom, "geoms", [geom]):
        if part.is_empty:
            continue
        pts = np.asarray(part.convex_hull.exterior.coords if hasattr(part.convex_hull, "exterior") else part.coords) * slide_mpp
        d = pts[:, None, :] - pts[None, :, :]
        best = max(best, float(np.sqrt((d**2).sum(-1)).max()))
    return size_class(best / 1000.0) if best > 0 else "negative"


def check_results_folder(results: object, command: str = "evaluate-slides") -> None:
    """A folder run's results, not one slide's heatmap store (which holds no summary.json) nor a file."""
    from pathlib import Path

    from .errors import DataError
    from .io.outputs import is_heatmap_store

    p = Path(str(results))
    if is_heatmap_store(p):
        raise DataError(
            f"{results} is the heatmap store of one slide; {command} takes the results folder of a folder run "
            "(`wsi-scan SLIDES/ --out RESULTS/`)"
        )
    if p.exists() and not p.is_dir():
        raise DataError(
            f"{results} is a file; {command} takes the results folder of a folder run (`wsi-scan SLIDES/ --out RESULTS/`)"
        )


def evaluate_cohort(
    results: object,
    annotations: object,
    reference: object | None = None,
    cfg: LesionConfig = LesionConfig(),
    figures: object | None = None,
    figure_prefix: str = "",
) -> dict[str, object]:
    """FROC, slide AUC, call confusion and (with a CAMELYON17-style reference) kappa of a folder
    run; with ``figures`` (a folder), its FROC and slide ROC drawn there as
    ``FIGURE_PREFIXfroc.png`` and ``FIGURE_PREFIXslide_roc.png``."""
    import json
    from pathlib import Path

    from .errors import DataError
    from .io.annotations import find_annotations, unmatched_annotations
    from .io.folder_run import output_path
    from .io.heatmap import open_heatmap
    from .lesions import CALLS, call_slide
    from .train.metrics import binary_metrics

    results, annotations = Path(str(results)), Path(str(annotations))
    if not annotations.is_dir():
        raise DataError(f"--annotations {annotations} is not a folder of annotation files (.xml or .geojson per slide)")
    check_results_folder(results)
    try:
        rows = json.loads((results / "summary.json").read_text(encoding="utf-8"))["slides"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{results}: no readable summary.json; run `wsi-scan SLIDES --out {results}` first") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("slide"), str) for r in rows):
        raise DataError(
            f"{results / 'summary.json'}: not a wsi-scan folder summary (expected 'slides' to be a list of rows, each "
            f"with its 'slide'); the summary was edited or damaged: rerun `wsi-scan SLIDES --out {results}`"
        )
    listed = Counter(str(r["slide"]) for r in rows)
    twice = sorted(s for s, n in listed.items() if n > 1)
    if twice:  # one slide counted twice would weigh twice in the FROC and the AUC
        raise DataError(
            f"{results / 'summary.json'}: slide {twice[0]} is listed {listed[twice[0]]} times; expected each slide "
            f"once: the summary was edited, rerun `wsi-scan SLIDES --out {results}`"
        )
    by_name: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") in ("ok", "skipped"):
            by_name.setdefault(Path(str(r["slide"])).name, []).append(str(r["slide"]))
    shared = next((paths for paths in by_name.values() if len(paths) > 1), None)
    if shared:  # one annotation file and one reference row would be taken for each of them
        raise DataError(
            f"{results}: slides {', '.join(sorted(shared)[:3])} share the file name {Path(shared[0]).name}, and "
            "annotations (NAME.xml, NAME.geojson) and reference rows are matched by file name, so one slide's "
            "annotation would count for the other; rename them, or evaluate each subfolder's run on its own"
        )
    unscanned = [str(r["slide"]) for r in rows if r.get("status") not in ("ok", "skipped")]
    if unscanned:
        import logging

        logging.getLogger("wsi_scan.evaluation").warning(
            f"{results}: {len(unscanned)} slide(s) of the run have no heatmap ({', '.join(unscanned[:3])}"
            f"{', ...' if len(unscanned) > 3 else ''}: failed or not scanned) and are not evaluated; the figures "
            "cover the others only: rerun the folder scan to include them"
        )
    dets, truth, scores, pred_calls, ref_calls, names = [], [], [], [], [], []
    for r in rows:
        if r.get("status") not in ("ok", "skipped"):
            continue
        # the store where this folder keeps it: the row's own path is relative to where the scan
        # ran, so a moved or copied folder would be evaluated against the old one's stores
        hm = open_heatmap(output_path(results, Path(str(r["slide"]))))
        call = call_slide(hm.probs, hm.grid, hm.mpp_xy, hm.threshold, cfg)
        ann = find_annotations(annotations, Path(r["slide"]).name)
        tumour, exclusion = (ann.tumour, ann.exclusion) if ann is not None else ((), ())
        size_wh = tuple(hm.attrs["slide"]["level0_size_wh"])
        if ann is not None:
            _check_on_slide(ann, size_wh)
        labels, l0_per_mask_px, itc = evaluation_regions(tumour, exclusion, size_wh, hm.mpp_xy[0])
        hits = []
        for les in call.lesions:
            x, y = (int(v / l0_per_mask_px) for v in les.l0_peak_xy)
            hits.append(int(labels[y, x]) if 0 <= y < labels.shape[0] and 0 <= x < labels.shape[1] else 0)
        dets.append(SlideDetections(hits, [le.score for le in call.lesions], int(labels.max()), itc))
        truth.append(1 if tumour else 0)
        scores.append(call.score)
        pred_calls.append(call.call)
        ref_calls.append(reference_call(tumour, exclusion, hm.mpp_xy[0]))
        names.append(Path(r["slide"]).name)
    if not dets:
        raise DataError(f"{results}: no scanned slide to evaluate")
    orphans = unmatched_annotations(annotations, names + [Path(s).name for s in unscanned])
    if orphans:
        import logging

        logging.getLogger("wsi_scan.evaluation").warning(
            f"{annotations}: {len(orphans)} annotation file(s) match no scanned slide by name "
            f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}): not used; a slide named differently "
            "is counted without its annotation (NAME.xml or NAME.geojson for slide NAME.tif)"
        )
    f = froc(dets)
    # no tumour region to find (ITC aside): a sensitivity of nothing is undefined, not 0
    counted = sum(1 for d in dets for k in range(1, d.n_regions + 1) if k not in d.itc)
    confusion = [[sum(1 for a, b in zip(ref_calls, pred_calls) if a == ra and b == pb) for pb in CALLS] for ra in CALLS]
    out: dict[str, object] = {
        "froc": f.score if counted else None,
        "sensitivities": dict(zip([str(x) for x in FP_RATES], f.sensitivities)) if counted else None,
        "tumour_regions": counted,
        "slide_auc": binary_metrics(np.asarray(truth), np.asarray(scores), 0.5).auc if 0 < sum(truth) < len(truth) else None,
        "confusion": {"labels": list(CALLS), "rows_reference_cols_predicted": confusion},
        "slides": [
            {"slide": n, "reference_call": a, "call": b, "score": s} for n, a, b, s in zip(names, ref_calls, pred_calls, scores)
        ],
        "kappa": None,
    }
    if reference is not None:
        out["kappa"] = _kappa_from_reference(Path(str(reference)), dict(zip(names, pred_calls)))
    if figures is not None:  # FROC and slide ROC pictures in this folder
        from .train.plots import evaluation_figures

        auc = out["slide_auc"]
        paths = evaluation_figures(
            Path(str(figures)),
            f.fps_per_slide,
            f.sensitivity,
            f.score if counted else None,
            np.asarray(truth),
            np.asarray(scores),
            auc if isinstance(auc, float) else None,
            figure_prefix,
        )
        out["figures"] = [str(p) for p in paths]
    return out


def _check_on_slide(ann: Any, size_wh: tuple[int, int]) -> None:
    """An annotated region wholly off the slide is in another frame (another level, another
    slide): counted, it would make the slide positive with a size no cell of it has."""
    from shapely.geometry import box

    from .errors import DataError

    slide = box(0, 0, size_wh[0], size_wh[1])
    for poly in (*ann.tumour, *ann.exclusion):
        if not poly.intersects(slide):
            x0, y0, x1, y1 = (round(v) for v in poly.bounds)
            raise DataError(
                f"{ann.path}: a region at level-0 px ({x0}, {y0})-({x1}, {y1}) lies wholly outside its slide "
                f"({size_wh[0]} x {size_wh[1]} px); annotations must be in the slide's level-0 pixels"
            )


def _kappa_from_reference(path: object, calls: dict[str, str]) -> dict[str, object]:
    """CAMELYON17's reference CSV: rows 'patient_XXX.zip,<stage>' and 'patient_XXX_node_N.tif,<call>'."""
    import csv
    from pathlib import Path

    from .errors import DataError
    from .lesions import pn_stage, quadratic_weighted_kappa

    p = Path(str(path))
    try:
        rows = list(csv.reader(p.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--reference {p}: not a readable CSV ({type(exc).__name__})") from None
    from .lesions import STAGES

    stages: dict[str, str] = {}
    for line, r in enumerate(rows, start=1):
        if not r or not r[0].endswith(".zip"):
            continue
        patient, stage = Path(r[0]).stem, (r[1].strip() if len(r) >= 2 else "")
        if stage not in STAGES:
            raise DataError(f"--reference {p}: line {line}: {r[0]} has the stage {stage!r}; expected one of {', '.join(STAGES)}")
        if patient in stages and stages[patient] != stage:
            raise DataError(
                f"--reference {p}: line {line}: {r[0]} is listed again with another stage ({stages[patient]}, {stage})"
            )
        stages[patient] = stage
    if not stages:
        raise DataError(f"--reference {p}: no patient rows ('patient_XXX.zip,<pN stage>')")
    ref, pred = [], []
    for patient, stage in sorted(stages.items()):
        nodes = sorted(n for n in calls if Path(n).stem.startswith(patient + "_node"))
        if not nodes:
            raise DataError(f"--reference {p}: no scanned node of {patient} in the results")
        ref.append(stage)
        pred.append(pn_stage([calls[n] for n in nodes]))
    return {
        "kappa": quadratic_weighted_kappa(ref, pred),
        "patients": [{"patient": a, "reference": b, "predicted": c} for a, b, c in zip(sorted(stages), ref, pred)],
    }
