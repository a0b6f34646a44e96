"""The CUDA path: AMP dense == patch, CUDA agrees with the CPU, pinned copies from many threads,
JPEG tiles decoded and resampled on the GPU.

Marked ``gpu``; every test skips on a machine without CUDA, so the suite passes anywhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from wsi_scan.config import ScanConfig
from wsi_scan.inference import Predictor, auto_batch_size
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import load_model
from wsi_scan.scan import scan_slide

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TUMOUR = ((1013, 707, 1511, 1209), (2203, 1500, 2431, 1699))
AMP_ATOL = 0.02  # bf16/fp16 rounding of a probability; float32 paths are held to 1e-5
DECODE_MEAN_ATOL, DECODE_MAX_ATOL = 0.005, 0.05  # another JPEG decoder's rounding, through the network


def _probs(out):
    p = open_heatmap(out).probs
    return p, np.isfinite(p)


def test_dense_equals_patch_on_cuda_with_amp(make_slide, tmp_path):
    slide = make_slide(tumour=TUMOUR)
    a = scan_slide(slide, tmp_path / "d.zarr", ScanConfig(device="cuda", mode="dense", block_cells=5, amp=True))
    b = scan_slide(slide, tmp_path / "p.zarr", ScanConfig(device="cuda", mode="patch", block_cells=5, amp=True))
    (pa, fa), (pb, fb) = _probs(a.out), _probs(b.out)
    assert fa.sum() > 100
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_allclose(pa[fa], pb[fb], atol=AMP_ATOL, rtol=0)


def test_cuda_float32_matches_cpu(make_slide, tmp_path):
    slide = make_slide(tumour=TUMOUR)
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would round like AMP
    try:
        # decoded on the CPU as the reference is: this test is about the network's arithmetic
        g = scan_slide(
            slide, tmp_path / "g.zarr", ScanConfig(device="cuda", mode="dense", block_cells=6, amp=False, decode="cpu")
        )
    finally:
        torch.backends.cudnn.allow_tf32 = True
    c = scan_slide(slide, tmp_path / "c.zarr", ScanConfig(device="cpu", mode="dense", block_cells=6))
    (pg, fg), (pc, fc) = _probs(g.out), _probs(c.out)
    np.testing.assert_array_equal(fg, fc)
    np.testing.assert_allclose(pg[fg], pc[fc], atol=1e-4, rtol=0)


def test_cuda_amp_close_to_cpu(make_slide, tmp_path):
    slide = make_slide(tumour=TUMOUR)
    g = scan_slide(
        slide, tmp_path / "g.zarr", ScanConfig(device="cuda", mode="dense", block_cells=6, amp=True, threads=4, decode="cpu")
    )
    c = scan_slide(slide, tmp_path / "c.zarr", ScanConfig(device="cpu", mode="dense", block_cells=6))
    (pg, fg), (pc, fc) = _probs(g.out), _probs(c.out)
    np.testing.assert_array_equal(fg, fc)
    np.testing.assert_allclose(pg[fg], pc[fc], atol=AMP_ATOL, rtol=0)


def test_reader_threads_share_one_gpu():
    """Blocks classified concurrently from several threads (own streams, pinned copies) equal a serial run."""
    loaded = load_model(None)
    pred = Predictor(loaded.net, loaded.card, torch.device("cuda"), "dense", amp=False)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (96 + 32 * 7, 96 + 32 * 7, 3), dtype=np.uint8) for _ in range(16)]
    cells = np.ones((8, 8), dtype=bool)
    serial = [pred.predict_block(b, cells) for b in blocks]
    with ThreadPoolExecutor(4) as ex:
        parallel = list(ex.map(lambda b: pred.predict_block(b, cells), blocks))
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(s, p)


def test_batch_size_is_chosen_for_the_card():
    card = load_model(None).card
    n = auto_batch_size(torch.device("cuda"), card)
    assert 64 <= n <= 8192
    pred = Predictor(load_model(None).net, card, torch.device("cuda"), "patch", batch_size=0)
    assert pred.batch_size == n


def test_resampling_on_the_gpu_is_the_cpus_bit_for_bit():
    from wsi_scan.device_regions import resample_chw

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (3, 700, 650), dtype=np.uint8))
    for box, out_wh in (((10.3, 7.9, 640.2, 690.5), (160, 170)), ((3.0, 4.0, 500.0, 520.0), (520, 540))):
        np.testing.assert_array_equal(resample_chw(img.cuda(), box, out_wh).cpu().numpy(), resample_chw(img, box, out_wh).numpy())


def test_nvjpeg_decodes_the_tiles_as_libjpeg_does_within_rounding(make_slide):
    from wsi_scan.device_regions import device_decode_check
    from wsi_scan.io.slide import open_slide

    slide = open_slide(make_slide(tile_px=128), "tifffile")
    try:
        assert device_decode_check(slide, 0, torch.device("cuda"), probes=8) is None
    finally:
        slide.close()


def test_aperio_tiles_decode_on_the_gpu():
    from tests._support import shared_path
    from wsi_scan.device_regions import device_decode_check
    from wsi_scan.io.slide import open_slide

    slide = open_slide(shared_path("slides", "cmu-1-small-region.svs"), "tifffile")
    try:
        assert device_decode_check(slide, 0, torch.device("cuda"), probes=8) is None
    finally:
        slide.close()


@pytest.mark.parametrize("mode", ["dense", "patch"])
def test_scan_decoded_on_the_gpu_matches_the_cpu_decode(make_slide, tmp_path, mode):
    slide = make_slide(tumour=TUMOUR, tile_px=128)
    cfg = {"device": "cuda", "mode": mode, "block_cells": 6, "amp": False, "backend": "tifffile"}
    g = scan_slide(slide, tmp_path / "g.zarr", ScanConfig(decode="auto", **cfg))
    c = scan_slide(slide, tmp_path / "c.zarr", ScanConfig(decode="cpu", **cfg))
    assert open_heatmap(g.out).attrs["grid"]["read_decode"].startswith("device (cuda")
    assert open_heatmap(c.out).attrs["grid"]["read_decode"] == "cpu"
    (pg, fg), (pc, fc) = _probs(g.out), _probs(c.out)
    np.testing.assert_array_equal(fg, fc)
    # nvJPEG rounds some pixels a level or two away from libjpeg-turbo: the network sees nearly
    # the same block, so its probabilities agree closely on average and nowhere far apart
    diff = np.abs(pg[fg] - pc[fc])
    assert float(diff.mean()) <= DECODE_MEAN_ATOL and float(diff.max()) <= DECODE_MAX_ATOL


def test_p4m_trains_under_amp_and_matches_the_cpu_on_cuda():
    """The p4m network's own batch norm and expanded filters under CUDA autocast: a training step
    runs and moves the running statistics; in float32 the logits are the CPU's, and every view of
    a window gives the same logit."""
    from wsi_scan.device import autocast
    from wsi_scan.model.nets import build_network
    from wsi_scan.model.transforms import dihedral

    torch.manual_seed(0)
    net = build_network("dense-cnn-p4m", width=16).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(16, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    bn = net.features[1]
    before = bn.running_mean.clone()
    with autocast(torch.device("cuda")):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), torch.ones(16, 1, 1, 1, device="cuda"))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, bn.running_mean)
    net.eval()
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            g = net(x)
            c = net.cpu()(x.cpu())
            net.cuda()
            np.testing.assert_allclose(g.cpu().numpy(), c.numpy(), atol=1e-4, rtol=0)
            for k in range(8):
                np.testing.assert_allclose(net(dihedral(x, k)).cpu().numpy(), g.cpu().numpy(), atol=1e-4, rtol=0)
    finally:
        torch.backends.cudnn.allow_tf32 = True
