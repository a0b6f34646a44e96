from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests._support import shared_path
from wsi_scan.io.mpp import resolve_mpp
from wsi_scan.io.slide import Region, TiffFileSlide, open_slide


def test_auto_reads_plain_pyramidal_tiff_with_tifffile_and_same_pixels_as_openslide(make_slide):
    path = make_slide(size_wh=(2100, 1700), downsamples=(1, 4, 16), tumour=((500, 400, 900, 800),))
    auto, osr, tfs = (open_slide(path, b) for b in ("auto", "openslide", "tifffile"))
    assert auto.info.backend == "tifffile"
    assert auto.info.vendor == osr.info.vendor == "generic-tiff"
    assert [lv.size_wh for lv in auto.info.levels] == [lv.size_wh for lv in osr.info.levels]
    mpp_a = resolve_mpp(auto.info.metadata, None, str(path))
    mpp_o = resolve_mpp(osr.info.metadata, None, str(path))
    assert np.allclose(mpp_a.xy, mpp_o.xy, rtol=1e-6)
    for level, l0_xy, wh in ((0, (237, 411), (301, 257)), (1, (-40, 1000), (200, 190)), (2, (0, 0), (132, 107))):
        a = tfs.read_region(l0_xy, level, wh)
        b = osr.read_region(l0_xy, level, wh)
        assert a.lv_origin_xy == b.lv_origin_xy
        assert np.array_equal(a.rgb, b.rgb), (level, l0_xy)
    for s in (auto, osr, tfs):
        s.close()


def _expected(img: np.ndarray, lx: int, ly: int, w: int, h: int) -> np.ndarray:
    """The read of (lx, ly, w, h) from ``img``: white outside it."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    H, W = img.shape[:2]
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = img[y0:y1, x0:x1, :3]
    return out


@pytest.mark.parametrize("layout", ["tiled", "stripped"])
def test_tifffile_reads_tiled_and_stripped_pages_exactly(tmp_path, layout):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (301, 467, 3), dtype=np.uint8)
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64) if layout == "tiled" else None)
    slide = TiffFileSlide(path)
    assert (slide._tiled[0] is not None) == (layout == "tiled")  # the tile path, or the zarr store
    for lx, ly, w, h in ((0, 0, 467, 301), (-20, -7, 90, 70), (400, 250, 100, 100), (63, 64, 65, 1), (500, 0, 10, 10)):
        region = slide.read_region((lx, ly), 0, (w, h))
        assert region.lv_origin_xy == (lx, ly)
        assert np.array_equal(region.rgb, _expected(img, lx, ly, w, h)), (lx, ly, w, h)
    slide.close()


def test_tifffile_tiles_with_alpha_are_composited_on_white(tmp_path):
    rgba = np.zeros((70, 90, 4), dtype=np.uint8)
    rgba[..., :3] = 100
    rgba[:, :45, 3] = 255  # left half opaque grey, right half transparent
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[2], tile=(32, 32))
    slide = TiffFileSlide(path)
    rgb = slide.read_region((0, 0), 0, (90, 70)).rgb
    assert (rgb[:, :45] == 100).all() and (rgb[:, 45:] == 255).all()
    slide.close()


def test_announced_reads_decode_each_tile_once_with_the_same_pixels(make_slide):
    path = make_slide(size_wh=(2100, 1700), downsamples=(1, 4), tumour=((500, 400, 900, 800),))
    plain, cached = TiffFileSlide(path), TiffFileSlide(path)
    # overlapping reads, as neighbouring blocks with their margins make
    reads = [((x, y), (700, 600)) for y in range(-100, 1600, 500) for x in range(-100, 2000, 500)]
    cached.expect_reads(0, reads, 1 << 30)
    for l0_xy, wh in reads:
        assert np.array_equal(cached.read_region(l0_xy, 0, wh).rgb, plain.read_region(l0_xy, 0, wh).rgb), l0_xy
    distinct = {k for l0_xy, wh in reads for k in cached._tile_keys(0, cached._lv_box(l0_xy, 0, wh))}
    assert cached.read_stats.tiles_decoded == len(distinct)
    assert plain.read_stats.tiles_decoded > len(distinct)
    assert cached._cache.nbytes == 0
    cached.forget_reads()
    for s in (plain, cached):
        s.close()


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_auto_reads_aperio_svs_with_tifffile_and_same_pixels(name):
    path = shared_path("slides", name)  # JPEG tiles, and JPEG 2000 (Aperio 33005) tiles
    auto, osr = open_slide(path, "auto"), open_slide(path, "openslide")
    assert (auto.info.backend, auto.info.vendor) == ("tifffile", "aperio")
    assert auto.info.metadata == osr.info.metadata  # OpenSlide's properties, mpp included
    w0, h0 = osr.info.level0_size_wh
    for l0_xy, wh in (((0, 0), (300, 200)), ((w0 - 150, h0 - 100), (300, 200)), ((-30, 700), (512, 512)), ((1000, 1500), (777, 333))):
        assert np.array_equal(auto.read_region(l0_xy, 0, wh).rgb, osr.read_region(l0_xy, 0, wh).rgb), l0_xy
    auto.close()
    osr.close()


def test_auto_keeps_openslide_when_tifffile_pixels_differ(make_slide, monkeypatch):
    path = make_slide(size_wh=(1200, 900), downsamples=(1, 4))
    orig = TiffFileSlide.read_region

    def inverted(self, l0_xy, level, lv_size_wh):  # any disagreement, on glass as on tissue
        r = orig(self, l0_xy, level, lv_size_wh)
        return Region(255 - r.rgb, r.lv_origin_xy)

    monkeypatch.setattr(TiffFileSlide, "read_region", inverted)
    slide = open_slide(path, "auto")
    assert slide.info.backend == "openslide"
    slide.close()
