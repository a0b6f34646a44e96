"""The overlay picture: heatmap colours sit on the painted tumour, placed by the grid's level-0 mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_scan.errors import SlideNotFoundError, UsageError
from wsi_scan.export.overlay import colormap_rgb, compose_overlay, render_overlay
from wsi_scan.geometry import GridGeometry
from wsi_scan.io.heatmap import Heatmap, open_heatmap
from wsi_scan.io.synthetic import BACKGROUND_RGB, TISSUE_RGB, TUMOUR_RGB


def _blend(under: tuple[int, ...], p: float, alpha: float) -> np.ndarray:
    return (1 - alpha) * np.array(under, float) + alpha * colormap_rgb(np.array([p]))[0].astype(float)


def test_overlay_colours_at_painted_tumour(scanned, tmp_path):
    _, hm_path = scanned()
    hm = open_heatmap(hm_path)
    out = render_overlay(hm_path, tmp_path / "o.png", max_size=600, alpha=0.5)
    pic = np.asarray(Image.open(out).convert("RGB")).astype(float)
    # the 3000 x 2400 slide fills the top-left 600 x 480 px: 5 level-0 px per picture px
    assert pic.shape[0] > 480 and pic.shape[1] > 600
    k = 5.0

    def at(l0_x: float, l0_y: float) -> np.ndarray:
        return pic[int(l0_y / k), int(l0_x / k)]

    # centre of the first painted square (1013..1511, 707..1209)
    r, c = hm.l0_to_cell(1262, 958)
    np.testing.assert_allclose(at(1262, 958), _blend(TUMOUR_RGB, float(hm.probs[r, c]), 0.5), atol=10)
    # tissue without tumour
    r, c = hm.l0_to_cell(700, 1800)
    np.testing.assert_allclose(at(700, 1800), _blend(TISSUE_RGB, float(hm.probs[r, c]), 0.5), atol=12)
    # glass: no heatmap drawn
    np.testing.assert_allclose(at(100, 100), BACKGROUND_RGB, atol=4)
    # the colour bar to the right of the thumbnail runs from the top colour (1.0) down to 0
    bar = pic[:480, 600:]
    top = colormap_rgb(np.array([1.0]))[0]
    assert (np.abs(bar - top).sum(axis=-1) < 6).any()


def test_alpha_zero_shows_the_slide(scanned, tmp_path):
    _, hm_path = scanned()
    pic = np.asarray(Image.open(render_overlay(hm_path, tmp_path / "o.png", max_size=600, alpha=0.0))).astype(float)
    np.testing.assert_allclose(pic[958 // 5, 1262 // 5], TUMOUR_RGB, atol=10)


def test_heatmap_placed_by_grid_not_stretched():
    """A grid that covers only part of the picture lands on its own level-0 rectangle."""
    grid = GridGeometry((500, 300), (100.0, 100.0), (2, 3), 32, 96, 0.972)
    probs = np.full((2, 3), np.nan, dtype=np.float32)
    probs[1, 2] = 1.0  # level-0 x 700..800, y 400..500
    attrs = {"slide": {"name": "t", "mpp_xy": [0.25, 0.25]}, "model": {"name": "m", "threshold": 0.5}}
    hm = Heatmap("mem", probs, np.isfinite(probs), grid, attrs)
    thumb = np.full((80, 100, 3), 255, dtype=np.uint8)  # 10 level-0 px per px
    pic = compose_overlay(hm, thumb, (10.0, 10.0), alpha=1.0, threshold=0.5).astype(float)
    want = colormap_rgb(np.array([1.0]))[0]
    np.testing.assert_array_equal(pic[41:49, 71:79], np.broadcast_to(want, (8, 8, 3)))
    # a stretched heatmap would have coloured the top-left corner; here it is untouched
    np.testing.assert_array_equal(pic[5, 5], [255, 255, 255])
    np.testing.assert_array_equal(pic[45, 65], [255, 255, 255])


def test_jpeg_slide_override_and_errors(scanned, tmp_path):
    slide, hm_path = scanned()
    moved = tmp_path / "moved" / slide.name
    moved.parent.mkdir()
    slide.rename(moved)
    with pytest.raises(SlideNotFoundError, match="--slide"):
        render_overlay(hm_path, tmp_path / "o.png", max_size=300)
    out = render_overlay(hm_path, tmp_path / "o.jpg", slide=moved, max_size=300)
    with Image.open(out) as im:
        assert im.format == "JPEG"
    with pytest.raises(UsageError, match=".png"):
        render_overlay(hm_path, tmp_path / "o.gif", slide=moved)
    with pytest.raises(FileExistsError):
        render_overlay(hm_path, out, slide=moved, max_size=300)
    assert render_overlay(hm_path, out, slide=moved, max_size=300, overwrite=True) == Path(out)


def test_small_pictures_keep_their_whole_caption(scanned, tmp_path):
    _, hm_path = scanned()
    with pytest.raises(UsageError, match="at least 128 px"):
        render_overlay(hm_path, tmp_path / "tiny.png", max_size=16)
    pic = np.asarray(Image.open(render_overlay(hm_path, tmp_path / "o.png", max_size=128)).convert("RGB"))
    # the caption breaks into lines instead of running off the right edge: the last columns stay
    # background and the strip below the thumbnail (128 x 103 px) has text on several lines
    assert pic.shape[0] > 103 + 4 * 10
    edge = pic[103:, -3:].astype(int)
    assert (np.abs(edge - pic[-1, -1].astype(int)).sum(axis=-1) < 30).all()
    text_rows = np.nonzero((pic[103:, :128].astype(int).sum(axis=-1) < 300).any(axis=1))[0]
    assert text_rows.size and np.ptp(text_rows) > 20
