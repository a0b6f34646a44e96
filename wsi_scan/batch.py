"""Scanning a folder of slides: resumable, one failure never stops the others, a run report.

Each slide becomes ``OUT_DIR/<path relative to SLIDES_DIR without extension>.zarr``. The unit of
work is a whole slide (:func:`process_slide`), which runs the same way in this process or as a
task on a Dask distributed worker: it takes the slide's lock, removes debris of killed runs,
decides whether the existing heatmap can be kept (complete, same ``settings_hash``) and scans
otherwise. Heatmaps are written under a temporary name and renamed (``io.heatmap``), so a killed
run leaves nothing that looks complete. The run's files (listing, locks, log, summaries) are
``io.folder_run``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ScanConfig
from .errors import MppError, UsageError, WsiScanError
from .io.folder_run import (
    SlideLock,
    check_run_folders,
    clean_debris,
    file_log,
    output_path,
    prepare_out_dir,
    read_mpp_csv,
    require_slides,
    slide_size_bytes,
    stored_attrs,
    write_summary,
)

log = logging.getLogger("wsi_scan.batch")

Status = Literal["ok", "skipped", "failed", "busy"]
STAGES = ("open", "model", "tissue", "scan", "write", "total")
SCHEDULER_TIMEOUT_S = 20  # connecting to --scheduler: a wrong address fails in this time, not never

#: models loaded in this process, by path: a Dask worker loads each model once for all its slides
_MODEL_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class SlideJob:
    """One slide of a folder run, as plain picklable values."""

    path: str  # the slide file
    rel: str  # its path relative to SLIDES_DIR (posix), the slide's name in reports
    out: str  # its heatmap store
    out_dir: str  # OUT_DIR of the run: holds the locks
    config: ScanConfig  # with the slide's own mpp override, if any


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one slide; a row of summary.csv."""

    slide: str
    path: str
    out: str
    status: Status
    error_type: str = ""
    error: str = ""
    n_tissue_cells: int | None = None
    tissue_area_mm2: float | None = None
    tumour_area_mm2: float | None = None
    max_prob: float | None = None
    mean_prob: float | None = None
    mpp: float | None = None
    mpp_source: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    cells_per_s: float | None = None
    settings_hash: str = ""
    call: str = ""  # the node's call: negative, itc, micro or macro (lesions.py)
    score: float | None = None  # the slide's tumour score (its highest probability)
    n_lesions: int | None = None
    largest_lesion_mm: float | None = None
    decoder_warnings: int | None = None  # corrupt tiles decoded with damage (see slide.decoder_warnings)
    decoder_warning: str = ""  # the first such warning

    def row(self) -> dict[str, Any]:
        """Flat columns for CSV/JSON; timings become ``seconds_<stage>`` columns."""
        # JSON has no NaN: a value that is not finite is simply unknown
        d: dict[str, Any] = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in dataclasses.asdict(self).items()
        }
        timings: dict[str, float] = d.pop("timings_s")
        for stage in STAGES:
            v = timings.get(stage)
            d[f"seconds_{stage}"] = round(v, 3) if v is not None else None
        return d


@dataclass(frozen=True)
class BatchResult:
    slides_dir: Path
    out_dir: Path
    outcomes: tuple[SlideOutcome, ...]
    summary_csv: Path
    summary_json: Path
    report_html: Path | None
    seconds: float

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def n_ok(self) -> int:
        return self.count("ok")

    @property
    def n_skipped(self) -> int:
        return self.count("skipped")

    @property
    def n_failed(self) -> int:
        return self.count("failed")

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# ----------------------------------------------------------------------------- planning


