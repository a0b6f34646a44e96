"""Lesions of a heatmap as a table (CSV), QuPath annotations (GeoJSON) or JSON, and the patients'
pN stages from a folder run's results."""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LesionConfig
from ..errors import DataError, UsageError
from ..io.folder_run import LOG_NAME, REPORT_HTML, SUMMARY_CSV, SUMMARY_JSON, output_path
from ..io.heatmap import Heatmap, open_heatmap
from ..lesions import CALLS, SlideCall, call_slide, find_lesions, stage_patients

LESION_FIELDS = [
    "lesion_id",
    "size_class",
    "longest_diameter_mm",
    "area_mm2",
    "max_prob",
    "mean_prob",
    "n_cells",
    "l0_centroid_x",
    "l0_centroid_y",
    "l0_bbox_x0",
    "l0_bbox_y0",
    "l0_bbox_x1",
    "l0_bbox_y1",
    "score",
]
STAGE_FIELDS = ["patient", "stage", "nodes_with_metastases", "nodes"]
#: QuPath colours per size class (packed RGB as QuPath writes them)
_COLOURS = {"itc": [255, 200, 0], "micro": [255, 120, 0], "macro": [220, 0, 0]}


def heatmap_call(
    heatmap: str | Path | Heatmap, threshold: float | None = None, cfg: LesionConfig = LesionConfig()
) -> tuple[Heatmap, SlideCall]:
    hm = heatmap if isinstance(heatmap, Heatmap) else open_heatmap(heatmap)
    thr = hm.threshold if threshold is None else threshold
    if not 0.0 <= thr <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], found {thr}")
    return hm, call_slide(hm.probs, hm.grid, hm.mpp_xy, thr, cfg)


def lesions_csv(call: SlideCall) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LESION_FIELDS)
    for les in call.lesions:
        w.writerow(
            [
                les.id,
                les.size_class,
                f"{les.longest_diameter_mm:.4f}",
                f"{les.area_mm2:.5f}",
                f"{les.max_prob:.4f}",
                f"{les.mean_prob:.4f}",
                les.n_cells,
                *(f"{v:.1f}" for v in (*les.l0_centroid_xy, *les.l0_bbox_xyxy)),
                f"{les.score:.4f}",
            ]
        )
    return buf.getvalue()


def lesions_geojson(hm: Heatmap, call: SlideCall, cfg: LesionConfig = LesionConfig()) -> dict[str, Any]:
    """Each lesion's outline (its cells, holes kept) as a QuPath annotation classified by size class."""
    import shapely

    from .geojson import _feature, _json_geom, region_polygons

    labels = np.zeros(hm.probs.shape, dtype=np.int32)
    lesions = find_lesions(hm.probs, hm.grid, hm.mpp_xy, call.threshold, cfg, labels=labels)
    features = []
    for les in lesions:
        geom = shapely.union_all([g for g, _, _ in region_polygons(labels == les.id, hm)])
        cls = {
            "name": les.size_class.upper() if les.size_class == "itc" else les.size_class.capitalize() + "-metastasis",
            "color": _COLOURS[les.size_class],
        }
        features.append(
            _feature(
                geom,
                cls,
                {
                    "longest_diameter_mm": les.longest_diameter_mm,
                    "area_mm2": les.area_mm2,
                    "max_probability": les.max_prob,
                    "mean_probability": les.mean_prob,
                },
                f"Lesion {les.id} ({les.size_class}, {les.longest_diameter_mm:.2f} mm)",
            )
        )
    return _json_geom(
        {
            "type": "FeatureCollection",
            "features": features,
            "properties": {
                "slide": hm.attrs["slide"].get("name"),
                "call": call.call,
                "score": call.score,
                "threshold": call.threshold,
                "seed_prob": call.seed_prob,
                "coordinates": "level-0 pixels",
            },
        }
    )


