"""Synthetic pyramidal TIFF slides with known content, for tests, benchmarks and demos.

The scene is described in level-0 pixels (tissue rectangles, "tumour" rectangles painted in a
distinct colour) and rendered tile by tile for every level, so slides far larger than memory
can be written. Levels are consecutive tiled JPEG (or uncompressed) pages with real resolution
tags, which OpenSlide (generic-tiff) and tifffile both read as a pyramid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]  # l0 x0, y0, x1, y1 (half-open)

BACKGROUND_RGB = (242, 242, 240)
TISSUE_RGB = (232, 160, 205)  # eosin pink
TUMOUR_RGB = (96, 40, 150)  # dense haematoxylin purple
PYRAMID_LAYOUTS = ("pages", "subifds", "ome", "svs")


@dataclass(frozen=True)
class SyntheticSlide:
    size_wh: tuple[int, int]
    mpp: float = 0.25
    downsamples: tuple[int, ...] = (1, 4, 16)
    tile_px: int = 256
    compression: str | None = "jpeg"
    quality: int = 90
    tissue: tuple[Box, ...] = ()
    tumour: tuple[Box, ...] = ()
    noise: int = 12  # amplitude of per-pixel texture on tissue
    seed: int = 0
    resolution_unit: str | None = "CENTIMETER"  # None: write no physical pixel size
    texture: np.ndarray | None = field(default=None, compare=False)  # optional RGB tile for tissue
    #: how the levels are stored (``PYRAMID_LAYOUTS``): "pages" (reduced pages after level 0),
    #: "subifds", "ome" (OME-TIFF, levels as SubIFDs), "svs" (Aperio: description, stripped
    #: thumbnail after level 0, label). tifffile lists "pages" and "svs" levels as separate
    #: series when a step is not 2, 3 or 4 (e.g. downsamples 1, 8, 32)
    layout: str = "pages"

    def level_sizes(self) -> list[tuple[int, int]]:
        w0, h0 = self.size_wh
        return [(max(1, math.ceil(w0 / d)), max(1, math.ceil(h0 / d))) for d in self.downsamples]


def _paint(spec: SyntheticSlide, lv_ds_xy: tuple[float, float], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Render level pixels [x0, x0+w) x [y0, y0+h); a pixel takes the colour at its l0 centre."""
    dx, dy = lv_ds_xy
    cx = (np.arange(x0, x0 + w) + 0.5) * dx
    cy = (np.arange(y0, y0 + h) + 0.5) * dy
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = BACKGROUND_RGB
    tissue = np.zeros((h, w), dtype=bool)
    for bx0, by0, bx1, by1 in spec.tissue:
        tissue |= ((cy >= by0) & (cy < by1))[:, None] & ((cx >= bx0) & (cx < bx1))[None, :]
    if tissue.any():
        if spec.texture is not None:
            tex = spec.texture
            ty = (cy / dy).astype(np.int64) % tex.shape[0]
            tx = (cx / dx).astype(np.int64) % tex.shape[1]
            out[tissue] = tex[ty[:, None], tx[None, :]][tissue]
        else:
            base = np.array(TISSUE_RGB, dtype=np.int16)
            # texture that depends on level-0 position only, so every level shows the same tissue
            ix = (cx // 7).astype(np.int64)[None, :]
            iy = (cy // 7).astype(np.int64)[:, None]
            hsh = (ix * 73856093 ^ iy * 19349663 ^ spec.seed * 83492791) % 1000
            jitter = hsh.astype(np.int16) * spec.noise // 1000 - spec.noise // 2
            tex = np.clip(base[None, None, :] + jitter[..., None], 0, 255).astype(np.uint8)
            out[tissue] = tex[tissue]
    for bx0, by0, bx1, by1 in spec.tumour:
        m = ((cy >= by0) & (cy < by1))[:, None] & ((cx >= bx0) & (cx < bx1))[None, :]
        out[m] = TUMOUR_RGB
    return out


def _tile_key(spec: SyntheticSlide, ds: tuple[float, float], tx: int, ty: int, w: int, h: int) -> tuple[object, ...] | None:
    """A key shared by tiles that render identically, or None when the tile must be rendered.

    Large slides are mostly glass or the interior of a textured tissue box; rendering and
    encoding those tiles once each is what makes a multi-gigapixel benchmark slide writable in
    minutes. Tests are conservative: a tile that might touch an edge or a tumour is rendered.
    """
    dx, dy = ds
    cx0, cx1 = (tx + 0.5) * dx, (tx + w - 0.5) * dx  # first and last pixel centre, l0
    cy0, cy1 = (ty + 0.5) * dy, (ty + h - 0.5) * dy

    def touches(b: Box) -> bool:
        return cx1 >= b[0] and cx0 < b[2] and cy1 >= b[1] and cy0 < b[3]

    if any(touches(b) for b in spec.tumour):
        return None
    if not any(touches(b) for b in spec.tissue):
        return ("glass", w, h)
    inside = any(cx0 >= b[0] and cx1 < b[2] and cy0 >= b[1] and cy1 < b[3] for b in spec.tissue)
    if inside and spec.texture is not None:
        # the texture is indexed by level pixel modulo its size (see _paint)
        return ("texture", tx % spec.texture.shape[1], ty % spec.texture.shape[0], w, h)
    return None


def _render_tile(spec: SyntheticSlide, ds: tuple[float, float], tx: int, ty: int, w: int, h: int) -> np.ndarray:
    t = spec.tile_px
    tile = np.full((t, t, 3), 255, dtype=np.uint8)
    tile[:h, :w] = _paint(spec, ds, tx, ty, w, h)
    return tile


def _jpeg_args(spec: SyntheticSlide) -> dict[str, object]:
    # what tifffile passes to its JPEG compressor for an RGB page, so pre-encoded tiles are the
    # very bytes tifffile would have written itself
    return {"level": spec.quality, "subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}


def _tiles(spec: SyntheticSlide, level: int) -> Iterator[np.ndarray | bytes]:
    """The tiles of a level in file order: arrays, or encoded bytes for JPEG pages."""
    import tifffile

    w0, h0 = spec.size_wh
    lw, lh = spec.level_sizes()[level]
    ds = (w0 / lw, h0 / lh)
    t = spec.tile_px
    encode = None
    if spec.compression == "jpeg":
        compressor = tifffile.TIFF.COMPRESSORS[7]
        kwargs = _jpeg_args(spec)

        def encode(a: np.ndarray) -> bytes:
            return bytes(compressor(a, **kwargs))

    cache: dict[tuple[object, ...], np.ndarray | bytes] = {}
    for ty in range(0, lh, t):
        for tx in range(0, lw, t):
            w, h = min(t, lw - tx), min(t, lh - ty)
            key = _tile_key(spec, ds, tx, ty, w, h)
            if key is not None and key in cache:
                yield cache[key]
                continue
            tile = _render_tile(spec, ds, tx, ty, w, h)
            out = encode(tile) if encode is not None else tile
            if key is not None and len(cache) < 4096:
                cache[key] = out
            yield out


def write_flat_slide(path: str | Path, rgb: np.ndarray, mpp: float, tile_px: int = 256) -> Path:
    """An (h, w, 3) uint8 image as a one-level tiled TIFF (zlib, lossless) whose resolution tags
    give ``mpp`` um/px: a slide both readers open, for scenes small enough to hold in memory."""
    import tifffile

    res = 1e4 / mpp
    tifffile.imwrite(
        path,
        rgb,
        tile=(tile_px, tile_px),
        photometric="rgb",
        compression="zlib",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return Path(path)


def write_synthetic_slide(path: str | Path, spec: SyntheticSlide) -> Path:
    import tifffile

    if spec.layout not in PYRAMID_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(PYRAMID_LAYOUTS)}, found {spec.layout!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sizes = spec.level_sizes()
    sub = spec.layout in ("subifds", "ome")
    ome_meta: dict[str, object] = {"axes": "YXS", "PhysicalSizeX": spec.mpp, "PhysicalSizeY": spec.mpp}
    with tifffile.TiffWriter(tmp, bigtiff=spec.size_wh[0] * spec.size_wh[1] > 2**31, ome=spec.layout == "ome") as tw:
        for i, (lw, lh) in enumerate(sizes):
            kw: dict[str, object] = {
                "shape": (lh, lw, 3),
                "dtype": np.uint8,
                "tile": (spec.tile_px, spec.tile_px),
                "photometric": "rgb",
                # Aperio marks no level as reduced (OpenSlide takes its tiled pages as levels)
                "subfiletype": 0 if i == 0 or spec.layout == "svs" else 1,
                "metadata": ome_meta if spec.layout == "ome" and i == 0 else None,
            }
            if sub and i == 0 and len(sizes) > 1:
                kw["subifds"] = len(sizes) - 1
            if spec.layout == "svs":
                kw["description"] = (
                    f"Aperio Image Library v10.0.0\r\n{lw}x{lh} [0,0 {lw}x{lh}] ({spec.tile_px}x{spec.tile_px}) "
                    f"JPEG/RGB Q={spec.quality}" + (f"|AppMag = 40|MPP = {spec.mpp}" if i == 0 else "")
                )
            if spec.compression == "jpeg":
                kw["compression"] = "jpeg"
                kw["compressionargs"] = {"level": spec.quality}
            if spec.resolution_unit is not None:
                d = spec.size_wh[0] / lw
                per_unit = (1e4 if spec.resolution_unit == "CENTIMETER" else 25400.0) / (spec.mpp * d)
                kw["resolution"] = (per_unit, per_unit)
                kw["resolutionunit"] = spec.resolution_unit
            else:
                kw["resolutionunit"] = "NONE"
            tw.write(_tiles(spec, i), **kw)  # type: ignore[arg-type]
            if spec.layout == "svs" and i == 0:  # the stripped thumbnail Aperio writes second: not a level
                tw.write(
                    _paint(spec, (8.0, 8.0), 0, 0, max(1, lw // 8), max(1, lh // 8)),
                    photometric="rgb",
                    description="Aperio Image Library v10.0.0\r\nthumbnail",
                    metadata=None,
                )
        if spec.layout == "svs":  # a label: another aspect ratio, stripped, marked reduced
            tw.write(
                np.full((120, 300, 3), 200, dtype=np.uint8),
                photometric="rgb",
                subfiletype=1,
                description="Aperio Image Library v10.0.0\r\nlabel 300x120",
                metadata=None,
            )
    tmp.replace(path)
    return path
