"""The export commands: files written, errors as one line with an exit code."""

from __future__ import annotations

import json

import numpy as np
import tifffile
from PIL import Image

from tests.export.conftest import SIZE_WH
from tests.test_cli import assert_clean_failure, run


def test_export_commands(scanned, tmp_path):
    slide, hm = scanned()
    code, out, err = run("overlay", hm, "--out", tmp_path / "o.png", "--max-size", 300, "--alpha", 0.4)
    assert code == 0, err
    with Image.open(tmp_path / "o.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    code, out, err = run("geojson", hm, "--out", tmp_path / "t.geojson", "--threshold", 0.6, "--tissue")
    assert code == 0, err
    fc = json.loads((tmp_path / "t.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"Tumor", "Tissue"}
    code, out, err = run("heatmap-tiff", hm, "--out", tmp_path / "h.tif", "--probability")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "h.tif", key=0).shape == (SIZE_WH[1], SIZE_WH[0])


def test_export_errors_are_one_line(scanned, tmp_path):
    slide, hm = scanned()
    code, _, err = run("overlay", hm, "--out", tmp_path / "o.bmp")
    assert_clean_failure(code, err, tmp_path / "o.bmp", ".png")
    code, _, err = run("geojson", tmp_path / "missing.zarr", "--out", tmp_path / "t.geojson")
    assert_clean_failure(code, err, tmp_path / "t.geojson", "does not exist")
    (tmp_path / "t.geojson").write_text("{}")
    code, _, err = run("geojson", hm, "--out", tmp_path / "t.geojson")
    assert_clean_failure(code, err, None, "not a file written by wsi-scan")  # said at once, not after --overwrite
    slide.unlink()
    code, _, err = run("overlay", hm, "--out", tmp_path / "o2.png")
    assert_clean_failure(code, err, tmp_path / "o2.png", "--slide")


def test_scan_writes_overlay(make_slide, tmp_path):
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    out, pic = tmp_path / "h.zarr", tmp_path / "o.jpg"
    code, _, err = run(slide, "--out", out, "--overlay", pic, "--quiet")
    assert code == 0, err
    with Image.open(pic) as im:
        assert im.format == "JPEG" and np.asarray(im).shape[2] == 3
    # a bad overlay name is refused before the scan starts
    code, _, err = run(slide, "--out", tmp_path / "h2.zarr", "--overlay", tmp_path / "o.tiff", "--quiet")
    assert_clean_failure(code, err, tmp_path / "h2.zarr", ".png")


def test_tile_command(make_slide, tmp_path):
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    labels = tmp_path / "t.geojson"
    labels.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": '
        '{"type": "Polygon", "coordinates": [[[1000, 700], [1500, 700], [1500, 1200], [1000, 1200], [1000, 700]]]}}]}'
    )
    code, out, err = run("tile", slide, "--out", tmp_path / "data", "--labels-geojson", labels)
    assert code == 0, err
    assert "positive" in out and (tmp_path / "data" / "camelyonpatch_level_2_split_train_y.h5").exists()
    code, _, err = run("tile", slide, "--out", tmp_path / "p.h5", "--labels-geojson", tmp_path / "none.geojson")
    assert_clean_failure(code, err, tmp_path / "p.h5", "does not exist")