def write_lesions(
    heatmap: str | Path,
    out: str | Path,
    threshold: float | None = None,
    overwrite: bool = False,
    cfg: LesionConfig = LesionConfig(),
) -> tuple[Path, SlideCall]:
    from ..io.exports import write_json, write_text
    from ..io.outputs import expect_suffix

    out = Path(out)
    suffix = expect_suffix(out, (".csv", ".geojson", ".json"))
    hm, call = heatmap_call(heatmap, threshold, cfg)
    if suffix == ".csv":
        return write_text(out, lesions_csv(call), overwrite), call
    return write_json(out, lesions_geojson(hm, call, cfg), overwrite), call


def read_patients(path: str | Path) -> dict[str, list[str]]:
    """``patient,slide`` rows -> {patient: [slides]}; a slide listed twice (for one patient or two) is refused."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"--patients {p}: not a readable CSV file ({type(exc).__name__}); expected columns patient,slide"
        ) from None
    out: dict[str, list[str]] = {}
    try:
        reader = csv.DictReader(io.StringIO(text))
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "patient" not in cols or "slide" not in cols:
            raise DataError(f"--patients {p}: expected columns patient,slide, found {','.join(cols) or 'no header'}")
        twice = sorted({c for c in ("patient", "slide") if cols.count(c) > 1})
        if twice:  # csv keeps the last of two equal columns: which one was meant cannot be known
            raise DataError(f"--patients {p}: the column {twice[0]} appears more than once in the header; expected it once")
        # slide -> (patient, line) where it was first listed: one slide is one lymph node, so a slide
        # listed twice counts one node twice (a macro node on 4 rows is pN2's "4-9 nodes", not pN1),
        # and a slide under two patients is a mix-up for which no stage can be right
        first: dict[str, tuple[str, int]] = {}
        for raw in reader:
            i = reader.line_num  # the file's line (blank lines are skipped, quoted fields may span lines)
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("patient") or not row.get("slide"):
                raise DataError(f"--patients {p}, line {i}: patient and slide must both be given")
            # normpath: "./a.svs" is the slide "a.svs" (the name the results know it by), not another
            patient, slide = row["patient"], posixpath.normpath(row["slide"].replace("\\", "/"))
            if slide in first:
                patient0, i0 = first[slide]
                found = f"again for {patient}" if patient == patient0 else f"under {patient0} and {patient}"
                raise DataError(
                    f"--patients {p}: expected each slide (lymph node) once, found {slide} on lines {i0} and {i} "
                    f"({found}); remove the duplicate row"
                )
            first[slide] = (patient, i)
            out.setdefault(patient, []).append(slide)
    except csv.Error as exc:  # a field over csv's size limit, a broken quote
        raise DataError(f"--patients {p}: not a readable CSV file ({exc}); expected columns patient,slide") from None
    if not out:
        raise DataError(f"--patients {p}: no rows")
    return out


def results_calls(results: str | Path) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """From a folder run's summary.json: {slide (relative path): call} of the slides with a call,
    {file name: relative path} for the file names that name one slide of the run, and {file
    name: relative paths} for those that name several (a patients list may name a slide either
    way; a name shared with a failed slide is ambiguous too, not the other one's)."""
    p = Path(results) / SUMMARY_JSON
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        rows = obj["slides"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("slide"), str) for r in rows):
            raise TypeError("expected 'slides' to be a list of rows, each with its 'slide'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{p}: not a wsi-scan folder summary ({type(exc).__name__}); run `wsi-scan SLIDES --out {results}` first"
        ) from None
    calls: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    for r in rows:
        slide = str(r["slide"])
        names.setdefault(Path(slide).name, []).append(slide)
        if r.get("status") in ("ok", "skipped") and r.get("call"):
            if r["call"] not in CALLS:
                raise DataError(
                    f"{p}: slide {slide} has the call {str(r['call'])[:40]!r}, expected one of {', '.join(CALLS)}; "
                    "the summary was edited or damaged: rerun the folder scan"
                )
            calls[slide] = str(r["call"])
    aliases = {n: paths[0] for n, paths in names.items() if len(paths) == 1 and n not in calls}
    ambiguous = {n: sorted(paths) for n, paths in names.items() if len(paths) > 1 and n not in calls}
    return calls, aliases, ambiguous


