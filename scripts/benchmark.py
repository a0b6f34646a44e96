#!/usr/bin/env python
"""Benchmark of wsi-scan on a large synthetic 40x slide; needs nothing but the package.

The slide is written once into a cache folder (default ~/.cache/wsi-scan/bench): 0.25 um/px,
256 px JPEG tiles, a 1/4/16 pyramid, about a third tissue. Its tissue texture is a mosaic of
real PCam patches when ``../shared/data/pcam-kaggle-sample`` exists, procedural otherwise.

Stages measured (each printed as a table row and written to JSON):
  tissue     thumbnail read + tissue mask + grid + tissue blocks, seconds
  read       every tissue block read and resampled to the model's frame (Dask threads), MP/s
             of target-frame pixels, and decoded / needed pixels from the reads' tile footprint
  dense      model compute alone on those block images, cells/s
  patch      patch mode at the same stride on a subset of blocks, cells/s (per cell, so it
             extrapolates), plus the largest difference from dense on the same cells
  e2e        scan_slide in a child process: seconds per slide and the child's peak RSS

    python scripts/benchmark.py                    # the default 60000 x 50000 slide
    python scripts/benchmark.py --scale4 --only e2e  # 4x the area, for the memory claim
    python scripts/benchmark.py --layout subifds     # the same slide with its levels as SubIFDs

Pyramid layouts (``--layout``, the cases of issue 17): pages (reduced pages after level 0),
subifds, ome (OME-TIFF), svs (Aperio), series (reduced pages at 1/8/32, which tifffile lists
as a second series: the 40x slide without a level near the model's pixel size). The planning
is ``wsi_scan.plan.plan_scan``'s, the scan's own.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PCAM_DIR = ROOT.parent / "shared" / "data" / "pcam-kaggle-sample"
WRITER_VERSION = 1  # bump when the slide content changes, so cached slides are rewritten
STAGES = ("tissue", "read", "dense", "patch", "bf16", "e2e")
#: --layout: (SyntheticSlide.layout, downsamples)
LAYOUTS = {
    "pages": ("pages", (1, 4, 16)),
    "subifds": ("subifds", (1, 4, 16)),
    "ome": ("ome", (1, 4, 16)),
    "svs": ("svs", (1, 4, 16)),
    "series": ("pages", (1, 8, 32)),
}


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, stage: str, value: str, note: str = "") -> None:
        self.rows.append((stage, value, note))
        print(f"  {stage:<34} {value:>16}  {note}", flush=True)


def real_texture(n: int = 8, scale: int = 4, seed: int = 0) -> np.ndarray | None:
    """A mosaic of n x n real H&E patches (0.97 um/px) enlarged to about 0.25 um/px.

    Enlarging by 4 (not 3.89) keeps the mosaic a whole number of 256 px tiles, so the writer can
    reuse encoded tiles; the 3% scale error does not matter for timing.
    """
    from PIL import Image

    if not PCAM_DIR.is_dir():
        return None
    files = sorted((PCAM_DIR / "train").glob("*.webp"))
    if len(files) < n * n:
        return None
    rng = np.random.default_rng(seed)
    pick = [files[i] for i in sorted(rng.choice(len(files), n * n, replace=False))]
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in pick]
    p = tiles[0].shape[0]
    mosaic = np.zeros((n * p, n * p, 3), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, n)
        mosaic[r * p : (r + 1) * p, c * p : (c + 1) * p] = t
    big = Image.fromarray(mosaic).resize((n * p * scale, n * p * scale), Image.Resampling.BICUBIC)
    return np.asarray(big)


def slide_spec(size_wh: tuple[int, int], texture: np.ndarray | None, layout: str = "pages") -> Any:
    """Three tissue sections covering about a third of the slide, with a few tumour foci."""
    from wsi_scan.io.synthetic import SyntheticSlide

    w, h = size_wh
    # fractions of the slide; areas 0.18 + 0.09 + 0.06 = 0.33 of the slide
    sections = ((0.05, 0.08, 0.50, 0.48), (0.55, 0.10, 0.925, 0.34), (0.30, 0.60, 0.675, 0.76))
    tissue = tuple((int(a * w), int(b * h), int(c * w), int(d * h)) for a, b, c, d in sections)
    foci = ((0.12, 0.15, 0.02), (0.40, 0.30, 0.03), (0.70, 0.20, 0.015), (0.45, 0.68, 0.025))
    tumour = tuple((int(x * w), int(y * h), int(x * w + s * w), int(y * h + s * w)) for x, y, s in foci)
    kind, downsamples = LAYOUTS[layout]
    return SyntheticSlide(
        size_wh=size_wh,
        mpp=0.25,
        downsamples=downsamples,
        tile_px=256,
        quality=90,
        tissue=tissue,
        tumour=tumour,
        texture=texture,
        layout=kind,
    )


def ensure_slide(cache: Path, size_wh: tuple[int, int], report: Report, layout: str = "pages") -> Path:
    from wsi_scan.io.synthetic import write_synthetic_slide

    texture = real_texture()
    kind = "pcam" if texture is not None else "procedural"
    suffix = "" if layout == "pages" else f"-{layout}"  # the former name for the former layout
    path = cache / f"bench-v{WRITER_VERSION}-{size_wh[0]}x{size_wh[1]}-{kind}{suffix}.tif"
    report.data["slide"] = {
        "path": str(path),
        "size_wh": list(size_wh),
        "mpp": 0.25,
        "texture": kind,
        "layout": layout,
        "downsamples": list(LAYOUTS[layout][1]),
        "tile_px": 256,
    }
    if path.exists():
        report.add("slide", "cached", f"{path.name}, {path.stat().st_size / 1e9:.2f} GB")
        return path
    t = time.perf_counter()
    write_synthetic_slide(path, slide_spec(size_wh, texture, layout))
    dt = time.perf_counter() - t
    gpx = size_wh[0] * size_wh[1] * (1 + 1 / 16 + 1 / 256) / 1e9
    report.data["slide"]["write_s"] = dt
    report.add("slide written", f"{dt:.1f} s", f"{gpx / dt * 1e3:.0f} MP/s over all levels, {path.stat().st_size / 1e9:.2f} GB")
    return path


class CountingSlide:
    """Wraps a slide and records the footprint of every read, in the benchmark only."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.info = inner.info
        self.reads: list[tuple[int, int, int, int, int]] = []  # level, lv x, y, w, h
        self.cpu_s = 0.0  # CPU seconds the calling threads spent inside read_region
        self._lock = threading.Lock()

    def read_region(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> Any:
        t = time.thread_time()
        region = self.inner.read_region(l0_xy, level, lv_size_wh)
        dt = time.thread_time() - t
        lx, ly = region.lv_origin_xy
        with self._lock:
            self.reads.append((level, math.floor(lx), math.floor(ly), lv_size_wh[0], lv_size_wh[1]))
            self.cpu_s += dt
        return region

    def expect_reads(self, level: int, reads: Any, max_bytes: int) -> None:
        if hasattr(self.inner, "expect_reads"):  # trees before the tile cache lack it
            self.inner.expect_reads(level, reads, max_bytes)

    def forget_reads(self) -> None:
        if hasattr(self.inner, "forget_reads"):
            self.inner.forget_reads()

    def close(self) -> None:
        self.inner.close()


def tile_footprint(reads: list[tuple[int, int, int, int, int]], levels_wh: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """(tiles decoded when every read decodes its own tiles, distinct tiles touched)."""
    total = 0
    seen: set[tuple[int, int, int]] = set()
    for level, x, y, w, h in reads:
        lw, lh = levels_wh[level]
        x0, y0 = max(x, 0) // tile, max(y, 0) // tile
        x1, y1 = (min(x + w, lw) - 1) // tile, (min(y + h, lh) - 1) // tile
        if x1 < x0 or y1 < y0:
            continue
        total += (x1 - x0 + 1) * (y1 - y0 + 1)
        seen.update((level, tx, ty) for ty in range(y0, y1 + 1) for tx in range(x0, x1 + 1))
    return total, len(seen)


def needed_level_px(cells: np.ndarray, grid: Any, downsample_xy: tuple[float, float]) -> float:
    """Read-level pixels under the 96 px windows of all tissue cells (their union)."""
    from scipy.ndimage import binary_dilation

    m = (grid.patch_px - grid.cell_px) // (2 * grid.cell_px)  # margin in cells (1 for PCam)
    under = binary_dilation(cells, np.ones((2 * m + 1, 2 * m + 1), dtype=bool)) if m else cells
    cell_lv_px = grid.l0_cell_size_xy[0] / downsample_xy[0] * grid.l0_cell_size_xy[1] / downsample_xy[1]
    return float(under.sum()) * cell_lv_px


def bench_device_read(slide: Any, plan: Any, block_list: list[Any], device: Any, args: Any, report: Report) -> None:
    """The same blocks read with --decode device: tiles decoded and resampled on ``device``."""
    import dask
    import torch

    from wsi_scan.device_regions import choose_decode, read_block_on_device

    dplan = choose_decode(slide, plan, device, args.decode)
    if not dplan.decode_device:
        report.data["read_device"] = {"skipped": dplan.decode_note}
        report.add("read + resample on the device", "skipped", dplan.decode_note)
        return
    dev = torch.device(dplan.decode_device)
    read_block_on_device(dplan, block_list[0], dev)  # warm-up: the decoder's and allocator's first call
    cpu0, t = time.process_time(), time.perf_counter()
    out = dask.compute(
        *[dask.delayed(read_block_on_device, pure=False)(dplan, b, dev) for b in block_list],
        scheduler="threads",
        num_workers=args.threads,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_read, cpu = time.perf_counter() - t, time.process_time() - cpu0
    tgt_mp = sum(int(im.shape[0]) * int(im.shape[1]) for im in out) / 1e6
    report.data["read_device"] = {"s": t_read, "process_cpu_s": cpu, "target_mp": tgt_mp, "target_mp_per_s": tgt_mp / t_read}
    report.add(
        f"read + resample on {dev}",
        f"{tgt_mp / t_read:.1f} MP/s",
        f"target frame; {t_read:.1f} s, {cpu:.1f} CPU s in the process "
        f"(on a GPU: reading the tiles and their 1/8-scale check), {args.threads} threads",
    )


def run_child_scan(slide: Path, cfg: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """scan_slide in a fresh process; its peak RSS is that process's alone."""
    with tempfile.TemporaryDirectory(prefix="wsi-bench-") as tmp:
        out = Path(tmp) / "h.zarr"
        code = (
            "import json, resource, sys\n"
            "from wsi_scan.config import ScanConfig\n"
            "from wsi_scan.scan import scan_slide\n"
            "cfg = ScanConfig(**json.loads(sys.argv[3]))\n"
            "r = scan_slide(sys.argv[1], sys.argv[2], cfg, model=sys.argv[4] or None)\n"
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the
            # benchmark process's own size (block images, torch) whenever that was larger
            "hwm = [int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
            "print('RESULT ' + json.dumps({'timings_s': r.timings_s, 'tissue_cells': r.n_tissue_cells,"
            " 'maxrss_kb': hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " 'ru_maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " 'user_s': resource.getrusage(resource.RUSAGE_SELF).ru_utime, 'sys_s': resource.getrusage(resource.RUSAGE_SELF).ru_stime}))\n"
        )
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code, str(slide), str(out), json.dumps(cfg), model or ""],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"scan child failed:\n{proc.stderr[-4000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        res: dict[str, Any] = json.loads(line[len("RESULT ") :])
        res["wall_s"] = wall
        return res


def machine() -> dict[str, Any]:
    import psutil
    import torch

    import wsi_scan

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "wsi_scan": str(Path(wsi_scan.__file__).parent),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    from wsi_scan.config import ScanConfig, TissueConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "wsi-scan" / "bench")
    ap.add_argument("--size", default="60000x50000", help="level-0 WxH of the benchmark slide")
    ap.add_argument("--scale4", action="store_true", help="a slide of 4x the area (2x each side)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--batch-size", type=int, default=ScanConfig.batch_size, help="windows per patch-mode pass")
    ap.add_argument("--block-cells", type=int, default=ScanConfig.block_cells)
    ap.add_argument("--threads", type=int, default=ScanConfig.threads, help="Dask threads per slide")
    ap.add_argument("--backend", default="auto", choices=("auto", "openslide", "tifffile"), help="slide reader")
    ap.add_argument("--layout", default="pages", choices=tuple(LAYOUTS), help="how the slide stores its pyramid")
    ap.add_argument("--read-level", default=ScanConfig.read_level, choices=("exact", "nearest"), help="the scan's level policy")
    ap.add_argument("--decode", default=ScanConfig.decode, choices=("auto", "cpu", "device"), help="where JPEG tiles are decoded")
    ap.add_argument("--tissue", default="glass", choices=("glass", "otsu", "all"), help="the tissue rule (otsu: the former one)")
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads, here and in the scan child (0: torch's default)"
    )
    ap.add_argument("--model", default=None, help="a bundled model's name or a model file (default: the bundled default)")
    ap.add_argument("--mode", default="both", choices=("both", "dense", "patch"), help="modes to time")
    ap.add_argument("--patch-blocks", type=int, default=6, help="blocks timed in patch mode (it is slow)")
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default: in --cache)")
    args = ap.parse_args(argv)

    import dask
    import torch

    from wsi_scan.device import resolve_device
    from wsi_scan.inference import Predictor
    from wsi_scan.io.model_files import load_model
    from wsi_scan.io.mpp import resolve_mpp
    from wsi_scan.io.slide import open_slide
    from wsi_scan.plan import plan_scan
    from wsi_scan.regions import resample_region

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # read by torch in the scan child
    w, h = (int(v) for v in args.size.lower().split("x"))
    if args.scale4:
        w, h = 2 * w, 2 * h
    only = set(args.only.split(","))
    report = Report()
    report.data["machine"] = machine()
    report.data["args"] = {k: str(v) for k, v in vars(args).items()}
    print(f"machine: {report.data['machine']}")
    args.cache.mkdir(parents=True, exist_ok=True)
    path = ensure_slide(args.cache, (w, h), report, args.layout)

    cfg = ScanConfig(
        backend=args.backend,
        device=args.device,
        block_cells=args.block_cells,
        batch_size=args.batch_size,
        threads=args.threads,
        read_level=args.read_level,
        decode=args.decode,
        tissue=TissueConfig(method=args.tissue),
    )
    slide = open_slide(path, cfg.backend)
    mpp = resolve_mpp(slide.info.metadata, None, str(path), cfg.mpp_xy_tolerance)
    loaded = load_model(args.model)
    report.data["model"] = {"name": loaded.card.name, "sha256": loaded.sha256, "arch_kwargs": loaded.card.arch_kwargs}
    card = loaded.card

    import tracemalloc

    # the planning's CPU time (robust to other load) and its peak of traced allocations (NumPy's
    # arrays included): what the tissue rule costs, beside the wall time
    tracemalloc.start()
    t, c = time.perf_counter(), time.process_time()
    sp = plan_scan(slide, mpp.xy, card.mpp, card.cell_px, card.input_px, cfg)  # the scan's own planning
    tissue, grid, cells, block_list, plan = sp.tissue, sp.grid, sp.cells, sp.blocks, sp.read
    t_tissue, cpu_tissue = time.perf_counter() - t, time.process_time() - c
    peak_tissue_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    n_cells = int(cells.sum())
    report.data["grid"] = {
        "shape_rc": list(grid.shape_rc),
        "tissue_cells": n_cells,
        "blocks": len(block_list),
        "tissue_fraction": tissue.fraction,
        "read_level": plan.level,
        "read_downsample": plan.downsample_xy[0],
    }
    print(
        f"grid {grid.shape_rc}, {n_cells} tissue cells ({tissue.fraction:.0%} of the slide), "
        f"{len(block_list)} blocks of {cfg.block_cells}^2 cells, read level {plan.level} with {slide.info.backend}"
    )
    if "tissue" in only:
        report.data["tissue_s"] = t_tissue
        report.data["tissue_cpu_s"] = cpu_tissue
        report.data["tissue_peak_traced_mb"] = peak_tissue_mb
        report.data["tissue_method"] = args.tissue
        report.add(
            f"tissue detection ({args.tissue})",
            f"{t_tissue:.2f} s",
            f"thumbnail at 8 um/px, mask, grid, blocks; {cpu_tissue:.2f} CPU s, peak {peak_tissue_mb:.0f} MB traced",
        )

    images: list[np.ndarray] = []
    if only & {"read", "dense", "patch"}:
        counting = CountingSlide(open_slide(path, slide.info.backend))
        g = plan.grid

        read_cpu = [0.0]

        def read(b: tuple[int, int, int, int]) -> np.ndarray:
            x0, y0, x1, y1 = g.block_tgt_box_xyxy(*b)
            t = time.thread_time()
            out = resample_region(counting, plan.level, plan.downsample_xy, g.block_l0_box_xyxy(*b), (x1 - x0, y1 - y0))
            with counting._lock:
                read_cpu[0] += time.thread_time() - t
            return out

        stats0 = copy.copy(getattr(counting.inner, "read_stats", None))
        t = time.perf_counter()
        try:  # announce the reads as scan_slide does, in trees that have the tile cache
            from wsi_scan.regions import block_reads

            counting.expect_reads(plan.level, block_reads(plan, block_list), cfg.tile_cache_mib << 20)
        except ImportError:
            pass
        try:  # the scan's task names, hence its order of blocks
            from wsi_scan.graph import block_key
        except ImportError:

            def block_key(b: tuple[int, int, int, int]) -> str:
                return f"block-{b[0]}-{b[1]}"

        images = list(
            dask.compute(
                *[dask.delayed(read, pure=False)(b, dask_key_name=block_key(b)) for b in block_list],
                scheduler="threads",
                num_workers=args.threads,
            )
        )
        counting.forget_reads()
        t_read = time.perf_counter() - t
        stats1 = getattr(counting.inner, "read_stats", None)
        tgt_mp = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
        levels_wh = [lv.size_wh for lv in slide.info.levels]
        decoded_tiles, distinct_tiles = tile_footprint(counting.reads, levels_wh, 256)
        needed = needed_level_px(cells, grid, plan.downsample_xy)
        lv_read_mp = sum(r[3] * r[4] for r in counting.reads) / 1e6
        # decoded pixels as counted by the reader where it counts them (tifffile backend), else
        # the tile footprint of the reads (what a reader without a cache decodes)
        if stats0 is not None and stats1 is not None:
            decoded_px = float(stats1.px_decoded - stats0.px_decoded)
            how = "counted by the reader"
            cache_mb = stats1.peak_cache_bytes / 2**20
        else:
            decoded_px, how, cache_mb = decoded_tiles * 65536.0, "tile footprint of the reads", 0.0
        report.data["read"] = {
            "s": t_read,
            "cpu_s": read_cpu[0],
            "slide_read_cpu_s": counting.cpu_s,
            "resample_cpu_s": read_cpu[0] - counting.cpu_s,
            "target_mp": tgt_mp,
            "level_mp_read": lv_read_mp,
            "target_mp_per_s": tgt_mp / t_read,
            "level_mp_per_s": lv_read_mp / t_read,
            "decoded_px": decoded_px,
            "decoded_how": how,
            "tile_cache_peak_mb": cache_mb,
            "footprint_px": decoded_tiles * 256 * 256,
            "distinct_tile_px": distinct_tiles * 256 * 256,
            "needed_px": needed,
            "decoded_over_needed": decoded_px / needed,
            "footprint_over_needed": decoded_tiles * 65536 / needed,
            "distinct_over_needed": distinct_tiles * 65536 / needed,
        }
        if "read" in only:
            report.add(
                "read + resample",
                f"{tgt_mp / t_read:.1f} MP/s",
                f"target frame; {lv_read_mp / t_read:.0f} MP/s of level {plan.level}; {t_read:.1f} s, {args.threads} threads",
            )
            report.add(
                "read CPU time",
                f"{read_cpu[0]:.1f} s",
                f"summed over threads: slide read (decode, assemble) {counting.cpu_s:.1f} s, "
                f"resample {read_cpu[0] - counting.cpu_s:.1f} s",
            )
            report.add(
                "decoded / needed",
                f"{decoded_px / needed:.2f}",
                f"{how}; tile cache peak {cache_mb:.0f} MB; {decoded_tiles * 65536 / needed:.2f} if each read "
                f"decoded its own tiles, {distinct_tiles * 65536 / needed:.2f} if each tile once",
            )

    device = resolve_device(args.device)
    if "read" in only and (args.decode == "device" or (args.decode == "auto" and device.type == "cuda")):
        bench_device_read(slide, plan, block_list, device, args, report)
    dense: Predictor | None = None
    if images and ("dense" in only or "patch" in only) and args.mode in ("both", "dense"):
        dense = Predictor(loaded.net, card, device, "dense", batch_size=args.batch_size)
    if dense is not None and "dense" in only:
        b0 = block_list[0]
        dense.predict_block(images[0], cells[b0[0] : b0[0] + b0[2], b0[1] : b0[1] + b0[3]])  # warm-up: first-call allocations
        passes = []
        for _ in range(2):  # the best of two: this VM's speed drifts by up to 2x from run to run
            t = time.perf_counter()
            for b, im in zip(block_list, images):
                dense.predict_block(im, cells[b[0] : b[0] + b[2], b[1] : b[1] + b[3]])
            if device.type == "cuda":
                torch.cuda.synchronize()
            passes.append(time.perf_counter() - t)
        t_dense = min(passes)
        report.data["dense"] = {"s": t_dense, "passes_s": passes, "cells_per_s": n_cells / t_dense}
        report.add(
            "dense model compute alone",
            f"{n_cells / t_dense:.0f} cells/s",
            f"{t_dense:.1f} s for {n_cells} cells (best of {', '.join(f'{p:.1f}' for p in passes)} s), "
            f"blocks in memory, torch {torch.get_num_threads()} threads",
        )
        if device.type == "cpu" and "read" in report.data:
            # CPU budget: a scan runs reads and the model on the same cores, so end-to-end can
            # not beat (read CPU + model CPU) / cores. Model CPU from one thread on every 4th
            # block (two torch threads would count their spin-waits as CPU time).
            nt = torch.get_num_threads()
            torch.set_num_threads(1)
            sample = list(range(0, len(block_list), 4))
            t = time.perf_counter()
            for i in sample:
                b = block_list[i]
                dense.predict_block(images[i], cells[b[0] : b[0] + b[2], b[1] : b[1] + b[3]])
            t1 = time.perf_counter() - t
            torch.set_num_threads(nt)
            n_sample = sum(
                int(
                    cells[
                        block_list[i][0] : block_list[i][0] + block_list[i][2],
                        block_list[i][1] : block_list[i][1] + block_list[i][3],
                    ].sum()
                )
                for i in sample
            )
            model_cpu = t1 * n_cells / max(n_sample, 1)
            cores = os.cpu_count() or 1
            bound = (report.data["read"]["cpu_s"] + model_cpu) / cores
            report.data["cpu_budget"] = {
                "model_cpu_s_1thread": model_cpu,
                "read_cpu_s": report.data["read"]["cpu_s"],
                "cores": cores,
                "scan_lower_bound_s": bound,
                "bound_over_model_alone": bound / t_dense,
            }
            report.add(
                "CPU budget",
                f"{bound / t_dense:.2f}x",
                f"(read {report.data['read']['cpu_s']:.1f} + model {model_cpu:.1f} CPU s) / {cores} cores = {bound:.1f} s: "
                f"the least scan time / model alone on these cores, if nothing were wasted",
            )

    if images and "patch" in only and args.mode in ("both", "patch"):
        patch = Predictor(loaded.net, card, device, "patch", batch_size=args.batch_size)
        # the blocks with the most tissue cells, so the subset measures full batches
        order = sorted(
            range(len(block_list)),
            key=lambda i: (
                -int(
                    cells[
                        block_list[i][0] : block_list[i][0] + block_list[i][2],
                        block_list[i][1] : block_list[i][1] + block_list[i][3],
                    ].sum()
                )
            ),
        )
        subset = order[: max(1, args.patch_blocks)]
        sel = [
            cells[block_list[i][0] : block_list[i][0] + block_list[i][2], block_list[i][1] : block_list[i][1] + block_list[i][3]]
            for i in subset
        ]
        n_sub = int(sum(int(s.sum()) for s in sel))
        t = time.perf_counter()
        outs_p = [patch.predict_block(images[i], s) for i, s in zip(subset, sel)]
        t_patch = time.perf_counter() - t
        pdata: dict[str, Any] = {"s": t_patch, "cells": n_sub, "blocks": len(subset), "cells_per_s": n_sub / t_patch}
        note = f"{len(subset)} blocks, {n_sub} cells; extrapolated per cell"
        if dense is not None:
            t = time.perf_counter()
            outs_d = [dense.predict_block(images[i], s) for i, s in zip(subset, sel)]
            t_dense_sub = time.perf_counter() - t
            diff = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(outs_p, outs_d))
            same_nan = all(np.array_equal(np.isnan(a), np.isnan(b)) for a, b in zip(outs_p, outs_d))
            pdata.update(
                {"dense_s_same_cells": t_dense_sub, "speedup": t_patch / t_dense_sub, "max_abs_diff": diff, "same_nan": same_nan}
            )
            report.add(
                "dense / patch speed-up",
                f"{t_patch / t_dense_sub:.1f}x",
                f"same {n_sub} cells; max |p_dense - p_patch| = {diff:.1e}, NaN pattern equal: {same_nan}",
            )
        report.data["patch"] = pdata
        if "bf16" in only and dense is not None and device.type == "cpu":
            # informative only: bf16 (AMX/AVX-512 where the CPU has it) changes the numbers,
            # so it is not what the tool does by default
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs_b = [dense.predict_block(images[i], s) for i, s in zip(subset, sel)]
            t_bf16 = time.perf_counter() - t
            diff_b = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(outs_b, outs_d))
            report.data["bf16"] = {
                "s": t_bf16,
                "cells_per_s": n_sub / t_bf16,
                "max_abs_diff": diff_b,
                "speedup_over_fp32": t_dense_sub / t_bf16,
            }
            report.add(
                "dense, CPU bf16 autocast (info)",
                f"{n_sub / t_bf16:.0f} cells/s",
                f"{t_dense_sub / t_bf16:.2f}x fp32 on the same cells; max |diff| {diff_b:.1e}",
            )
        report.add("patch mode", f"{n_sub / t_patch:.0f} cells/s", note)
        if "dense" in report.data:
            report.add(
                "patch mode, whole slide (extrap.)",
                f"{n_cells / (n_sub / t_patch):.0f} s",
                f"vs {report.data['dense']['s']:.0f} s dense",
            )
    images.clear()

    # end to end in a child process, per mode ("both": dense, then patch; key "e2e" is dense's)
    for e2e_mode in (("dense", "patch") if args.mode == "both" else (args.mode,)) if "e2e" in only else ():
        child_cfg = {
            "backend": args.backend,
            "device": args.device,
            "block_cells": args.block_cells,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "mode": e2e_mode,
            "read_level": args.read_level,
            "decode": args.decode,
        }
        res = run_child_scan(path, child_cfg, args.model)
        ts = res["timings_s"]
        rss_gb = res["maxrss_kb"] / 2**20
        n_win = res["tissue_cells"]
        cpu_ms = (res["user_s"] + res["sys_s"]) * 1e3 / max(n_win, 1)  # the whole child: open, tissue, scan, write
        key = "e2e" if e2e_mode == "dense" else f"e2e_{e2e_mode}"
        report.data[key] = {**res, "peak_rss_gb": rss_gb, "windows_per_s": n_win / ts["total"], "cpu_ms_per_window": cpu_ms}
        report.add(
            f"end-to-end per slide, {e2e_mode}",
            f"{ts['total']:.1f} s",
            f"scan {ts['scan']:.1f}, tissue {ts['tissue']:.1f}, write {ts['write']:.1f}; {n_win / ts['total']:.0f} windows/s",
        )
        report.add(
            f"CPU per window, {e2e_mode}",
            f"{cpu_ms:.2f} ms",
            f"user {res['user_s']:.1f} s + sys {res['sys_s']:.1f} s over {n_win} windows",
        )
        report.add(f"peak RSS (scan process), {e2e_mode}", f"{rss_gb:.2f} GiB", f"{rss_gb * 2**30 / 1e9:.2f} GB; slide {w}x{h}")
        if "dense" in report.data and e2e_mode == "dense":
            ratio = ts["total"] / report.data["dense"]["s"]
            report.data["e2e"]["over_model_alone"] = ratio
            report.add("end-to-end / model alone", f"{ratio:.2f}x", "target <= 1.5x")
        if device.type == "cuda":
            report.add("slides per hour", f"{3600 / ts['total']:.0f}", str(report.data["machine"].get("gpu")))

    out = args.json or args.cache / f"results-{w}x{h}-{args.layout}-{args.device}.json"
    out.write_text(json.dumps(report.data, indent=2, default=str))
    print(f"\nwritten {out}")
    print("\n| stage | value | note |\n|---|---:|---|")
    for stage, value, note in report.rows:
        print(f"| {stage} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
