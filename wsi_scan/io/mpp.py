"""Physical pixel size of level 0, with where it came from. Never guessed.

Order: the user's override; OpenSlide's normalised ``openslide.mpp-x/y`` (from the vendor's own
metadata); Aperio's ``MPP``; OME ``PhysicalSizeX/Y``; TIFF resolution tags with a real unit
(inch or centimeter). Objective power is never used: "20x" means 0.5 um/px on one scanner and
0.45 on another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import MppError

_UM_PER = {"inch": 25_400.0, "centimeter": 10_000.0, "cm": 10_000.0}
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3}


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str

    @property
    def xy(self) -> tuple[float, float]:
        return (self.x, self.y)

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


def _num(meta: Mapping[str, str], key: str) -> float | None:
    try:
        v = float(meta[key])
    except (KeyError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _from_metadata(meta: Mapping[str, str]) -> Mpp | None:
    x, y = _num(meta, "openslide.mpp-x"), _num(meta, "openslide.mpp-y")
    if x and y:
        return Mpp(x, y, f"openslide.mpp-x/y ({meta.get('openslide.vendor', 'unknown')} metadata)")
    a = _num(meta, "aperio.MPP")
    if a:
        return Mpp(a, a, "aperio.MPP (Aperio ImageDescription)")
    ox, oy = _num(meta, "ome.PhysicalSizeX"), _num(meta, "ome.PhysicalSizeY")
    if ox and oy:
        ux = _OME_UNIT_UM.get(meta.get("ome.PhysicalSizeXUnit", "µm"))
        uy = _OME_UNIT_UM.get(meta.get("ome.PhysicalSizeYUnit", "µm"))
        if ux and uy:
            return Mpp(ox * ux, oy * uy, "ome.PhysicalSizeX/Y (OME-XML)")
    unit = meta.get("tiff.ResolutionUnit", "none")
    rx, ry = _num(meta, "tiff.XResolution"), _num(meta, "tiff.YResolution")
    if unit in _UM_PER and rx and ry:
        return Mpp(_UM_PER[unit] / rx, _UM_PER[unit] / ry, f"tiff.X/YResolution (pixels per {unit})")
    return None


def resolve_mpp(
    meta: Mapping[str, str], override: float | None, where: str, tolerance: float = 0.02
) -> Mpp:
    """Level-0 um/px of a slide; raises MppError (naming --mpp) when it cannot be known."""
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise MppError(f"--mpp must be a positive number of micrometers per pixel, found {override}")
        return Mpp(float(override), float(override), "user (--mpp)")
    mpp = _from_metadata(meta)
    if mpp is None:
        raise MppError(
            f"{where}: the slide records no physical pixel size (no vendor mpp, no OME or TIFF "
            "resolution with a unit); pass it with --mpp, e.g. --mpp 0.25 for a 40x scan, after "
            "checking the scanner's specification"
        )
    if abs(mpp.x - mpp.y) > tolerance * max(mpp.x, mpp.y):
        raise MppError(
            f"{where}: pixel size differs between x ({mpp.x:.5g} um) and y ({mpp.y:.5g} um) by more "
            f"than {tolerance:.0%} (source: {mpp.source}); non-square pixels are not supported, "
            "pass --mpp if the metadata is wrong"
        )
    return mpp
