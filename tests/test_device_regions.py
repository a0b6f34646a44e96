"""Block reads on the model's device (``device_regions``), run here with torch on the CPU: the
resampler against Pillow, the JPEG tiles against the CPU decoder, a scan against the CPU path.
The same code on a GPU is in tests/test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests._support import shared_path
from wsi_scan.config import ScanConfig
from wsi_scan.device_regions import choose_decode, decode_tiles, device_decode_check, resample_chw
from wsi_scan.errors import UsageError
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.slide import open_slide
from wsi_scan.io.synthetic import write_flat_slide
from wsi_scan.regions import ReadPlan, resample_region
from wsi_scan.scan import scan_slide

CPU = torch.device("cpu")
TUMOUR = ((1013, 707, 1511, 1209), (2203, 1500, 2431, 1699))


def _pil(img: np.ndarray, box, out_wh) -> np.ndarray:
    return np.array(Image.fromarray(img).resize(out_wh, Image.Resampling.BILINEAR, box=box))


def _mine(img: np.ndarray, box, out_wh) -> np.ndarray:
    return resample_chw(torch.from_numpy(img).permute(2, 0, 1).contiguous(), box, out_wh).permute(1, 2, 0).numpy()


def _cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(4, 260, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out_wh = tuple(int(v) for v in rng.integers(1, 240, 2))
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        box = (x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h))
        if i % 4 == 0:  # whole-pixel corners, as most reads of a level at the model's scale
            box = (float(int(box[0])), float(int(box[1])), box[2], box[3])
        yield img, box, out_wh


def test_resampler_is_pillows_two_passes_bit_for_bit():
    # Pillow's horizontal pass, then its vertical pass: exactly what resample_chw computes
    for img, (x0, y0, x1, y1), (ow, oh) in _cases(120, 0):
        h = img.shape[0]
        across = _pil(img, (x0, 0, x1, h), (ow, h))
        np.testing.assert_array_equal(_mine(img, (x0, y0, x1, y1), (ow, oh)), _pil(across, (0, y0, ow, y1), (ow, oh)))


def test_resampler_within_one_level_of_pillows_single_call():
    # Pillow 13 chooses the order of its passes by cost; the rounding between them is all that differs
    worst = 0
    for img, box, out_wh in _cases(150, 1):
        worst = max(worst, int(np.abs(_mine(img, box, out_wh).astype(int) - _pil(img, box, out_wh)).max()))
    assert worst <= 1


def test_resampler_in_bands_of_rows_gives_the_same_pixels(monkeypatch):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    box, out_wh = (10.3, 7.9, 250.2, 290.5), (60, 70)
    whole = _mine(img, box, out_wh)
    monkeypatch.setattr("wsi_scan.config.DEVICE_RESAMPLE_BAND_BYTES", 3 * 260 * 8 * 7)  # 7 rows a band
    np.testing.assert_array_equal(_mine(img, box, out_wh), whole)


def test_resampler_keeps_one_axis_exact():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for box, out_wh in (((3.25, 0, 61.5, 50), (40, 50)), ((0, 2.5, 70, 47.75), (70, 90))):
        np.testing.assert_array_equal(_mine(img, box, out_wh), _pil(img, box, out_wh))


def test_device_read_of_jpeg_tiles_equals_the_cpu_read(make_slide):
    # torchvision's CPU decoder is libjpeg-turbo, as the CPU path's: the tiles agree exactly, so
    # only the resampler's order of passes can differ (<= 1 level)
    from wsi_scan.device_regions import resample_region_on_device

    slide = open_slide(make_slide(tumour=TUMOUR, tile_px=128), "tifffile")
    try:
        assert slide.jpeg_level(0) and device_decode_check(slide, 0, CPU) is None
        for level, box, out_wh in (
            (0, (101.3, 57.9, 101.3 + 416 * 4.1, 57.9 + 352 * 4.1), (416, 352)),  # shrink, tiles cut anywhere
            (1, (-40.0, -40.0, 500.0, 400.0), (130, 110)),  # past the slide's corner: white there
            (1, (2800.0, 2200.0, 3300.0, 2600.0), (125, 100)),  # past the far corner
            (0, (256.0, 128.0, 256.0 + 96, 128.0 + 96), (96, 96)),  # whole pixels: a crop, no resampling
        ):
            ds = slide.info.levels[level].downsample_xy
            cpu = resample_region(slide, level, ds, box, out_wh)
            dev = resample_region_on_device(slide, level, ds, box, out_wh, CPU).numpy()
            assert dev.shape == cpu.shape
            assert int(np.abs(dev.astype(int) - cpu).max()) <= 1
    finally:
        slide.close()


def test_tiles_decode_as_the_cpu_decoder_does(make_slide):
    slide = open_slide(make_slide(tile_px=128), "tifffile")
    try:
        probes = slide.probe_jpeg_streams(0, 5)
        assert len(probes) == 5
        for (index, _), tile in zip(probes, decode_tiles([s for _, s in probes], CPU)):
            np.testing.assert_array_equal(tile.permute(1, 2, 0).numpy(), slide.decode_tile_index(0, index))
    finally:
        slide.close()


def test_aperio_rgb_coded_tiles_decode_alike():
    # Aperio's tiles are RGB-coded JPEG (an Adobe marker is spliced in): the decoders must agree
    slide = open_slide(shared_path("slides", "cmu-1-small-region.svs"), "tifffile")
    try:
        assert device_decode_check(slide, 0, CPU, probes=8) is None
    finally:
        slide.close()


def _plan(slide) -> ReadPlan:
    from wsi_scan.geometry import plan_grid
    from wsi_scan.regions import make_read_plan

    grid = plan_grid(slide.info.l0_bounds_xywh, (0.243, 0.243), 0.972, 32, 96)
    return make_read_plan(slide, (0.243, 0.243), grid)


def test_choose_decode_keeps_the_cpu_where_it_must(make_slide, tmp_path):
    jpeg = open_slide(make_slide(), "tifffile")
    lossless = open_slide(write_flat_slide(tmp_path / "flat.tif", np.full((300, 400, 3), 200, np.uint8), 0.243))
    try:
        plan = _plan(jpeg)
        assert choose_decode(jpeg, plan, CPU, "cpu") == plan
        auto = choose_decode(jpeg, plan, CPU, "auto")
        assert auto.decode_device == "" and "CPU" in auto.decode_note
        assert choose_decode(jpeg, plan, CPU, "device").decode_device == "cpu"
        with pytest.raises(UsageError, match="not JPEG tiles"):
            choose_decode(lossless, _plan(lossless), CPU, "device")
    finally:
        jpeg.close()
        lossless.close()


@pytest.mark.parametrize("mode", ["dense", "patch"])
def test_scan_decoded_on_the_device_matches_the_cpu_scan(make_slide, tmp_path, mock_model, mode):
    slide = make_slide(tumour=TUMOUR, tile_px=128)
    cfg = {"mode": mode, "block_cells": 5, "backend": "tifffile"}
    a = scan_slide(slide, tmp_path / "cpu.zarr", ScanConfig(decode="cpu", **cfg), model=mock_model)
    b = scan_slide(slide, tmp_path / "dev.zarr", ScanConfig(decode="device", **cfg), model=mock_model)
    ha, hb = open_heatmap(a.out), open_heatmap(b.out)
    fa, fb = np.isfinite(ha.probs), np.isfinite(hb.probs)
    np.testing.assert_array_equal(fa, fb)
    assert fa.sum() > 100
    # a level of difference in a few resampled pixels moves the mock's tumour share a little at most
    assert float(np.abs(ha.probs[fa] - hb.probs[fb]).max()) <= 0.01
    assert ha.attrs["grid"]["read_decode"] == "cpu" and hb.attrs["grid"]["read_decode"] == "device (cpu)"
    assert ha.attrs["settings_hash"] == hb.attrs["settings_hash"]  # like --device: how, not what


def test_decode_device_refused_in_one_line_for_a_slide_it_cannot_decode(tmp_path, mock_model):
    flat = write_flat_slide(tmp_path / "flat.tif", np.full((600, 800, 3), 120, np.uint8), 0.243)
    with pytest.raises(UsageError, match="--decode device is not possible"):
        scan_slide(flat, tmp_path / "o.zarr", ScanConfig(decode="device", backend="tifffile"), model=mock_model)


def test_jpeg_tiles_are_complete_streams_of_jpeg_levels_only(make_slide):
    slide = open_slide(make_slide(tile_px=128), "tifffile")
    try:
        tiles = slide.jpeg_tiles((0, 0), 0, (300, 200))
        assert tiles.tile_wh == (128, 128) and [k for k, _ in tiles.tiles] == [(x, y) for y in (0, 1) for x in (0, 1, 2)]
        assert all(isinstance(s, bytes) and s[:2] == b"\xff\xd8" for _, s in tiles.tiles)
        with pytest.raises(UsageError):
            open_slide(make_slide("raw.tif", compression=None), "tifffile").jpeg_tiles((0, 0), 0, (10, 10))
    finally:
        slide.close()


def test_damaged_tiles_are_reported_as_on_the_cpu_path(make_slide, mock_model, tmp_path):
    from tests.test_robustness import _flip_bytes_in_a_tile

    slide = make_slide(size_wh=(2048, 2048), downsamples=(1,), mpp=0.9, tissue=((0, 0, 2048, 2048),))
    bad = _flip_bytes_in_a_tile(slide, tmp_path / "bad.tif")
    cfg = {"backend": "tifffile", "block_cells": 8}
    a = scan_slide(bad, tmp_path / "cpu.zarr", ScanConfig(decode="cpu", **cfg), model=mock_model)
    b = scan_slide(bad, tmp_path / "dev.zarr", ScanConfig(decode="device", **cfg), model=mock_model)
    assert a.decoder_warnings >= 1 and b.decoder_warnings >= 1 and "Corrupt JPEG data" in b.decoder_warning
    pa, pb = open_heatmap(a.out).probs, open_heatmap(b.out).probs
    assert float(np.nanmax(np.abs(pa - pb))) <= 0.01


def test_a_tile_without_data_is_white_and_counted_on_both_paths(make_slide, mock_model, tmp_path):
    import tifffile

    slide = make_slide(size_wh=(1024, 1024), downsamples=(1,), mpp=0.9, tissue=((0, 0, 1024, 1024),), tile_px=128)
    with tifffile.TiffFile(slide, mode="r+") as tf:
        tag = tf.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[9] = 0
        tag.overwrite(counts)
    cfg = {"backend": "tifffile", "block_cells": 8}
    a = scan_slide(slide, tmp_path / "cpu.zarr", ScanConfig(decode="cpu", **cfg), model=mock_model)
    b = scan_slide(slide, tmp_path / "dev.zarr", ScanConfig(decode="device", **cfg), model=mock_model)
    assert a.decoder_warnings >= 1 and b.decoder_warnings >= 1 and "no data" in b.decoder_warning
    pa, pb = open_heatmap(a.out).probs, open_heatmap(b.out).probs
    np.testing.assert_array_equal(np.isfinite(pa), np.isfinite(pb))
    assert float(np.nanmax(np.abs(pa - pb))) <= 0.01


def test_a_slide_cut_short_under_a_running_read_fails_in_one_line(make_slide, tmp_path):
    from wsi_scan.errors import SlideFormatError

    path = make_slide(tile_px=128)
    slide = open_slide(path, "tifffile")
    try:
        with open(path, "r+b") as fh:  # another process truncates the file after it was opened
            fh.truncate(path.stat().st_size // 3)
        with pytest.raises(SlideFormatError, match="damaged or truncated|cannot be decoded"):
            for y in range(0, 2400, 300):
                slide.jpeg_tiles((0, y), 0, (3000, 300))
    finally:
        slide.close()
