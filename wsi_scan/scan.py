"""Scanning one slide: open -> tissue -> grid -> regions -> model -> heatmap."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ScanConfig
from .errors import WsiScanError


@dataclass(frozen=True)
class ScanResult:
    out: Path
    slide_path: str
    n_cells: int
    n_tissue_cells: int
    tissue_area_mm2: float
    tumour_area_mm2: float
    max_prob: float | None
    mean_prob: float | None
    mpp_xy: tuple[float, float]
    mpp_source: str
    timings_s: dict[str, float] = field(default_factory=dict)
    mode: str = "dense"
    device: str = "cpu"
    resumed_cells: int = 0  # tissue cells taken from an interrupted scan of the same output
    decoder_warnings: int = 0  # tiles the decoder found corrupt (decoded with damage) in this run
    decoder_warning: str = ""  # the first of them

    @property
    def cells_per_s(self) -> float:
        """Cells classified per second of this run (cells taken over from an interrupted scan
        were not classified in it)."""
        t = self.timings_s.get("scan", 0.0)
        return (self.n_tissue_cells - self.resumed_cells) / t if t > 0 else 0.0


def settings_hash(model_sha256: str, cfg: ScanConfig) -> str:
    """Identifies the model and every setting that changes the numbers of a heatmap."""
    d = cfg.to_dict()
    # how the work is cut and run does not change the numbers beyond float rounding (tests:
    # block size, batch size, threads and backends give the same heatmap)
    for k in ("overwrite", "threads", "device", "batch_size", "block_cells", "backend", "mpp_source", "tile_cache_mb", "checkpoint_s"):
        d.pop(k, None)
    # a user's mask or ROI enters by content: the same file moved gives the same heatmap, an edited one not
    from .plan import file_sha256

    for k in ("tissue_mask", "roi"):
        if d.get(k) is not None:
            d[k] = file_sha256(d[k])
    payload = json.dumps({"model": model_sha256, "config": d}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def settings_roi_digest(config: ScanConfig) -> str | None:
    from .plan import file_sha256

    return file_sha256(config.roi) if config.roi else None


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    from . import __version__

    out = {"wsi_scan": __version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "zarr", "dask", "openslide-python", "openslide-bin", "tifffile", "scikit-image", "pillow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


class _Progress:
    """A tqdm bar advanced by finished Dask block tasks."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False, dynamic_ncols=True)

    def callback(self) -> Any:
        from dask.callbacks import Callback

        bar = self.bar

        class _CB(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:  # noqa: A002
                name = key[0] if isinstance(key, tuple) else key
                if str(name).startswith("block-"):
                    bar.update(1)

        return _CB()

    def close(self) -> None:
        self.bar.close()


def scan_slide(
    slide_path: str | Path,
    out: str | Path,
    config: ScanConfig = ScanConfig(),
    model: Any = None,
    progress: bool = False,
    scheduler: str = "threads",
    restart: bool | None = None,
) -> ScanResult:
    """Scan one slide and write its heatmap store to ``out``; returns a summary.

    ``model`` is a path, a ``LoadedModel`` or None for the bundled default. ``restart`` drops the
    finished blocks of an interrupted scan of ``out`` (default: ``config.overwrite``, as the
    CLI's --overwrite means "start afresh"); a folder run replaces a stale store but keeps them.
    """
    from .io.heatmap import check_output
    from .io.slide import open_slide
    from .regions import release_slide

    t_start = time.perf_counter()
    out = Path(out)
    slide_path = Path(slide_path)
    check_output(out, config.overwrite, str(slide_path) if slide_path.exists() else None)

    t = time.perf_counter()
    slide = open_slide(slide_path, config.backend)
    try:
        return _scan_opened(slide, slide_path, out, config, model, progress, scheduler, restart, t_start, t)
    finally:
        slide.close()
        release_slide(slide.info.path)  # the handles the block tasks opened: no descriptor outlives a scan


def _scan_opened(slide: Any, slide_path: Path, out: Path, config: ScanConfig, model: Any, progress: bool,
                 scheduler: str, restart: bool | None, t_start: float, t: float) -> ScanResult:
    import dask

    from .device import resolve_device
    from .geometry import check_resolution
    from .graph import block_key, build_graph
    from .inference import Predictor
    from .io.checkpoint import LoadedModel, card_summary, load_model
    from .io.heatmap import FORMAT_VERSION, write_heatmap
    from .io.mpp import check_extent, resolve_mpp
    from .io.resume import Checkpoint, drop_partial, load_partial, partial_key
    from .io.slide import file_identity
    from .lesions import call_slide
    from .plan import plan_scan
    from .regions import cached_slide, expected_reads

    timings: dict[str, float] = {}
    info = slide.info
    mpp = resolve_mpp(info.metadata, config.mpp, str(slide_path), config.mpp_xy_tolerance)
    if config.mpp is not None:
        mpp = dataclasses.replace(mpp, source=config.mpp_override_source)
    check_extent(info.level0_size_wh, mpp, str(slide_path))
    timings["open"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    card = loaded.card
    check_resolution(mpp.xy, card.mpp, config.max_upsample, str(slide_path))
    device = resolve_device(config.device)
    # the cores are shared by the Dask threads: each gets its share of torch threads
    cpu_threads = max(1, (os.cpu_count() or 1) // max(1, config.threads)) if device.type == "cpu" else 0
    predictor = Predictor(loaded.net, card, device, config.mode, config.tta, config.batch_size, config.amp, cpu_threads)
    timings["model"] = time.perf_counter() - t

    t = time.perf_counter()
    sp = plan_scan(slide, mpp.xy, card.mpp, card.cell_px, card.input_px, config)
    tissue, grid, cells, block_list, plan = sp.tissue, sp.grid, sp.cells, sp.blocks, sp.read
    timings["tissue"] = time.perf_counter() - t

    t = time.perf_counter()
    key = partial_key(settings_hash(loaded.sha256, config), file_identity(slide_path), grid, plan.level)
    if config.overwrite if restart is None else restart:
        drop_partial(out)
    resumed = load_partial(out, key, grid.shape_rc)
    probs, done = resumed if resumed is not None else (np.full(grid.shape_rc, np.nan, dtype=np.float32), np.zeros(grid.shape_rc, dtype=bool))
    resumed_cells = int((done & cells).sum())
    todo = [b for b in block_list if not done[b[0] : b[0] + b[2], b[1] : b[1] + b[3]].all()]
    decoder = None
    if todo:
        tasks = build_graph(plan, cells, todo, predictor)
        bar = _Progress(len(todo), slide_path.name, progress)
        ckpt = Checkpoint(out, key, probs, done, {block_key(b): b for b in todo}, config.checkpoint_s)
        try:
            with bar.callback(), ckpt.callback(), expected_reads(plan, todo, config.tile_cache_mb << 20):
                results = dask.compute(*tasks, scheduler=scheduler, num_workers=max(1, config.threads))
        finally:
            bar.close()
            ckpt.save()  # finished blocks survive an error or Ctrl-C as well as a kill
        if scheduler in ("threads", "sync", "synchronous", "single-threaded"):
            # the handles that decoded the blocks live in this process only on a local scheduler
            decoder = cached_slide(plan.slide_path, plan.backend).decoder_warnings
        # the checkpoint callback has recorded these already on Dask's local schedulers; a
        # distributed scheduler runs no local callbacks, so the results are placed here too
        for (r0, c0, nr, nc), res in zip(todo, results):
            probs[r0 : r0 + nr, c0 : c0 + nc] = res
    timings["scan"] = time.perf_counter() - t

    t = time.perf_counter()
    cell_um2 = grid.l0_cell_size_xy[0] * mpp.x * grid.l0_cell_size_xy[1] * mpp.y
    n_tissue = int(cells.sum())
    finite = probs[np.isfinite(probs)]
    tumour_cells = int((finite >= card.threshold).sum())
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "status": "writing",
        "slide": {
            "path": str(slide_path.resolve()),
            "name": slide_path.name,
            "size_bytes": info.size_bytes,
            "level0_size_wh": list(info.level0_size_wh),
            "l0_bounds_xywh": list(info.l0_bounds_xywh),
            "mpp_xy": [mpp.x, mpp.y],
            "mpp_source": mpp.source,
            "mpp_recorded_xy": list(mpp.recorded_xy) if mpp.recorded_xy else None,
            "mpp_recorded_source": mpp.recorded_source or None,
            "vendor": info.vendor,
            "backend": info.backend,
            # corrupt data the decoder passed over (wrong pixels in those tiles); null when no
            # block was read in this process (all resumed, or a distributed scheduler)
            "decoder_warnings": decoder.to_dict() if decoder is not None else None,
            "levels": [{"size_wh": list(lv.size_wh), "downsample_xy": list(lv.downsample_xy)} for lv in info.levels],
        },
        "grid": {
            "l0_origin_xy": list(grid.l0_origin_xy),
            "l0_cell_size_xy": list(grid.l0_cell_size_xy),
            "shape_rc": list(grid.shape_rc),
            "patch_px": grid.patch_px,
            "cell_px": grid.cell_px,
            "target_mpp": grid.target_mpp,
            "read_level": plan.level,
            "read_downsample_xy": list(plan.downsample_xy),
        },
        "tissue": {
            **tissue.params,
            "roi": {"path": config.roi, "sha256": settings_roi_digest(config)} if config.roi else None,
            "mask_mpp_xy": list(tissue.mask_mpp_xy),
            "fraction_of_slide": tissue.fraction,
            "area_mm2": n_tissue * cell_um2 / 1e6,
            "tissue_cells": n_tissue,
            "note": "no tissue found: every cell is NaN" if n_tissue == 0 else "",
        },
        "model": {**card_summary(card), "path": loaded.path, "sha256": loaded.sha256},
        "config": {**config.to_dict(), "mode": predictor.mode, "device": str(device)},
        "settings_hash": settings_hash(loaded.sha256, config),
        "summary": {
            # the node's call, the one place it is computed (lesions.call_slide)
            **call_slide(probs, grid, mpp.xy, card.threshold).summary(),
            "tumour_cells": tumour_cells,
            "tumour_area_mm2": tumour_cells * cell_um2 / 1e6,
            "max_prob": float(finite.max()) if finite.size else None,
            "mean_prob": float(finite.mean()) if finite.size else None,
        },
        "resumed_cells": resumed_cells,
        "software": software_versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    timings["write"] = 0.0
    write_heatmap(out, probs, cells, grid, mpp.xy, attrs, overwrite=config.overwrite)
    drop_partial(out)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return ScanResult(
        out=out,
        slide_path=str(slide_path),
        n_cells=int(probs.size),
        n_tissue_cells=n_tissue,
        tissue_area_mm2=n_tissue * cell_um2 / 1e6,
        tumour_area_mm2=tumour_cells * cell_um2 / 1e6,
        max_prob=float(finite.max()) if finite.size else None,
        mean_prob=float(finite.mean()) if finite.size else None,
        mpp_xy=mpp.xy,
        mpp_source=mpp.source,
        timings_s=timings,
        mode=predictor.mode,
        device=str(device),
        resumed_cells=resumed_cells,
        decoder_warnings=decoder.count if decoder is not None else 0,
        decoder_warning=(decoder.first or "") if decoder is not None else "",
    )


__all__ = ["ScanResult", "WsiScanError", "scan_slide", "settings_hash"]
