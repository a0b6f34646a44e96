from __future__ import annotations

import numpy as np
import pytest

from wsi_scan.config import TissueConfig
from wsi_scan.geometry import plan_grid
from wsi_scan.grid import cell_tissue_fraction, tissue_blocks, tissue_cells
from wsi_scan.tissue import TissueMask, compute_mask


def _thumb() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 240, np.uint8) + rng.integers(0, 6, (200, 300, 3)).astype(np.uint8)
    img[50:150, 60:200] = (220, 130, 190)  # tissue, 100 x 140 mask px
    img[90:95, 100:105] = (240, 240, 240)  # a small hole: filled
    img[10:12, 10:12] = (90, 85, 80)  # a speck of grey dust: dropped
    img[180:195, 250:290] = (10, 10, 10)  # black ink: not tissue
    return img


def test_mask_finds_tissue_fills_holes_drops_specks():
    tm = compute_mask(_thumb(), (8.0, 8.0), TissueConfig())
    mask, thr = tm.mask, tm.threshold
    assert mask[50:150, 60:200].all()
    assert not mask[10:12, 10:12].any()
    assert not mask[180:195, 250:290].any()
    # the 3 x 3 mean lends the tissue's edge to the glass pixel next to it, no further
    assert mask.sum() == 102 * 142 and mask[49:151, 59:201].all()
    assert TissueConfig().min_saturation <= thr <= TissueConfig().max_saturation
    assert tm.params["method"] == "glass" and tm.params["glass_seen"] and tm.params["saturation_threshold"] == thr
    otsu = compute_mask(_thumb(), (8.0, 8.0), TissueConfig(method="otsu"))
    assert otsu.mask.sum() == 100 * 140 and 0.07 <= otsu.threshold < 0.4  # the former rule, unchanged


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
    assert np.array_equal(sat, hsv[..., 1]) and np.array_equal(value * (1.0 / 255.0), hsv[..., 2])
    assert np.array_equal(not_dark, hsv[..., 2] > 0.1)


# ----------------------------------------------------------------------------- artefacts, cell by cell

SLIDE_MPP = 2.0  # the artefact slide's level 0: 4 px per 8 um thumbnail pixel


def _glass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Scanner glass as the mosaics have it: RGB 238/237/241, noise sigma 2 (float, to paint on)."""
    return np.clip(np.array([238.0, 237.0, 241.0]) + rng.normal(0, 2.0, (h, w, 1)), 0, 255)


def _paint_tissue(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """Dense pink tissue with a grain (sigma 12) over ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = np.clip(np.array([200.0, 120.0, 175.0]) + rng.normal(0, 12, (y1 - y0, x1 - x0, 1)), 0, 255)


def _paint_fat(img: np.ndarray, box: tuple[int, int, int, int], step: int, width: int) -> None:
    """White fat cells ``step`` px across with pink membranes ``width`` px thick over ``box``."""
    x0, y0, x1, y1 = box
    fat = np.full((y1 - y0, x1 - x0, 3), 246.0)
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    fat[(yy % step < width) | (xx % step < width)] = (215, 150, 190)
    img[y0:y1, x0:x1] = fat


