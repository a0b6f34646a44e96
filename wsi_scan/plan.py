"""Planning a scan: thumbnail -> tissue mask -> cell grid -> tissue cells -> blocks -> read plan.

One function, used by the scan, ``info`` and ``tile``, so that all three see the same tissue for
a slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ScanConfig, TissueConfig
from .errors import UsageError
from .geometry import CellBlock, GridGeometry
from .regions import ReadPlan
from .tissue import TissueMask


@dataclass(frozen=True)
class SlidePlan:
    tissue: TissueMask
    grid: GridGeometry
    cells: np.ndarray  # (rows, cols) bool: cells to classify
    blocks: list[CellBlock]  # each block with tissue cells, cropped to them
    read: ReadPlan

    @property
    def tissue_area_mm2(self) -> float:
        """Area of the cells that are scanned (what the heatmap's tissue label shows)."""
        sx, sy = self.grid.l0_cell_size_xy
        # level-0 um/px from the mask's own frame
        mx = self.tissue.mask_mpp_xy[0] / self.tissue.l0_per_mask_xy[0]
        my = self.tissue.mask_mpp_xy[1] / self.tissue.l0_per_mask_xy[1]
        return float(self.cells.sum()) * sx * mx * sy * my / 1e6


def plan_tissue(slide: Any, mpp_xy: tuple[float, float], cfg: TissueConfig) -> TissueMask:
    from .regions import read_thumbnail
    from .tissue import compute_mask

    thumb, l0_per_mask_xy = read_thumbnail(slide, mpp_xy, cfg.mask_mpp)
    mask_mpp_xy = (l0_per_mask_xy[0] * mpp_xy[0], l0_per_mask_xy[1] * mpp_xy[1])
    return compute_mask(thumb, mask_mpp_xy, cfg, l0_per_mask_xy)


def plan_scan(
    slide: Any, mpp_xy: tuple[float, float], target_mpp: float, cell_px: int, patch_px: int, config: ScanConfig = ScanConfig()
) -> SlidePlan:
    """Everything a scan decides before reading a block, for a slide with a known pixel size."""
    from .geometry import plan_grid
    from .grid import crop_to_tissue, tissue_blocks, tissue_cells
    from .regions import make_read_plan

    if config.tissue_mask is not None:
        tissue = user_tissue_mask(config.tissue_mask, slide.info.level0_size_wh, mpp_xy)
    else:
        tissue = plan_tissue(slide, mpp_xy, config.tissue)
    grid = plan_grid(slide.info.l0_bounds_xywh, mpp_xy, target_mpp, cell_px, patch_px)
    cells = tissue_cells(grid, tissue, config.tissue.min_cell_fraction, config.tissue.min_window_fraction)
    if tissue.evidence is not None:  # the glass rule with the stain check on
        cells, tissue = stain_check(slide, mpp_xy, grid, tissue, cells, config.tissue, config.block_cells)
    if config.roi is not None:
        cells &= roi_cells(grid, config.roi)
    blocks = crop_to_tissue(cells, tissue_blocks(cells, config.block_cells))
    return SlidePlan(tissue, grid, cells, blocks, make_read_plan(slide, mpp_xy, grid, config.read_level, config.max_upsample))


def stain_check(
    slide: Any,
    mpp_xy: tuple[float, float],
    grid: GridGeometry,
    tissue: TissueMask,
    cells: np.ndarray,
    cfg: TissueConfig,
    block_cells: int,
) -> tuple[np.ndarray, TissueMask]:
    """The cells the thumbnail left out but saw faint signs of tissue near, read again at
    ``cfg.stain_check_mpp``; those whose window holds ``cfg.stain_check_min_um2`` of stain are
    added. The count of cells read and added goes into the mask's params (the attrs)."""
    import math
    from dataclasses import replace

    from .geometry import choose_level
    from .grid import crop_to_tissue, stain_check_cells, tissue_blocks, window_stain_px
    from .regions import resample_region
    from .tissue import stained_pixels

    todo = stain_check_cells(grid, tissue, cells)
    # a whole number of check px per cell, so each cell's stain is a sum over its own pixels
    px_per_cell = max(1, round(grid.cell_px * grid.target_mpp / cfg.stain_check_mpp))
    cell_um = grid.cell_px * grid.target_mpp
    px_um2 = (cell_um / px_per_cell) ** 2
    min_px = max(1, math.ceil(cfg.stain_check_min_um2 / px_um2))
    ds = [lv.downsample_xy for lv in slide.info.levels]
    level = choose_level(ds, mpp_xy, cell_um / px_per_cell)
    assert tissue.excluded is not None  # the glass rule always sets it
    ex = tissue.excluded
    kx, ky = tissue.l0_per_mask_xy
    added = np.zeros_like(cells)
    sx, sy = grid.l0_cell_size_xy
    for r0, c0, nr, nc in crop_to_tissue(todo, tissue_blocks(todo, block_cells)):
        # the block's cells and the ring of neighbours their windows reach
        box = grid.cell_to_l0_rect(r0 - 1, c0 - 1)[:2] + grid.cell_to_l0_rect(r0 + nr, c0 + nc)[2:]
        size = ((nc + 2) * px_per_cell, (nr + 2) * px_per_cell)
        stained = stained_pixels(resample_region(slide, level, ds[level], box, size), cfg)
        # what the thumbnail refused (ink, black, dark marks, and their rims) stays refused
        tx = np.clip(((box[0] + (np.arange(size[0]) + 0.5) * sx / px_per_cell) / kx).astype(np.int64), 0, ex.shape[1] - 1)
        ty = np.clip(((box[1] + (np.arange(size[1]) + 0.5) * sy / px_per_cell) / ky).astype(np.int64), 0, ex.shape[0] - 1)
        stained &= ~ex[ty[:, None], tx[None, :]]
        win = window_stain_px(stained, px_per_cell)
        added[r0 : r0 + nr, c0 : c0 + nc] |= todo[r0 : r0 + nr, c0 : c0 + nc] & (win >= min_px)
    params = {
        **tissue.params,
        "stain_check_level": level,
        "stain_check_px_um": round(cell_um / px_per_cell, 4),
        "stain_check_cells_read": int(todo.sum()),
        "stain_check_cells_added": int(added.sum()),
    }
    # the evidence and refusal maps served the check only: not held through the scan
    return cells | added, replace(tissue, params=params, evidence=None, excluded=None)


def file_sha256(path: str) -> str:
    """The sha256 of a user's mask or ROI file (the model files' own digest function)."""
    from pathlib import Path

    from .errors import DataError
    from .io.model_files import _sha256

    try:
        return _sha256(Path(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); expected a mask image or a GeoJSON file") from None


def user_tissue_mask(path: str, l0_size_wh: tuple[int, int], mpp_xy: tuple[float, float]) -> TissueMask:
    """``--tissue-mask``: a mask image of the slide's level-0 frame at any downsample (non-zero = tissue)."""
    from .export.tiles import check_mask_shape
    from .io.annotations import read_label_mask

    mask = read_label_mask(path, what="--tissue-mask", meaning="tissue", error=UsageError)
    check_mask_shape(mask.shape, l0_size_wh, f"--tissue-mask {path}")
    mh, mw = mask.shape
    l0_per_mask_xy = (l0_size_wh[0] / mw, l0_size_wh[1] / mh)
    params = {"method": "user mask (--tissue-mask)", "path": str(path), "sha256": file_sha256(path)}
    mask_mpp_xy = (l0_per_mask_xy[0] * mpp_xy[0], l0_per_mask_xy[1] * mpp_xy[1])
    return TissueMask(mask, l0_per_mask_xy, mask_mpp_xy, float("nan"), params)


def roi_cells(grid: GridGeometry, path: str) -> np.ndarray:
    """``--roi``: the cells whose centre lies inside a polygon of the GeoJSON (level-0 px, e.g. QuPath)."""
    import shapely

    from .errors import DataError
    from .export.tiles import tumour_geometry
    from .io.annotations import read_json

    geom = tumour_geometry(read_json(path), f"--roi {path}", class_name=None)
    if geom is None:
        raise DataError(f"--roi {path}: no polygon found; expected QuPath annotations (GeoJSON polygons in level-0 pixels)")
    rows, cols = grid.shape_rc
    (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
    cy, cx = np.mgrid[0:rows, 0:cols]
    return np.asarray(shapely.contains_xy(geom, ox + (cx + 0.5) * sx, oy + (cy + 0.5) * sy), dtype=bool)
