"""The overlay picture: slide thumbnail, tumour heatmap, colour bar, scale bar and caption.

Heatmap cells are placed on the thumbnail through the grid's level-0 mapping (the same one
every export uses), never by stretching the heatmap over the picture: the grid starts at the
slide's bounds and overhangs its far edges, so stretching would shift everything.

The thumbnail occupies the top-left corner of the picture pixel for pixel; the colour bar sits
to its right and the caption and scale bar below it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..config import OVERLAY_ALPHA, OVERLAY_MAX_SIZE_PX, OVERLAY_MIN_SIZE_PX
from ..errors import SlideError, SlideNotFoundError, UsageError
from ..io.heatmap import Heatmap, open_heatmap

CMAP = "inferno"  # perceptually uniform and readable in greyscale
TISSUE_RGB = (0, 200, 255)
CONTOUR_RGB = (0, 255, 0)
BG_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
NICE_MM = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 50.0)


def colormap_rgb(values: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """(..., 3) uint8 colours of probabilities in [0, 1] (NaN maps to 0)."""
    import matplotlib

    lut = (np.asarray(matplotlib.colormaps[cmap](np.linspace(0, 1, 256)))[:, :3] * 255 + 0.5).astype(np.uint8)
    idx = np.clip(np.nan_to_num(values, nan=0.0) * 255 + 0.5, 0, 255).astype(np.int64)
    return lut[idx]


def _as_heatmap(heatmap: str | Path | Heatmap) -> Heatmap:
    return heatmap if isinstance(heatmap, Heatmap) else open_heatmap(heatmap)


def resolve_slide_path(hm: Heatmap, slide: str | Path | None) -> Path:
    p = Path(slide) if slide is not None else Path(str(hm.attrs["slide"]["path"]))
    if not p.exists():
        how = "the --slide given" if slide is not None else "the slide path recorded in the heatmap"
        raise SlideNotFoundError(f"{how}, {p}, does not exist; pass --slide with the slide's current location")
    return p


def check_same_slide(hm: Heatmap, info: Any) -> None:
    """Refuse to draw a heatmap over another slide than the one it was made from: the picture
    would look right and be wrong. Level-0 size and file size must both match."""
    rec = hm.attrs.get("slide", {})
    want_wh = [int(v) for v in rec.get("level0_size_wh", [])]
    want_bytes = rec.get("size_bytes")
    found_wh = [int(v) for v in info.level0_size_wh]
    if want_wh and want_wh != found_wh:
        raise SlideError(
            f"{info.path} is {found_wh[0]} x {found_wh[1]} px but the heatmap was made from "
            f"{rec.get('name')} of {want_wh[0]} x {want_wh[1]} px; pass the slide the heatmap was made from"
        )
    if want_bytes is not None and int(want_bytes) != int(info.size_bytes):
        raise SlideError(
            f"{info.path} has {info.size_bytes:,} bytes but the heatmap was made from {rec.get('name')} "
            f"of {int(want_bytes):,} bytes; pass the slide the heatmap was made from"
        )


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels on the inner edge of a boolean mask, ``width`` px thick."""
    from scipy import ndimage

    if not mask.any():
        return np.zeros_like(mask)
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=width, border_value=0)
    return mask & ~inner


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_scale_mm(image_w_um: float) -> float:
    target = image_w_um / 1000 / 5
    return max([m for m in NICE_MM if m <= target] or [NICE_MM[0]])