def plan_jobs(
    slides_dir: Path, slides: Sequence[Path], out_dir: Path, config: ScanConfig, mpp_overrides: dict[str, float]
) -> tuple[list[SlideJob], list[SlideOutcome]]:
    """Jobs for ``slides`` (found under ``slides_dir``), plus outcomes already decided (two
    slides that map to one output)."""
    jobs: list[SlideJob] = []
    clashes: list[SlideOutcome] = []
    taken: dict[str, str] = {}
    used_keys: set[str] = set()
    for p in slides:
        rel = p.relative_to(slides_dir)
        key = rel.as_posix()
        out = output_path(out_dir, rel)
        if out.as_posix() in taken:
            clashes.append(
                SlideOutcome(
                    key,
                    str(p),
                    str(out),
                    "failed",
                    "OutputExistsError",
                    f"{key} and {taken[out.as_posix()]} would both write {out}; rename one of them",
                )
            )
            continue
        taken[out.as_posix()] = key
        cfg = config
        for k in (key, rel.name):  # the relative path wins over a bare file name
            if k in mpp_overrides:
                cfg = dataclasses.replace(config, mpp_override=mpp_overrides[k], mpp_source=f"user (--mpp-csv, row {k})")
                used_keys.add(k)
                break
        jobs.append(SlideJob(str(p), key, str(out), str(out_dir), cfg))
    unused = sorted(set(mpp_overrides) - used_keys)
    if unused:
        # on the console too (this logger's records are not kept to the log file): a row meant to
        # correct a slide's recorded pixel size that matches no slide leaves that size in use
        logging.getLogger("wsi_scan.mpp_csv").warning(
            f"--mpp-csv: {len(unused)} row(s) match no slide of the folder and are not used ({', '.join(unused[:5])}"
            f"{', ...' if len(unused) > 5 else ''}); a row names a slide by its path relative to the folder or its "
            "file name, in the same case"
        )
    return jobs, clashes


# ----------------------------------------------------------------------------- one slide


def _model_for(model: Any) -> Any:
    """A LoadedModel from a LoadedModel, a path or None, loading each path once per process."""
    from .io.model_files import LoadedModel, load_model, resolve_model

    if isinstance(model, LoadedModel):
        return model
    key = str(resolve_model(model).resolve())
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(model)
    return _MODEL_CACHE[key]


def _outcome_from_attrs(job: SlideJob, status: Status, attrs: dict[str, Any]) -> SlideOutcome:
    summary = attrs.get("summary", {})
    slide = attrs.get("slide", {})
    timings = {k: float(v) for k, v in attrs.get("timings_s", {}).items()}
    if timings and "total" not in timings:  # the store records its stages before writing itself
        timings["total"] = sum(timings.values())
    n_tissue = attrs.get("tissue", {}).get("tissue_cells")
    scan_s = timings.get("scan", 0.0)
    mpp_xy = slide.get("mpp_xy") or [None]
    return SlideOutcome(
        slide=job.rel,
        path=job.path,
        out=job.out,
        status=status,
        n_tissue_cells=n_tissue,
        tissue_area_mm2=attrs.get("tissue", {}).get("area_mm2"),
        tumour_area_mm2=summary.get("tumour_area_mm2"),
        max_prob=summary.get("max_prob"),
        mean_prob=summary.get("mean_prob"),
        mpp=mpp_xy[0],
        mpp_source=slide.get("mpp_source", ""),
        timings_s=timings,
        cells_per_s=((n_tissue - int(attrs.get("resumed_cells") or 0)) / scan_s) if n_tissue and scan_s > 0 else None,
        settings_hash=attrs.get("settings_hash", ""),
        call=str(summary.get("call") or ""),
        score=summary.get("score"),
        n_lesions=summary.get("n_lesions"),
        largest_lesion_mm=summary.get("largest_lesion_mm"),
        decoder_warnings=(slide.get("decoder_warnings") or {}).get("count"),
        decoder_warning=(slide.get("decoder_warnings") or {}).get("first") or "",
    )


def _failure(job: SlideJob, exc: BaseException) -> SlideOutcome:
    msg = str(exc).replace("\n", " ").strip() or type(exc).__name__
    if isinstance(exc, MppError):
        msg += " (in a folder run: a row 'name,mpp' in --mpp-csv sets it for this slide alone)"
    elif isinstance(exc, MemoryError):
        msg = f"out of memory while scanning ({msg}); retry with a smaller --block-cells or fewer --threads"
    elif not isinstance(exc, WsiScanError):
        msg = f"unexpected error: {msg}"
    return SlideOutcome(job.rel, job.path, job.out, "failed", type(exc).__name__, msg)


def _why_redo(job: SlideJob, attrs: dict[str, Any], want_hash: str) -> str | None:
    """Why an existing store must be scanned again; None where it is complete and current."""
    complete = attrs.get("status") == "complete"
    same_hash = complete and attrs.get("settings_hash") == want_hash
    # a slide replaced by another file of the same name must not keep the old result
    same_slide = complete and attrs.get("slide", {}).get("size_bytes") == slide_size_bytes(job.path)
    if not job.config.overwrite and same_hash and same_slide:
        return None
    return (
        "--overwrite"
        if job.config.overwrite
        else "incomplete"
        if not complete
        else "made with another model or settings"
        if not same_hash
        else "the slide file changed size"
    )


