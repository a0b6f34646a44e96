"""Deep Zoom tiles of a slide and of its heatmap, both in the slide's level-0 frame.

Deep Zoom level ``dz`` of a W x H px level 0 has ``dz_ds = 2 ** (max_dz - dz)`` level-0 px per
pixel, ``max_dz = ceil(log2(max(W, H)))``; tile (col, row) holds that level's pixels
[col*T, col*T + T) x [row*T, row*T + T) (no overlap), i.e. the level-0 box
``l0_box_xyxy = (col*T*dz_ds, row*T*dz_ds, ...)``, clipped to the slide. The heatmap tile of the same
(dz, col, row) colours each pixel with the cell under its centre (``geometry.image_cells``), so
the two layers align exactly, at every zoom, however the grid's origin and cell size fall.

Slide tiles are resampled from the coarsest pyramid level at or finer than ``dz_ds``; the
coarsest Deep Zoom levels are cut from one overview image per slide, read once.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import image_cells
from ..io.heatmap import Heatmap
from ..io.slide import Slide

#: a pyramid level whose downsample exceeds the wanted one by this factor still counts as "at it"
LEVEL_SLACK = 1e-3


@dataclass(frozen=True)
class DeepZoom:
    """The Deep Zoom pyramid of a ``size_wh`` level-0 image in tiles of ``tile_px``."""

    size_wh: tuple[int, int]
    tile_px: int

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.size_wh))))

    def downsample(self, dz: int) -> int:
        """Level-0 px per pixel of Deep Zoom level ``dz``."""
        return 1 << (self.max_level - dz)

    def level_size(self, dz: int) -> tuple[int, int]:
        d = self.downsample(dz)
        return (max(1, math.ceil(self.size_wh[0] / d)), max(1, math.ceil(self.size_wh[1] / d)))

    def tile_count(self, dz: int) -> tuple[int, int]:
        w, h = self.level_size(dz)
        return (math.ceil(w / self.tile_px), math.ceil(h / self.tile_px))

    def valid(self, dz: int, col: int, row: int) -> bool:
        if not 0 <= dz <= self.max_level:
            return False
        nc, nr = self.tile_count(dz)
        return 0 <= col < nc and 0 <= row < nr

    def tile_box(self, dz: int, col: int, row: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(pixel origin in level ``dz``, tile size (w, h)) of a tile; edge tiles are smaller."""
        w, h = self.level_size(dz)
        x0, y0 = col * self.tile_px, row * self.tile_px
        return (x0, y0), (min(self.tile_px, w - x0), min(self.tile_px, h - y0))

    def tile_l0_box_xyxy(self, dz: int, col: int, row: int) -> tuple[float, float, float, float]:
        """The level-0 box (x0, y0, x1, y1) a tile shows, clipped to the image."""
        (x0, y0), (w, h) = self.tile_box(dz, col, row)
        d = self.downsample(dz)
        return (x0 * d, y0 * d, min((x0 + w) * d, self.size_wh[0]), min((y0 + h) * d, self.size_wh[1]))


