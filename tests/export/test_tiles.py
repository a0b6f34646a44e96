"""Patch sets cut from a slide: the windows a scan sees, level-0 coordinates, PCam labels and layout."""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np
import pytest

from tests._support import expected_share
from tests.export.conftest import MPP, SIZE_WH, TISSUE
from wsi_scan.errors import DataError
from wsi_scan.export.tiles import tile_slide
from wsi_scan.geometry import plan_grid
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.synthetic import TUMOUR_RGB

TUMOUR = ((1013, 707, 1511, 1209),)


def _geojson(tmp_path, boxes):
    feats = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Tumor"}},
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        }
        for x0, y0, x1, y1 in boxes
    ]
    # a non-tumour annotation is ignored
    feats.append(
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Stroma"}},
            "geometry": {"type": "Polygon", "coordinates": [[[300, 300], [900, 300], [900, 600], [300, 300]]]},
        }
    )
    p = tmp_path / "labels.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return p


def test_tiles_single_file(make_slide, tmp_path):
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE, tumour=TUMOUR)
    res = tile_slide(slide, tmp_path / "p.h5", stride_cells=2, labels_geojson=_geojson(tmp_path, TUMOUR))
    grid = plan_grid((0, 0, *SIZE_WH), (MPP, MPP), 0.972, 32, 96)
    with h5py.File(res.files[0], "r") as f:
        x, y, l0_xy, rc = f["x"][...], f["y"][...], f["l0_xy"][...], f["cell_rc"][...]
    n = res.n_patches
    assert x.shape == (n, 96, 96, 3) and x.dtype == np.uint8 and y.shape == (n, 1, 1, 1) and l0_xy.shape == (n, 2)
    assert n > 50 and (rc % 2 == 0).all()
    # windows are centred on their cell; the window top-left is one cell (margin) before it
    for (r, c), (wx, wy) in zip(rc, l0_xy):
        cx0, cy0, _, _ = grid.cell_to_l0_rect(int(r), int(c))
        assert (wx, wy) == pytest.approx((cx0 - 128, cy0 - 128))
    # labels follow PCam's rule on the painted square, in level-0 coordinates
    want = np.array([expected_share(grid.cell_to_l0_rect(int(r), int(c)), TUMOUR) > 0 for r, c in rc])
    np.testing.assert_array_equal(y.reshape(-1).astype(bool), want)
    assert res.n_positive == int(want.sum()) > 0
    # a window whose central cell lies wholly inside the painted square shows the tumour colour there
    inside = [i for i, (r, c) in enumerate(rc) if expected_share(grid.cell_to_l0_rect(int(r), int(c)), TUMOUR) == 1.0]
    assert inside
    for i in inside:
        np.testing.assert_allclose(x[i, 32:64, 32:64].reshape(-1, 3).mean(axis=0), TUMOUR_RGB, atol=8)


def test_tiles_pcam_folder_is_trainable_data(make_slide, tmp_path):
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE, tumour=TUMOUR)
    res = tile_slide(slide, tmp_path / "data", stride_cells=3, labels_geojson=_geojson(tmp_path, TUMOUR))
    assert sorted(p.name for p in res.files) == [
        "camelyonpatch_level_2_split_train_x.h5",
        "camelyonpatch_level_2_split_train_y.h5",
    ]
    pd = open_patch_data(tmp_path / "data", cache_dir=tmp_path / "cache")
    ps = pd.splits["train"]
    assert len(ps) == res.n_patches and int(ps.labels.sum()) == res.n_positive
    assert ps.read(0).shape == (96, 96, 3)


def test_tiles_without_labels_and_bad_labels(make_slide, tmp_path):
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    res = tile_slide(slide, tmp_path / "p.h5")
    with h5py.File(res.files[0], "r") as f:
        assert "y" not in f and f["x"].shape[0] == res.n_patches > 0
    bad = tmp_path / "bad.geojson"
    bad.write_text("not json")
    with pytest.raises(DataError, match="GeoJSON"):
        tile_slide(slide, tmp_path / "q.h5", labels_geojson=bad)
    assert not (tmp_path / "q.h5").exists()


