"""Block reads on the model's device: JPEG tiles decoded there, pasted and resampled there.

The CPU path (``regions.py``) decodes a block's tiles with libjpeg-turbo, pastes them into one
buffer and shrinks or enlarges it with Pillow; on a GPU the decode (torchvision's nvJPEG
decoder over the tiles' raw bytes, batched), the paste and the resampling run on the device,
so only compressed bytes cross the bus and the block image never exists on the host.

The resampling is Pillow's bilinear resize recomputed: the same filter weights in double
precision from the box's float32 corners, rounded to Pillow's 22-bit fixed point, each pass
rounded and clipped to 8 bits as Pillow does. Sums of 8-bit pixels times 22-bit weights stay
below 2**53, so float64 matrix products give Pillow's integers exactly. The passes run
horizontal first; Pillow 13 picks the order by an estimate of its own cost, so where it runs the
vertical pass first the two differ by the rounding between passes: at most one 8-bit level
(tested: equal to Pillow's two passes in this order bit for bit, within one level of its single
call). What may differ more on a GPU is the JPEG decoder (nvJPEG's inverse DCT and chroma
upsampling are not libjpeg-turbo's); ``device_decode_check`` measures that on the slide's own
tiles before a scan uses it.

The geometry of the read (which level pixels, which box inside them) is ``regions.py``'s: the
two paths see the same pixels up to the decoder.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a block is read, never by ``import wsi_scan``
    import torch

    from .geometry import CellBlock
    from .regions import ReadPlan

#: Pillow's fixed point for 8-bit resampling (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2)
PIL_PRECISION_BITS = 22


def pil_bilinear_weights(in_size: int, in0: float, in1: float, out_size: int) -> np.ndarray:
    """(out_size, in_size) int64: Pillow's fixed-point bilinear weights for resizing the span
    ``in0 .. in1`` of an axis of ``in_size`` pixels to ``out_size`` pixels (Resample.c,
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc``), in Pillow's order of operations."""
    # Pillow takes the box as C floats: the span and the centres start from float32 values
    in0_f, in1_f = np.float32(in0), np.float32(in1)
    scale = float(in1_f - in0_f) / out_size
    in0 = float(in0_f)
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    xx = np.arange(out_size, dtype=np.float64)
    center = in0 + (xx + 0.5) * scale
    # C's (int) truncates toward zero
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    k = np.zeros((out_size, ksize), dtype=np.float64)
    ww = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # summed in Pillow's order, so the normalisation rounds alike
        x = np.abs((j + xmin - center + 0.5) * ss)
        w = np.where((j < xmax) & (x < 1.0), 1.0 - x, 0.0)
        k[:, j] = w
        ww += w
    k = np.divide(k, ww[:, None], out=k, where=ww[:, None] != 0)
    fixed = np.trunc(np.where(k < 0, -0.5, 0.5) + k * (1 << PIL_PRECISION_BITS)).astype(np.int64)
    dense = np.zeros((out_size, in_size), dtype=np.int64)
    rows = np.repeat(np.arange(out_size), ksize)
    cols = (xmin[:, None] + np.arange(ksize)[None, :]).reshape(-1)
    keep = (np.arange(ksize)[None, :] < xmax[:, None]).reshape(-1)
    dense[rows[keep], cols[keep]] = fixed.reshape(-1)[keep]
    return dense