def _scan_unless_current(job: SlideJob, model: Any, progress: bool) -> SlideOutcome:
    """The slide's outcome while its lock is held: kept as it is, or scanned (again)."""
    from .io.heatmap import read_attrs
    from .scan import scan_slide, settings_hash

    out = Path(job.out)
    clean_debris(out)
    loaded = _model_for(model)
    want = settings_hash(loaded.sha256, job.config)
    cfg = job.config
    attrs = stored_attrs(out)
    if attrs is not None:
        why = _why_redo(job, attrs, want)
        if why is None:
            return _outcome_from_attrs(job, "skipped", attrs)
        log.info("%s: redoing existing %s (%s)", job.rel, out, why)
        cfg = dataclasses.replace(cfg, overwrite=True)
    # a stale store is replaced, but its interrupted scan's finished blocks are kept unless
    # the user asked to start afresh
    res = scan_slide(job.path, out, cfg, model=loaded, progress=progress, restart=job.config.overwrite)
    o = _outcome_from_attrs(job, "ok", read_attrs(out) or {})
    return dataclasses.replace(o, timings_s=dict(res.timings_s), cells_per_s=res.cells_per_s)


def process_slide(job: SlideJob, model: Any = None, blocking: bool = False, progress: bool = False) -> SlideOutcome:
    """Scan one slide of a folder unless its heatmap is complete and current.

    Returns status "busy" (without waiting) when another run holds the slide's lock and
    ``blocking`` is false. Never raises for a problem of this slide: it becomes status "failed".
    """
    lock = SlideLock(Path(job.out_dir), job.rel)
    try:
        if not lock.acquire(blocking):
            return SlideOutcome(job.rel, job.path, job.out, "busy", error=f"locked by another run ({lock.holder()})")
    except OSError as exc:
        return SlideOutcome(
            job.rel,
            job.path,
            job.out,
            "failed",
            type(exc).__name__,
            f"cannot lock {lock.path} ({exc}); check that OUT_DIR is writable",
        )
    try:
        return _scan_unless_current(job, model, progress)
    except (Exception, MemoryError) as exc:  # noqa: BLE001 - contained: one slide never stops the run
        return _failure(job, exc)
    finally:
        lock.release()


# ----------------------------------------------------------------------------- the runners