def _artefact_slide(tmp_path):
    """A 4 x 3 mm slide at 2 um/px with tissue, fat, a small fragment and every artefact the
    mask must refuse; returns the path and the regions in level-0 px (x0, y0, x1, y1)."""
    from scipy import ndimage

    from wsi_scan.io.synthetic import write_flat_slide

    rng = np.random.default_rng(5)
    h, w = 1500, 2000
    img = _glass(rng, h, w)
    regions = {
        "tissue": (200, 200, 700, 700),
        "fat": (800, 200, 1200, 600),
        "fragment": (1400, 300, 1450, 350),
        "pen_blue": (200, 900, 700, 930),
        "pen_green": (200, 1000, 700, 1030),
        "pen_black": (200, 1100, 700, 1130),
        "dust": (900, 1000, 905, 1005),
        "border": (1960, 0, 2000, 1500),
        "bubble": (1000, 800, 1300, 1100),
        "blur": (1450, 900, 1800, 1300),
    }
    _paint_tissue(img, regions["tissue"], rng)
    _paint_fat(img, regions["fat"], 30, 2)  # fat cells ~60 um across, membranes 4 um thick
    x0, y0, x1, y1 = regions["fragment"]  # ~100 um of pale stroma
    img[y0:y1, x0:x1] = np.clip(np.array([225.0, 185.0, 210.0]) + rng.normal(0, 6, (y1 - y0, x1 - x0, 1)), 0, 255)
    for name, colour in (("pen_blue", (40, 70, 170)), ("pen_green", (60, 150, 80)), ("pen_black", (40, 40, 46))):
        x0, y0, x1, y1 = regions[name]
        img[y0:y1, x0:x1] = colour
    x0, y0, x1, y1 = regions["dust"]
    img[y0:y1, x0:x1] = (70, 68, 66)
    x0, y0, x1, y1 = regions["border"]
    img[y0:y1, x0:x1] = 0
    x0, y0, x1, y1 = regions["bubble"]  # a grey ring 3 px thick
    cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, (x1 - x0) / 2 - 4
    yy, xx = np.mgrid[0:h, 0:w]
    ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.5
    img[ring] = (150, 150, 152)
    x0, y0, x1, y1 = regions["blur"]  # an out-of-focus blank: a smooth, slightly darker grey
    patch = ndimage.gaussian_filter(rng.normal(0, 4, (y1 - y0, x1 - x0)), 20)
    img[y0:y1, x0:x1] = np.clip(np.array([226.0, 226.0, 229.0]) + patch[..., None], 0, 255)
    path = tmp_path / "artefacts.tif"
    write_flat_slide(path, img.astype(np.uint8), SLIDE_MPP)
    return path, regions


def _cells_in(grid, box, inner: bool) -> tuple[slice, slice]:
    """The cells wholly inside (inner) or touching (not inner) a level-0 box."""
    import math

    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    x0, y0, x1, y1 = box
    if inner:
        return slice(math.ceil((y0 - oy) / sy), math.floor((y1 - oy) / sy)), slice(
            math.ceil((x0 - ox) / sx), math.floor((x1 - ox) / sx)
        )
    return slice(max(0, math.floor((y0 - oy) / sy)), math.ceil((y1 - oy) / sy)), slice(
        max(0, math.floor((x0 - ox) / sx)), math.ceil((x1 - ox) / sx)
    )


def test_artefacts_stay_out_and_pale_tissue_stays_in(tmp_path):
    from wsi_scan.config import ScanConfig
    from wsi_scan.io.slide import open_slide
    from wsi_scan.plan import plan_scan

    path, regions = _artefact_slide(tmp_path)
    with open_slide(path) as slide:
        sp = plan_scan(slide, (SLIDE_MPP, SLIDE_MPP), 0.972, 32, 96, ScanConfig())
    cells, grid = sp.cells, sp.grid
    for name in ("tissue", "fat", "fragment"):
        inside = cells[_cells_in(grid, regions[name], inner=True)]
        assert inside.size and inside.all(), f"{name}: {int((~inside).sum())} of {inside.size} cells not scanned"
    for name in ("pen_blue", "pen_green", "pen_black", "dust", "border", "bubble", "blur"):
        touched = cells[_cells_in(grid, regions[name], inner=False)]
        assert not touched.any(), f"{name}: {int(touched.sum())} cells scanned"
    # and the former rule indeed dropped the fat: the test would catch a return to it
    with open_slide(path) as slide:
        old = plan_scan(slide, (SLIDE_MPP, SLIDE_MPP), 0.972, 32, 96, ScanConfig(tissue=TissueConfig(method="otsu")))
    assert not old.cells[_cells_in(grid, regions["fat"], inner=True)].all()


