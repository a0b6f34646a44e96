"""Labels of a slide: tumour annotations (CAMELYON/ASAP XML, QuPath GeoJSON) as level-0 polygons,
GeoJSON files read whole (regions of interest), and label-mask images."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, WsiScanError

#: ASAP groups: CAMELYON16 "Tumor", CAMELYON17 "_0" / "_1" are tumour, "_2" is an exclusion inside them
TUMOUR_GROUPS = ("tumor", "tumour", "_0", "_1", "metastases")
EXCLUSION_GROUPS = ("_2", "exclusion")
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
#: the largest |coordinate| accepted, in level-0 px: the largest slides are ~250k px wide, so a
#: billion (250 m at 0.25 um/px) is no slide; beyond it geometry maths loses its precision and
#: overflows (1e308 squared), and shapely fails on NaN and infinity with errors of its own
MAX_L0_COORD = 1e9


@dataclass(frozen=True)
class Annotations:
    tumour: tuple[Any, ...]  # shapely polygons, level-0 px
    exclusion: tuple[Any, ...]
    path: str


def read_asap_xml(path: Path) -> Annotations:
    import xml.etree.ElementTree as ET

    from shapely.geometry import Polygon

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: not a readable ASAP XML annotation file ({exc})") from None
    tumour, exclusion = [], []
    other_groups: dict[str, int] = {}
    for ann in root.iter("Annotation"):
        group = (ann.get("PartOfGroup") or "").strip().lower()
        if group == "none":  # ASAP's own spelling of an annotation in no group
            group = ""
        try:
            pts = sorted(
                (
                    (int(float(c.get("Order", i))), float(c.get("X", "nan")), float(c.get("Y", "nan")))
                    for i, c in enumerate(ann.iter("Coordinate"))
                ),
                key=lambda t: t[0],
            )
        except (ValueError, OverflowError) as exc:  # OverflowError: an Order of 1e400 (int of infinity)
            raise DataError(f"{path}: annotation {ann.get('Name')!r} has a coordinate that is not a number ({exc})") from None
        if len(pts) < 3:
            if (ann.get("Type") or "").lower() != "dot" and (group in TUMOUR_GROUPS or group in EXCLUSION_GROUPS or not group):
                # not an area: left out, but said, as a slide could become negative by it
                logging.getLogger("wsi_scan.annotations").warning(
                    f"{path}: annotation {ann.get('Name')!r} has {len(pts)} point(s), no area; it is left out"
                )
            continue
        bad = next((v for _, x, y in pts for v in (x, y) if not _plausible(v)), None)
        if bad is not None:
            raise DataError(
                f"{path}: annotation {ann.get('Name')!r} has the coordinate {bad!r}; expected finite level-0 "
                f"pixel coordinates within +-{MAX_L0_COORD:.0e} (every Coordinate needs X and Y); correct the file"
            )
        poly = Polygon([(x, y) for _, x, y in pts])
        poly = poly if poly.is_valid else poly.buffer(0)
        if group in EXCLUSION_GROUPS:
            exclusion.append(poly)
        elif group in TUMOUR_GROUPS or not group:
            tumour.append(poly)
        else:
            name = (ann.get("PartOfGroup") or "").strip()
            other_groups[name] = other_groups.get(name, 0) + 1
    if other_groups:
        # left out: a tumour drawn in a group of another name would make the slide negative in silence
        kinds = ", ".join(f"{n} in {g!r}" for g, n in sorted(other_groups.items()))
        logging.getLogger("wsi_scan.annotations").warning(
            f"{path}: {sum(other_groups.values())} polygon(s) in groups that are neither tumour "
            f"({', '.join(TUMOUR_GROUPS)}) nor exclusion ({', '.join(EXCLUSION_GROUPS)}) are left out ({kinds}); "
            "rename the group if they are tumour"
        )
    return Annotations(tuple(tumour), tuple(exclusion), str(path))


def read_qupath_geojson(path: Path) -> Annotations:
    import shapely

    from ..export.tiles import tumour_geometry

    geom = tumour_geometry(read_json(path), str(path))
    polys = [] if geom is None else [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, shapely.Polygon)]
    return Annotations(tuple(polys), (), str(path))


def find_annotations(folder: Path, slide_name: str) -> Annotations | None:
    """The annotation file of a slide in ``folder``, matched by the slide's file stem; None when
    the slide has none (a negative slide in CAMELYON's convention)."""
    stem = Path(slide_name).stem
    # any case of the suffix (NAME.XML, NAME.GeoJSON): such a file was not reported as unmatched,
    # and was never read either, so its slide counted as negative in silence
    found = sorted(p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in ANNOTATION_SUFFIXES and p.is_file())
    if len(found) > 1:
        raise DataError(
            f"{folder}: slide {slide_name} has {len(found)} annotation files ({', '.join(p.name for p in found)}); "
            "which one is the reference is not clear: keep one"
        )
    if not found:
        return None
    return read_asap_xml(found[0]) if found[0].suffix.lower() == ".xml" else read_qupath_geojson(found[0])


def unmatched_annotations(folder: Path, slide_names: list[str]) -> list[str]:
    """Annotation files in ``folder`` whose name matches none of the slides (a typo, another
    case, ``NAME.tif.xml``): their slides would be counted negative without them."""
    stems = {Path(n).stem for n in slide_names}
    return sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in ANNOTATION_SUFFIXES and p.is_file() and p.stem not in stems
    )


