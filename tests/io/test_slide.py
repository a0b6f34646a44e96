from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests._support import shared_path
from wsi_scan.io.mpp import resolve_mpp
from wsi_scan.io.slide import Region, TiffFileSlide, open_slide
from wsi_scan.io.synthetic import PYRAMID_LAYOUTS, SyntheticSlide, write_synthetic_slide


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
    for l0_xy, wh in (
        ((0, 0), (300, 200)),
        ((w0 - 150, h0 - 100), (300, 200)),
        ((-30, 700), (512, 512)),
        ((1000, 1500), (777, 333)),
    ):
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


def _openslide_levels(path) -> list[tuple[int, int]] | None:
    import openslide

    try:
        with openslide.OpenSlide(str(path)) as osr:
            return [tuple(d) for d in osr.level_dimensions]
    except openslide.OpenSlideError:
        return None


@pytest.mark.parametrize("downsamples", [(1, 4, 16), (1, 8, 32)])
@pytest.mark.parametrize("layout", PYRAMID_LAYOUTS)
def test_every_pyramid_layout_reads_its_levels_with_tifffile_and_openslides_pixels(tmp_path, layout, downsamples):
    spec = SyntheticSlide(
        size_wh=(2100, 1700),
        downsamples=downsamples,
        tissue=((300, 300, 1800, 1500),),
        tumour=((500, 400, 900, 800),),
        layout=layout,
    )
    path = write_synthetic_slide(tmp_path / f"{layout}.tif", spec)
    if downsamples == (1, 8, 32) and layout in ("pages", "subifds"):
        with tifffile.TiffFile(path) as tf:  # the case: tifffile lists the pyramid in two series
            assert len(tf.series[0].levels) == 1
    tfs, auto = TiffFileSlide(path), open_slide(path, "auto")
    assert [lv.size_wh for lv in tfs.info.levels] == spec.level_sizes()
    assert all(tl is not None and tl.strict_jpeg for tl in tfs._tiled)  # every level on the fast path
    assert (auto.info.backend, [lv.size_wh for lv in auto.info.levels]) == ("tifffile", spec.level_sizes())
    assert resolve_mpp(auto.info.metadata, None, str(path)).xy == (0.25, 0.25)
    # each level decoded tile by tile (simplejpeg) equals tifffile's own decode of its page
    for level, tl in enumerate(tfs._tiled):
        w, h = tfs.info.levels[level].size_wh
        assert np.array_equal(tfs.read_region((0, 0), level, (w, h)).rgb, tl.page.asarray()[..., :3]), level
    os_levels = _openslide_levels(path)
    assert os_levels is not None
    # the documented rule: OpenSlide finds the same levels, except SubIFDs (it sees level 0 only)
    assert os_levels == (spec.level_sizes()[:1] if layout in ("subifds", "ome") else spec.level_sizes())
    osr = open_slide(path, "openslide")
    for level, size in enumerate(os_levels):
        tf_level = spec.level_sizes().index(size)
        reads = [((0, 0), (300, 200))] + ([((-37, 611), (401, 257)), ((1900, 1500), (300, 300))] if level == 0 else [])
        for l0_xy, wh in reads:
            a, b = tfs.read_region(l0_xy, tf_level, wh), osr.read_region(l0_xy, level, wh)
            assert a.lv_origin_xy == b.lv_origin_xy and np.array_equal(a.rgb, b.rgb), (level, l0_xy)
    for s in (tfs, auto, osr):
        s.close()


def test_labels_and_thumbnails_are_no_levels():
    from wsi_scan.io.slide import _one_downsample

    assert _one_downsample((2100, 1700), (525, 425)) and _one_downsample((2100, 1700), (132, 107))  # 1/4, 1/15.9
    assert _one_downsample((4443, 3567), (2221, 1783))  # TCGA: floor on both sides
    assert not _one_downsample((2100, 1700), (300, 120))  # a label
    assert not _one_downsample((2100, 1700), (2100, 1700))  # level 0 itself
    assert not _one_downsample((2100, 1700), (525, 440))  # another aspect ratio


def test_openslide_reads_stay_in_pil_with_the_same_pixels(make_slide):
    path = make_slide(size_wh=(1200, 900), downsamples=(1, 4))
    osr = open_slide(path, "openslide")
    r = osr.read_region((100, 50), 0, (300, 200))
    assert not isinstance(r.pixels, np.ndarray)  # opaque: kept as PIL for the resampler
    tfs = TiffFileSlide(path)
    assert np.array_equal(r.rgb, tfs.read_region((100, 50), 0, (300, 200)).rgb)
    edge = osr.read_region((1100, 850), 0, (300, 200))  # past the image: transparent, flattened on white
    assert isinstance(edge.pixels, np.ndarray) and (edge.rgb[100:, :] == 255).all()
    for s in (osr, tfs):
        s.close()


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_real_aperio_levels_agree_with_openslide(name):
    path = shared_path("slides", name)
    tfs = TiffFileSlide(path)
    assert [lv.size_wh for lv in tfs.info.levels] == _openslide_levels(path)
    tfs.close()


