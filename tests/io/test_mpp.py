from __future__ import annotations

import pytest

from wsi_scan.errors import MppError
from wsi_scan.io.mpp import resolve_mpp


def test_vendor_first_and_override():
    meta = {
        "openslide.mpp-x": "0.2527",
        "openslide.mpp-y": "0.2527",
        "openslide.vendor": "aperio",
        "openslide.objective-power": "40",
    }
    m = resolve_mpp(meta, None, "s")
    assert m.xy == (0.2527, 0.2527) and "aperio" in m.source
    assert resolve_mpp(meta, 0.5, "s").source == "user (--mpp)"


@pytest.mark.parametrize(
    ("meta", "want"),
    [
        ({"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25),
        ({"tiff.XResolution": "50800", "tiff.YResolution": "50800", "tiff.ResolutionUnit": "inch"}, 0.5),
        ({"aperio.MPP": "0.499"}, 0.499),
        (
            {
                "ome.PhysicalSizeX": "250",
                "ome.PhysicalSizeY": "250",
                "ome.PhysicalSizeXUnit": "nm",
                "ome.PhysicalSizeYUnit": "nm",
            },
            0.25,
        ),
    ],
)
def test_sources(meta, want):
    assert resolve_mpp(meta, None, "s").x == pytest.approx(want)


@pytest.mark.parametrize(
    "meta",
    [
        {"openslide.objective-power": "20"},  # never guessed from objective power
        {"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "none"},
        {},
    ],
)
def test_missing_names_mpp_option(meta):
    with pytest.raises(MppError, match="records no physical pixel size.*--mpp"):
        resolve_mpp(meta, None, "slide.svs")


@pytest.mark.parametrize("value", ["nan", "-0.5", "0", "inf", "abc"])
def test_garbled_mpp_is_named_not_called_absent(value):
    with pytest.raises(MppError, match=f"not a positive number \\(aperio.MPP = '{value}'\\).*--mpp"):
        resolve_mpp({"aperio.MPP": value}, None, "slide.svs")


def test_x_y_disagree_is_error():
    with pytest.raises(MppError, match="differs between x"):
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.30"}, None, "s")


def test_bad_override():
    with pytest.raises(MppError):
        resolve_mpp({}, -1.0, "s")


def test_ome_tiff_pixel_size_survives_every_backend(tmp_path):
    import numpy as np
    import tifffile

    from wsi_scan.io.mpp import resolve_mpp
    from wsi_scan.io.slide import open_slide

    img = np.full((1024, 1024, 3), 200, np.uint8)
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            img,
            tile=(256, 256),
            photometric="rgb",
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
        )
        tw.write(img[::2, ::2].copy(), tile=(256, 256), photometric="rgb", subfiletype=1)
    for backend in ("auto", "tifffile"):
        with open_slide(path, backend) as s:
            mpp = resolve_mpp(s.info.metadata, None, str(path))
        assert mpp.xy == (0.25, 0.25) and "OME" in mpp.source