def _plausible(v: float) -> bool:
    return math.isfinite(v) and abs(v) <= MAX_L0_COORD


def _check_coordinates(obj: dict[str, Any], p: Path) -> None:
    """Refuse a NaN, infinite or absurdly large coordinate in any feature's geometry (Python's
    json reads NaN and Infinity; shapely then fails with GEOSException or overflows)."""
    feats = obj.get("features") if obj.get("type") == "FeatureCollection" else [obj]
    if not isinstance(feats, list):
        return  # not a FeatureCollection's shape: the geometry reader says what is wrong
    for i, f in enumerate(feats):
        geom = f.get("geometry", f) if isinstance(f, dict) else None
        stack: list[Any] = [geom]  # a loop, not recursion: nesting may be as deep as json allows
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.get(k) for k in ("coordinates", "geometries"))
            elif isinstance(item, list):
                stack.extend(item)
            # abs() first: an int of 400 digits does not convert to a float, it is just too large
            elif (
                isinstance(item, (int, float))
                and not isinstance(item, bool)
                and (abs(item) > MAX_L0_COORD or not math.isfinite(item))
            ):
                which = f"feature {i}" if obj.get("type") == "FeatureCollection" else "its geometry"
                raise DataError(
                    f"{p}: {which} has the coordinate {item!r:.40}; expected finite level-0 pixel "
                    f"coordinates within +-{MAX_L0_COORD:.0e}; correct or re-export the annotations"
                )


def read_json(path: str | Path) -> dict[str, Any]:
    """A GeoJSON file as a dict, its geometries' coordinates checked to be finite and slide-sized."""
    p = Path(path)
    try:
        # utf-8-sig: GeoJSON is UTF-8 (RFC 7946), and some Windows tools write a byte-order mark
        obj = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{p} does not exist; expected a GeoJSON file of tumour annotations") from None
    # ValueError: also a number of over 4300 digits; RecursionError: arrays nested thousands deep
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(
            f"{p}: not a readable JSON file ({type(exc).__name__}: {exc!s:.80}); expected GeoJSON (e.g. exported from QuPath)"
        ) from None
    if isinstance(obj, list):
        # QuPath's "Export objects as GeoJSON" writes a bare array of features unless "Export as
        # FeatureCollection" is ticked: the same features (before, refused as "a JSON list")
        obj = {"type": "FeatureCollection", "features": obj}
    if not isinstance(obj, dict):
        raise DataError(
            f"{p}: expected a GeoJSON object (a FeatureCollection, Feature or geometry), found a JSON "
            f"{type(obj).__name__}; export the annotations as GeoJSON"
        )
    _check_coordinates(obj, p)
    return obj


def read_label_mask(
    path: str | Path,
    max_px: int = 1 << 28,
    what: str = "label mask",
    meaning: str = "tumour",
    error: type[WsiScanError] = DataError,
) -> np.ndarray:
    """A label mask image as a bool array (True where a pixel is non-zero).

    PNG, JPEG or TIFF; of a pyramidal TIFF (e.g. a CAMELYON16 mask) the finest level with at
    most ``max_px`` pixels, so that a 200k x 100k px mask does not fill the memory. ``what``,
    ``meaning`` and ``error`` say in messages whose mask it is (a tumour label is training data;
    a ``--tissue-mask`` is an option).
    """
    from .slide import TIFF_MAGIC

    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist or is not a file; expected a PNG or TIFF mask of the slide")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
        if magic in TIFF_MAGIC:
            import tifffile

            with tifffile.TiffFile(str(p)) as tf:
                levels = tf.series[0].levels
                fits = [lv for lv in levels if int(np.prod(lv.shape[:2])) <= max_px] or [levels[-1]]
                arr = fits[0].asarray()
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im)
    except Exception as exc:  # codec and format errors of a broken or foreign file
        raise error(
            f"{what} {p}: not a readable mask image ({exc!s:.100}); expected a PNG or TIFF, non-zero = {meaning}"
        ) from None
    if arr.ndim == 3:
        arr = arr.max(axis=-1) if arr.shape[-1] <= 4 else arr.max(axis=0)
    if arr.ndim != 2:
        raise error(f"{what} {p}: expected a 2-D mask image, found an array of shape {arr.shape}")
    return arr > 0