def _fixed_pass(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One Pillow pass: ``weights @ x`` in exact float64, Pillow's rounding, clipped to 8 bits."""
    import torch

    acc = torch.matmul(weights, x) + float(1 << (PIL_PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << PIL_PRECISION_BITS)).clamp_(0, 255)


def resample_chw(img: torch.Tensor, box_xyxy: tuple[float, float, float, float], out_wh: tuple[int, int]) -> torch.Tensor:
    """Pillow's ``resize(out_wh, BILINEAR, box=box_xyxy)`` of a (3, h, w) uint8 tensor, on its device."""
    import torch

    _, h, w = img.shape
    out_w, out_h = out_wh
    dev = img.device
    wx = torch.from_numpy(pil_bilinear_weights(w, box_xyxy[0], box_xyxy[2], out_w).astype(np.float64)).to(dev)
    wy = torch.from_numpy(pil_bilinear_weights(h, box_xyxy[1], box_xyxy[3], out_h).astype(np.float64)).to(dev)
    # Pillow's horizontal pass runs first, only over the rows the vertical pass reads; in bands
    # of rows, so a level-0 read of a large block never exists in float64 as a whole
    used = torch.nonzero(wy.any(dim=0)).flatten()
    r0, r1 = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 0)
    from .config import DEVICE_RESAMPLE_BAND_BYTES

    band = max(1, DEVICE_RESAMPLE_BAND_BYTES // (3 * max(w, 1) * 8))
    across = torch.empty((3, r1 - r0, out_w), dtype=torch.float64, device=dev)
    for b0 in range(r0, r1, band):
        rows = img[:, b0 : min(b0 + band, r1)].to(torch.float64)
        across[:, b0 - r0 : b0 - r0 + rows.shape[1]] = _fixed_pass(wx, rows.transpose(1, 2)).transpose(1, 2)
    down = _fixed_pass(wy[:, r0:r1], across)  # (3, out_h, out_w)
    return down.to(torch.uint8)


def decode_tiles(streams: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """Complete JPEG streams decoded to (3, h, w) uint8 tensors on ``device``, in one batch."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    # torchvision serialises its nvJPEG decoder itself and orders the result on the caller's
    # current stream
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not a
        # dependency here); they still work in the pinned version, which the tests hold them to
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list) else [out]


def read_region_chw(slide: Any, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int], device: torch.device) -> Any:
    """``slide.read_region`` with the tiles decoded and pasted on ``device``: ((3, h, w) uint8
    tensor, lv_origin_xy). ``slide`` is a ``TiffFileSlide`` whose ``level`` is JPEG-tiled."""
    import torch

    from .errors import SlideFormatError
    from .geometry import tile_in_read

    tiles = slide.jpeg_tiles(l0_xy, level, lv_size_wh)
    lx, ly, w, h = tiles.lv_box
    tw, th = tiles.tile_wh
    out = torch.full((3, h, w), 255, dtype=torch.uint8, device=device)
    streams = [t for _, t in tiles.tiles if isinstance(t, bytes)]
    try:
        on_device = iter(decode_tiles(streams, device))
    except RuntimeError as exc:  # intact for libjpeg-turbo (jpeg_tiles checked), refused by the device
        raise SlideFormatError(
            f"{slide.info.path}: level {level} tiles cannot be decoded on {device} ({exc}); scan with --decode cpu"
        ) from None
    decoded = [
        next(on_device) if isinstance(t, bytes) else torch.from_numpy(t).permute(2, 0, 1).to(device) for _, t in tiles.tiles
    ]
    for ((tx, ty), _), tile in zip(tiles.tiles, decoded):
        if tuple(tile.shape) != (3, th, tw):
            raise SlideFormatError(
                f"{slide.info.path}: level {level} tile ({tx}, {ty}) decodes to {tuple(tile.shape)}, expected {(3, th, tw)}"
            )
        dst, src = tile_in_read((tx, ty), tiles.tile_wh, tiles.lv_box, tiles.level_wh)
        out[:, dst[0], dst[1]] = tile[:, src[0], src[1]]
    return out, (float(lx), float(ly))


def resample_region_on_device(
    slide: Any,
    level: int,
    downsample_xy: tuple[float, float],
    l0_box_xyxy: tuple[float, float, float, float],
    out_wh: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """``regions.resample_region`` on ``device``: (h, w, 3) uint8 tensor there."""
    from .geometry import box_in_read, whole_pixel_crop
    from .regions import region_read

    out_w, out_h = out_wh
    l0_xy, lv_size = region_read(l0_box_xyxy, downsample_xy, out_wh)
    img, origin = read_region_chw(slide, l0_xy, level, lv_size, device)
    box = box_in_read(l0_box_xyxy, downsample_xy, origin)
    crop = whole_pixel_crop(box, out_wh)
    if crop is not None:
        x0, y0 = crop
        return img[:, y0 : y0 + out_h, x0 : x0 + out_w].permute(1, 2, 0)
    return resample_chw(img, box, out_wh).permute(1, 2, 0)


def read_block_on_device(plan: ReadPlan, block: CellBlock, device: torch.device) -> torch.Tensor:
    """``regions.read_block`` with decode and resampling on ``device``."""
    from .regions import block_box_and_size, cached_slide

    slide = cached_slide(plan.slide_path, plan.backend)
    return resample_region_on_device(slide, plan.level, plan.downsample_xy, *block_box_and_size(plan, block), device)


def device_decode_check(slide: Any, level: int, device: torch.device, probes: int = 8) -> str | None:
    """Why the scan must not decode ``level`` on ``device`` (None: it may).

    Decodes up to ``probes`` of the level's tiles there and with the CPU decoder the CPU path
    uses, and refuses when they differ by more than a JPEG decoder's rounding
    (``config.DEVICE_DECODE_MAX_ABS`` / ``_MEAN``) or the device cannot decode them.
    """
    from .config import DEVICE_DECODE_MAX_ABS, DEVICE_DECODE_MAX_MEAN

    if not getattr(slide, "jpeg_level", lambda _level: False)(level):
        return "the level is not JPEG tiles read by the tifffile backend"
    streams = slide.probe_jpeg_streams(level, probes)
    if not streams:
        return "the level holds no coded tiles"
    try:
        mine = decode_tiles([s for _, s in streams], device)
    except RuntimeError as exc:  # the device's decoder refuses the slide's tiles
        return f"the device's JPEG decoder failed on the slide's tiles ({exc})"
    worst, mean = 0, 0.0
    for (index, _), tile in zip(streams, mine):
        ref = slide.decode_tile_index(level, index)
        got = tile.permute(1, 2, 0).cpu().numpy()
        if got.shape != ref.shape:
            return f"the device decodes a tile to {got.shape}, the CPU to {ref.shape}"
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        worst, mean = max(worst, int(diff.max())), max(mean, float(diff.mean()))
    if worst > DEVICE_DECODE_MAX_ABS or mean > DEVICE_DECODE_MAX_MEAN:
        return (
            f"the device's JPEG decoder differs from the CPU's by up to {worst} levels (mean {mean:.2f}) on the "
            f"slide's tiles, more than a decoder's rounding ({DEVICE_DECODE_MAX_ABS}, {DEVICE_DECODE_MAX_MEAN})"
        )
    return None


def choose_decode(slide: Any, plan: ReadPlan, device: torch.device, decode: str) -> ReadPlan:
    """The read plan with where its blocks are decoded (``ScanConfig.decode``): ``decode_device``
    set when on ``device``, and ``decode_note`` saying why not when ``auto`` keeps the CPU.
    ``device`` asks for it and raises when the slide's read level cannot be decoded there."""
    import dataclasses

    from .errors import UsageError

    if decode == "cpu":
        return plan
    if decode == "auto" and device.type != "cuda":
        return dataclasses.replace(plan, decode_note="the model runs on the CPU")
    why = device_decode_check(slide, plan.level, device)
    if why is None:
        return dataclasses.replace(plan, decode_device=str(device))
    if decode == "device":
        raise UsageError(f"{slide.info.path}: --decode device is not possible: {why}; use --decode auto or cpu")
    return dataclasses.replace(plan, decode_note=why)
