"""The level-0 heatmap TIFF: slide-sized pyramid whose pixels show the cell under them."""

from __future__ import annotations

import re

import numpy as np
import tifffile

from tests.export.conftest import MPP, SIZE_WH
from wsi_scan.export.heatmap_tiff import write_heatmap_tiff
from wsi_scan.export.overlay import colormap_rgb
from wsi_scan.io.heatmap import open_heatmap


def _cells_of_row(hm, l0_y: int, width: int) -> tuple[int, np.ndarray]:
    r = hm.l0_to_cell(0, l0_y + 0.5)[0]
    cols = np.array([hm.l0_to_cell(x + 0.5, 0)[1] for x in range(width)])
    return r, cols


def test_rgba_tiff_pixels_follow_cells(scanned, tmp_path):
    _, hm_path = scanned()
    hm = open_heatmap(hm_path)
    out = write_heatmap_tiff(hm_path, tmp_path / "h.tif", tile_px=256)
    with tifffile.TiffFile(out) as tf:
        assert len(tf.pages) >= 3
        p0 = tf.pages[0]
        assert p0.shape == (SIZE_WH[1], SIZE_WH[0], 4) and p0.is_tiled
        num, den = p0.tags["XResolution"].value
        assert p0.tags["ResolutionUnit"].value == 3  # centimeter
        assert abs(num / den - 1e4 / MPP) < 1e-3 * 1e4 / MPP  # pixels per cm from the slide's mpp
        lv0 = p0.asarray()
        assert tf.pages[1].shape[:2] == (SIZE_WH[1] // 2, SIZE_WH[0] // 2)
    # a row through the painted tumour (y = 958): every pixel shows its own cell
    r, cols = _cells_of_row(hm, 958, SIZE_WH[0])
    p = hm.probs[r, np.clip(cols, 0, None)]
    ok = np.isfinite(p)
    np.testing.assert_array_equal(lv0[958, ok, :3], colormap_rgb(p[ok]))
    assert (lv0[958, ok, 3] == 255).all() and (lv0[958, ~ok, 3] == 0).all()
    assert ok[1262] and p[1262] > 0.85  # tumour centre
    assert lv0[100, 100, 3] == 0  # glass is transparent


def test_probability_tiff(scanned, tmp_path):
    _, hm_path = scanned()
    hm = open_heatmap(hm_path)
    out = write_heatmap_tiff(hm_path, tmp_path / "p.tif", probability=True, tile_px=512)
    lv0 = tifffile.imread(out, key=0)
    assert lv0.shape == (SIZE_WH[1], SIZE_WH[0]) and lv0.dtype == np.float32
    for l0_x, l0_y in ((1262, 958), (2300, 1600), (700, 1800), (1023, 767), (1024, 768)):
        r, c = hm.l0_to_cell(l0_x + 0.5, l0_y + 0.5)
        np.testing.assert_array_equal(lv0[l0_y, l0_x], hm.probs[r, c])
    assert np.isnan(lv0[100, 100])


def test_the_progress_bar_counts_every_tile_of_every_level(scanned, tmp_path, capsys):
    """A CAMELYON-sized store takes minutes to write; the bar's total is the tiles actually written."""
    _, hm_path = scanned()
    out = write_heatmap_tiff(hm_path, tmp_path / "h.tif", tile_px=256, progress=True)
    with tifffile.TiffFile(out) as tf:
        written = sum(len(p.dataoffsets) for p in tf.pages)
    totals = set(re.findall(r"\d+/(\d+) \[", capsys.readouterr().err))
    assert totals == {str(written)}
