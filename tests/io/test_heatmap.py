"""The OME-Zarr contract of DESIGN section 5, read back with plain zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tests._support import ColourProbe, mock_card
from wsi_scan.config import ScanConfig
from wsi_scan.errors import HeatmapError
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import LoadedModel
from wsi_scan.scan import scan_slide


def test_contract(make_slide, mock_model, tmp_path):
    slide = make_slide(size_wh=(10000, 2400), tissue=((300, 300, 9700, 2100),), tumour=((1000, 700, 1500, 1200),))
    out = tmp_path / "h.zarr"
    scan_slide(slide, out, ScanConfig(), model=mock_model)
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" for a in ms["axes"])
    paths = [d["path"] for d in ms["datasets"]]
    assert paths[0] == "0" and len(paths) >= 2
    meta = root.attrs["wsi_scan"]
    assert meta["status"] == "complete" and isinstance(meta["format_version"], int)
    for k in ("path", "name", "size_bytes", "level0_size_wh", "mpp_xy", "mpp_source"):
        assert k in meta["slide"]
    for k in ("l0_origin_xy", "l0_cell_size_xy", "shape_rc", "patch_px", "cell_px", "target_mpp"):
        assert k in meta["grid"]
    for k in ("model", "config", "software", "timings_s"):
        assert meta[k]
    assert meta["model"]["threshold"] == 0.5
    # scale: one cell is 32 px at the model's 0.972 um/px
    s0 = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert s0 == pytest.approx([32 * 0.972, 32 * 0.972])
    s1 = ms["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert s1 == pytest.approx([64 * 0.972, 64 * 0.972])
    # translation puts cell (0, 0)'s centre at its level-0 rectangle's centre, in the
    # pixel-centre world frame of a slide shown at scale = mpp
    t0 = ms["datasets"][0]["coordinateTransformations"][1]["translation"]
    g = meta["grid"]
    mpp = meta["slide"]["mpp_xy"]
    cx = g["l0_origin_xy"][0] + g["l0_cell_size_xy"][0] / 2
    assert t0[1] == pytest.approx((cx - 0.5) * mpp[0])
    a0 = root["0"]
    assert a0.dtype == np.float32 and tuple(a0.shape) == tuple(g["shape_rc"])
    tissue = root["labels/tissue/0"]
    assert tuple(tissue.shape) == tuple(g["shape_rc"])
    assert root["labels"].attrs["ome"]["labels"] == ["tissue"]
    assert "image-label" in root["labels/tissue"].attrs["ome"]
    probs = a0[...]
    assert np.array_equal(np.isfinite(probs), tissue[...].astype(bool))
    # the coarser level is the NaN-aware 2x2 mean
    lvl1 = root["1"][...]
    blk = probs[:2, :2]
    if np.isfinite(blk).any():
        assert lvl1[0, 0] == pytest.approx(np.nanmean(blk))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".h.zarr")]


def test_incomplete_store_is_refused(make_slide, mock_model, tmp_path):
    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=mock_model)
    root = zarr.open_group(str(out), mode="r+")
    meta = dict(root.attrs["wsi_scan"])
    meta["status"] = "writing"
    root.attrs["wsi_scan"] = meta
    with pytest.raises(HeatmapError, match="incomplete"):
        open_heatmap(out)


def test_cell_mapping_roundtrip(make_slide, mock_model, tmp_path):
    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=mock_model)
    hm = open_heatmap(out)
    for r, c in [(0, 0), (3, 7), (hm.grid.shape_rc[0] - 1, hm.grid.shape_rc[1] - 1)]:
        x0, y0, x1, y1 = hm.cell_to_l0_rect(r, c)
        assert hm.l0_to_cell((x0 + x1) / 2, (y0 + y1) / 2) == (r, c)
        assert hm.l0_to_cell(x0 + 1e-6, y0 + 1e-6) == (r, c)


def _edit(out, fn):
    root = zarr.open_group(str(out), mode="r+")
    meta = dict(root.attrs["wsi_scan"])
    ome = dict(root.attrs["ome"])
    fn(meta, ome)
    root.attrs["wsi_scan"] = meta
    root.attrs["ome"] = ome


@pytest.mark.parametrize(
    "edit, match",
    [
        # each value alone is plausible; together they would move and rescale every lesion
        (lambda m, o: m["slide"].update(mpp_xy=[1.5, 1.5]), "cell size"),
        (lambda m, o: m["grid"].update(l0_cell_size_xy=[55.0, 55.0]), "cell size"),
        (lambda m, o: o["multiscales"][0]["datasets"][0]["coordinateTransformations"][0].update(scale=[1, 1]), "OME"),
        (lambda m, o: o.pop("multiscales"), "OME"),
    ],
)
def test_edited_scale_is_refused(make_slide, mock_model, tmp_path, edit, match):
    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=mock_model)
    open_heatmap(out)
    _edit(out, edit)
    with pytest.raises(HeatmapError, match=match):
        open_heatmap(out)


@pytest.mark.parametrize(
    "key, value",
    [(("grid", "l0_origin_xy"), "[Infinity, 0]"), (("slide", "level0_size_wh"), "[1e400, 2400]")],
)
def test_an_infinite_integer_attr_is_a_damaged_store(make_slide, mock_model, tmp_path, key, value):
    """JSON's Infinity (or 1e400) where an integer belongs: int() raises OverflowError, which
    escaped the contract check as a traceback in every reader (2026-12-05)."""
    import json

    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=mock_model)
    zj = out / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"]["wsi_scan"][key[0]][key[1]] = "@@"
    zj.write_text(json.dumps(doc).replace('"@@"', value))
    with pytest.raises(HeatmapError, match="damaged heatmap store"):
        open_heatmap(out)


@pytest.mark.parametrize("side", [90, 1])
def test_the_store_of_a_slide_smaller_than_one_cell_is_read_back(make_slide, mock_model, tmp_path, side):
    """A 90 px (or 1 px) crop scans to a grid of one cell larger than the slide; every reader then
    called that store "damaged ... rerun the scan", which gave the same store again (2026-12-05)."""
    slide = make_slide(size_wh=(side, side), downsamples=(1,), tile_px=16, tissue=((0, 0, side, side),))
    out = tmp_path / "h.zarr"
    scan_slide(slide, out, ScanConfig(), model=mock_model)
    hm = open_heatmap(out)
    assert hm.grid.shape_rc == (1, 1) and hm.grid.l0_cell_size_xy[0] > side


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["model"].pop("threshold"),
        lambda m: m["model"].update(threshold=0.0),
        lambda m: m["model"].update(threshold=1.5),
    ],
)
def test_a_store_without_a_usable_threshold_is_damaged(make_slide, mock_model, tmp_path, edit):
    """A threshold removed from the attrs read as 0.5 whatever the model's (0.3993 for the bundled
    fast), and one of 0 or 1 made every tissue cell tumour, or none: each changed every tumour
    area and contour without a word (2026-12-05)."""
    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=mock_model)
    _edit(out, lambda m, o: edit(m))
    with pytest.raises(HeatmapError, match="damaged heatmap store"):
        open_heatmap(out)


def test_the_store_of_a_model_whose_threshold_rule_failed_is_read_back(make_slide, tmp_path):
    """A run whose scores meet no specificity is kept with threshold 1.0 and its failed rule in
    its card; the store its scan wrote must not then be called damaged by every reader."""
    card = mock_card(threshold=1.0, training={"threshold_rule": {"met": False, "reached": 0.0}})
    model = LoadedModel(ColourProbe(card.mean, card.std).eval(), card, "mock", "0" * 64)
    out = tmp_path / "h.zarr"
    scan_slide(make_slide(), out, ScanConfig(), model=model)
    assert open_heatmap(out).threshold == 1.0


def test_a_store_missing_an_array_or_a_file_is_named_for_what_it_is(make_slide, mock_model, tmp_path):
    """A store of ours with its level-0 array's metadata deleted was "not a wsi-scan heatmap store
    (KeyError: '0')", and a slide given to lesions "not a ... store (GroupNotFoundError ...)",
    neither saying what to do (2026-12-05)."""
    slide = make_slide()
    out = tmp_path / "h.zarr"
    scan_slide(slide, out, ScanConfig(), model=mock_model)
    (out / "0" / "zarr.json").unlink()
    with pytest.raises(HeatmapError, match="damaged heatmap store, its array 0 is missing; rerun the scan"):
        open_heatmap(out)
    with pytest.raises(HeatmapError, match=r"slide.tif is a file, not a heatmap store \(a folder\)"):
        open_heatmap(slide)
