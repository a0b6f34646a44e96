"""Pixel reads of regions: one read per block of cells, with the margin its windows need, and the
thumbnail of the whole slide.

Each block is read once from the pyramid level ``--read-level`` chooses (``nearest``: the
level nearest the model's mpp, even up to 1.1x coarser; ``exact``: the coarsest at or finer) and
resampled (antialiased when shrinking) to exactly the target frame, so a block of nr x nc cells becomes an
image of (32 nr + 64) x (32 nc + 64) px: the input of one dense pass, or the source of its
96x96 windows in patch mode. Blocks without tissue are never read. A read carries the slide path
and opens it itself (one cached handle per process), so the graph of reads (``graph.py``) runs
on threads, processes or a distributed cluster alike.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .config import MAX_THUMBNAIL_BYTES
from .errors import UsageError
from .geometry import CellBlock, GridGeometry, box_in_read, choose_level, level_read_plan, whole_pixel_crop
from .io.slide import ReadRequest, Slide, open_slide


@dataclass(frozen=True)
class ReadPlan:
    """Everything a task needs to read a block, as plain picklable values."""

    slide_path: str
    backend: str  # the concrete backend that opened the slide: "openslide" or "tifffile"
    level: int
    downsample_xy: tuple[float, float]
    grid: GridGeometry
    #: the torch device the blocks are decoded and resampled on ("": this module, on the CPU;
    #: ``device_regions.choose_decode``), and why not there when ``--decode auto`` kept the CPU
    decode_device: str = ""
    decode_note: str = ""


class _Handles:
    """Open slide handles of this process, keyed by the file's identity as well as its path.

    A slide replaced on disk under the same name gets a new handle (the old one would read the
    old file's pixels under the new file's tissue mask), and handles are closed when evicted
    or released, so a long folder run does not leak file descriptors.
    """

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str, str], Slide] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, backend: str) -> Slide:
        from .io.slide import file_identity

        key = (path, backend, file_identity(path))
        with self._lock:
            slide = self._open.get(key)
            if slide is not None:
                self._open.move_to_end(key)
                return slide
            slide = open_slide(path, backend)
            self._open[key] = slide
            stale = [k for k in self._open if k[:2] == (path, backend) and k != key]
            while len(self._open) - len(stale) > self.max_open:
                stale.append(next(k for k in self._open if k not in stale))
            for k in stale:
                self._open.pop(k).close()
            return slide

    def release(self, path: str) -> None:
        """Close every handle of ``path`` (a scan of it has finished)."""
        with self._lock:
            for k in [k for k in self._open if k[0] == path]:
                self._open.pop(k).close()


_HANDLES = _Handles()  # per process by necessity: Dask tasks in worker processes reuse handles


def cached_slide(path: str, backend: str) -> Slide:
    """One open handle per slide file and process: handles are thread-safe for reads."""
    return _HANDLES.get(path, backend)


def release_slide(path: str) -> None:
    _HANDLES.release(path)


def make_read_plan(
    slide: Slide, mpp_xy: tuple[float, float], grid: GridGeometry, read_level: str = "exact", max_upsample: float = 1.0
) -> ReadPlan:
    """Which level the blocks are read from (``geometry.choose_level``'s ``read_level`` policy)."""
    ds = [lv.downsample_xy for lv in slide.info.levels]
    level = choose_level(ds, mpp_xy, grid.target_mpp, read_level, max_upsample)
    return ReadPlan(slide.info.path, slide.info.backend, level, ds[level], grid)


def region_read(
    l0_box_xyxy: tuple[float, float, float, float], downsample_xy: tuple[float, float], out_wh: tuple[int, int]
) -> ReadRequest:
    """The ``read_region`` call (l0_xy, level size) that ``resample_region`` makes for ``l0_box_xyxy``."""
    out_w, out_h = out_wh
    scale = max(
        (l0_box_xyxy[2] - l0_box_xyxy[0]) / downsample_xy[0] / out_w, (l0_box_xyxy[3] - l0_box_xyxy[1]) / downsample_xy[1] / out_h
    )
    pad = math.ceil(scale) + 2  # bilinear support when shrinking by `scale`
    return level_read_plan(l0_box_xyxy, downsample_xy, pad)


def resample_region(
    slide: Slide,
    level: int,
    downsample_xy: tuple[float, float],
    l0_box_xyxy: tuple[float, float, float, float],
    out_wh: tuple[int, int],
) -> np.ndarray:
    """Pixels of ``l0_box_xyxy`` resampled to ``out_wh``: (h, w, 3) uint8, antialiased when shrinking."""
    from PIL import Image

    out_w, out_h = out_wh
    l0_xy, lv_size = region_read(l0_box_xyxy, downsample_xy, out_wh)
    region = slide.read_region(l0_xy, level, lv_size)
    box = box_in_read(l0_box_xyxy, downsample_xy, region.lv_origin_xy)
    crop = whole_pixel_crop(box, out_wh)
    if crop is not None:
        x0, y0 = crop
        if not isinstance(region.pixels, np.ndarray):  # an OpenSlide read, held by PIL
            return np.array(region.pixels.crop((x0, y0, x0 + out_w, y0 + out_h)))
        return np.ascontiguousarray(region.rgb[y0 : y0 + out_h, x0 : x0 + out_w])
    src = region.pil()  # OpenSlide's reads arrive as PIL images: no copy; arrays are copied once
    del region  # a level-0 read of a 32-cell block is ~50 MB per thread: keep one copy only
    img = src.resize(out_wh, Image.Resampling.BILINEAR, box=box)
    del src
    return np.array(img)  # writable: torch refuses read-only buffers


def block_box_and_size(plan: ReadPlan, block: CellBlock) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    x0, y0, x1, y1 = plan.grid.block_tgt_box_xyxy(*block)
    return plan.grid.block_l0_box_xyxy(*block), (x1 - x0, y1 - y0)


def read_block(plan: ReadPlan, block: CellBlock) -> np.ndarray:
    """The target-frame image of a block's windows: (32 nr + 64, 32 nc + 64, 3) uint8."""
    slide = cached_slide(plan.slide_path, plan.backend)
    return resample_region(slide, plan.level, plan.downsample_xy, *block_box_and_size(plan, block))


def block_reads(plan: ReadPlan, block_list: list[CellBlock]) -> list[ReadRequest]:
    """The slide reads ``read_block`` will make for these blocks, for ``Slide.expect_reads``."""
    return [region_read(box, plan.downsample_xy, size) for box, size in (block_box_and_size(plan, b) for b in block_list)]


@contextlib.contextmanager
def expected_reads(plan: ReadPlan, block_list: list[CellBlock], cache_bytes: int) -> Iterator[None]:
    """Announce the blocks' reads to this process's slide handle while they run.

    Tiles shared by neighbouring blocks are then decoded once (``io.tilecache``). Tasks run in
    other processes read with their own handles, unannounced: the same pixels, decoded per read.
    """
    slide = cached_slide(plan.slide_path, plan.backend)
    slide.expect_reads(plan.level, block_reads(plan, block_list), cache_bytes)
    try:
        yield
    finally:
        slide.forget_reads()


def read_thumbnail(
    slide: Slide, mpp_xy: tuple[float, float], mask_mpp: float, max_read_px: int = 2048
) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole level-0 frame at about ``mask_mpp``, read in pieces of bounded size.

    Returns the image and its exact level-0 pixels per thumbnail pixel (x, y): callers name it
    ``l0_per_mask_xy``, as the tissue mask drawn on such a thumbnail does.
    """
    w0, h0 = slide.info.level0_size_wh
    tw = max(1, math.ceil(w0 * mpp_xy[0] / mask_mpp))
    th = max(1, math.ceil(h0 * mpp_xy[1] / mask_mpp))
    kx, ky = w0 / tw, h0 / th
    if tw * th * 3 > MAX_THUMBNAIL_BYTES:
        raise UsageError(
            f"a thumbnail of {slide.info.path} at {mask_mpp:g} um/px would be {tw} x {th} px "
            f"(over {MAX_THUMBNAIL_BYTES >> 20} MiB); pass a coarser --tissue-mpp"
        )
    ds = [lv.downsample_xy for lv in slide.info.levels]
    level = choose_level(ds, mpp_xy, mask_mpp)
    d = ds[level]
    step = max(1, int(max_read_px * min(d[0] / kx, d[1] / ky)))  # thumbnail px per piece
    out = np.empty((th, tw, 3), dtype=np.uint8)
    for ty in range(0, th, step):
        for tx in range(0, tw, step):
            pw, ph = min(step, tw - tx), min(step, th - ty)
            box = (tx * kx, ty * ky, (tx + pw) * kx, (ty + ph) * ky)
            out[ty : ty + ph, tx : tx + pw] = resample_region(slide, level, d, box, (pw, ph))
    return out, (kx, ky)
