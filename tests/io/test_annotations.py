"""Annotation files: coordinates that no slide has are refused with the file and the feature named."""

from __future__ import annotations

import json

import pytest

from tests._support import assert_clean_failure, run
from wsi_scan.errors import DataError
from wsi_scan.io.annotations import MAX_L0_COORD, read_asap_xml, read_json, read_qupath_geojson

SQUARE = [[0, 0], [5000, 0], [5000, 5000], [0, 5000], [0, 0]]


def _collection(*rings: str) -> str:
    """A FeatureCollection whose polygons' coordinates are given as JSON text (NaN is not JSON
    that json.dumps writes, but Python's json reads it and QuPath-like tools can write it)."""
    feats = ['{"type": "Feature", "properties": {}, "geometry": ' + _polygon(r) + "}" for r in rings]
    return '{"type": "FeatureCollection", "features": [' + ", ".join(feats) + "]}"


def _polygon(ring: str) -> str:
    return '{"type": "Polygon", "coordinates": [' + ring + "]}"


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e308", "1e400", "1" + "0" * 400, "-2e9"])
def test_geojson_refuses_a_coordinate_no_slide_has(tmp_path, bad):
    p = tmp_path / "a.geojson"
    p.write_text(_collection(json.dumps(SQUARE), f"[[0, 0], [{bad}, 0], [5000, 5000], [0, 5000], [0, 0]]"))
    with pytest.raises(DataError, match=r"a\.geojson: feature 1 has the coordinate .*expected finite level-0"):
        read_json(p)
    with pytest.raises(DataError, match="feature 1"):
        read_qupath_geojson(p)  # the evaluation's reader: a DataError, not shapely's GEOSException


def test_geojson_bare_geometry_and_limits(tmp_path):
    p = tmp_path / "g.json"
    p.write_text('{"type": "MultiPolygon", "coordinates": [[[[0, 0], [NaN, 0], [1, 1], [0, 0]]]]}')
    with pytest.raises(DataError, match=r"g\.json: its geometry has the coordinate nan"):
        read_json(p)
    # on the bound is a coordinate; a byte-order mark (some Windows tools write one) is no error
    ring = [[0, 0], [MAX_L0_COORD, 0], [MAX_L0_COORD, 10], [0, 0]]
    p.write_bytes(b"\xef\xbb\xbf" + _collection(json.dumps(ring)).encode())
    assert read_json(p)["features"][0]["geometry"]["coordinates"][0][1] == [MAX_L0_COORD, 0]
    # properties are not geometry: a NaN there is the exporter's business
    p.write_text('{"type": "Feature", "properties": {"area": NaN}, "geometry": ' + _polygon(json.dumps(SQUARE)) + "}")
    assert read_qupath_geojson(p).tumour[0].area == 5000 * 5000


def test_geojson_nested_too_deep_is_a_data_error(tmp_path):
    p = tmp_path / "deep.geojson"
    p.write_text('{"type": "Polygon", "coordinates": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match="deep.geojson: not a readable JSON file"):
        read_json(p)


def test_asap_xml_refuses_a_missing_or_absurd_coordinate(tmp_path):
    p = tmp_path / "s.xml"
    for coord in ('X="10"', 'X="10" Y="inf"', 'X="1e12" Y="5"'):
        p.write_text(
            '<ASAP_Annotations><Annotations><Annotation Name="T1" PartOfGroup="Tumor"><Coordinates>'
            '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="100" Y="0"/>'
            f'<Coordinate Order="2" {coord}/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
        )
        with pytest.raises(DataError, match=r"s\.xml: annotation 'T1' has the coordinate"):
            read_asap_xml(p)


def test_tile_and_roi_with_a_nan_coordinate_are_one_line(make_slide, tmp_path):
    slide = make_slide()
    labels = tmp_path / "nan.geojson"
    labels.write_text(_collection("[[0, 0], [NaN, 0], [5000, 5000], [0, 5000], [0, 0]]"))
    code, _, err = run("tile", slide, "--out", tmp_path / "p.h5", "--labels-geojson", labels)
    assert_clean_failure(code, err, tmp_path / "p.h5", "nan.geojson", "feature 0")
    assert code == 6
    code, _, err = run(slide, "--out", tmp_path / "h.zarr", "--roi", labels, "--quiet")
    assert_clean_failure(code, err, tmp_path / "h.zarr", "nan.geojson", "feature 0")
    assert code == 6


def _asap(path, group: str, order: str = "1") -> None:
    path.write_text(
        f'<ASAP_Annotations><Annotations><Annotation Name="A" PartOfGroup="{group}" Type="Polygon"><Coordinates>'
        f'<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="{order}" X="100" Y="0"/>'
        '<Coordinate Order="2" X="100" Y="50"/><Coordinate Order="3" X="0" Y="50"/>'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )


def test_asap_groups_none_unknown_and_an_infinite_order(tmp_path, caplog):
    """ASAP writes PartOfGroup="None" for an annotation in no group: tumour, as an empty group is.
    A group of another name is left out with a warning (before: in silence, the slide negative).
    An Order of 1e400 was an OverflowError traceback (2026-12-05)."""
    p = tmp_path / "s.xml"
    _asap(p, "None")
    assert read_asap_xml(p).tumour[0].area == 5000
    _asap(p, "Metastasis")
    with caplog.at_level("WARNING", logger="wsi_scan.annotations"):
        assert read_asap_xml(p).tumour == ()
    assert "1 in 'Metastasis'" in caplog.text and "left out" in caplog.text
    _asap(p, "_0", order="1e400")
    with pytest.raises(DataError, match="s.xml: annotation 'A' has a coordinate that is not a number"):
        read_asap_xml(p)


@pytest.mark.parametrize("name", ["s.XML", "s.GeoJSON", "s.Json"])
def test_an_annotation_file_is_found_whatever_the_case_of_its_suffix(tmp_path, name):
    """s.XML beside slide s.tif was neither read nor reported as unmatched: the slide counted as
    negative in silence (2026-12-05)."""
    from wsi_scan.io.annotations import find_annotations

    p = tmp_path / name
    if name.lower().endswith(".xml"):
        _asap(p, "_0")
    else:
        p.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]]}))
    found = find_annotations(tmp_path, "s.tif")
    assert found is not None and found.tumour[0].area == 5000
    (tmp_path / "s.xml").write_text("<a/>")  # two files for one slide, in two cases: which one is unclear
    if name != "s.XML":
        with pytest.raises(DataError, match="2 annotation files"):
            find_annotations(tmp_path, "s.tif")


def test_a_bare_array_of_features_as_qupath_writes_it_is_read(tmp_path):
    """QuPath's "Export objects as GeoJSON" writes a JSON array of features unless "Export as
    FeatureCollection" is ticked; it was refused as "a JSON list" (2026-12-05)."""
    p = tmp_path / "s.geojson"
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "Tumor"}},
        "geometry": json.loads(_polygon(json.dumps(SQUARE))),
    }
    p.write_text(json.dumps([feature, feature]))
    assert read_qupath_geojson(p).tumour[0].area == 5000 * 5000
    p.write_text(json.dumps([feature, "x"]))
    with pytest.raises(DataError, match="feature 1 is a JSON str"):
        read_qupath_geojson(p)
    p.write_text("5")
    with pytest.raises(DataError, match="expected a GeoJSON object.*found a JSON int"):
        read_json(p)
