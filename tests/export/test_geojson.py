"""GeoJSON regions match the painted tumour in level-0 coordinates, exactly on cell edges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box, shape

from tests._support import expected_share
from tests.export.conftest import MPP, SIZE_WH
from wsi_scan.errors import UsageError
from wsi_scan.export.geojson import to_geojson, write_geojson
from wsi_scan.io.heatmap import open_heatmap

#: every cell's share of these lies at least 0.05 away from 0.5
TUMOUR = ((1013, 740, 1511, 1190), (2203, 1500, 2431, 1699))


def _expected_union(hm, boxes, threshold: float):
    """Union of the cells whose painted tumour share is above the threshold (none ambiguous)."""
    rects = []
    rows, cols = hm.grid.shape_rc
    for r in range(rows):
        for c in range(cols):
            if not hm.tissue[r, c]:
                continue
            share = expected_share(hm.cell_to_l0_rect(r, c), boxes)
            assert abs(share - threshold) > 0.05, "test scene has a cell too close to the threshold"
            if share > threshold:
                rects.append(box(*hm.cell_to_l0_rect(r, c)))
    return shapely.union_all(rects)


def test_tumour_polygons_match_painted_squares(scanned):
    _, hm_path = scanned(tumour=TUMOUR)
    hm = open_heatmap(hm_path)
    fc = to_geojson(hm_path)
    assert fc["type"] == "FeatureCollection"
    feats = fc["features"]
    assert len(feats) == 2
    geoms = [shape(f["geometry"]) for f in feats]
    assert all(g.is_valid and isinstance(g, Polygon) for g in geoms)
    # exact: union of the cells the painted squares cover for more than half
    want = _expected_union(hm, TUMOUR, 0.5)
    got = shapely.union_all(geoms)
    assert got.symmetric_difference(want).area == 0
    assert sorted(g.bounds for g in geoms) == [(1024.0, 768.0, 1536.0, 1152.0), (2176.0, 1536.0, 2432.0, 1664.0)]
    for f, g in zip(feats, geoms):
        p = f["properties"]
        assert p["objectType"] == "annotation"
        assert p["classification"]["name"] == "Tumor" and len(p["classification"]["color"]) == 3
        m = p["measurements"]
        assert m["area_um2"] == pytest.approx(g.area * MPP * MPP)
        assert 0.5 <= m["mean_probability"] <= m["max_probability"] <= 1.0
    # every painted square's centre lies in exactly one polygon
    for x0, y0, x1, y1 in TUMOUR:
        centre = shapely.Point((x0 + x1) / 2, (y0 + y1) / 2)
        assert sum(g.contains(centre) for g in geoms) == 1
    json.dumps(fc, allow_nan=False)  # plain JSON, no NaN


def test_holes_are_kept(scanned):
    # a ring of tumour on cell edges (128 l0 px) around a 2x2-cell hole
    ring = ((1024, 768, 1792, 1024), (1024, 1280, 1792, 1536), (1024, 1024, 1280, 1280), (1536, 1024, 1792, 1280))
    _, hm_path = scanned(tumour=ring)
    feats = to_geojson(hm_path)["features"]
    assert len(feats) == 1
    g = shape(feats[0]["geometry"])
    assert g.is_valid and len(g.interiors) == 1
    assert g.exterior.bounds == (1024.0, 768.0, 1792.0, 1536.0)
    assert Polygon(g.interiors[0]).equals(box(1280, 1024, 1536, 1280))
    assert feats[0]["properties"]["measurements"]["area_um2"] == pytest.approx((768 * 768 - 256 * 256) * MPP * MPP)


def test_polygons_are_clipped_to_the_slide(scanned):
    # tumour up to the right edge: the last grid column overhangs the slide (24 * 128 > 3000)
    _, hm_path = scanned(tumour=((2700, 300, 3000, 900),), tissue=((300, 300, 3000, 2100),))
    hm = open_heatmap(hm_path)
    assert hm.cell_to_l0_rect(0, hm.grid.shape_rc[1] - 1)[2] > SIZE_WH[0]
    feats = to_geojson(hm_path, threshold=0.3)["features"]
    assert len(feats) == 1
    g = shape(feats[0]["geometry"])
    assert g.is_valid and g.bounds[2] == SIZE_WH[0]
    assert box(0, 0, *SIZE_WH).contains(g)


def test_tissue_layer_and_threshold(scanned, tmp_path):
    _, hm_path = scanned()
    fc = to_geojson(hm_path, threshold=0.99, include_tissue=True)
    classes = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert classes == ["Tissue"]  # nothing reaches 0.99 with the mock model
    g = shape(fc["features"][0]["geometry"])
    tx0, ty0, tx1, ty1 = g.bounds
    # the tissue rectangle (300, 300, 2700, 2100), to within two cells: cells whose window
    # reaches the tissue are scanned too (TissueConfig.min_window_fraction), one ring of cells
    assert np.allclose((tx0, ty0, tx1, ty1), (300, 300, 2700, 2100), atol=256)
    with pytest.raises(UsageError):
        to_geojson(hm_path, threshold=1.5)
    out = write_geojson(hm_path, tmp_path / "t.geojson", include_tissue=True)
    assert json.loads(out.read_text())["features"][0]["properties"]["classification"]["name"] == "Tumor"


def test_empty_slide_gives_empty_exports(scanned, tmp_path):
    from wsi_scan.export.overlay import render_overlay

    _, hm_path = scanned(tumour=(), tissue=())
    assert to_geojson(hm_path, include_tissue=True)["features"] == []
    assert render_overlay(hm_path, tmp_path / "o.png", max_size=200).exists()