def compose_overlay(
    hm: Heatmap,
    thumb: np.ndarray,
    l0_per_mask_xy: tuple[float, float],
    alpha: float = OVERLAY_ALPHA,
    threshold: float | None = None,
) -> np.ndarray:
    """The picture as an (h, w, 3) uint8 array; ``thumb`` shows the whole level-0 frame, at
    ``l0_per_mask_xy`` level-0 px per thumbnail px (``read_thumbnail``'s scale, named as the
    tissue mask names it)."""
    from PIL import Image, ImageDraw

    from ..geometry import image_cells

    th, tw = thumb.shape[:2]
    r, c = image_cells(hm.grid, l0_per_mask_xy, (0, 0), (tw, th))
    inside = (r[:, None] >= 0) & (c[None, :] >= 0)
    rr, cc = np.broadcast_to(r[:, None], inside.shape), np.broadcast_to(c[None, :], inside.shape)
    probs = np.full((th, tw), np.nan, dtype=np.float32)
    probs[inside] = hm.probs[rr[inside], cc[inside]]
    tissue = np.zeros((th, tw), dtype=bool)
    tissue[inside] = hm.tissue[rr[inside], cc[inside]]

    img = thumb.astype(np.float32)
    scanned = np.isfinite(probs)
    img[scanned] = (1 - alpha) * img[scanned] + alpha * colormap_rgb(probs[scanned]).astype(np.float32)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    line = max(1, round(max(th, tw) / 800))
    img[_outline(tissue, line)] = TISSUE_RGB
    thr = hm.threshold if threshold is None else threshold
    img[_outline(scanned & (np.nan_to_num(probs, nan=-1.0) >= thr), line)] = CONTOUR_RGB

    # colour bar to the right, caption and scale bar below
    fs = max(10, min(28, round(max(th, tw) / 60)))
    font = _font(fs)
    bar_w = max(12, fs)
    panel_w = bar_w + 5 * fs
    model = hm.attrs.get("model", {})
    parts = [
        f"{hm.attrs['slide'].get('name', '?')}",
        f"model {model.get('name', '?')}",
        f"tumour probability ({CMAP}); green: >= {thr:.4g}; blue: tissue",
    ]
    # one line where it fits the picture's width, else a line per part: a cut caption hides the legend
    lines = ["  |  ".join(parts)]
    if font.getlength(lines[0]) > tw + panel_w - 2 * fs:
        lines = parts
    strip_h = round((2.6 + 1.2 * len(lines)) * fs)
    canvas = Image.new("RGB", (max(tw + panel_w, round(max(font.getlength(t) for t in lines)) + 2 * fs), th + strip_h), BG_RGB)
    canvas.paste(Image.fromarray(img), (0, 0))
    draw = ImageDraw.Draw(canvas)
    bx0, by0 = tw + fs // 2, fs
    bar_h = max(20, th - 2 * fs)
    ramp = colormap_rgb(np.linspace(1, 0, bar_h))[:, None, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(ramp), (bx0, by0))
    draw.rectangle((bx0 - 1, by0 - 1, bx0 + bar_w, by0 + bar_h), outline=TEXT_RGB)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = by0 + round((1 - v) * (bar_h - 1))
        draw.line((bx0 + bar_w, y, bx0 + bar_w + fs // 3, y), fill=TEXT_RGB)
        draw.text((bx0 + bar_w + fs // 2, y), f"{v:.2f}", fill=TEXT_RGB, font=font, anchor="lm")
    ty = by0 + round((1 - thr) * (bar_h - 1))
    if 0 <= thr <= 1:
        draw.line((bx0 - 3, ty, bx0 + bar_w + 2, ty), fill=CONTOUR_RGB, width=2)

    um_per_px = l0_per_mask_xy[0] * hm.mpp_xy[0]
    mm = _nice_scale_mm(tw * um_per_px)
    bar_px = max(1, round(mm * 1000 / um_per_px))
    sy = th + fs
    draw.rectangle((fs, sy, fs + bar_px, sy + max(3, fs // 3)), fill=TEXT_RGB)
    draw.text((fs + bar_px + fs // 2, sy), f"{mm:g} mm", fill=TEXT_RGB, font=font, anchor="lt")
    for i, text in enumerate(lines):
        draw.text((fs, sy + (1.6 + 1.2 * i) * fs), text, fill=TEXT_RGB, font=font, anchor="lt")
    return np.asarray(canvas)


def render_overlay(
    heatmap: str | Path | Heatmap,
    out: str | Path,
    slide: str | Path | None = None,
    max_size: int = OVERLAY_MAX_SIZE_PX,
    alpha: float = OVERLAY_ALPHA,
    threshold: float | None = None,
    overwrite: bool = False,
    backend: str = "auto",
) -> Path:
    """Write the overlay picture (PNG or JPEG by extension) of a heatmap on its slide.

    ``slide`` overrides the slide path recorded in the heatmap; ``threshold`` (default: the
    model's) draws the outline of the regions at or above it. Returns ``out``.
    """
    from ..io.exports import image_format, write_image
    from ..io.slide import open_slide
    from ..regions import read_thumbnail

    out = Path(out)
    image_format(out)  # a wrong suffix fails before any pixel is read
    if max_size < OVERLAY_MIN_SIZE_PX:
        # below it the colour bar's five labels overlap
        raise UsageError(f"--max-size must be at least {OVERLAY_MIN_SIZE_PX} px, found {max_size}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], found {threshold}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1], found {alpha}")
    hm = _as_heatmap(heatmap)
    s = open_slide(resolve_slide_path(hm, slide), backend)
    try:
        check_same_slide(hm, s.info)
        w0, h0 = s.info.level0_size_wh
        mx, my = hm.mpp_xy
        # a hair coarser than exact, so that ceil() in read_thumbnail stays within max_size
        # never finer than level 0: a picture larger than the slide only costs memory
        thumb_mpp = max(max(w0 * mx, h0 * my) / max_size * (1 + 1e-9), mx, my)
        thumb, l0_per_mask_xy = read_thumbnail(s, hm.mpp_xy, thumb_mpp)
    finally:
        s.close()
    pic = compose_overlay(hm, thumb, l0_per_mask_xy, alpha, threshold)
    return write_image(out, pic, overwrite)
