"""Tissue mask from a low-resolution thumbnail. Pure: arrays in, arrays out.

The default ("glass") rule asks "does this pixel differ from the glass?", not "is it as dark as
the rest of the tissue?". H&E stains everything on a section, fat and loose stroma faintly;
scanner glass is grey. The glass's saturation is estimated from the thumbnail itself (the mode of
its bright, grey pixels) and the threshold sits just above it, between a floor and a cap. Otsu's
threshold on saturation ("otsu", the former rule) splits pale tissue from dark tissue whenever
tissue is plentiful and drops fat, the subcapsular sinus's neighbour (docs/tissue.md).

Excluded whatever their saturation: black background and very dark pixels, blue and green pen
(G > R: both H&E stains absorb green more than red), and dark grey marks (black marker, air-bubble
edges, dirt). Morphology sizes are in micrometers and converted with the mask's own pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import TissueConfig


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # (rows, cols) bool
    l0_per_mask_xy: tuple[float, float]  # level-0 pixels per mask pixel
    mask_mpp_xy: tuple[float, float]
    threshold: float  # saturation threshold used (inf: none, NaN: not thresholded)
    params: dict[str, Any] = field(default_factory=dict)  # method and every parameter, for the attrs
    # for the stain check only ("glass" with ``stain_check``; dropped once it has run): thumbnail
    # pixels with a sign of tissue (small pieces of the mask, pixels over the threshold that the
    # mean or the speck rule left out, pixels darker than their neighbours), and pixels refused
    # whatever their stain (ink, dark, and their rims)
    evidence: np.ndarray | None = field(default=None, repr=False, compare=False)
    excluded: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) - float(values.min()) < 1e-6:
        return float("inf")
    return float(threshold_otsu(values))


def _saturation(rgb: np.ndarray, max_value_dark: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV saturation (float64, equal to skimage's ``rgb2hsv``), value as its uint8 numerator
    (the pixel's max: compare through ``_value_is``), and value > ``max_value_dark``.

    Computed from each pixel's uint8 max and min through lookup tables, because ``rgb2hsv`` keeps
    several float64 copies of the image (docs/benchmarks.md: the mask stage's peak memory).
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # elementwise over the three planes: a reduction over the last axis of uint8 is much slower (docs/tissue.md, cost)
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    v = np.arange(256, dtype=np.float64) * (1.0 / 255.0)  # exactly skimage's img_as_float of uint8
    with np.errstate(invalid="ignore", divide="ignore"):
        s_lut = (v[:, None] - v[None, :]) / v[:, None]  # [max, min], as rgb2hsv: ptp / max
    s_lut[~np.isfinite(s_lut)] = 0.0
    sat = s_lut[hi, lo]
    not_dark = (v > max_value_dark)[hi]
    return sat, hi, not_dark


def _value_is(value_u8: np.ndarray, op: str, t: float) -> np.ndarray:
    """``value op t`` for HSV value in [0, 1], exactly as on float values, through a 256-entry table."""
    v = np.arange(256, dtype=np.float64) * (1.0 / 255.0)
    table = v >= t if op == ">=" else v < t
    return table[value_u8]


def glass_threshold(sat: np.ndarray, value: np.ndarray, cfg: TissueConfig) -> tuple[float, dict[str, Any]]:
    """Saturation threshold just above the glass's: the mode of bright, grey pixels plus a margin.

    Without enough glass in view (a fully covered slide) the cap is used: no scanner's glass is
    that saturated, and every H&E stain is.
    """
    glass = sat[_value_is(value, ">=", cfg.glass_min_value) & (sat < cfg.glass_max_saturation)]
    seen = glass.size >= max(64, int(0.01 * sat.size))
    if not seen:
        return cfg.max_saturation, {"glass_seen": False}
    step = 0.0025
    hist, edges = np.histogram(glass, bins=int(math.ceil(cfg.glass_max_saturation / step)), range=(0.0, cfg.glass_max_saturation))
    k = int(np.argmax(hist))
    mode = float((edges[k] + edges[k + 1]) / 2)
    below = glass[glass <= mode + 4 * step]  # the glass's own spread: its side of the mode
    del glass
    # in place, and a median that may reorder its input: the glass can be most of the thumbnail,
    # and each float64 copy of it was the rule's peak memory (docs/tissue.md, cost)
    below -= mode
    np.abs(below, out=below)
    spread = float(1.4826 * np.median(below, overwrite_input=True)) if below.size else 0.0
    thr = min(max(mode + max(cfg.glass_margin, 4 * spread), cfg.min_saturation), cfg.max_saturation)
    return thr, {"glass_seen": True, "glass_saturation_mode": round(mode, 4), "glass_saturation_spread": round(spread, 4)}


def ink(rgb: np.ndarray, sat: np.ndarray, value: np.ndarray, cfg: TissueConfig) -> np.ndarray:
    """Pen marks and dark grey debris: blue/green ink (G > R) and dark, weakly saturated pixels."""
    green_excess = rgb[..., 1].astype(np.int16) - rgb[..., 0].astype(np.int16)
    return (green_excess > cfg.ink_green_excess) | (_value_is(value, "<", cfg.ink_grey_value) & (sat < cfg.ink_grey_saturation))


def _pieces(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's connected pieces (4-connected): their labels (0 off the mask) and the size of
    each label in pixels (``sizes[0]``: the pixels off the mask)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _drop_specks(mask: np.ndarray, sat: np.ndarray, min_px: int, min_stained_px: int, stained: float) -> np.ndarray:
    """Drop pieces smaller than ``min_px``, except stained ones down to ``min_stained_px``.

    A 90 um fragment of fat or loose stroma shows as a few pixels at 8 um/px, as small as a
    speck of dust; but dust is grey (the ink rule takes it) and a fragment carries stain."""
    labels, sizes = _pieces(mask)
    small = sizes <= min_px
    small[0] = False
    # the peak stain of the small pieces only: their pixels are few, the slide's are many
    in_small = small[labels]
    peak = np.zeros(sizes.size)
    np.maximum.at(peak, labels[in_small], sat[in_small])
    keep = ~small | ((sizes > min_stained_px) & (peak >= stained))
    keep[0] = False
    return keep[labels]


def _small_pieces(mask: np.ndarray, max_px: int) -> np.ndarray:
    """The mask's pieces of at most ``max_px`` pixels."""
    labels, sizes = _pieces(mask)
    small = sizes <= max_px
    small[0] = False
    return np.asarray(small[labels])