class _FolderBar:
    """The folder-wide bar: slides done, failures, ETA (tqdm computes the ETA from the rate)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="slides", unit="slide", disable=not enabled, position=0, dynamic_ncols=True)
        self.failed = 0

    def update(self, o: SlideOutcome) -> None:
        self.failed += o.status == "failed"
        self.bar.set_postfix_str(f"failed {self.failed}, last {o.slide}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _log_outcome(o: SlideOutcome) -> None:
    if o.status == "failed":
        log.error("%s: failed: %s: %s", o.slide, o.error_type, o.error)
    elif o.status == "skipped":
        log.info("%s: skipped, %s is complete with the same model and settings", o.slide, o.out)
    else:
        log.info(
            "%s: ok in %.1f s, tumour area %.3f mm2, max prob %s -> %s",
            o.slide,
            o.timings_s.get("total", 0.0),
            o.tumour_area_mm2 or 0.0,
            o.max_prob,
            o.out,
        )


def _run_serial(jobs: Sequence[SlideJob], model: Any, progress: bool, bar: _FolderBar) -> list[SlideOutcome]:
    done: list[SlideOutcome] = []
    busy: list[SlideJob] = []
    for job in jobs:
        o = process_slide(job, model, blocking=False, progress=progress)
        if o.status == "busy":
            # another run is on it: do the others first, then wait for that run to finish it
            log.info("%s: %s; coming back to it later", job.rel, o.error)
            busy.append(job)
            continue
        _log_outcome(o)
        bar.update(o)
        done.append(o)
    for job in busy:
        o = process_slide(job, model, blocking=True, progress=progress)
        _log_outcome(o)
        bar.update(o)
        done.append(o)
    return done


def _pin_worker_gpu(config: ScanConfig) -> None:
    """One GPU per worker: worker k of a local cluster uses GPU k (mod the GPUs it sees).

    Left alone where CUDA_VISIBLE_DEVICES is set: dask-cuda and Slurm's --gres already give each
    worker its own device there.
    """
    if config.device == "cpu" or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not inside a worker
        return
    if isinstance(name, int):
        torch.cuda.set_device(name % torch.cuda.device_count())


def _worker_task(job: SlideJob, model: Any, blocking: bool) -> SlideOutcome:
    try:
        _pin_worker_gpu(job.config)
    except Exception as exc:  # noqa: BLE001 - contained like any other failure of this slide
        return _failure(job, exc)
    return process_slide(job, model, blocking=blocking, progress=False)


def _connect(stack: contextlib.ExitStack, workers: int | None, address: str | None) -> Any:
    """A Dask client of the scheduler at ``address``, or of a new local cluster of ``workers``."""
    from distributed import Client, LocalCluster

    if address:
        try:
            client = stack.enter_context(Client(address, timeout=SCHEDULER_TIMEOUT_S))
        except (OSError, ValueError, TypeError) as exc:  # bad address, refused, timed out
            raise UsageError(
                f"--scheduler {address}: cannot reach a Dask scheduler there ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); expected tcp://host:port of a running one"
            ) from None
    else:
        # processes, one thread each: a slide task already runs its own thread pool (--threads)
        cluster = stack.enter_context(
            LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None)
        )
        client = stack.enter_context(Client(cluster))
    log.info(
        "Dask cluster %s with %d workers",
        client.scheduler.address if client.scheduler else address,
        len(client.scheduler_info().get("workers", {})),
    )
    return client


def _model_ref(model: Any, client: Any) -> Any:
    """What the workers get for ``model``: a path where they can load it, else the model itself."""
    from .io.model_files import LoadedModel, resolve_model

    if isinstance(model, LoadedModel):
        # a model file on disk is reloaded by path in each worker (cached there); an
        # in-memory model is sent once to every worker instead of once per slide
        return model.path if Path(model.path).is_file() else client.scatter(model, broadcast=True)
    if model is not None:
        # resolved here, not by Path: a bundled model's name (fast) is not a file in the caller's folder
        return str(resolve_model(model).resolve())
    return model


def _run_distributed(
    jobs: Sequence[SlideJob], model: Any, workers: int | None, address: str | None, bar: _FolderBar
) -> list[SlideOutcome]:
    from distributed import as_completed

    with contextlib.ExitStack() as stack:
        client = _connect(stack, workers, address)
        ref = _model_ref(model, client)
        order = {j.rel: i for i, j in enumerate(jobs)}
        run = uuid.uuid4().hex[:8]  # task keys must not meet those of another run on the same cluster
        futures = [client.submit(_worker_task, j, ref, False, key=f"slide-{run}-{i}", pure=False) for i, j in enumerate(jobs)]
        job_of = {f.key: j for f, j in zip(futures, jobs)}
        done: list[SlideOutcome] = []
        ac = as_completed(futures)
        for fut in ac:
            job = job_of[fut.key]
            try:
                o = fut.result()
            except (Exception, MemoryError) as exc:  # noqa: BLE001 - a worker died (KilledWorker) or the task could not run
                o = _failure(job, exc)
            if o.status == "busy":
                log.info("%s: %s; coming back to it later", job.rel, o.error)
                again = client.submit(_worker_task, job, ref, True, key=f"slide-{run}-{order[job.rel]}-wait", pure=False)
                job_of[again.key] = job
                ac.add(again)
                continue
            _log_outcome(o)
            bar.update(o)
            done.append(o)
        return sorted(done, key=lambda o: order.get(o.slide, 0))


# ----------------------------------------------------------------------------- the folder


def _check_arguments(config: ScanConfig, workers: int | None, scheduler_address: str | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, found {workers}")
    if workers is not None and scheduler_address:
        raise UsageError("pass either --workers (start a local cluster) or --scheduler (use a running one), not both")
    given = [f for f, v in (("--roi", config.roi), ("--tissue-mask", config.tissue_mask)) if v is not None]
    if given:
        # in one slide's level-0 pixels or frame: applied to every slide, it cut each other slide's
        # scan to a region of the first (a mask of the same aspect ratio was even taken as theirs)
        raise UsageError(
            f"{' and '.join(given)} {'describes' if len(given) == 1 else 'describe'} one slide (its level-0 pixels); "
            "a folder run cannot apply that to every slide: scan the slide on its own "
            f"(`wsi-scan SLIDE --out H.zarr {given[0]} ...`)"
        )
    if config.mpp_override is not None:
        from .io.mpp import resolve_mpp

        try:
            resolve_mpp({}, config.mpp_override, "--mpp")
        except MppError as exc:
            raise UsageError(str(exc)) from None


def _run_jobs(
    jobs: Sequence[SlideJob],
    decided: Sequence[SlideOutcome],
    model: Any,
    loaded: Any,
    workers: int | None,
    scheduler_address: str | None,
    progress: bool,
) -> list[SlideOutcome]:
    """The outcomes of ``decided`` and of every job, run serially or on a Dask cluster."""
    outcomes = list(decided)
    bar = _FolderBar(len(jobs) + len(decided), progress)
    try:
        for o in decided:
            _log_outcome(o)
            bar.update(o)
        if workers is not None or scheduler_address:
            # workers load the caller's model themselves (see _model_ref), each once for all its slides
            outcomes += _run_distributed(jobs, model, workers, scheduler_address, bar)
        else:
            outcomes += _run_serial(jobs, loaded, progress, bar)
    finally:
        bar.close()
    return outcomes


def _run_meta(slides_dir: Path, out_dir: Path, loaded: Any, outcomes: Sequence[SlideOutcome]) -> dict[str, Any]:
    from . import __version__

    return {
        "wsi_scan": __version__,
        "slides_dir": str(slides_dir.resolve()),
        "out_dir": str(out_dir.resolve()),
        "model": {"path": loaded.path, "sha256": loaded.sha256, "name": loaded.card.name, "threshold": loaded.card.threshold},
        "counts": {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "skipped", "failed")},
    }


def scan_folder(
    slides_dir: str | Path,
    out_dir: str | Path,
    config: ScanConfig = ScanConfig(),
    model: Any = None,
    recursive: bool = False,
    mpp_csv: str | Path | None = None,
    workers: int | None = None,
    scheduler_address: str | None = None,
    progress: bool = False,
    report: bool = True,
) -> BatchResult:
    """Scan every slide under ``slides_dir`` into ``out_dir``; resumable, failures contained.

    ``model`` is a path, a ``LoadedModel`` or None (bundled default). ``workers`` starts a local
    Dask distributed cluster of that many processes; ``scheduler_address`` uses an existing one;
    neither: slides run one after the other in this process. ``report=False`` skips report.html
    (summary.csv/json are always written). Raises only for problems of the whole run (bad
    folder, bad --mpp-csv, unloadable model); a slide's problem is in its outcome.
    """
    t0 = time.perf_counter()
    slides_dir = Path(slides_dir)
    out_dir = Path(out_dir)
    _check_arguments(config, workers, scheduler_address)
    check_run_folders(slides_dir, out_dir)
    mpp_overrides = read_mpp_csv(mpp_csv) if mpp_csv is not None else {}
    slides = require_slides(slides_dir, recursive, exclude=out_dir)
    prepare_out_dir(out_dir)
    with file_log(out_dir):
        jobs, decided = plan_jobs(slides_dir, slides, out_dir, config, mpp_overrides)
        log.info(
            "folder run: %d slides in %s -> %s (%s)",
            len(jobs) + len(decided),
            slides_dir,
            out_dir,
            f"cluster {scheduler_address}" if scheduler_address else f"{workers} local workers" if workers else "serial",
        )
        loaded = _model_for(model)  # once for the run; fails the run early when the model is unusable
        outcomes = _run_jobs(jobs, decided, model, loaded, workers, scheduler_address, progress)
        outcomes.sort(key=lambda o: o.slide)
        meta = _run_meta(slides_dir, out_dir, loaded, outcomes)
        fields = list(SlideOutcome("", "", "", "ok").row())
        csv_path, json_path = write_summary(out_dir, fields, [o.row() for o in outcomes], meta)
        html_path = None
        if report:
            from .report import write_report

            html_path = write_report(out_dir, outcomes, meta)
        res = BatchResult(slides_dir, out_dir, tuple(outcomes), csv_path, json_path, html_path, time.perf_counter() - t0)
        log.info("folder run done: %d ok, %d skipped, %d failed in %.1f s", res.n_ok, res.n_skipped, res.n_failed, res.seconds)
    return res


__all__ = ["BatchResult", "SlideJob", "SlideOutcome", "plan_jobs", "process_slide", "scan_folder"]
