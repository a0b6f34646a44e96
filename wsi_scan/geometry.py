"""Pure frame conversions. The only module that converts between frames.

Frames: ``l0_`` level-0 pixels of the slide; ``lv_`` pixels of one pyramid level; ``tgt_`` pixels
at the model's mpp, relative to the grid origin; ``cell_`` heatmap (row, col); ``mask_`` tissue
mask pixels. Locations are floored and sizes ceiled; downsamples are floats, never int()-ed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import MppError

#: a block of cells: (r0, c0, n_rows, n_cols), in cells of the grid
CellBlock = tuple[int, int, int, int]

#: a level this close to the target counts as "at the target" (metadata rounding)
LEVEL_MPP_SLACK = 1e-3


@dataclass(frozen=True)
class GridGeometry:
    """The heatmap's cell grid and its exact mapping to level 0.

    Cell (r, c) is the level-0 rectangle x in [x0 + c*sx, x0 + (c+1)*sx), y in
    [y0 + r*sy, y0 + (r+1)*sy): the central ``cell_px`` square of the ``patch_px`` window the
    model sees, at ``target_mpp``.
    """

    l0_origin_xy: tuple[int, int]
    l0_cell_size_xy: tuple[float, float]
    shape_rc: tuple[int, int]
    cell_px: int
    patch_px: int
    target_mpp: float

    @property
    def margin_px(self) -> int:
        return (self.patch_px - self.cell_px) // 2

    @property
    def l0_per_tgt_xy(self) -> tuple[float, float]:
        return (self.l0_cell_size_xy[0] / self.cell_px, self.l0_cell_size_xy[1] / self.cell_px)

    def cell_to_l0_rect(self, r: int, c: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of cell (r, c) in level-0 pixels (half-open)."""
        (ox, oy), (sx, sy) = self.l0_origin_xy, self.l0_cell_size_xy
        return (ox + c * sx, oy + r * sy, ox + (c + 1) * sx, oy + (r + 1) * sy)

    def l0_to_cell(self, l0_x: float, l0_y: float) -> tuple[int, int]:
        """The (row, col) of the cell holding a level-0 point (may lie outside the grid)."""
        (ox, oy), (sx, sy) = self.l0_origin_xy, self.l0_cell_size_xy
        return (math.floor((l0_y - oy) / sy), math.floor((l0_x - ox) / sx))

    def tgt_to_l0(self, tgt_x: float, tgt_y: float) -> tuple[float, float]:
        fx, fy = self.l0_per_tgt_xy
        return (self.l0_origin_xy[0] + tgt_x * fx, self.l0_origin_xy[1] + tgt_y * fy)

    def block_tgt_box_xyxy(self, r0: int, c0: int, nr: int, nc: int) -> tuple[int, int, int, int]:
        """Target-frame box (x0, y0, x1, y1) of the windows of cells [r0, r0+nr) x [c0, c0+nc)."""
        m, p = self.margin_px, self.cell_px
        return (c0 * p - m, r0 * p - m, (c0 + nc) * p + m, (r0 + nr) * p + m)

    def block_l0_box_xyxy(self, r0: int, c0: int, nr: int, nc: int) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = self.block_tgt_box_xyxy(r0, c0, nr, nc)
        a = self.tgt_to_l0(x0, y0)
        b = self.tgt_to_l0(x1, y1)
        return (a[0], a[1], b[0], b[1])


def plan_grid(
    l0_bounds_xywh: tuple[int, int, int, int],
    mpp_xy: tuple[float, float],
    target_mpp: float,
    cell_px: int,
    patch_px: int,
) -> GridGeometry:
    """Cells covering the slide's bounds, starting at the bounds' origin."""
    bx, by, bw, bh = l0_bounds_xywh
    sx = cell_px * target_mpp / mpp_xy[0]
    sy = cell_px * target_mpp / mpp_xy[1]
    shape = (max(1, math.ceil(bh / sy - 1e-9)), max(1, math.ceil(bw / sx - 1e-9)))
    return GridGeometry((bx, by), (sx, sy), shape, cell_px, patch_px, target_mpp)


def level_mpp(mpp_xy: tuple[float, float], downsample_xy: tuple[float, float]) -> tuple[float, float]:
    return (mpp_xy[0] * downsample_xy[0], mpp_xy[1] * downsample_xy[1])


def choose_level(
    downsamples_xy: Sequence[tuple[float, float]],
    mpp_xy: tuple[float, float],
    target_mpp: float,
    policy: str = "exact",
    max_upsample: float = 1.0,
) -> int:
    """The level a scan reads for a model at ``target_mpp``.

    ``exact``: the coarsest level at or finer than ``target_mpp`` (level 0 when every level is
    coarser), so pixels are only ever shrunk. ``nearest``: the level whose pixel size is nearest
    the target's (ratio), among those at most ``max_upsample`` times coarser, so a 40x slide's
    1.0 um/px level serves a 0.972 um/px model, enlarged 3%, instead of level 0 shrunk 4x.
    """
    if policy == "nearest":
        ok = [
            i
            for i, ds in enumerate(downsamples_xy)
            if max(level_mpp(mpp_xy, ds)) <= target_mpp * max(1.0, max_upsample) * (1 + LEVEL_MPP_SLACK)
        ]
        if ok:
            # ties go to the finer level (smaller downsample)
            return min(
                ok, key=lambda i: (abs(math.log(max(level_mpp(mpp_xy, downsamples_xy[i])) / target_mpp)), downsamples_xy[i][0])
            )
    elif policy != "exact":
        raise ValueError(f"read-level policy must be exact or nearest, found {policy!r}")
    best = 0
    for i, ds in enumerate(downsamples_xy):
        lx, ly = level_mpp(mpp_xy, ds)
        if max(lx, ly) <= target_mpp * (1 + LEVEL_MPP_SLACK) and ds[0] >= downsamples_xy[best][0]:
            best = i
    return best