def test_tissue_all_mask_and_roi(tmp_path):
    import json

    from PIL import Image

    from wsi_scan.config import ScanConfig
    from wsi_scan.io.slide import open_slide
    from wsi_scan.plan import plan_scan

    path, regions = _artefact_slide(tmp_path)
    with open_slide(path) as slide:
        every = plan_scan(slide, (SLIDE_MPP, SLIDE_MPP), 0.972, 32, 96, ScanConfig(tissue=TissueConfig(method="all")))
        assert every.cells.all()
        # a user's mask at 1/10 of level 0: exactly the tissue square
        m = np.zeros((150, 200), np.uint8)
        m[20:70, 20:70] = 255
        Image.fromarray(m).save(tmp_path / "mask.png")
        user = plan_scan(slide, (SLIDE_MPP, SLIDE_MPP), 0.972, 32, 96, ScanConfig(tissue_mask=str(tmp_path / "mask.png")))
        assert user.cells[_cells_in(user.grid, regions["tissue"], inner=True)].all()
        assert user.cells.sum() <= user.cells[_cells_in(user.grid, (180, 180, 720, 720), inner=False)].sum()
        # an ROI over the left half of the tissue square
        roi = {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "properties": {},
                    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [450, 0], [450, 1500], [0, 1500], [0, 0]]]},
                }
            ],
        }
        (tmp_path / "roi.geojson").write_text(json.dumps(roi))
        part = plan_scan(slide, (SLIDE_MPP, SLIDE_MPP), 0.972, 32, 96, ScanConfig(roi=str(tmp_path / "roi.geojson")))
    xs = part.grid.l0_origin_xy[0] + (np.nonzero(part.cells)[1] + 0.5) * part.grid.l0_cell_size_xy[0]
    assert part.cells.any() and xs.max() < 450


def test_closing_equals_skimage_on_the_padded_mask():
    from skimage import morphology

    from wsi_scan.tissue import _closing

    rng = np.random.default_rng(0)
    for p in (0.97, 0.6):
        m = rng.random((150, 170)) > p
        for r in (1, 2, 4):
            want = morphology.closing(np.pad(m, r + 1), morphology.disk(r))[r + 1 : -r - 1, r + 1 : -r - 1] | m
            assert np.array_equal(_closing(m, r), want)


def test_glass_threshold_equals_the_plain_formula():
    """The glass level is computed in place to save memory; it must equal the plain formula:
    the histogram mode of bright grey pixels plus the larger of the margin and 4 spreads."""
    import math

    from wsi_scan.tissue import glass_threshold

    cfg = TissueConfig(min_saturation=0.0, max_saturation=1.0)  # the clamp would hide a difference
    rng = np.random.default_rng(3)
    sat = np.clip(rng.normal(0.013, 0.004, (300, 400)), 0, 1)
    sat[:100] = rng.uniform(0.05, 0.6, (100, 400))  # tissue
    value = np.full(sat.shape, 240, np.uint8)
    thr, found = glass_threshold(sat, value, cfg)
    glass = sat[(value / 255.0 >= cfg.glass_min_value) & (sat < cfg.glass_max_saturation)]
    step = 0.0025
    hist, edges = np.histogram(glass, bins=int(math.ceil(cfg.glass_max_saturation / step)), range=(0.0, cfg.glass_max_saturation))
    k = int(np.argmax(hist))
    mode = (edges[k] + edges[k + 1]) / 2
    spread = 1.4826 * np.median(np.abs(glass[glass <= mode + 4 * step] - mode))
    assert thr == mode + max(cfg.glass_margin, 4 * spread)
    assert found == {"glass_seen": True, "glass_saturation_mode": round(mode, 4), "glass_saturation_spread": round(spread, 4)}


# ----------------------------------------------------------------------------- the stain check


def test_window_stain_px_equals_the_plain_sum():
    from wsi_scan.grid import window_stain_px

    rng = np.random.default_rng(4)
    st = rng.random((7 * 5, 9 * 5)) > 0.7  # 7 x 9 cells of 5 px: 5 x 7 inner cells
    got = window_stain_px(st, 5)
    want = np.array([[st[r * 5 : (r + 3) * 5, c * 5 : (c + 3) * 5].sum() for c in range(7)] for r in range(5)])
    assert got.shape == (5, 7) and np.array_equal(got, want)


