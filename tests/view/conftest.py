"""Fixtures of the viewer tests: synthetic slides, heatmaps painted with known probabilities, a
results folder, a running viewer and a headless Chromium (skipped cleanly where there is none)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_scan.config import LesionConfig, ScanConfig, ViewConfig
from wsi_scan.geometry import GridGeometry
from wsi_scan.io.heatmap import grid_from_attrs, read_attrs, write_heatmap
from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide
from wsi_scan.lesions import call_slide
from wsi_scan.scan import scan_slide

SIZE_WH = (3000, 2400)
MPP = 0.243
TISSUE = ((300, 300, 2700, 2100),)
TUMOUR = ((1013, 707, 1511, 1209),)
#: a grid that starts off the slide's corner and whose cells are not whole level-0 pixels: the
#: heatmap layer must follow the attrs, not assume (0, 0) and integer cells
ODD_ORIGIN_XY = (37, 53)
ODD_CELL = 131.7

CHROMIUM = os.environ.get("WSI_SCAN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def ramp(rows: int, cols: int) -> np.ndarray:
    """Probabilities that differ from cell to cell: 0..1 along the columns, a little along the rows."""
    r, c = np.mgrid[0:rows, 0:cols]
    return ((c / max(cols - 1, 1)) * 0.9 + (r % 5) * 0.02).astype(np.float32)


def paint_store(
    src: Path,
    out: Path,
    probs_fn: Callable[[int, int], np.ndarray],
    grid: GridGeometry | None = None,
    lesion_box_rc: tuple[int, int, int, int] | None = None,
    overwrite: bool = False,
) -> Path:
    """A store for ``src``'s slide with probabilities of our choosing (``probs_fn(rows, cols)``)
    on a grid of our choosing; tissue is every cell whose centre lies in the slide's tissue box;
    ``lesion_box_rc`` (r0, c0, r1, c1) is set to 0.99 (a lesion)."""
    attrs = read_attrs(src)
    assert attrs is not None
    g = grid or grid_from_attrs(attrs["grid"])
    rows, cols = g.shape_rc
    probs = probs_fn(rows, cols)
    if lesion_box_rc is not None:
        r0, c0, r1, c1 = lesion_box_rc
        probs[r0:r1, c0:c1] = 0.99
    (ox, oy), (sx, sy) = g.l0_origin_xy, g.l0_cell_size_xy
    cx = ox + (np.arange(cols) + 0.5) * sx
    cy = oy + (np.arange(rows) + 0.5) * sy
    x0, y0, x1, y1 = TISSUE[0]
    tissue = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    probs = np.where(tissue, probs, np.nan).astype(np.float32)
    mpp_xy = tuple(attrs["slide"]["mpp_xy"])
    call = call_slide(probs, g, mpp_xy, 0.5, LesionConfig())
    attrs = dict(attrs)
    attrs.pop("status", None)
    attrs.pop("data_sha256", None)
    attrs["grid"] = {
        **attrs["grid"],
        "l0_origin_xy": list(g.l0_origin_xy),
        "l0_cell_size_xy": list(g.l0_cell_size_xy),
        "shape_rc": list(g.shape_rc),
        "target_mpp": g.target_mpp,
    }
    attrs["summary"] = {
        **attrs["summary"],
        "call": call.call,
        "score": call.score,
        "n_lesions": len(call.lesions),
        "largest_lesion_mm": call.largest_lesion_mm,
        "max_prob": float(np.nanmax(probs)),
    }
    write_heatmap(out, probs, tissue, g, mpp_xy, attrs, overwrite=overwrite)  # type: ignore[arg-type]
    return out


def odd_grid() -> GridGeometry:
    ox, oy = ODD_ORIGIN_XY
    shape = (int((SIZE_WH[1] - oy) // ODD_CELL) + 1, int((SIZE_WH[0] - ox) // ODD_CELL) + 1)
    # the model's um/px that makes a cell of 32 px ODD_CELL level-0 px: a store's cell size must
    # agree with its mpp and target_mpp (io.heatmap refuses one that does not)
    return GridGeometry(ODD_ORIGIN_XY, (ODD_CELL, ODD_CELL), shape, 32, 96, ODD_CELL * MPP / 32)


@pytest.fixture
def scanned_store(tmp_path: Path, mock_model: Any) -> tuple[Path, Path]:
    """(slide, store): a synthetic slide with a painted tumour, scanned with the mock model."""
    slide = write_synthetic_slide(
        tmp_path / "slides" / "s.tif", SyntheticSlide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE, tumour=TUMOUR)
    )
    out = tmp_path / "s.zarr"
    scan_slide(slide, out, ScanConfig(), model=mock_model)
    return slide, out


@pytest.fixture
def painted_store(scanned_store: tuple[Path, Path], tmp_path: Path) -> Path:
    """A ramp of probabilities on an odd grid, with one lesion of 0.99 (4 x 5 cells)."""
    _, src = scanned_store
    return paint_store(src, tmp_path / "painted.zarr", ramp, grid=odd_grid(), lesion_box_rc=(6, 4, 10, 9))


@pytest.fixture
def results_folder(tmp_path: Path, mock_model: Any) -> Path:
    """A folder run of three slides, whose stores are then repainted to three different calls, and
    a file that failed."""
    from wsi_scan.batch import scan_folder

    slides, out = tmp_path / "cohort-slides", tmp_path / "results"
    for i in range(3):
        write_synthetic_slide(
            slides / f"case{i}.tif", SyntheticSlide(size_wh=SIZE_WH, mpp=MPP, tissue=TISSUE, tumour=TUMOUR, seed=i)
        )
    (slides / "broken.svs").write_text("not a slide\n")  # a failed row: listed, not openable
    scan_folder(slides, out, ScanConfig(), model=mock_model, report=False)
    # case0: negative (a low ramp); case1: a lesion of 3 x 3 cells (ITC); case2: 13 x 17 cells (micro)
    lesions = {0: None, 1: (6, 6, 9, 9), 2: (3, 3, 16, 20)}
    for i, box in lesions.items():
        store = out / f"case{i}.zarr"
        paint_store(store, store, lambda r, c: ramp(r, c) * 0.4, lesion_box_rc=box, overwrite=True)
    return out


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """serve(path, **ViewConfig fields) -> a started Viewer, stopped after the test."""
    from wsi_scan.view.server import Viewer

    started: list[Viewer] = []

    def go(path: Path, **kw: Any) -> Viewer:
        v = Viewer(path, ViewConfig(**kw)).start()
        started.append(v)
        return v

    yield go
    for v in started:
        v.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright; skipped with the reason where there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set WSI_SCAN_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # noqa: BLE001 - a broken or sandboxed Chromium: skip with its reason
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, device_scale_factor=1, bypass_csp=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    ctx.close()
