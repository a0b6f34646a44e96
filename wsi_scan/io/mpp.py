"""Physical pixel size of level 0, with where it came from. Never guessed.

Order: the user's override; OpenSlide's normalised ``openslide.mpp-x/y`` (from the vendor's own
metadata); Aperio's ``MPP``; OME ``PhysicalSizeX/Y``; TIFF resolution tags with a real unit
(inch or centimeter). Objective power is never used: "20x" means 0.5 um/px on one scanner and
0.45 on another.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import MAX_SLIDE_EXTENT_MM, MPP_RANGE_UM
from ..errors import MppError

log = logging.getLogger("wsi_scan")

_UM_PER = {"inch": 25_400.0, "centimeter": 10_000.0, "cm": 10_000.0}
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3}


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str
    # what the slide itself records when an override replaced it (kept so outputs show both)
    recorded_xy: tuple[float, float] | None = None
    recorded_source: str = ""

    @property
    def xy(self) -> tuple[float, float]:
        return (self.x, self.y)

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


#: the metadata key under which a backend says why it set a slide's recorded pixel size aside
#: (io/slide.py: resolution tags of another image than level 0); resolve_mpp then asks for --mpp
MPP_NOTE_KEY = "wsi_scan.mpp-note"

#: the keys _from_metadata reads a pixel size from
_MPP_KEYS = (
    "openslide.mpp-x",
    "openslide.mpp-y",
    "aperio.MPP",
    "ome.PhysicalSizeX",
    "ome.PhysicalSizeY",
    "tiff.XResolution",
    "tiff.YResolution",
)


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


def resolve_mpp(meta: Mapping[str, str], override: float | None, where: str, tolerance: float = 0.02) -> Mpp:
    """Level-0 um/px of a slide; raises MppError (naming --mpp) when it cannot be known or
    lies outside physical sense (``MPP_RANGE_UM``)."""
    lo, hi = MPP_RANGE_UM
    recorded = _from_metadata(meta)
    if override is not None:
        if not (math.isfinite(override) and lo <= override <= hi):
            raise MppError(f"--mpp must be between {lo:g} and {hi:g} micrometers per pixel, found {override}")
        if recorded is not None and abs(recorded.mean - override) > tolerance * max(recorded.mean, override):
            log.warning(
                "%s: --mpp %g replaces the %.5g um/px the slide records (%s); both are recorded in the output",
                where,
                override,
                recorded.mean,
                recorded.source,
            )
        return Mpp(
            float(override),
            float(override),
            "user (--mpp)",
            recorded.xy if recorded is not None else None,
            recorded.source if recorded is not None else "",
        )
    mpp = recorded
    if mpp is None and meta.get(MPP_NOTE_KEY):
        raise MppError(
            f"{where}: {meta[MPP_NOTE_KEY]}; pass level 0's true pixel size with --mpp, after checking the "
            "scanner's specification"
        )
    if mpp is None:
        garbled = [f"{k} = {meta[k]!r:.30}" for k in _MPP_KEYS if k in meta and _num(meta, k) is None]
        if garbled:  # present but unusable: "records none" would send the user looking for nothing
            raise MppError(
                f"{where}: the slide's pixel size metadata is not a positive number ({', '.join(garbled)}); "
                "pass the true pixel size with --mpp, e.g. --mpp 0.25 for a 40x scan, after checking the "
                "scanner's specification"
            )
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
    if not (lo <= mpp.x <= hi and lo <= mpp.y <= hi):
        raise MppError(
            f"{where}: the slide records {mpp.x:.4g} x {mpp.y:.4g} um/px ({mpp.source}), outside the {lo:g}-{hi:g} "
            "um/px of any scanner; the metadata is wrong: pass the true pixel size with --mpp"
        )
    return mpp


def check_extent(level0_size_wh: tuple[int, int], mpp: Mpp, where: str) -> None:
    """Refuse an image larger than a glass slide at its stated scale (a lying header or --mpp),
    before anything is allocated for it."""
    w_mm, h_mm = level0_size_wh[0] * mpp.x / 1000, level0_size_wh[1] * mpp.y / 1000
    if max(w_mm, h_mm) > MAX_SLIDE_EXTENT_MM:
        raise MppError(
            f"{where}: {level0_size_wh[0]} x {level0_size_wh[1]} px at {mpp.x:.4g} um/px ({mpp.source}) would be "
            f"{w_mm:.0f} x {h_mm:.0f} mm, larger than any glass slide (at most {MAX_SLIDE_EXTENT_MM:g} mm); "
            "the file's size or pixel size is wrong"
        )