def _fill_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background pieces of at most ``max_px`` pixels that the mask encloses.

    Unlike ``skimage.morphology.remove_small_holes``, a piece touching the image's edge is not a
    hole: the glass of a small slide (or a bay of glass at a slide's edge) is glass, not tissue."""
    background, sizes = _pieces(~mask)
    fill = sizes <= max_px
    fill[0] = False
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    fill[edge] = False
    return np.asarray(mask | fill[background])


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing by skimage's ``disk(radius)`` with scipy's binary morphology: the pixels of
    ``skimage.morphology.closing`` on the zero-padded mask (tested), in a fraction of its time
    (docs/tissue.md, cost; skimage goes through grey min/max filters). The padding keeps the
    image's edge from counting as tissue."""
    from scipy import ndimage
    from skimage.morphology import disk

    pad = radius + 1  # the erosion must not take the image border for background
    padded = np.pad(mask, pad, mode="constant")
    closed = ndimage.binary_closing(padded, structure=disk(radius).astype(bool))
    return np.asarray(closed[pad:-pad, pad:-pad] | mask)


def compute_mask(
    rgb: np.ndarray, mask_mpp_xy: tuple[float, float], cfg: TissueConfig, l0_per_mask_xy: tuple[float, float] = (1.0, 1.0)
) -> TissueMask:
    """The tissue mask of an (h, w, 3) uint8 thumbnail at ``mask_mpp_xy`` um/px."""
    from skimage import morphology

    params: dict[str, Any] = {"method": cfg.method, **{k: v for k, v in vars(cfg).items() if k != "method"}}
    if cfg.method == "all":
        return TissueMask(np.ones(rgb.shape[:2], dtype=bool), l0_per_mask_xy, mask_mpp_xy, float("nan"), params)
    sat, value, not_dark = _saturation(rgb, cfg.max_value_dark)
    if cfg.method == "otsu":
        # Otsu over every non-dark pixel, floored so that a slide of glass only is not split in two
        candidates = sat[not_dark]
        thr = max(_otsu(candidates), cfg.otsu_min_saturation) if candidates.size > 16 else float("inf")
        del candidates
        mask = (sat >= thr) & not_dark
        excluded = ~not_dark
    else:
        # a 3 x 3 mean (24 um at 8 um/px) takes the glass's pixel noise and JPEG ringing out of
        # the decision, so the threshold can sit close to the glass (CLAM and WSInfer blur too);
        # unlike a median it keeps the thin membranes that are all a thumbnail shows of fat
        from scipy import ndimage

        smooth = ndimage.uniform_filter(sat, size=3, mode="nearest")
        thr, found = glass_threshold(smooth, value, cfg)
        params.update(found)
        # grown by the mean's reach: glass next to ink would otherwise borrow the ink's saturation
        # (and by the one-pixel blend of a stroke's antialiased edge with the glass)
        # (a 5 x 5 maximum is that dilation, separable: 2.5x faster on a whole thumbnail; tested)
        excluded = ndimage.maximum_filter(~not_dark | ink(rgb, sat, value, cfg), size=5, mode="constant", cval=False)
        # a pixel twice as saturated as the threshold is tissue whatever its neighbours: the mean
        # would take the corners and one-pixel tips of small fragments
        mask = ((smooth >= thr) | (sat >= 2 * thr)) & ~excluded
        del smooth
        if cfg.stain_check:
            # a thin membrane or a few nuclei shift a thumbnail pixel's saturation a little, or
            # only its value (on white fat a membrane is a grey line); the mean in uint8 and the
            # difference in int16: float copies of a thumbnail are the rule's peak memory
            local = ndimage.uniform_filter(value, size=3, mode="nearest").astype(np.int16)
            local -= value
            faint = (sat >= cfg.stain_check_evidence * thr) | (local >= round(cfg.stain_check_dip * 255))
            del local
    sat_full = sat
    del value, not_dark
    px_area = mask_mpp_xy[0] * mask_mpp_xy[1]
    radius = int(round(cfg.closing_um / math.sqrt(px_area)))
    if radius > 0 and mask.any():
        mask = _closing(mask, radius)
        if cfg.method == "glass":
            mask &= ~excluded  # the closing must not carry the mask onto ink next to tissue
    min_obj = int(round(cfg.min_object_um2 / px_area))
    min_hole = int(round(cfg.min_hole_um2 / px_area))
    if min_obj > 0 and cfg.method == "glass":
        mask = _drop_specks(mask, sat_full, min_obj, int(round(cfg.min_stained_object_um2 / px_area)), cfg.stained_saturation)
    elif min_obj > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_obj)
    if min_hole > 0 and cfg.method == "glass":
        mask = _fill_holes(mask, min_hole) & ~excluded
    elif min_hole > 0:  # the former rule as it was, edge pieces filled too
        mask = morphology.remove_small_holes(mask, max_size=min_hole)
    params["saturation_threshold"] = float(thr) if math.isfinite(thr) else None
    if cfg.method != "glass" or not cfg.stain_check:
        return TissueMask(mask.astype(bool), l0_per_mask_xy, mask_mpp_xy, float(thr), params)
    # the mask counts as evidence only in small pieces (fragments, whose every edge matters):
    # around large tissue the window rule's ring already reaches the edge, and re-reading it
    # was most of the check's cost (docs/tissue.md, cost)
    evidence = (faint & ~excluded & ~mask) | _small_pieces(mask, int(round(cfg.stain_check_fragment_um2 / px_area)))
    return TissueMask(mask.astype(bool), l0_per_mask_xy, mask_mpp_xy, float(thr), params, evidence, excluded)


def stained_pixels(rgb: np.ndarray, cfg: TissueConfig) -> np.ndarray:
    """Pixels of an (h, w, 3) uint8 image at ``cfg.stain_check_mpp`` that carry H&E stain.

    Saturated above any glass, not black, and away from ink and dark grey marks (grown by two
    pixels: a pen stroke's antialiased edge and a bubble's rim take colour from both sides)."""
    from scipy import ndimage

    sat, value, not_dark = _saturation(rgb, cfg.max_value_dark)
    stained = (sat >= cfg.stain_check_saturation) & not_dark
    refused = ~not_dark | ink(rgb, sat, value, cfg)
    if refused.any():  # a read without any needs no growing
        stained &= ~ndimage.maximum_filter(refused, size=5)
    return np.asarray(stained)
