"""Running a model on regions: batch sizes, dense and patch execution (the device and mixed
precision, shared with training, are in ``device.py``)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from .device import autocast
from .errors import ModelError, UsageError


def auto_batch_size(device: torch.device, card: Any) -> int:
    """Windows per patch-mode pass sized to the card: a quarter of its memory for activations.

    The first feature maps of a 96 px window dominate its memory: about input_px^2 / 4 positions
    x 32 channels x 4 live tensors x 4 bytes (halved under AMP). The CPU gains nothing past a
    few dozen windows and loses to page faults beyond (``config.CPU_PATCH_BATCH``).
    """
    if device.type != "cuda":
        from .config import CPU_PATCH_BATCH

        return CPU_PATCH_BATCH
    total = torch.cuda.get_device_properties(device).total_memory
    per_window = (card.input_px // 2) ** 2 * 32 * 4 * 4
    return int(min(8192, max(64, total // 4 // per_window)))


#: glibc mallopt parameters (malloc.h) and the values a CPU scan sets (``keep_freed_memory``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
CPU_MALLOC_TRIM_BYTES = 256 << 20
CPU_MALLOC_MMAP_BYTES = 32 << 20  # glibc's largest on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back after every pass.

    A CPU scan allocates and frees the same activation sizes pass after pass in each Dask
    thread; glibc's defaults give the top of each thread's heap back to the kernel (and map
    large blocks afresh), so every pass page-faults its buffers in again: patch mode spent a
    noticeable share of its CPU time in the kernel, a fraction of it with fixed thresholds, peak
    RSS unchanged (docs/benchmarks.md, "Patch mode memory"). Process-wide and harmless elsewhere;
    a no-op off glibc. Returns whether it was applied.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, CPU_MALLOC_TRIM_BYTES)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, CPU_MALLOC_MMAP_BYTES)
        )
    except (OSError, AttributeError):
        return False


class Predictor:
    """A loaded model bound to a device and a mode; classifies the cells of block images.

    ``dense``: one forward pass over the whole block image; each output is one window's logit.
    ``patch``: the block's 96x96 windows of tissue cells, in batches (any classifier).
    Both see the very same pixels, so they agree to float precision.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        card: Any,
        device: torch.device,
        mode: str,
        tta: bool = False,
        batch_size: int = 256,
        amp: bool = True,
        cpu_threads: int = 0,
    ) -> None:
        if mode == "auto":
            mode = "dense" if card.dense_exact else "patch"
        if mode == "dense" and not card.dense_exact:
            raise UsageError(f"model {card.name!r} ({card.arch}) is not dense-exact; use --mode patch or auto")
        if mode not in ("dense", "patch"):
            raise UsageError(f"mode must be auto, dense or patch, found {mode!r}")
        self.card = card
        self.device = device
        self.mode = mode
        self.tta = tta
        self.batch_size = batch_size if batch_size > 0 else auto_batch_size(device, card)
        if device.type == "cpu":
            from .config import CPU_PATCH_BATCH

            # larger passes only add memory and kernel time on the CPU (config.CPU_PATCH_BATCH)
            self.batch_size = min(self.batch_size, CPU_PATCH_BATCH)
            keep_freed_memory()
        self.amp = amp and device.type == "cuda"
        self.net = net.to(device).eval().to(memory_format=torch.channels_last)
        self._local = threading.local()
        # torch threads per calling thread on the CPU (0: leave torch's setting alone)
        self.cpu_threads = cpu_threads

    def _stream(self) -> Any:
        """One CUDA stream per reader thread, so one block's copy overlaps another's compute."""
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(self.device)
        return s

    @torch.inference_mode()
    def _probs(self, rgb: np.ndarray | torch.Tensor) -> np.ndarray:
        from .model.transforms import predict_logits, to_input

        if self.device.type != "cuda":
            # Dask threads each call torch; with torch's default of one thread per core the
            # two pools oversubscribe the cores. The setting is per OS thread for threads that
            # already ran torch (Dask reuses its pool), so it is applied where the work runs.
            if self.cpu_threads > 0 and torch.get_num_threads() != self.cpu_threads:
                torch.set_num_threads(self.cpu_threads)
            x = to_input(rgb, self.card, self.device)
            return torch.sigmoid(predict_logits(self.net, x, self.tta).float()).numpy()
        stream = self._stream()
        if isinstance(rgb, torch.Tensor):
            # decoded and resampled on the device already (device_regions), on this thread's
            # current stream: the compute stream waits for it, and the allocator is told the
            # block is used there, so its memory is not reused under the pass
            stream.wait_stream(torch.cuda.current_stream(self.device))
            rgb.record_stream(stream)
            src = rgb
        else:
            # uint8 goes over the bus (4x less than float) from pinned memory, so the copy is a
            # true asynchronous DMA on this thread's stream; normalisation runs on the GPU
            src = torch.from_numpy(np.ascontiguousarray(rgb)).pin_memory()
        with torch.cuda.stream(stream):
            x = to_input(src, self.card, self.device)
            with autocast(self.device, self.amp):
                logits = predict_logits(self.net, x, self.tta)
            probs = torch.sigmoid(logits.float()).to("cpu", non_blocking=True)
            torch.cuda.current_stream().synchronize()
        return probs.numpy()

    def predict_block(self, region: np.ndarray | torch.Tensor, cells: np.ndarray) -> np.ndarray:
        """``region``: the block image (h, w, 3) uint8, a NumPy array or a tensor on the device."""
        from .grid import block_windows

        out = np.full(cells.shape, np.nan, dtype=np.float32)
        if not cells.any():
            return out
        if self.mode == "dense":
            probs = self._probs(region)[0, 0]
            if probs.shape != cells.shape:
                raise ModelError(
                    f"model {self.card.name!r} gave {probs.shape} outputs for a block of {cells.shape} cells; "
                    "its card's cell_px/input_px do not match the network"
                )
            out[cells] = probs[cells]
        else:
            windows = (
                tensor_block_windows(region, cells, self.card.input_px, self.card.cell_px)
                if isinstance(region, torch.Tensor)
                else block_windows(region, cells, self.card.input_px, self.card.cell_px)
            )
            vals = [self._probs(windows[i : i + self.batch_size]).reshape(-1) for i in range(0, len(windows), self.batch_size)]
            out[cells] = np.concatenate(vals)
        bad = int((~np.isfinite(out[cells])).sum())
        if bad:
            # NaN marks "no tissue" in a heatmap: a NaN output would read as "no tumour"
            raise ModelError(
                f"model {self.card.name!r} gave non-finite probabilities (NaN or infinity) for {bad} of "
                f"{int(cells.sum())} windows of a block; the model is broken, no heatmap is written"
            )
        return out


def tensor_block_windows(region: torch.Tensor, cells: np.ndarray, patch_px: int, cell_px: int) -> torch.Tensor:
    """``grid.block_windows`` of a block image held as a tensor, on its device: (N, patch_px, patch_px, 3)."""
    view = region.unfold(0, patch_px, cell_px).unfold(1, patch_px, cell_px)  # (nr, nc, 3, P, P)
    rows, cols = np.nonzero(cells)
    index_r = torch.as_tensor(rows, device=region.device)
    index_c = torch.as_tensor(cols, device=region.device)
    return view[index_r, index_c].permute(0, 2, 3, 1).contiguous()
