"""The viewer page in headless Chromium: layers load and align, colours are the probabilities',
the sliders and toggles change the picture, lesions can be jumped to, the cohort table sorts,
filters and opens a slide. Screenshots go to each test's tmp_path (``*.png``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.view.conftest import ODD_CELL, ODD_ORIGIN_XY, TUMOUR
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.synthetic import TISSUE_RGB, TUMOUR_RGB

pytestmark = pytest.mark.slow

LOADED = "window.wsiView && wsiView.ready && wsiView.heatVersion > 0 && wsiView.fullyLoaded()"


def cmap_rgb(p: float) -> np.ndarray:
    """The colour a probability should have, straight from matplotlib (not from the server's LUT)."""
    from matplotlib import colormaps

    return np.asarray(colormaps["inferno"](p))[:3] * 255


def shot(page: Any, path: Path) -> np.ndarray:
    from PIL import Image

    png = page.screenshot(path=str(path))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def settle(page: Any, version: int | None = None) -> None:
    """Wait until every tile of every layer is drawn (and, with ``version``, a new heat layer)."""
    cond = LOADED if version is None else f"{LOADED} && wsiView.heatVersion > {version}"
    page.wait_for_function(cond, timeout=60_000)
    page.wait_for_function(
        "!wsiView.viewer.viewport.getZoom(true) || "
        "Math.abs(wsiView.viewer.viewport.getZoom(true) - wsiView.viewer.viewport.getZoom(false)) < 1e-9",
        timeout=30_000,
    )
    page.wait_for_function(LOADED, timeout=60_000)
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def slider(page: Any, selector: str, value: float) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def screen_xy(page: Any, x: float, y: float) -> tuple[int, int]:
    """Level-0 point -> the page pixel it is drawn at (the viewer element's offset added)."""
    sx, sy = page.evaluate(f"wsiView.l0ToScreen({x}, {y})")
    box = page.eval_on_selector("#osd", "e => { const r = e.getBoundingClientRect(); return [r.left, r.top]; }")
    return int(box[0] + sx), int(box[1] + sy)


def open_store(page: Any, url: str, heat_opacity: float = 1.0) -> None:
    page.goto(url)
    settle(page)
    slider(page, "#opacity", heat_opacity)


def cell_centre(r: int, c: int) -> tuple[float, float]:
    return (ODD_ORIGIN_XY[0] + (c + 0.5) * ODD_CELL, ODD_ORIGIN_XY[1] + (r + 0.5) * ODD_CELL)


def test_layers_load_and_cells_have_the_colour_of_their_probability(painted_store, serve, page, tmp_path):
    hm = open_heatmap(painted_store)
    v = serve(painted_store)
    open_store(page, v.url)
    assert page.evaluate("wsiView.viewer.world.getItemCount()") == 2  # slide below, heatmap above
    assert page.evaluate("wsiView.slideImage !== null && wsiView.heatImage !== null")
    shot(page, tmp_path / "overview.png")
    # zoom on a few cells of the odd grid (origin 37, 53; 131.7 px cells): each is many screen
    # pixels wide, and its centre must show exactly the colour map's colour of its probability
    cells = [(5, 3), (5, 4), (7, 12), (11, 15), (12, 9)]
    x0, y0 = cell_centre(4, 2)
    x1, y1 = cell_centre(13, 16)
    page.evaluate(f"wsiView.showL0({x0}, {y0}, {x1}, {y1}, true)")
    settle(page)
    img = shot(page, tmp_path / "cells.png")
    for r, c in cells:
        x, y = cell_centre(r, c)
        assert hm.l0_to_cell(x, y) == (r, c)
        px, py = screen_xy(page, x, y)
        got = img[py, px]
        want = cmap_rgb(float(hm.probs[r, c]))
        assert np.abs(got - want).max() <= 3, ((r, c), float(hm.probs[r, c]), got, want)
    # and the neighbouring cells differ: the picture follows the grid, not a blur of it
    a, b = (screen_xy(page, *cell_centre(7, c)) for c in (12, 13))
    assert np.abs(img[a[1], a[0]] - img[b[1], b[0]]).max() > 3
    # the cursor read-out: level-0 coordinates and the probability of the cell under the mouse
    x, y = cell_centre(7, 12)
    page.mouse.move(*screen_xy(page, x, y))
    page.wait_for_function(
        "wsiView.cursor && wsiView.cursor.cell_rc && wsiView.cursor.cell_rc[0] === 7 && wsiView.cursor.cell_rc[1] === 12"
    )
    assert abs(page.evaluate("wsiView.cursor.prob") - float(hm.probs[7, 12])) < 1e-6
    assert page.inner_text("#cursor-p") == f"{float(hm.probs[7, 12]):.3f}"
    shown = page.inner_text("#cursor-xy")
    sx, sy = (int(s) for s in shown.strip("() px").split(","))
    assert abs(sx - x) <= ODD_CELL / 4 and abs(sy - y) <= ODD_CELL / 4, shown
    # the scale bar: its length in screen pixels is its length in um at the current zoom
    um, bar_px = page.evaluate("[wsiView.scaleBar.um, wsiView.scaleBar.px]")
    (ax, _), (bx, _) = screen_xy(page, 0, 0), screen_xy(page, 1000, 0)
    assert abs(bar_px - um / 0.243 * (bx - ax) / 1000) < 0.5
    assert page.inner_text("#scalebar-text") in (f"{um:g} µm", f"{um / 1000:g} mm")
    assert page.errors == []


def test_toggle_and_sliders_change_the_picture(painted_store, serve, page, tmp_path):
    hm = open_heatmap(painted_store)
    v = serve(painted_store)
    open_store(page, v.url, heat_opacity=0.5)
    low, high = (7, 3), (7, 15)  # probabilities ~0.2 and ~0.8
    p_low, p_high = float(hm.probs[low]), float(hm.probs[high])
    assert p_low < 0.5 < p_high
    x0, y0 = cell_centre(5, 1)
    x1, y1 = cell_centre(9, 17)
    page.evaluate(f"wsiView.showL0({x0}, {y0}, {x1}, {y1}, true)")
    settle(page)
    at = {k: screen_xy(page, *cell_centre(*k)) for k in (low, high)}
    half = shot(page, tmp_path / "opacity-0.5.png")
    slider(page, "#opacity", 1.0)
    settle(page)
    full = shot(page, tmp_path / "opacity-1.png")
    for k, p in ((low, p_low), (high, p_high)):
        x, y = at[k]
        assert np.abs(full[y, x] - cmap_rgb(p)).max() <= 3
        assert np.abs(half[y, x] - full[y, x]).max() > 10  # opacity moved the colour
    # threshold 0.5: the low cell shows the slide (tissue pink) again, the high one keeps its colour
    version = page.evaluate("wsiView.heatVersion")
    slider(page, "#threshold", 0.5)
    settle(page, version)
    assert page.evaluate("wsiView.heatThreshold") == 0.5
    thr = shot(page, tmp_path / "threshold-0.5.png")
    x, y = at[low]
    assert np.abs(thr[y, x] - np.array(TISSUE_RGB)).max() <= 16
    x, y = at[high]
    assert np.abs(thr[y, x] - cmap_rgb(p_high)).max() <= 3
    # the toggle hides the heatmap: the slide's own pixels everywhere
    page.click("#heat-on")
    settle(page)
    off = shot(page, tmp_path / "heat-off.png")
    x, y = at[high]
    assert np.abs(off[y, x] - np.array(TISSUE_RGB)).max() <= 16
    assert page.errors == []


def test_slide_layer_shows_the_slide_where_the_level0_frame_says(painted_store, serve, page, tmp_path):
    v = serve(painted_store)
    open_store(page, v.url)
    page.click("#heat-on")
    tx0, ty0, tx1, ty1 = TUMOUR[0]
    page.evaluate(f"wsiView.showL0({tx0 - 300}, {ty0 - 300}, {tx1 + 300}, {ty1 + 300}, true)")
    settle(page)
    img = shot(page, tmp_path / "slide-tumour.png")
    inside = screen_xy(page, (tx0 + tx1) / 2, (ty0 + ty1) / 2)
    assert np.abs(img[inside[1], inside[0]] - np.array(TUMOUR_RGB)).max() <= 12
    # just outside each edge of the painted square (by 12 level-0 px): tissue, not tumour
    for x, y in (
        (tx0 - 12, (ty0 + ty1) / 2),
        (tx1 + 12, (ty0 + ty1) / 2),
        ((tx0 + tx1) / 2, ty0 - 12),
        ((tx0 + tx1) / 2, ty1 + 12),
    ):
        px, py = screen_xy(page, x, y)
        assert np.abs(img[py, px] - np.array(TISSUE_RGB)).max() <= 20, (x, y, img[py, px])
        px, py = screen_xy(page, x + (24 if x < tx0 else -24 if x > tx1 else 0), y + (24 if y < ty0 else -24 if y > ty1 else 0))
        assert np.abs(img[py, px] - np.array(TUMOUR_RGB)).max() <= 20, (x, y, img[py, px])


def test_lesion_list_and_outlines(painted_store, serve, page, tmp_path):
    v = serve(painted_store)
    open_store(page, v.url, heat_opacity=0.3)
    assert page.inner_text("#slide-call").startswith("call: ")
    items = page.locator("#lesions li")
    assert items.count() == page.evaluate("wsiView.meta.lesions.length") == 1
    les = page.evaluate("wsiView.meta.lesions[0]")
    assert les["size_class"] in items.first.inner_text()
    items.first.click()
    cx, cy = les["l0_centroid_xy"]
    page.wait_for_function(
        f"(() => {{ const p = wsiView.l0ToScreen({cx}, {cy}), e = document.getElementById('osd');"
        f" return Math.abs(p[0] - e.clientWidth / 2) < 20 && Math.abs(p[1] - e.clientHeight / 2) < 20; }})()",
        timeout=30_000,
    )
    settle(page)
    img = shot(page, tmp_path / "lesion.png")
    # the outline is drawn on the lesion's edge: the lesion's left edge is column 4 of the odd grid
    x_edge = ODD_ORIGIN_XY[0] + 4 * ODD_CELL
    _, y_mid = cell_centre(8, 6)
    px, py = screen_xy(page, x_edge, y_mid)
    strip = img[py, px - 2 : px + 3]
    assert (np.abs(strip - np.array([255, 120, 0])).max(axis=1) <= 40).any(), strip


def test_cohort_table_sorts_filters_and_opens_a_slide(results_folder, serve, page, tmp_path):
    v = serve(results_folder)
    page.goto(v.url)
    page.wait_for_function("window.wsiView && wsiView.ready")
    names = lambda: page.eval_on_selector_all("#table tbody tr", "rows => rows.map(r => r.children[0].textContent)")  # noqa: E731
    calls = {f"case{i}": open_heatmap(results_folder / f"case{i}.zarr").attrs["summary"]["call"] for i in range(3)}
    scores = {f"case{i}": open_heatmap(results_folder / f"case{i}.zarr").attrs["summary"]["score"] for i in range(3)}
    assert sorted(names()) == ["broken.svs", "case0", "case1", "case2"]
    # opens sorted by score, highest first; the failed slide (no score) last
    assert names() == sorted(scores, key=lambda k: -scores[k]) + ["broken.svs"]
    assert "SlideFormatError" in page.inner_text("#table tbody tr.failed")
    shot(page, tmp_path / "cohort.png")
    page.click("th[data-key=slide]")
    assert names() == ["case2", "case1", "case0", "broken.svs"]
    page.click("th[data-key=slide]")
    assert names() == ["broken.svs", "case0", "case1", "case2"]
    page.click("th[data-key=call]")  # by severity: micro, itc, negative; no call last
    order = {"negative": 0, "itc": 1, "micro": 2, "macro": 3}
    assert [order[calls[n]] for n in names()[:3]] == sorted((order[c] for c in calls.values()), reverse=True)
    assert names()[3] == "broken.svs"
    assert set(calls.values()) == {"negative", "itc", "micro"}
    page.select_option("#filter-call", "itc")
    assert names() == [n for n, c in calls.items() if c == "itc"]
    page.select_option("#filter-call", "")
    assert len(names()) == 4
    page.click("#table tbody tr.failed")  # nothing to open
    assert page.evaluate("location.hash") == ""
    page.click("#table tbody tr:has-text('case2')")
    settle(page)
    assert page.evaluate("wsiView.meta.name") == "case2"
    assert page.inner_text("#slide-call").startswith(f"call: {calls['case2']}")
    shot(page, tmp_path / "cohort-case2.png")
    page.click("#home")
    page.wait_for_selector("#cohort:not([hidden])")
    assert len(names()) == 4
    assert page.errors == []


@pytest.mark.real_data
@pytest.mark.parametrize("name, mpp", [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)])
def test_shared_slide_opens_with_its_heatmap(name, mpp, serve, page, tmp_path, mock_model):
    """The shared real slides (Aperio JPEG; JPEG 2000 read by OpenSlide) scanned with the mock
    model, opened in the browser."""
    from tests._support import shared_path
    from wsi_scan.config import ScanConfig
    from wsi_scan.scan import scan_slide

    slide = shared_path("slides", name)
    out = tmp_path / "real.zarr"
    scan_slide(slide, out, ScanConfig(mpp_override=mpp), model=mock_model)
    v = serve(out)
    open_store(page, v.url, heat_opacity=0.4)
    img = shot(page, tmp_path / f"{name}.png")
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500  # a real picture, not a blank page
    assert page.evaluate("wsiView.meta.slide_available")
    assert page.errors == []
