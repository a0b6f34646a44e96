"""Tissue mask from a low-resolution thumbnail. Pure: arrays in, arrays out.

H&E tissue is coloured and glass is grey, so Otsu's threshold on HSV saturation separates
them; a floor keeps an empty slide from having its noise called tissue. Very dark pixels (ink,
black borders of MRXS/NDPI scans) are excluded. Morphology sizes are in micrometers and
converted with the mask's own pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TissueConfig


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # (rows, cols) bool
    l0_per_mask_xy: tuple[float, float]  # level-0 pixels per mask pixel
    mask_mpp_xy: tuple[float, float]
    threshold: float  # saturation threshold used

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mask_mpp_xy[0] * self.mask_mpp_xy[1]


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) - float(values.min()) < 1e-6:
        return float("inf")
    return float(threshold_otsu(values))


def _saturation(rgb: np.ndarray, max_value_dark: float) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (float64) and value > ``max_value_dark``, equal to skimage's ``rgb2hsv``.

    Computed from each pixel's uint8 max and min through 256 x 256 lookup tables, because
    ``rgb2hsv`` keeps several float64 copies of the image: the mask stage peaked at 1.28 GB for
    the 3750 x 3125 px mask of a 120000 x 100000 px slide, 0.47 GB this way (docs/benchmarks.md).
    """
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    v = np.arange(256, dtype=np.float64) * (1.0 / 255.0)  # exactly skimage's img_as_float of uint8
    with np.errstate(invalid="ignore", divide="ignore"):
        s_lut = (v[:, None] - v[None, :]) / v[:, None]  # [max, min], as rgb2hsv: ptp / max
    s_lut[~np.isfinite(s_lut)] = 0.0
    sat = s_lut[hi, lo]
    not_dark = (v > max_value_dark)[hi]
    return sat, not_dark


def compute_mask(rgb: np.ndarray, mask_mpp_xy: tuple[float, float], cfg: TissueConfig) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an (h, w, 3) uint8 thumbnail and the saturation threshold used."""
    from skimage import morphology

    sat, not_dark = _saturation(rgb, cfg.max_value_dark)
    # Otsu over every non-dark pixel: glass and tissue form the two modes; the floor keeps a
    # slide of glass only from having its noise split in two.
    candidates = sat[not_dark]
    thr = max(_otsu(candidates), cfg.min_saturation) if candidates.size > 16 else float("inf")
    del candidates
    mask = (sat >= thr) & not_dark
    del sat, not_dark
    px_area = mask_mpp_xy[0] * mask_mpp_xy[1]
    radius = int(round(cfg.closing_um / math.sqrt(px_area)))
    if radius > 0 and mask.any():
        mask = morphology.closing(mask, morphology.disk(radius))
    min_obj = int(round(cfg.min_object_um2 / px_area))
    min_hole = int(round(cfg.min_hole_um2 / px_area))
    if min_obj > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_obj)
    if min_hole > 0:
        mask = morphology.remove_small_holes(mask, max_size=min_hole)
    return mask.astype(bool), float(thr)
