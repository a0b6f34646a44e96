from __future__ import annotations

import numpy as np

from wsi_scan.config import TissueConfig
from wsi_scan.geometry import plan_grid
from wsi_scan.grid import cell_tissue_fraction, tissue_blocks, tissue_cells
from wsi_scan.tissue import TissueMask, compute_mask


def _thumb() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 240, np.uint8) + rng.integers(0, 6, (200, 300, 3)).astype(np.uint8)
    img[50:150, 60:200] = (220, 130, 190)  # tissue, 100 x 140 mask px
    img[90:95, 100:105] = (240, 240, 240)  # a small hole: filled
    img[10:12, 10:12] = (200, 100, 180)  # a speck: dropped
    img[180:195, 250:290] = (10, 10, 10)  # black ink: not tissue
    return img


def test_mask_finds_tissue_fills_holes_drops_specks():
    tm = compute_mask(_thumb(), (8.0, 8.0), TissueConfig())
    mask, thr = tm.mask, tm.threshold
    assert mask[50:150, 60:200].all()
    assert not mask[10:12, 10:12].any()
    assert not mask[180:195, 250:290].any()
    assert mask.sum() == 100 * 140
    assert TissueConfig().min_saturation <= thr <= TissueConfig().max_saturation
    assert tm.params["method"] == "glass" and tm.params["glass_seen"] and tm.params["saturation_threshold"] == thr
    otsu = compute_mask(_thumb(), (8.0, 8.0), TissueConfig(method="otsu"))
    assert otsu.mask.sum() == 100 * 140 and 0.07 <= otsu.threshold < 0.4


def test_glass_only_has_no_tissue():
    rng = np.random.default_rng(1)
    glass = (235 + rng.integers(0, 8, (120, 160, 3))).astype(np.uint8)
    assert not compute_mask(glass, (8.0, 8.0), TissueConfig()).mask.any()


def test_cell_fraction_and_blocks():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 30:50] = True
    tm = TissueMask(mask, (32.0, 32.0), (8.0, 8.0), 0.1)  # a mask px = 32 l0 px
    # cells of 128 l0 px = 4 mask px
    g = plan_grid((0, 0, 3200, 3200), (0.243, 0.243), 0.972, 32, 96)
    frac = cell_tissue_fraction(g, tm)
    assert frac.shape == g.shape_rc == (25, 25)
    assert frac[5:15, 8:12].min() == 1.0 and frac[:5].max() == 0.0
    assert frac[5, 7] == 0.5  # mask columns 28..31 of which 30, 31 are tissue
    cells = tissue_cells(g, tm, 0.05)
    assert cells.sum() == 10 * 4 + 10 * 2
    bl = tissue_blocks(cells, 8)
    assert all(cells[r0 : r0 + nr, c0 : c0 + nc].any() for r0, c0, nr, nc in bl)
    assert sorted(bl) == [(0, 0, 8, 8), (0, 8, 8, 8), (8, 0, 8, 8), (8, 8, 8, 8)]  # none of the 12 empty blocks


def test_saturation_lookup_equals_skimage_rgb2hsv_exactly():
    from skimage.color import rgb2hsv

    from wsi_scan.tissue import _saturation

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)
    rgb[0, :4] = [(0, 0, 0), (255, 255, 255), (7, 7, 7), (255, 0, 0)]  # zero max, grey, saturated
    hsv = rgb2hsv(rgb)
    sat, value, not_dark = _saturation(rgb, 0.1)
    assert np.array_equal(sat, hsv[..., 1]) and np.array_equal(value, hsv[..., 2])
    assert np.array_equal(not_dark, hsv[..., 2] > 0.1)
