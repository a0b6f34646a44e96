"""Mosaic slides built from labelled patches: a slide whose ground truth is known per cell.

Patches are laid edge to edge at the model's mpp on a 96 px pitch, so the window of cell
(3i + 1, 3j + 1) is exactly patch (i, j) and its label is that cell's truth. Written losslessly
(deflate) with resolution tags, as a single-level tiled TIFF both backends read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import PatchSet


@dataclass(frozen=True)
class Mosaic:
    path: Path
    grid_rc: tuple[int, int]  # patches per column and per row
    indices: np.ndarray  # (n,) index into the PatchSet of the patch at each mosaic position
    labels: np.ndarray  # (n,)

    def cell_of(self, k: int) -> tuple[int, int]:
        """The heatmap cell whose window is mosaic patch k (row-major)."""
        i, j = divmod(k, self.grid_rc[1])
        return (3 * i + 1, 3 * j + 1)


def write_mosaic(
    path: str | Path, ps: PatchSet, indices: np.ndarray, mpp: float = 0.972, tile_px: int = 256, scan_mpp: float | None = None
) -> Mosaic:
    """Write the mosaic; with ``scan_mpp`` (e.g. 0.25) it is enlarged to about that pixel size
    (bicubic), JPEG-tiled (quality 90) with a 1/4/16 pyramid, as a 40x scanner would store it, so
    a scan goes through the whole read-and-shrink path. Its exact mpp is written in the file:
    ``mpp`` times the enlargement, which keeps every patch on its cell."""
    import tifffile
    from PIL import Image

    n = len(indices)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    img = np.full((rows * 96, cols * 96, 3), 255, dtype=np.uint8)
    for k, idx in enumerate(indices):
        i, j = divmod(k, cols)
        img[i * 96 : (i + 1) * 96, j * 96 : (j + 1) * 96] = ps.read(int(idx))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = Mosaic(path, (rows, cols), np.asarray(indices), ps.labels[np.asarray(indices)])
    if scan_mpp is None:
        res = 1e4 / mpp
        tifffile.imwrite(path, img, tile=(tile_px, tile_px), photometric="rgb", compression="zlib",
                         resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
        return truth
    h, w = img.shape[:2]
    big_w, big_h = round(w * mpp / scan_mpp), round(h * mpp / scan_mpp)
    big = np.asarray(Image.fromarray(img).resize((big_w, big_h), Image.Resampling.BICUBIC))
    del img
    res_x, res_y = 1e4 / (mpp * w / big_w), 1e4 / (mpp * h / big_h)
    opts: dict[str, Any] = {"tile": (tile_px, tile_px), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    # levels as successive pages, the layout both OpenSlide (generic-tiff) and tifffile read
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(big, subfiletype=0, resolution=(res_x, res_y), resolutionunit="CENTIMETER", metadata=None, **opts)
        for f in (4, 16):
            level = np.asarray(Image.fromarray(big).reduce(f))
            tw.write(level, subfiletype=1, resolution=(res_x / f, res_y / f), resolutionunit="CENTIMETER", metadata=None, **opts)
    return truth