def check_resolution(mpp_xy: tuple[float, float], target_mpp: float, max_upsample: float, where: str) -> None:
    coarse = max(mpp_xy)
    if coarse > target_mpp * max_upsample:
        raise MppError(
            f"{where}: slide is too coarse for the model: level 0 has {coarse:.4g} um/px but the model "
            f"needs {target_mpp:.4g} um/px (at most {max_upsample:g}x upsampling); rescan at higher "
            "magnification, or check --mpp if the recorded pixel size is wrong"
        )


def level_read_plan(
    l0_box_xyxy: tuple[float, float, float, float], downsample_xy: tuple[float, float], pad_lv: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Integer level-0 location and level size of a read that covers ``l0_box_xyxy`` plus ``pad_lv``.

    The size allows for a backend starting the read up to one level pixel before the location.
    """
    dx, dy = downsample_xy
    lv_x0 = math.floor(l0_box_xyxy[0] / dx) - pad_lv
    lv_y0 = math.floor(l0_box_xyxy[1] / dy) - pad_lv
    l0_x = math.floor(lv_x0 * dx)
    l0_y = math.floor(lv_y0 * dy)
    w = math.ceil(l0_box_xyxy[2] / dx) + pad_lv - math.floor(l0_x / dx) + 1
    h = math.ceil(l0_box_xyxy[3] / dy) + pad_lv - math.floor(l0_y / dy) + 1
    return (l0_x, l0_y), (w, h)


def box_in_read(
    l0_box_xyxy: tuple[float, float, float, float], downsample_xy: tuple[float, float], lv_origin_xy: tuple[float, float]
) -> tuple[float, float, float, float]:
    """``l0_box_xyxy`` in the pixel frame of a read whose corner lies at ``lv_origin_xy``."""
    dx, dy = downsample_xy
    ox, oy = lv_origin_xy
    return (l0_box_xyxy[0] / dx - ox, l0_box_xyxy[1] / dy - oy, l0_box_xyxy[2] / dx - ox, l0_box_xyxy[3] / dy - oy)


def tile_in_read(
    tile_xy: tuple[int, int], tile_wh: tuple[int, int], lv_box: tuple[int, int, int, int], level_wh: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where tile (column, row) lands in a read of ``lv_box`` (x, y, w, h in level px): the
    (rows, columns) slices of the read and of the tile, clipped to both the read and the level
    (edge tiles are padded past the level)."""
    (tx, ty), (tw, th), (lx, ly, w, h), (W, H) = tile_xy, tile_wh, lv_box, level_wh
    ax0, ay0 = max(tx * tw, lx), max(ty * th, ly)
    ax1, ay1 = min((tx + 1) * tw, lx + w, W), min((ty + 1) * th, ly + h, H)
    return (
        (slice(ay0 - ly, ay1 - ly), slice(ax0 - lx, ax1 - lx)),
        (slice(ay0 - ty * th, ay1 - ty * th), slice(ax0 - tx * tw, ax1 - tx * tw)),
    )


def whole_pixel_crop(box_xyxy: tuple[float, float, float, float], out_wh: tuple[int, int]) -> tuple[int, int] | None:
    """The top-left pixel of ``box_xyxy`` when it is exactly ``out_wh`` pixels starting on a whole
    pixel, so resampling it is a crop; None when it must be resampled."""
    bw, bh = box_xyxy[2] - box_xyxy[0], box_xyxy[3] - box_xyxy[1]
    if (
        abs(bw - out_wh[0]) < 1e-9
        and abs(bh - out_wh[1]) < 1e-9
        and float(box_xyxy[0]).is_integer()
        and float(box_xyxy[1]).is_integer()
    ):
        return int(box_xyxy[0]), int(box_xyxy[1])
    return None


def blocks(shape_rc: tuple[int, int], block_cells: int) -> list[CellBlock]:
    """(r0, c0, nr, nc) of the blocks tiling the grid, row-major."""
    rows, cols = shape_rc
    return [
        (r0, c0, min(block_cells, rows - r0), min(block_cells, cols - c0))
        for r0 in range(0, rows, block_cells)
        for c0 in range(0, cols, block_cells)
    ]


def image_cells(
    grid: GridGeometry, l0_per_image_xy: tuple[float, float], px_origin_xy: tuple[int, int], size_wh: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap cell under each pixel centre of an image of the level-0 frame.

    The image has ``l0_per_image_xy`` level-0 pixels per pixel (a thumbnail, a pyramid level of an
    export) and this window of it starts at pixel ``px_origin_xy``. Returns (cell row per image
    row, cell col per image column), -1 where the pixel centre lies outside the grid: a heatmap
    never has to cover the image it is drawn on.
    """
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    rows, cols = grid.shape_rc
    l0_x = (px_origin_xy[0] + np.arange(size_wh[0]) + 0.5) * l0_per_image_xy[0]
    l0_y = (px_origin_xy[1] + np.arange(size_wh[1]) + 0.5) * l0_per_image_xy[1]
    c = np.floor((l0_x - ox) / sx).astype(np.int64)
    r = np.floor((l0_y - oy) / sy).astype(np.int64)
    c[(c < 0) | (c >= cols)] = -1
    r[(r < 0) | (r >= rows)] = -1
    return r, c


def cell_edges_l0(grid: GridGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 x of every column edge and y of every row edge ((cols + 1,), (rows + 1,)).

    Neighbouring cells share these exact values, so rectangles built from them meet without
    slivers when unioned.
    """
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    rows, cols = grid.shape_rc
    return ox + np.arange(cols + 1) * sx, oy + np.arange(rows + 1) * sy