def _label_mask(boxes, downsample):
    w, h = -(-SIZE_WH[0] // downsample), -(-SIZE_WH[1] // downsample)  # ceil, as slide pyramids round
    m = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0 // downsample : -(-y1 // downsample), x0 // downsample : -(-x1 // downsample)] = 255
    return m


@pytest.mark.parametrize("downsample,fmt", [(1, "png"), (8, "tif")])
def test_tiles_labels_from_mask_follow_pcam_rule(make_slide, tmp_path, downsample, fmt):
    from PIL import Image

    # boxes on multiples of the downsample, so the mask holds them exactly
    boxes = ((1016, 704, 1512, 1208), (2200, 1496, 2432, 1696))
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE, tumour=boxes)
    mask_path = tmp_path / f"mask.{fmt}"
    Image.fromarray(_label_mask(boxes, downsample)).save(mask_path)
    res = tile_slide(slide, tmp_path / "p.h5", stride_cells=1, labels_mask=mask_path)
    grid = plan_grid((0, 0, *SIZE_WH), (MPP, MPP), 0.972, 32, 96)
    with h5py.File(res.files[0], "r") as f:
        y, rc = f["y"][...].reshape(-1), f["cell_rc"][...]
        attrs = json.loads(f.attrs["wsi_scan"])
    assert "mask pixel" in attrs["label_rule"] and attrs["labels"] == str(mask_path)
    want = np.array([expected_share(grid.cell_to_l0_rect(int(r), int(c)), boxes) > 0 for r, c in rc])
    np.testing.assert_array_equal(y.astype(bool), want)
    assert 0 < res.n_positive == int(want.sum()) < res.n_patches


def test_tiles_label_mask_errors(make_slide, tmp_path):
    from PIL import Image

    from wsi_scan.errors import UsageError

    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    square = tmp_path / "square.png"
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(square)  # slide is 3000 x 2400: not its shape
    with pytest.raises(DataError, match="does not have the shape"):
        tile_slide(slide, tmp_path / "a.h5", labels_mask=square)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable mask"):
        tile_slide(slide, tmp_path / "b.h5", labels_mask=tmp_path / "text.png")
    with pytest.raises(UsageError, match="not both"):
        tile_slide(slide, tmp_path / "c.h5", labels_mask=square, labels_geojson=_geojson(tmp_path, TUMOUR))
    assert not list(tmp_path.glob("*.h5"))


def test_a_stride_that_misses_the_tissue_is_refused_before_writing(make_slide, tmp_path):
    from wsi_scan.errors import UsageError

    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    with pytest.raises(UsageError, match="--stride-cells 100000 leaves no window on the tissue"):
        tile_slide(slide, tmp_path / "a.h5", stride_cells=100000)
    assert not list(tmp_path.glob("*.h5"))


def test_labels_that_make_no_window_positive_are_warned_about(make_slide, tmp_path, caplog):
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    off = _geojson(tmp_path, [(50000, 50000, 60000, 60000)])  # tumour areas, all off the slide
    with caplog.at_level("WARNING", logger="wsi_scan.tile"):
        res = tile_slide(slide, tmp_path / "a.h5", labels_geojson=off)
    assert res.n_positive == 0 and "make no window positive" in caplog.text
    caplog.clear()
    empty = tmp_path / "negative.geojson"  # a negative slide's labels: no tumour, no warning
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with caplog.at_level("WARNING", logger="wsi_scan.tile"):
        tile_slide(slide, tmp_path / "b.h5", labels_geojson=empty)
    assert "make no window positive" not in caplog.text


def test_labels_of_points_only_are_warned_about(make_slide, tmp_path, caplog):
    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    points = tmp_path / "points.geojson"  # QuPath's point tool: counts, not areas
    points.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, "geometry": g}
                    for g in (
                        {"type": "Point", "coordinates": [1000, 1000]},
                        {"type": "MultiPoint", "coordinates": [[1200, 1000], [1300, 1100]]},
                        {"type": "LineString", "coordinates": [[1000, 1000], [2000, 2000]]},
                    )
                ],
            }
        )
    )
    with caplog.at_level("WARNING"):
        res = tile_slide(slide, tmp_path / "a.h5", labels_geojson=points)
    assert res.n_positive == 0
    assert "1 LineString, 1 MultiPoint, 1 Point and no polygon" in caplog.text and "not used" in caplog.text


