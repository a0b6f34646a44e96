"""Which cells and blocks hold tissue, and the windows of a block's cells. Pure."""

from __future__ import annotations

import numpy as np

from .geometry import CellBlock, GridGeometry, blocks
from .tissue import TissueMask


def cell_tissue_fraction(grid: GridGeometry, tissue: TissueMask) -> np.ndarray:
    """Share of each cell's level-0 rectangle that the tissue mask covers, (rows, cols) float32.

    Cell edges are mapped to the nearest mask pixel edge; a summed-area table then gives every
    cell's tissue count in O(1).
    """
    rows, cols = grid.shape_rc
    m = tissue.mask
    # integer counts: exact, and int32 (any mask under 2**31 px) is 3x faster than float64 here
    count_t = np.int32 if m.size < 2**31 else np.int64
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=count_t)
    sat[1:, 1:] = m.cumsum(0, dtype=count_t).cumsum(1, dtype=count_t)
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    kx, ky = tissue.l0_per_mask_xy
    xs = np.clip(np.rint((ox + np.arange(cols + 1) * sx) / kx), 0, m.shape[1]).astype(np.int64)
    ys = np.clip(np.rint((oy + np.arange(rows + 1) * sy) / ky), 0, m.shape[0]).astype(np.int64)
    # cells smaller than a mask pixel still look at the pixel under them
    xe = np.maximum(xs[1:], np.minimum(xs[:-1] + 1, m.shape[1]))
    ye = np.maximum(ys[1:], np.minimum(ys[:-1] + 1, m.shape[0]))
    y0, y1 = ys[:-1, None], ye[:, None]
    x0, x1 = xs[None, :-1], xe[None, :]
    count = (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]).astype(np.float64)
    area = (y1 - y0) * (x1 - x0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, count / np.maximum(area, 1), 0.0)
    return frac.astype(np.float32)


def tissue_cells(grid: GridGeometry, tissue: TissueMask, min_fraction: float, min_window_fraction: float = 1.0) -> np.ndarray:
    """Cells to classify: those with at least ``min_fraction`` of tissue, and those whose window
    (the cell and its 8 neighbours, what the model sees) holds at least ``min_window_fraction``.

    The second rule keeps the cells of pale tissue that a thumbnail sees only at the edges of
    the window (fat, whose membranes are all that an 8 um/px mask shows)."""
    from scipy import ndimage

    frac = cell_tissue_fraction(grid, tissue)
    cells = (frac >= min_fraction) & (frac > 0)
    if min_window_fraction < 1.0:
        window = ndimage.uniform_filter(frac, size=3, mode="constant", cval=0.0)
        cells |= window >= min_window_fraction
    return cells


def stain_check_cells(grid: GridGeometry, tissue: TissueMask, cells: np.ndarray) -> np.ndarray:
    """Cells left out whose window (3 x 3 cells) touches a thumbnail pixel with any sign of
    tissue (``TissueMask.evidence``): the only ones the stain check reads again."""
    from dataclasses import replace

    from scipy import ndimage

    if tissue.evidence is None:
        return np.zeros_like(cells)
    touched = cell_tissue_fraction(grid, replace(tissue, mask=tissue.evidence)) > 0
    return np.asarray(ndimage.maximum_filter(touched, size=3, mode="constant", cval=False) & ~cells)


def window_stain_px(stained: np.ndarray, px_per_cell: int) -> np.ndarray:
    """Stained pixels in each window of a read of (rows + 2) x (cols + 2) cells at
    ``px_per_cell`` px a cell: (rows, cols) int64 for the inner cells (each window is the cell
    and its 8 neighbours, what the model sees)."""
    h, w = stained.shape
    rows, cols = h // px_per_cell - 2, w // px_per_cell - 2
    per_cell = stained.reshape(rows + 2, px_per_cell, cols + 2, px_per_cell).sum(axis=(1, 3), dtype=np.int64)
    total = np.zeros((rows + 3, cols + 3), dtype=np.int64)
    total[1:, 1:] = per_cell.cumsum(0).cumsum(1)
    return np.asarray(total[3:, 3:] - total[:-3, 3:] - total[3:, :-3] + total[:-3, :-3])


def tissue_blocks(cells: np.ndarray, block_cells: int) -> list[CellBlock]:
    """Blocks (r0, c0, nr, nc) that contain at least one tissue cell."""
    return [b for b in blocks(cells.shape, block_cells) if cells[b[0] : b[0] + b[2], b[1] : b[1] + b[3]].any()]


def crop_to_tissue(cells: np.ndarray, block_list: list[CellBlock]) -> list[CellBlock]:
    """Each block cropped to the bounding box of its tissue cells; blocks without any are dropped.

    Results do not change (a cell's window is the same whatever block holds it), but blocks on
    the tissue's edge stop reading and classifying glass: without it, the benchmark slide
    decoded well over the pixels its tissue cells need (docs/benchmarks.md, "What was changed":
    the block crop).
    """
    out = []
    for r0, c0, nr, nc in block_list:
        sub = cells[r0 : r0 + nr, c0 : c0 + nc]
        rows, cols = np.flatnonzero(sub.any(axis=1)), np.flatnonzero(sub.any(axis=0))
        if rows.size:
            out.append((r0 + int(rows[0]), c0 + int(cols[0]), int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1))
    return out


def block_windows(region: np.ndarray, cells: np.ndarray, patch_px: int, cell_px: int) -> np.ndarray:
    """The patch_px windows of the selected cells of a block image, (N, patch_px, patch_px, 3)."""
    view = np.lib.stride_tricks.sliding_window_view(region, (patch_px, patch_px), axis=(0, 1))[::cell_px, ::cell_px]
    rows, cols = np.nonzero(cells)
    return np.ascontiguousarray(view[rows, cols].transpose(0, 2, 3, 1))
