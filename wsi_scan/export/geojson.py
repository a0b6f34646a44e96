"""Tumour regions as GeoJSON that QuPath imports by drag and drop.

Polygons are built exactly from the cell grid: each 4-connected region of cells at or above
the threshold becomes the union of its cells' level-0 rectangles (holes kept), clipped to the
slide. Coordinates are level-0 pixels with (0, 0) the top-left corner of the first pixel, the
frame QuPath uses for a slide's annotations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..io.heatmap import Heatmap, open_heatmap

TUMOR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 220]}
PRECISION_L0 = 1e-3  # coordinates are rounded to this grid (level-0 px); keeps files small


def region_polygons(mask: np.ndarray, hm: Heatmap) -> list[tuple[Any, tuple[slice, slice], np.ndarray]]:
    """(shapely polygon in level-0 px, bounding slices, cell mask within them) of every
    4-connected region of ``mask``."""
    import shapely
    from scipy import ndimage
    from shapely.geometry import box

    from ..geometry import cell_edges_l0

    xs, ys = cell_edges_l0(hm.grid)
    w0, h0 = (int(v) for v in hm.attrs["slide"]["level0_size_wh"])
    slide_box = box(0, 0, w0, h0)
    labels, _ = ndimage.label(mask)  # the default structure is 4-connectivity
    out = []
    # work inside each region's bounding box: whole-grid masks per region cost O(regions x cells)
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == k
        r_off, c_off = sl[0].start, sl[1].start
        rects = []
        # one rectangle per horizontal run of cells: far fewer pieces to union than cells
        for r in range(region.shape[0]):
            row = np.concatenate(([False], region[r], [False]))
            d = np.diff(row.astype(np.int8))
            for c0, c1 in zip(np.flatnonzero(d == 1) + c_off, np.flatnonzero(d == -1) + c_off):
                rects.append(box(xs[c0], ys[r + r_off], xs[c1], ys[r + r_off + 1]))
        geom = shapely.union_all(rects).intersection(slide_box)
        # simplify(0) drops the collinear vertices every cell corner leaves on straight edges
        geom = shapely.set_precision(geom, PRECISION_L0).simplify(0)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        if geom.is_empty:
            continue
        out.append((geom, (sl[0], sl[1]), region))
    return out


def _feature(geom: Any, cls: dict[str, Any], measurements: dict[str, float], name: str) -> dict[str, Any]:
    from shapely.geometry import mapping

    return {
        "type": "Feature",
        "geometry": mapping(geom),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": dict(cls),
            "isLocked": False,
            "measurements": measurements,
        },
    }


def _json_geom(feature: dict[str, Any]) -> dict[str, Any]:
    """shapely's mapping() uses tuples; GeoJSON consumers and equality tests want lists."""
    import json

    return dict(json.loads(json.dumps(feature)))


def to_geojson(heatmap: str | Path | Heatmap, threshold: float | None = None, include_tissue: bool = False) -> dict[str, Any]:
    """A FeatureCollection of tumour regions at or above ``threshold`` (default: the model's).

    Each feature is a QuPath annotation classified "Tumor" with measurements ``area_um2``,
    ``mean_probability``, ``max_probability`` and ``cells``; with ``include_tissue`` the scanned
    tissue is added as annotations classified "Tissue".
    """
    hm = heatmap if isinstance(heatmap, Heatmap) else open_heatmap(heatmap)
    thr = hm.threshold if threshold is None else float(threshold)
    if not 0.0 <= thr <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], found {thr}")
    mx, my = hm.mpp_xy
    probs = hm.probs
    tumour = np.isfinite(probs) & (np.nan_to_num(probs, nan=-1.0) >= thr)
    features = []
    for i, (geom, sl, cells) in enumerate(region_polygons(tumour, hm), start=1):
        p = probs[sl][cells]
        features.append(
            _feature(
                geom,
                TUMOR_CLASS,
                {
                    "area_um2": float(geom.area * mx * my),
                    "mean_probability": float(p.mean()),
                    "max_probability": float(p.max()),
                    "cells": int(cells.sum()),
                },
                f"Tumor {i}",
            )
        )
    if include_tissue:
        for i, (geom, _, cells) in enumerate(region_polygons(hm.tissue, hm), start=1):
            features.append(
                _feature(geom, TISSUE_CLASS, {"area_um2": float(geom.area * mx * my), "cells": int(cells.sum())}, f"Tissue {i}")
            )
    model = hm.attrs.get("model", {})
    return _json_geom(
        {
            "type": "FeatureCollection",
            "features": features,
            "properties": {
                "slide": hm.attrs["slide"].get("name"),
                "model": model.get("name"),
                "threshold": thr,
                "coordinates": "level-0 pixels",
                "mpp_xy": [mx, my],
            },
        }
    )


def write_geojson(
    heatmap: str | Path | Heatmap,
    out: str | Path,
    threshold: float | None = None,
    include_tissue: bool = False,
    overwrite: bool = False,
) -> Path:
    from ..io.exports import write_json
    from ..io.outputs import expect_suffix

    expect_suffix(Path(out), (".geojson", ".json"))
    return write_json(out, to_geojson(heatmap, threshold, include_tissue), overwrite)