@pytest.mark.parametrize("backend", ["auto", "tifffile", "openslide"])
def test_header_declaring_more_tiles_than_indexed_is_refused_at_open(make_slide, tmp_path, backend):
    import shutil

    from wsi_scan.errors import SlideIndexError

    p = tmp_path / "edited.tif"
    shutil.copy(make_slide(), p)
    with tifffile.TiffFile(p, mode="r+b") as tf:  # what a hostile or damaged header does
        tf.pages[0].tags["ImageWidth"].overwrite(200000)
        tf.pages[0].tags["ImageLength"].overwrite(100000)
    # OpenSlide alone opens it and then decodes blank gigapixels for a thumbnail
    with pytest.raises(SlideIndexError, match="needs .* tiles .* indexes"):
        open_slide(p, backend=backend)


def test_a_folder_given_as_one_slide_says_how_folders_are_scanned(tmp_path):
    """`info DIR`, `tile DIR` and `overlay --slide DIR` told the user that "for a folder of slides,
    --out must be a folder", an option info does not have and a folder tile cannot take (2026-12-05)."""
    from tests._support import run

    (tmp_path / "slides").mkdir()
    for args in (("info", tmp_path / "slides"), ("tile", tmp_path / "slides", "--out", tmp_path / "p.h5")):
        code, _, err = run(*args)
        assert code == 3 and "is a folder; expected one slide file" in err and "--out must be" not in err, err
        assert f"wsi-scan {tmp_path / 'slides'} --out RESULTS/" in err and len(err.strip().splitlines()) == 1


def _write_pages(path, sizes_wh, pixels, mpp=0.25):
    """A tiled TIFF of one page per size, the first full-resolution, the rest reduced, each with
    resolution tags saying ``mpp`` scaled by its size against the first page's."""
    (w0, h0) = sizes_wh[0]
    with tifffile.TiffWriter(path) as tw:
        for i, (w, h) in enumerate(sizes_wh):
            tw.write(
                pixels(w, h),
                tile=(256, 256),
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h)),
                resolutionunit="CENTIMETER",
            )
    return path


def test_a_level_of_two_downsamples_is_not_read_by_openslide(tmp_path):
    """A level of 1000 x 2400 under 3000 x 2400 (3 in x, 1 in y): OpenSlide gives it the mean, 2,
    and a scan read it as 2 x 2, every cell's window stretched (2026-12-05: heatmap off by up to
    0.79). It is left out, as the tifffile backend leaves it out; the levels after it keep their
    own pixels."""
    from wsi_scan.io.synthetic import _paint

    spec = SyntheticSlide(size_wh=(3000, 2400), tissue=((300, 300, 2700, 2100),), tumour=((1000, 1000, 1600, 1500),))
    path = _write_pages(
        tmp_path / "aniso.tif",
        ((3000, 2400), (1000, 2400), (250, 200)),
        lambda w, h: _paint(spec, (3000 / w, 2400 / h), 0, 0, w, h),
    )
    for backend in ("openslide", "auto"):
        s = open_slide(path, backend)
        try:
            assert [lv.size_wh for lv in s.info.levels] == [(3000, 2400), (250, 200)], backend
            got = s.read_region((1200, 1200), 1, (10, 10)).rgb
            want = _paint(spec, (12.0, 12.0), 100, 100, 10, 10)
            assert np.array_equal(np.asarray(got)[..., :3], want), backend  # the 12x level, not the 2x one
        finally:
            s.close()


def test_resolution_tags_of_a_first_image_that_is_not_level_0_are_not_its_pixel_size(tmp_path):
    """A TIFF whose first image (3000 x 2400, 0.25 um/px by its tags) is followed by a larger one
    (6000 x 4800): OpenSlide takes the larger as level 0 and the first's tags as its mpp, and a
    scan ran at twice the true scale in silence (2026-12-05). The mpp is set aside, said why,
    and --mpp still scans it."""
    from wsi_scan.errors import MppError

    path = _write_pages(
        tmp_path / "first-not-largest.tif",
        ((3000, 2400), (6000, 4800), (750, 600)),
        lambda w, h: np.full((h, w, 3), 230, np.uint8),
    )
    for backend in ("openslide", "auto"):
        s = open_slide(path, backend)
        try:
            assert s.info.level0_size_wh == (6000, 4800)
            with pytest.raises(MppError, match=r"first image \(3000 x 2400 px\), which is not its largest, level 0"):
                resolve_mpp(s.info.metadata, None, str(path))
            assert resolve_mpp(s.info.metadata, 0.125, str(path)).x == 0.125
        finally:
            s.close()


def test_a_zarr_folder_wsi_scan_did_not_write_is_named_as_one(tmp_path):
    """`info user.zarr` said "damaged or unreadable slide (IsADirectoryError ...)" (2026-12-05)."""
    from wsi_scan.errors import SlideFormatError

    store = tmp_path / "user.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(SlideFormatError, match="user.zarr is a Zarr folder, not a slide file"):
        open_slide(store)
