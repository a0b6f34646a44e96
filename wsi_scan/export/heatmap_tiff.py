"""The heatmap as a full-resolution pyramidal TIFF in the slide's level-0 frame.

Pixel (x, y) of level 0 shows the cell holding that slide pixel, so a viewer that lays the TIFF
over the slide at the same size lines them up exactly. Each tile is rendered from the cell grid
when it is written: a 100k px slide never exists as one image in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io.heatmap import Heatmap, open_heatmap
from .overlay import colormap_rgb

MIN_LEVEL_PX = 512  # stop adding pyramid levels once one fits in a tile


def pyramid_sizes(level0_size_wh: tuple[int, int]) -> list[tuple[int, int]]:
    w, h = level0_size_wh
    sizes = [(w, h)]
    k = 1
    while max(sizes[-1]) > MIN_LEVEL_PX:
        k *= 2
        sizes.append((max(1, math.ceil(w / k)), max(1, math.ceil(h / k))))
    return sizes


def write_heatmap_tiff(
    heatmap: str | Path | Heatmap,
    out: str | Path,
    probability: bool = False,
    opacity: float = 1.0,
    tile_px: int = 512,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the heatmap as a tiled pyramidal TIFF of the slide's level-0 size.

    Colour-mapped RGBA by default (transparent off tissue, ``opacity`` elsewhere), or float32
    probabilities with NaN off tissue when ``probability``. Resolution tags carry the slide's mpp.
    """
    from ..geometry import image_cells
    from ..io.exports import write_pyramid_tiff
    from ..io.outputs import expect_suffix

    expect_suffix(Path(out), (".tif", ".tiff"))
    if tile_px % 16:
        raise UsageError(f"tile size must be a multiple of 16 (a TIFF rule), found {tile_px}")
    if not 0.0 <= opacity <= 1.0:
        raise UsageError(f"opacity must lie in [0, 1], found {opacity}")
    hm = heatmap if isinstance(heatmap, Heatmap) else open_heatmap(heatmap)
    w0, h0 = (int(v) for v in hm.attrs["slide"]["level0_size_wh"])
    sizes = pyramid_sizes((w0, h0))
    rows, cols = hm.grid.shape_rc
    # one value per cell plus a last row and column for "outside the grid": image_cells marks
    # those pixels -1, which indexes that padding, so a tile is a single gather
    if probability:
        cell_img = np.full((rows + 1, cols + 1, 1), np.nan, dtype=np.float32)
        cell_img[:rows, :cols, 0] = hm.probs
    else:
        cell_img = np.zeros((rows + 1, cols + 1, 4), dtype=np.uint8)
        ok = np.isfinite(hm.probs)
        rgba = cell_img[:rows, :cols]
        rgba[ok, :3] = colormap_rgb(hm.probs[ok])
        rgba[ok, 3] = round(opacity * 255)

    def render(level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lw, lh = sizes[level]
        r, c = image_cells(hm.grid, (w0 / lw, h0 / lh), (x0, y0), (w, h))
        return np.take(np.take(cell_img, r, axis=0), c, axis=1)

    if probability:
        return write_pyramid_tiff(out, sizes, render, 1, np.float32, hm.mpp_xy, tile_px, overwrite, progress)
    return write_pyramid_tiff(out, sizes, render, 4, np.uint8, hm.mpp_xy, tile_px, overwrite, progress)