def test_stained_pixels_refuse_glass_ink_and_dark_marks():
    from wsi_scan.tissue import stained_pixels

    rng = np.random.default_rng(6)
    img = np.clip(np.array([238.0, 237.0, 241.0]) + rng.normal(0, 2.0, (60, 120, 1)), 0, 255).astype(np.uint8)
    img[10:12, 5:25] = (215, 150, 190)  # a 2 px eosin membrane
    img[20:24, 5:9] = (90, 40, 130)  # a haematoxylin nucleus, dark but coloured
    img[10:20, 40:50] = (40, 70, 170)  # blue pen
    img[10:20, 60:70] = (60, 150, 80)  # green pen
    img[10:20, 80:90] = (70, 68, 66)  # grey dust
    img[10:20, 100:110] = 0  # black
    st = stained_pixels(img, TissueConfig())
    assert st[10:12, 5:25].all() and st[20:24, 5:9].all()
    assert not st[:, 35:].any(), "ink, dust, black or their rims taken for stain"
    assert not st[30:, :].any(), "glass taken for stain"


def _fragment_slide(tmp_path):
    """A 3 x 2 mm slide at 1 um/px: one piece of tissue, and far from it and from each other a
    fat fragment (1 px membranes), two nuclei, a 3 px speck and a dot of blue pen,
    each too faint or too small for the 8 um/px thumbnail alone. Regions in level-0 px."""
    from wsi_scan.io.synthetic import write_flat_slide

    rng = np.random.default_rng(7)
    h, w = 2000, 3000
    img = _glass(rng, h, w)
    regions = {
        "tissue": (200, 200, 1000, 1000),
        "fat": (1500, 400, 1590, 490),
        "nuclei": (2400, 400, 2417, 414),
        "speck": (1500, 1500, 1503, 1503),
        "pen": (2400, 1500, 2410, 1510),
    }
    _paint_tissue(img, regions["tissue"], rng)
    _paint_fat(img, regions["fat"], 30, 1)  # membranes 1 um thick
    x0, y0 = regions["nuclei"][:2]
    for dy, dx in ((0, 0), (9, 12)):  # two nuclei 5 um across: 50 um2 of stain
        img[y0 + dy : y0 + dy + 5, x0 + dx : x0 + dx + 5] = (90, 40, 130)
    x0, y0, x1, y1 = regions["speck"]
    img[y0:y1, x0:x1] = (215, 150, 190)
    x0, y0, x1, y1 = regions["pen"]
    img[y0:y1, x0:x1] = (40, 70, 170)
    path = tmp_path / "fragments.tif"
    write_flat_slide(path, img.astype(np.uint8), 1.0)
    return path, regions


def test_stain_check_finds_faint_fragments_and_nothing_else(tmp_path):
    from wsi_scan.config import ScanConfig
    from wsi_scan.io.slide import open_slide
    from wsi_scan.plan import plan_scan

    path, regions = _fragment_slide(tmp_path)
    with open_slide(path) as slide:
        off = plan_scan(slide, (1.0, 1.0), 0.972, 32, 96, ScanConfig(tissue=TissueConfig(stain_check=False)))
        on = plan_scan(slide, (1.0, 1.0), 0.972, 32, 96, ScanConfig())
    grid = on.grid
    for name in ("fat", "nuclei"):
        r = grid.l0_to_cell((regions[name][0] + regions[name][2]) / 2, (regions[name][1] + regions[name][3]) / 2)
        assert not off.cells[r], f"{name}: the thumbnail alone found it, so this slide tests nothing"
        assert on.cells[r], f"{name}: the stain check did not find it"
    assert on.cells[_cells_in(grid, regions["tissue"], inner=True)].all()
    added = on.cells & ~off.cells
    assert not (off.cells & ~on.cells).any()  # the check only adds
    # every cell added has a fragment in its window (the cell and its 8 neighbours)
    near = np.zeros_like(added)
    for name in ("tissue", "fat", "nuclei"):
        rs, cs = _cells_in(grid, regions[name], inner=False)
        near[max(0, rs.start - 1) : rs.stop + 1, max(0, cs.start - 1) : cs.stop + 1] = True
    assert added.any() and not (added & ~near).any()
    for name in ("speck", "pen"):  # 9 um2 of stain is under the check's 20 um2; pen is never stain
        rs, cs = _cells_in(grid, regions[name], inner=False)
        assert not on.cells[max(0, rs.start - 1) : rs.stop + 1, max(0, cs.start - 1) : cs.stop + 1].any(), name
    p = on.tissue.params
    assert p["stain_check_cells_added"] == int(added.sum()) and p["stain_check_cells_read"] >= int(added.sum())
    assert p["stain_check"] is True and "stain_check_cells_read" not in off.tissue.params


