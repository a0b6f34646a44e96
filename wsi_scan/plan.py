"""Planning a scan: thumbnail -> tissue mask -> cell grid -> tissue cells -> blocks -> read plan.

One function, used by the scan, ``info``, ``tile`` and the benchmark, so that they all report the
same tissue for a slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ScanConfig, TissueConfig
from .geometry import GridGeometry
from .regions import ReadPlan
from .tissue import TissueMask


@dataclass(frozen=True)
class SlidePlan:
    tissue: TissueMask
    grid: GridGeometry
    cells: np.ndarray  # (rows, cols) bool: cells to classify
    blocks: list[tuple[int, int, int, int]]  # (r0, c0, n_rows, n_cols) of each block with tissue cells
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

    thumb, l0_per_mask = read_thumbnail(slide, mpp_xy, cfg.mask_mpp)
    mask_mpp = (l0_per_mask[0] * mpp_xy[0], l0_per_mask[1] * mpp_xy[1])
    return compute_mask(thumb, mask_mpp, cfg, l0_per_mask)


def plan_scan(slide: Any, mpp_xy: tuple[float, float], target_mpp: float, cell_px: int, patch_px: int,
              config: ScanConfig = ScanConfig()) -> SlidePlan:
    """Everything a scan decides before reading a block, for a slide with a known pixel size."""
    from .geometry import plan_grid
    from .grid import crop_to_tissue, tissue_blocks, tissue_cells
    from .regions import make_read_plan

    tissue = plan_tissue(slide, mpp_xy, config.tissue)
    grid = plan_grid(slide.info.l0_bounds_xywh, mpp_xy, target_mpp, cell_px, patch_px)
    cells = tissue_cells(grid, tissue, config.tissue.min_cell_fraction)
    blocks = crop_to_tissue(cells, tissue_blocks(cells, config.block_cells))
    return SlidePlan(tissue, grid, cells, blocks, make_read_plan(slide, mpp_xy, grid))
