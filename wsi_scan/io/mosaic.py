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

#: layouts of the patches on the slide, in 96 px slots (issue 11's table):
#: "edge": edge to edge in a square with a margin of glass; "full": the whole slide covered;
#: "groups": 4 x 4 blocks with two slots of glass between them; "scattered": single patches,
#: one slot of glass between neighbours
LAYOUTS = ("edge", "full", "groups", "scattered")
#: scanner glass as seen on the shared real slides: near-white, faintly tinted, noisy
GLASS_RGB = (238, 237, 241)
GLASS_NOISE = 2.0


@dataclass(frozen=True)
class Mosaic:
    path: Path
    grid_rc: tuple[int, int]  # slots per column and per row
    indices: np.ndarray  # (n,) index into the PatchSet of the patch at each mosaic position
    labels: np.ndarray  # (n,)
    slots_rc: np.ndarray | None = None  # (n, 2) slot of each patch; None: row-major from 0

    def slot_of(self, k: int) -> tuple[int, int]:
        if self.slots_rc is None:
            return divmod(k, self.grid_rc[1])
        return int(self.slots_rc[k, 0]), int(self.slots_rc[k, 1])

    def cell_of(self, k: int) -> tuple[int, int]:
        """The heatmap cell whose window is mosaic patch k."""
        i, j = self.slot_of(k)
        return (3 * i + 1, 3 * j + 1)

    def occupied(self) -> np.ndarray:
        """(rows, cols) bool over slots: where a patch lies."""
        occ = np.zeros(self.grid_rc, dtype=bool)
        for k in range(len(self.indices)):
            occ[self.slot_of(k)] = True
        return occ


def layout_slots(n: int, layout: str) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """Slots (n, 2) of n patches, the slot grid, and the slots of filler copies ("full" only)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
    side = math.ceil(math.sqrt(n))
    k = np.arange(n)
    if layout in ("edge", "full"):
        margin = 2 if layout == "edge" else 0
        slots = np.stack([k // side + margin, k % side + margin], axis=1)
        rows = math.ceil(n / side) + 2 * margin
        grid = (rows, side + 2 * margin)
        filler = np.zeros((0, 2), dtype=int)
        if layout == "full":  # the last row's empty slots get copies, so no glass is left
            filler = np.array([(grid[0] - 1, c) for c in range(n - (grid[0] - 1) * side, side)], dtype=int).reshape(-1, 2)
        return slots, grid, filler
    if layout == "groups":
        g_side = math.ceil(math.sqrt(math.ceil(n / 16)))
        g, w = divmod(k, 16)
        gr, gc = divmod(g, g_side)
        slots = np.stack([1 + gr * 6 + w // 4, 1 + gc * 6 + w % 4], axis=1)
        return slots, (1 + 6 * math.ceil(math.ceil(n / 16) / g_side), 1 + 6 * g_side), np.zeros((0, 2), dtype=int)
    slots = np.stack([1 + 2 * (k // side), 1 + 2 * (k % side)], axis=1)
    return slots, (1 + 2 * math.ceil(n / side), 1 + 2 * side), np.zeros((0, 2), dtype=int)


def write_mosaic(
    path: str | Path,
    ps: PatchSet,
    indices: np.ndarray,
    mpp: float = 0.972,
    tile_px: int = 256,
    scan_mpp: float | None = None,
    layout: str | None = None,
    seed: int = 0,
) -> Mosaic:
    """Write the mosaic; with ``scan_mpp`` (e.g. 0.25) it is enlarged to about that pixel size
    (bicubic), JPEG-tiled (quality 90) with a 1/4/16 pyramid, as a 40x scanner would store it, so
    a scan goes through the whole read-and-shrink path. Its exact mpp is written in the file:
    ``mpp`` times the enlargement, which keeps every patch on its cell."""
    import tifffile
    from PIL import Image

    n = len(indices)
    if layout is None:  # the original layout: edge to edge, pure white around
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        slots = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1)
        filler = np.zeros((0, 2), dtype=int)
        img = np.full((rows * 96, cols * 96, 3), 255, dtype=np.uint8)
    else:
        slots, (rows, cols), filler = layout_slots(n, layout)
        rng = np.random.default_rng(seed)
        noise = rng.normal(0.0, GLASS_NOISE, (rows * 96, cols * 96, 1))
        img = np.clip(np.asarray(GLASS_RGB, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        del noise
    for k, idx in enumerate(indices):
        i, j = slots[k]
        img[i * 96 : (i + 1) * 96, j * 96 : (j + 1) * 96] = ps.read(int(idx))
    for f, (i, j) in enumerate(filler):
        img[i * 96 : (i + 1) * 96, j * 96 : (j + 1) * 96] = ps.read(int(indices[f % n]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = Mosaic(path, (rows, cols), np.asarray(indices), ps.labels[np.asarray(indices)], None if layout is None else slots)
    if scan_mpp is None:
        from .synthetic import write_flat_slide

        write_flat_slide(path, img, mpp, tile_px)
        return truth
    h, w = img.shape[:2]
    big_w, big_h = round(w * mpp / scan_mpp), round(h * mpp / scan_mpp)
    big = np.asarray(Image.fromarray(img).resize((big_w, big_h), Image.Resampling.BICUBIC))
    del img
    res_x, res_y = 1e4 / (mpp * w / big_w), 1e4 / (mpp * h / big_h)
    opts: dict[str, Any] = {
        "tile": (tile_px, tile_px),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
    }
    # levels as successive pages, the layout both OpenSlide (generic-tiff) and tifffile read
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(big, subfiletype=0, resolution=(res_x, res_y), resolutionunit="CENTIMETER", metadata=None, **opts)
        for f in (4, 16):
            level = np.asarray(Image.fromarray(big).reduce(f))
            tw.write(level, subfiletype=1, resolution=(res_x / f, res_y / f), resolutionunit="CENTIMETER", metadata=None, **opts)
    return truth