def _check_one_name_per_slide(patients: dict[str, list[str]], aliases: dict[str, str], where: Path) -> None:
    """read_patients refuses a slide listed twice by one spelling; this refuses it by two (its
    path and its bare name), which would count one lymph node as two."""
    first: dict[str, tuple[str, str]] = {}
    for patient, slides in patients.items():
        for slide in slides:
            canonical = aliases.get(slide, slide)
            if canonical in first:
                patient0, slide0 = first[canonical]
                raise DataError(
                    f"--patients {where}: {slide0} ({patient0}) and {slide} ({patient}) are the same slide "
                    f"{canonical} of the results; expected each slide (lymph node) once: remove one row"
                )
            first[canonical] = (patient, slide)


def stage_results(results: str | Path, patients: str | Path) -> list[dict[str, Any]]:
    from ..evaluation import check_results_folder

    check_results_folder(results, "stage")
    calls, aliases, ambiguous = results_calls(results)
    listed = read_patients(patients)
    _check_one_name_per_slide(listed, aliases, Path(patients))
    for patient, slides in listed.items():
        for slide in slides:
            if slide in ambiguous:
                raise DataError(
                    f"--patients {patients}: {slide} ({patient}) names {len(ambiguous[slide])} slides of the results "
                    f"({', '.join(ambiguous[slide][:3])}); give its path relative to the slides folder"
                )
    _check_stores(Path(results), {aliases.get(s, s) for slides in listed.values() for s in slides} & set(calls), calls)
    try:
        return stage_patients({**calls, **{a: calls[c] for a, c in aliases.items() if c in calls}}, listed)
    except KeyError as exc:
        raise DataError(
            f"{exc.args[0]} in {Path(results) / SUMMARY_JSON} (slides that failed or were never scanned "
            "have no call); rerun the folder scan or correct --patients"
        ) from None


def _check_stores(results: Path, slides: set[str], calls: dict[str, str]) -> None:
    """A stage rests on each node's heatmap, not on a line of summary.json: a store deleted or
    damaged since the run (or a summary edited) would otherwise count as the node it claims."""
    for slide in sorted(slides):
        store = output_path(results, Path(slide))
        if not store.exists():
            raise DataError(f"the heatmap {store} of slide {slide} is missing (summary.json lists it); rerun the folder scan")
        got = heatmap_call(store)[1].call  # HeatmapError for a damaged store
        if got != calls[slide]:
            raise DataError(
                f"{results / SUMMARY_JSON}: slide {slide} has the call {calls[slide]} but its heatmap {store} gives "
                f"{got}; the summary was edited or the store replaced: rerun the folder scan"
            )


def write_stages(
    results: str | Path, patients: str | Path, out: str | Path | None, overwrite: bool
) -> tuple[Path, list[dict[str, Any]]]:
    """The stages of ``stage_results`` as a CSV at ``out`` (default RESULTS/stages.csv, replaced
    by each run). Refused before any work: an ``out`` that is not a .csv, the patients list, or
    one of the folder run's own files (its summary is this command's input)."""
    from ..evaluation import check_results_folder
    from ..io.exports import write_text
    from ..io.outputs import check_replaceable, expect_suffix

    results, patients = Path(results), Path(patients)
    # first: the default --out lies in RESULTS, and a store or a file there would be named as the --out
    check_results_folder(results, "stage")
    target = Path(out) if out is not None else results / "stages.csv"
    expect_suffix(target, (".csv",))
    run_files = [results / n for n in (SUMMARY_JSON, SUMMARY_CSV, REPORT_HTML, LOG_NAME)]
    check_replaceable(target, overwrite or out is None, protect=[patients, *run_files])
    rows = stage_results(results, patients)
    write_text(target, stages_csv(rows), overwrite or out is None)
    return target, rows


def stages_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(STAGE_FIELDS)
    for r in rows:
        w.writerow([r["patient"], r["stage"], r["nodes_with_metastases"], ";".join(f"{k}:{v}" for k, v in r["nodes"].items())])
    return buf.getvalue()