def test_a_disk_that_fills_while_patches_are_written_is_one_error_and_leaves_nothing(make_slide, tmp_path, monkeypatch):
    """Measured on a tmpfs filled by another program mid-write: HDF5 raised inside its close and
    then crashed the process at exit (segfault). The writer's sink now takes the failure."""
    import errno

    from wsi_scan.errors import OutputWriteError
    from wsi_scan.io import datasets

    slide = make_slide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE)
    real_init = datasets._DiskSink.__init__

    class FillsUp:
        def __init__(self, f: Any) -> None:
            self.f, self.left = f, 60_000

        def write(self, b: Any) -> int:
            n = memoryview(b).nbytes
            if n > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= n
            return self.f.write(b)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def init(self: Any, path: Any) -> None:
        real_init(self, path)
        self._f = FillsUp(self._f)

    monkeypatch.setattr(datasets._DiskSink, "__init__", init)
    for out in (tmp_path / "a.h5", tmp_path / "folder"):
        with pytest.raises(OutputWriteError, match="No space left on device"):
            tile_slide(slide, out, labels_geojson=_geojson(tmp_path, [(1000, 1000, 2000, 2000)]))
        assert not out.exists() or not any(out.iterdir())
    assert not [p for p in tmp_path.rglob("*.tmp-*")]


def test_geojson_features_in_any_shape_give_the_tumour_or_one_error(tmp_path, caplog):
    """Found by the 2026-12-05 sweep: a class written as a bare string (or a number), properties
    that are a list, or a feature that is not an object were tracebacks; a bare geometry and the
    polygons inside a GeometryCollection were left out, the slide then negative in silence."""
    from wsi_scan.export.tiles import tumour_geometry

    ring = [[[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]]
    poly = {"type": "Polygon", "coordinates": ring}

    def fc(*feats: Any) -> dict[str, Any]:
        return {"type": "FeatureCollection", "features": list(feats)}

    def feat(props: Any, geometry: Any = poly) -> dict[str, Any]:
        return {"type": "Feature", "properties": props, "geometry": geometry}

    assert tumour_geometry(fc(feat({"classification": "Tumor"})), "g").area == 5000
    assert tumour_geometry(fc(feat([1, 2])), "g").area == 5000  # properties that say nothing: unclassified
    assert tumour_geometry(poly, "g").area == 5000  # a bare geometry is one unclassified region
    gc = {"type": "GeometryCollection", "geometries": [poly, {"type": "Point", "coordinates": [5, 5]}]}
    assert tumour_geometry(fc(feat({}, gc)), "g").area == 5000
    with pytest.raises(DataError, match="feature 0 is a JSON str"):
        tumour_geometry(fc("hello"), "g")
    with pytest.raises(DataError, match="'features' is a list, found dict"):
        tumour_geometry({"type": "FeatureCollection", "features": {}}, "g")
    # regions of other classes only: nothing is tumour, and that is said
    with caplog.at_level("WARNING", logger="wsi_scan.annotations"):
        assert tumour_geometry(fc(feat({"classification": {"name": "Metastasis"}}), feat({"classification": 5})), "g") is None
    assert "no region is classified Tumor" in caplog.text and "1 'Metastasis'" in caplog.text and "1 '5'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_scan.annotations"):  # beside a tumour region: no warning
        tumour_geometry(fc(feat({"classification": {"name": "Stroma"}}), feat({"classification": {"name": "Tumor"}})), "g")
    assert not caplog.text


def test_a_json_that_is_not_geojson_is_refused(tmp_path):
    """Any JSON object read as annotations marked nothing: a wsi-scan evaluation named after a
    slide (NAME.json) made that slide negative in silence (2026-12-05)."""
    from wsi_scan.export.tiles import tumour_geometry

    for obj, found in (({"froc": 1.0}, "found no type"), ({"type": "Topology"}, "found type 'Topology'")):
        with pytest.raises(DataError, match=f"g: not GeoJSON: expected an object of type FeatureCollection.*{found}"):
            tumour_geometry(obj, "g")
