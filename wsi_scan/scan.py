"""Scanning one slide: open -> tissue -> grid -> regions -> model -> heatmap."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
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


def user_file_digests(cfg: ScanConfig) -> dict[str, str]:
    """sha256 of the user's tissue mask and ROI files, by setting name (those given only)."""
    from .plan import file_sha256

    return {k: file_sha256(v) for k in ("tissue_mask", "roi") if (v := getattr(cfg, k)) is not None}


def settings_hash(model_sha256: str, cfg: ScanConfig, digests: dict[str, str] | None = None) -> str:
    """Identifies the model and every setting that changes the numbers of a heatmap. ``digests``
    (``user_file_digests``) saves reading the mask and ROI files again where they were hashed."""
    d = cfg.to_dict()
    # how the work is cut and run does not change the numbers beyond float rounding (tests:
    # block size, batch size, threads and backends give the same heatmap)
    for k in (
        "overwrite",
        "threads",
        "device",
        "decode",  # the device's JPEG decoder rounds as a device's arithmetic does (device_regions)
        "batch_size",
        "block_cells",
        "backend",
        "mpp_source",
        "tile_cache_mib",
        "checkpoint_s",
    ):
        d.pop(k, None)
    # a user's mask or ROI enters by content: the same file moved gives the same heatmap, an edited one not
    d.update(user_file_digests(cfg) if digests is None else digests)
    payload = json.dumps({"model": model_sha256, "config": d}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def _scan_opened(
    slide: Any,
    slide_path: Path,
    out: Path,
    config: ScanConfig,
    model: Any,
    progress: bool,
    scheduler: str,
    restart: bool | None,
    t_start: float,
    t: float,
) -> ScanResult:
    """The stages of a scan of an opened slide: pixel size, model, plan, classify, write."""
    from .io.heatmap import write_heatmap
    from .io.mpp import check_extent, resolve_mpp
    from .io.resume import drop_partial
    from .plan import plan_scan

    timings: dict[str, float] = {}
    mpp = resolve_mpp(slide.info.metadata, config.mpp_override, str(slide_path), config.mpp_xy_tolerance)
    if config.mpp_override is not None:
        mpp = dataclasses.replace(mpp, source=config.mpp_override_source)
    check_extent(slide.info.level0_size_wh, mpp, str(slide_path))
    timings["open"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded, predictor = _model_stage(model, mpp.xy, config, str(slide_path))
    timings["model"] = time.perf_counter() - t

    t = time.perf_counter()
    sp = plan_scan(slide, mpp.xy, loaded.card.mpp, loaded.card.cell_px, loaded.card.input_px, config)
    timings["tissue"] = time.perf_counter() - t
    side_px = min(n * m / loaded.card.mpp for n, m in zip(slide.info.level0_size_wh, mpp.xy))
    if side_px < loaded.card.input_px:
        logging.getLogger("wsi_scan.scan").warning(
            "%s: the slide is %.0f px across at the model's %g um/px, less than one %d px window: its cells "
            "are scored mostly on the white padding around it",
            slide_path,
            side_px,
            loaded.card.mpp,
            loaded.card.input_px,
        )

    t = time.perf_counter()
    if config.decode != "cpu":  # decodes probe tiles both ways: timed with the scan, not the tissue
        from .device_regions import choose_decode

        sp = dataclasses.replace(sp, read=choose_decode(slide, sp.read, predictor.device, config.decode))
    digests = user_file_digests(config)  # the mask and ROI files hashed once, for the hash and the attrs
    settings = settings_hash(loaded.sha256, config, digests)
    run = _classify(sp, predictor, slide_path, out, config, settings, restart, progress, scheduler)
    timings["scan"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = HeatmapSummary.of(run.probs, int(sp.cells.sum()), sp.grid.l0_cell_size_xy, mpp.xy, loaded.card.threshold)
    attrs = _attrs(slide.info, slide_path, mpp, sp, loaded, predictor, config, settings, digests, run, summary, timings)
    timings["write"] = 0.0
    write_heatmap(out, run.probs, sp.cells, sp.grid, mpp.xy, attrs, overwrite=config.overwrite)
    drop_partial(out)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return ScanResult(
        out=out,
        slide_path=str(slide_path),
        n_cells=int(run.probs.size),
        n_tissue_cells=summary.n_tissue,
        tissue_area_mm2=summary.tissue_area_mm2,
        tumour_area_mm2=summary.tumour_area_mm2,
        max_prob=summary.max_prob,
        mean_prob=summary.mean_prob,
        mpp_xy=mpp.xy,
        mpp_source=mpp.source,
        timings_s=timings,
        mode=predictor.mode,
        device=str(predictor.device),
        resumed_cells=run.resumed_cells,
        decoder_warnings=run.decoder.count if run.decoder is not None else 0,
        decoder_warning=(run.decoder.first or "") if run.decoder is not None else "",
    )


def _model_stage(model: Any, mpp_xy: tuple[float, float], config: ScanConfig, where: str) -> tuple[Any, Any]:
    """The model (loaded unless given loaded), checked against the slide's pixel size, bound to
    its device and mode."""
    from .device import resolve_device
    from .geometry import check_resolution
    from .inference import Predictor
    from .io.model_files import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    check_resolution(mpp_xy, loaded.card.mpp, config.max_upsample, where)
    device = resolve_device(config.device)
    # the cores are shared by the Dask threads: each gets its share of torch threads
    cpu_threads = max(1, (os.cpu_count() or 1) // max(1, config.threads)) if device.type == "cpu" else 0
    return loaded, Predictor(loaded.net, loaded.card, device, config.mode, config.tta, config.batch_size, config.amp, cpu_threads)


@dataclass
class _Classified:
    probs: np.ndarray  # (rows, cols) float32, NaN off tissue
    resumed_cells: int  # tissue cells taken over from an interrupted scan of the same output
    decoder: Any  # the reader's decoder warnings, None when no block was read in this process


def _classify(
    sp: Any,
    predictor: Any,
    slide_path: Path,
    out: Path,
    config: ScanConfig,
    settings: str,
    restart: bool | None,
    progress: bool,
    scheduler: str,
) -> _Classified:
    """Every tissue block not finished by an interrupted scan of ``out``, read and classified on
    Dask, the finished ones saved as they come (io/resume.py)."""
    import dask

    from .graph import block_key, build_graph
    from .io.resume import Checkpoint, drop_partial, load_partial, partial_key
    from .io.slide import file_identity
    from .regions import cached_slide, expected_reads

    grid, cells, plan = sp.grid, sp.cells, sp.read
    key = partial_key(settings, file_identity(slide_path), grid, plan.level)
    if config.overwrite if restart is None else restart:
        drop_partial(out)
    resumed = load_partial(out, key, grid.shape_rc)
    probs, done = (
        resumed
        if resumed is not None
        else (np.full(grid.shape_rc, np.nan, dtype=np.float32), np.zeros(grid.shape_rc, dtype=bool))
    )
    resumed_cells = int((done & cells).sum())
    todo = [b for b in sp.blocks if not done[b[0] : b[0] + b[2], b[1] : b[1] + b[3]].all()]
    if not todo:
        return _Classified(probs, resumed_cells, None)
    tasks = build_graph(plan, cells, todo, predictor)
    bar = _Progress(len(todo), slide_path.name, progress)
    ckpt = Checkpoint(out, key, probs, done, {block_key(b): b for b in todo}, config.checkpoint_s)
    # blocks decoded on the model's device share no decoded tiles: nothing to announce
    announce = contextlib.nullcontext() if plan.decode_device else expected_reads(plan, todo, config.tile_cache_mib << 20)
    try:
        with bar.callback(), ckpt.callback(), announce:
            results = dask.compute(*tasks, scheduler=scheduler, num_workers=max(1, config.threads))
    finally:
        bar.close()
        ckpt.save()  # finished blocks survive an error or Ctrl-C as well as a kill
    decoder = None
    if scheduler in ("threads", "sync", "synchronous", "single-threaded"):
        # the handles that decoded the blocks live in this process only on a local scheduler
        decoder = cached_slide(plan.slide_path, plan.backend).decoder_warnings
    # the resume callback has recorded these already on Dask's local schedulers; a
    # distributed scheduler runs no local callbacks, so the results are placed here too
    for (r0, c0, nr, nc), res in zip(todo, results):
        probs[r0 : r0 + nr, c0 : c0 + nc] = res
    return _Classified(probs, resumed_cells, decoder)


@dataclass(frozen=True)
class HeatmapSummary:
    """The heatmap's summary numbers, computed once for the attrs and the returned result, and
    again from a stored heatmap by a reader that does not take the attrs' word for them."""

    n_tissue: int
    cell_um2: float
    tumour_cells: int
    max_prob: float | None
    mean_prob: float | None

    @classmethod
    def of(
        cls,
        probs: np.ndarray,
        tissue_cells: int,
        l0_cell_size_xy: tuple[float, float],
        mpp_xy: tuple[float, float],
        threshold: float,
    ) -> HeatmapSummary:
        (sx, sy) = l0_cell_size_xy
        finite = probs[np.isfinite(probs)]
        return cls(
            tissue_cells,
            sx * mpp_xy[0] * sy * mpp_xy[1],
            int((finite >= threshold).sum()),
            float(finite.max()) if finite.size else None,
            float(finite.mean()) if finite.size else None,
        )

    @property
    def tissue_area_mm2(self) -> float:
        return self.n_tissue * self.cell_um2 / 1e6

    @property
    def tumour_area_mm2(self) -> float:
        return self.tumour_cells * self.cell_um2 / 1e6


def _attrs(
    info: Any,
    slide_path: Path,
    mpp: Any,
    sp: Any,
    loaded: Any,
    predictor: Any,
    config: ScanConfig,
    settings: str,
    digests: dict[str, str],
    run: _Classified,
    summary: HeatmapSummary,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The store's attrs: slide, grid, tissue, model, settings, summary, provenance (README: output format)."""
    from .io.heatmap import FORMAT_VERSION
    from .io.model_files import card_summary
    from .lesions import call_slide

    grid, tissue, plan = sp.grid, sp.tissue, sp.read
    return {
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
            "decoder_warnings": run.decoder.to_dict() if run.decoder is not None else None,
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
            # where the blocks' JPEG tiles were decoded and resampled, and why not on the model's
            # device when --decode auto kept the CPU
            "read_decode": f"device ({plan.decode_device})" if plan.decode_device else "cpu",
            "read_decode_note": plan.decode_note,
        },
        "tissue": {
            **tissue.params,
            "roi": {"path": config.roi, "sha256": digests["roi"]} if config.roi else None,
            "mask_mpp_xy": list(tissue.mask_mpp_xy),
            "fraction_of_slide": tissue.fraction,
            "area_mm2": summary.tissue_area_mm2,
            "tissue_cells": summary.n_tissue,
            "note": "no tissue found: every cell is NaN" if summary.n_tissue == 0 else "",
        },
        "model": {**card_summary(loaded.card), "path": loaded.path, "sha256": loaded.sha256},
        "config": {**config.to_dict(), "mode": predictor.mode, "device": str(predictor.device)},
        "settings_hash": settings,
        "summary": {
            # the node's call, the one place it is computed (lesions.call_slide)
            **call_slide(run.probs, grid, mpp.xy, loaded.card.threshold).summary(),
            "tumour_cells": summary.tumour_cells,
            "tumour_area_mm2": summary.tumour_area_mm2,
            "max_prob": summary.max_prob,
            "mean_prob": summary.mean_prob,
        },
        "resumed_cells": run.resumed_cells,
        "software": software_versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


__all__ = ["ScanResult", "WsiScanError", "scan_slide", "settings_hash"]