def test_glass_at_the_edge_is_not_a_hole():
    """A slide smaller than the largest hole the rule fills is glass, not tissue; and a bay of
    glass between tissue and the slide's edge stays glass, while a hole inside tissue is filled."""
    rng = np.random.default_rng(8)
    small = (235 + rng.integers(0, 8, (12, 12, 3))).astype(np.uint8)  # 96 um of glass
    assert not compute_mask(small, (8.0, 8.0), TissueConfig()).mask.any()
    img = (235 + rng.integers(0, 8, (100, 100, 3))).astype(np.uint8)
    img[:, 20:] = (200, 120, 175)
    img[40:54, 86:100] = (238, 237, 241)  # a bay at the right edge, 14 x 14 px (12,500 um2)
    img[40:50, 50:60] = (238, 237, 241)  # a hole inside the tissue
    m = compute_mask(img, (8.0, 8.0), TissueConfig()).mask
    assert m[42:48, 52:58].all() and not m[44:50, 93:100].any()
    # the former rule fills the bay: this slide tells the two apart
    assert compute_mask(img, (8.0, 8.0), TissueConfig(method="otsu")).mask[44:50, 93:100].all()


def test_the_ink_margin_is_the_former_dilation():
    """The refused pixels are grown with a separable 5 x 5 maximum instead of a binary dilation
    by a 5 x 5 square: the same pixels, borders included."""
    from scipy import ndimage

    rng = np.random.default_rng(9)
    for p in (0.999, 0.9, 0.5):
        m = rng.random((97, 131)) > p
        m[0, :3] = m[-1, -2:] = True
        want = ndimage.binary_dilation(m, structure=np.ones((5, 5), bool))
        assert np.array_equal(ndimage.maximum_filter(m, size=5, mode="constant", cval=False), want)


def test_only_small_pieces_of_the_mask_send_their_ring_to_the_stain_check():
    from wsi_scan.tissue import _small_pieces

    m = np.zeros((40, 60), bool)
    m[2:30, 2:30] = True  # 784 px: large tissue
    m[5:8, 40:43] = True  # 9 px: a fragment
    m[20:22, 50:52] = True  # 4 px
    small = _small_pieces(m, 9)
    assert small[5:8, 40:43].all() and small[20:22, 50:52].all() and not small[2:30, 2:30].any()
    assert not _small_pieces(np.zeros((5, 5), bool), 9).any()


def test_a_bad_tissue_mask_is_named_as_the_option(tmp_path):
    from wsi_scan.errors import UsageError
    from wsi_scan.plan import user_tissue_mask

    (tmp_path / "junk.png").write_bytes(b"not an image")
    for path, match in (
        (tmp_path, "--tissue-mask .* does not exist or is not a file"),
        (tmp_path / "junk.png", "non-zero = tissue"),
    ):
        with pytest.raises(UsageError, match=match):  # exit 2 for an option, not 6 for training data
            user_tissue_mask(str(path), (1000, 1000), (0.5, 0.5))
