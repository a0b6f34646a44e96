"""Tumour annotations of a slide: CAMELYON/ASAP XML and QuPath GeoJSON, as level-0 polygons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

#: ASAP groups: CAMELYON16 "Tumor", CAMELYON17 "_0" / "_1" are tumour, "_2" is an exclusion inside them
TUMOUR_GROUPS = ("tumor", "tumour", "_0", "_1", "metastases")
EXCLUSION_GROUPS = ("_2", "exclusion")
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


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
    for ann in root.iter("Annotation"):
        group = (ann.get("PartOfGroup") or "").strip().lower()
        try:
            pts = sorted(((int(float(c.get("Order", i))), float(c.get("X", "nan")), float(c.get("Y", "nan")))
                          for i, c in enumerate(ann.iter("Coordinate"))), key=lambda t: t[0])
        except ValueError as exc:
            raise DataError(f"{path}: annotation {ann.get('Name')!r} has a coordinate that is not a number ({exc})") from None
        if len(pts) < 3:
            continue
        poly = Polygon([(x, y) for _, x, y in pts])
        poly = poly if poly.is_valid else poly.buffer(0)
        if group in EXCLUSION_GROUPS:
            exclusion.append(poly)
        elif group in TUMOUR_GROUPS or not group:
            tumour.append(poly)
    return Annotations(tuple(tumour), tuple(exclusion), str(path))


def read_qupath_geojson(path: Path) -> Annotations:
    import shapely

    from ..export.tiles import tumour_geometry
    from .exports import read_json

    geom = tumour_geometry(read_json(path), str(path))
    polys = [] if geom is None else [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, shapely.Polygon)]
    return Annotations(tuple(polys), (), str(path))


def find_annotations(folder: Path, slide_name: str) -> Annotations | None:
    """The annotation file of a slide in ``folder``, matched by the slide's file stem; None when
    the slide has none (a negative slide in CAMELYON's convention)."""
    stem = Path(slide_name).stem
    for suffix in ANNOTATION_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return read_asap_xml(p) if suffix == ".xml" else read_qupath_geojson(p)
    return None