def colour_lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8: the colour of probability p is ``lut[probability_index(p)]``."""
    from matplotlib import colormaps

    return (np.asarray(colormaps[cmap](np.linspace(0.0, 1.0, 256)))[:, :3] * 255 + 0.5).astype(np.uint8)


def probability_index(p: np.ndarray) -> np.ndarray:
    """LUT index of probabilities in [0, 1] (NaN must be masked by the caller)."""
    return np.clip(np.rint(np.nan_to_num(p, nan=0.0) * 255), 0, 255).astype(np.intp)


class ByteLRU:
    """A thread-safe least-recently-used cache bounded by the bytes of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[Any, bytes] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        # keys being made: the event their waiters wait on and, once made, the value, which
        # reaches the waiters even when the cache does not keep it (too large, slide closed)
        self._making: dict[Any, tuple[threading.Event, list[bytes]]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._nbytes -= len(old)
            self._d[key] = value
            self._nbytes += len(value)
            while self._nbytes > self.max_bytes and self._d:
                _, v = self._d.popitem(last=False)
                self._nbytes -= len(v)

    def get_or_make(self, key: Any, make: Callable[[], bytes], keep: Callable[[], bool] = lambda: True) -> bytes:
        """The cached value of ``key``, or ``make()``'s, kept when ``keep()`` says so. Requests for a
        key being made wait for that one: a page opened in many tabs, or a viewer's burst of
        requests for one cold tile, renders it once instead of once per request. A waiter whose
        maker failed makes the value itself."""
        while True:
            with self._lock:
                v = self._d.get(key)
                if v is not None:
                    self._d.move_to_end(key)
                    self.hits += 1
                    return v
                making = self._making.get(key)
                mine = making is None
                if making is None:
                    making = self._making[key] = (threading.Event(), [])
                    self.misses += 1
            ev, result = making
            if not mine:
                ev.wait()
                if result:
                    return result[0]
                continue  # its maker failed
            try:
                value = make()
                result.append(value)
                if keep():
                    self.put(key, value)
                return value
            finally:
                with self._lock:
                    self._making.pop(key, None)
                ev.set()

    def drop(self, match: Callable[[Any], bool]) -> None:
        with self._lock:
            for k in [k for k in self._d if match(k)]:
                self._nbytes -= len(self._d.pop(k))


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    try:
        import simplejpeg

        return bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB"))
    except ImportError:  # pragma: no cover - simplejpeg is a dependency
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def encode_png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SlideTiles:
    """Deep Zoom tiles of one slide, from its own reader (any format the scanner reads)."""

    def __init__(self, slide: Slide, dz: DeepZoom, thumbnail_px: int) -> None:
        self.slide = slide
        self.dz = dz
        self.levels = [lv.downsample_xy for lv in slide.info.levels]
        # the overview: a power-of-two downsample with its longest side at most thumbnail_px
        self.overview_ds = 1 << max(0, math.ceil(math.log2(max(dz.size_wh) / thumbnail_px)))
        self._overview: np.ndarray | None = None
        self._overview_l0_per: tuple[float, float] = (1.0, 1.0)
        self._lock = threading.Lock()

    def _level_for(self, ds: float) -> int:
        """The coarsest pyramid level at or finer than ``ds`` level-0 px per pixel."""
        best = 0
        for i, (dx, dy) in enumerate(self.levels):
            if max(dx, dy) <= ds * (1 + LEVEL_SLACK) and dx >= self.levels[best][0]:
                best = i
        return best

    def overview(self) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole level-0 frame at ``overview_ds`` (read once, in bounded pieces)."""
        with self._lock:
            if self._overview is None:
                from ..regions import resample_region

                w0, h0 = self.dz.size_wh
                d = self.overview_ds
                tw, th = max(1, math.ceil(w0 / d)), max(1, math.ceil(h0 / d))
                kx, ky = w0 / tw, h0 / th
                level = self._level_for(min(kx, ky))
                ds = self.levels[level]
                out = np.empty((th, tw, 3), dtype=np.uint8)
                step = max(1, int(2048 * min(ds[0] / kx, ds[1] / ky)))  # overview px per read: reads of ~2048 px
                for ty in range(0, th, step):
                    for tx in range(0, tw, step):
                        pw, ph = min(step, tw - tx), min(step, th - ty)
                        box = (tx * kx, ty * ky, (tx + pw) * kx, (ty + ph) * ky)
                        out[ty : ty + ph, tx : tx + pw] = resample_region(self.slide, level, ds, box, (pw, ph))
                self._overview, self._overview_l0_per = out, (kx, ky)
            return self._overview, self._overview_l0_per

    def tile_rgb(self, dzl: int, col: int, row: int) -> np.ndarray:
        from PIL import Image

        from ..regions import resample_region

        ds = self.dz.downsample(dzl)
        box = self.dz.tile_l0_box_xyxy(dzl, col, row)
        _, size = self.dz.tile_box(dzl, col, row)
        if ds >= self.overview_ds:
            img, (kx, ky) = self.overview()
            src = Image.fromarray(img)
            return np.asarray(
                src.resize(size, Image.Resampling.BILINEAR, box=(box[0] / kx, box[1] / ky, box[2] / kx, box[3] / ky))
            )
        level = self._level_for(ds)
        return resample_region(self.slide, level, self.levels[level], box, size)


class HeatTiles:
    """Deep Zoom tiles of a heatmap in its slide's level-0 frame: RGBA, opaque on the cells at or
    above the threshold, transparent elsewhere (off tissue, NaN, below the threshold, off grid)."""

    def __init__(self, hm: Heatmap, dz: DeepZoom, lut: np.ndarray) -> None:
        self.hm = hm
        self.dz = dz
        self.lut = lut
        self._index = probability_index(hm.probs).astype(np.uint8)  # 1 byte per cell
        self._finite = np.isfinite(hm.probs)

    def tile_rgba(self, dzl: int, col: int, row: int, threshold: float) -> np.ndarray:
        """Where a tile pixel is smaller than a cell, the cell under its centre; where it covers
        cells, the highest probability among them (a lone suspicious cell stays visible when
        zoomed out, as the lesion outlines do)."""
        (x0, y0), (w, h) = self.dz.tile_box(dzl, col, row)
        d = float(self.dz.downsample(dzl))
        out = np.zeros((h, w, 4), dtype=np.uint8)
        if d >= max(self.hm.grid.l0_cell_size_xy):
            probs, (ys, xs) = self._pooled(x0, y0, w, h, d)
            if probs.size == 0:
                return out
            index = probability_index(probs)
            show = np.isfinite(probs) & (probs >= threshold)
        else:
            r, c = image_cells(self.hm.grid, (d, d), (x0, y0), (w, h))
            rows, cols = np.flatnonzero(r >= 0), np.flatnonzero(c >= 0)
            if rows.size == 0 or cols.size == 0:
                return out
            ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)  # in-grid pixels are contiguous
            rr, cc = r[rows][:, None], c[cols][None, :]
            index = self._index[rr, cc]
            show = self._finite[rr, cc] & (self.hm.probs[rr, cc] >= threshold)
        sub = np.zeros(show.shape + (4,), dtype=np.uint8)
        sub[..., :3] = self.lut[index]
        sub[..., 3] = np.where(show, 255, 0)
        sub[~show] = 0  # transparent pixels all alike: smaller PNGs
        out[ys, xs] = sub
        return out

    def _pooled(self, x0: int, y0: int, w: int, h: int, d: float) -> tuple[np.ndarray, tuple[slice, slice]]:
        """The highest probability (NaN-aware) of the cells whose top-left corner lies in each
        pixel of a tile whose pixels are at least a cell wide, and the tile pixels that have any."""
        g = self.hm.grid
        (ox, oy), (sx, sy) = g.l0_origin_xy, g.l0_cell_size_xy
        rows, cols = g.shape_rc

        def cuts(p0: int, n: int, o: float, s: float, n_cells: int) -> tuple[np.ndarray, int, int]:
            # index of the first cell whose top-left corner is at or after each pixel edge: pixel i
            # holds cells [first[i], first[i + 1]), one at least inside the grid since d >= s
            first = np.clip(np.ceil(((p0 + np.arange(n + 1)) * d - o) / s).astype(np.int64), 0, n_cells)
            used = np.flatnonzero(first[1:] > first[:-1])
            if used.size == 0:
                return used, 0, 0
            return first[used], int(used[0]), int(used[-1]) + 1

        cstart, px0, px1 = cuts(x0, w, ox, sx, cols)
        rstart, py0, py1 = cuts(y0, h, oy, sy, rows)
        if cstart.size == 0 or rstart.size == 0 or px1 - px0 != cstart.size or py1 - py0 != rstart.size:
            return np.zeros((0, 0), np.float32), (slice(0, 0), slice(0, 0))
        cend = int(np.clip(np.ceil(((x0 + px1) * d - ox) / sx), 0, cols))
        rend = int(np.clip(np.ceil(((y0 + py1) * d - oy) / sy), 0, rows))
        sub = self.hm.probs[rstart[0] : rend, cstart[0] : cend]
        with np.errstate(invalid="ignore"):
            pooled = np.fmax.reduceat(np.fmax.reduceat(sub, cstart - cstart[0], axis=1), rstart - rstart[0], axis=0)
        return pooled, (slice(py0, py1), slice(px0, px1))
