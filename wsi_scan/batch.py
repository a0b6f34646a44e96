"""Scanning a folder of slides: resumable, one failure never stops the others, a run report.

Each slide becomes ``OUT_DIR/<path relative to SLIDES_DIR without extension>.zarr``. The unit of
work is a whole slide (:func:`process_slide`), which runs the same way in this process or as a
task on a Dask distributed worker: it takes the slide's lock, removes debris of killed runs,
decides whether the existing heatmap can be kept (complete, same ``settings_hash``) and scans
otherwise. Heatmaps are written under a temporary name and renamed (``io.heatmap``), so a killed
run leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import ScanConfig
from .errors import MppError, SlideNotFoundError, UsageError, WsiScanError
from .io.outputs import MARK

log = logging.getLogger("wsi_scan.batch")

Status = Literal["ok", "skipped", "failed", "busy"]
STAGES = ("open", "model", "tissue", "scan", "write", "total")
LOG_NAME = "wsi-scan.log"
SUMMARY_CSV, SUMMARY_JSON, REPORT_HTML = "summary.csv", "summary.json", "report.html"
SCHEDULER_TIMEOUT_S = 20  # connecting to --scheduler: a wrong address fails in this time, not never
LOCK_DIR = ".locks"
# names editors, copy tools and our own writers leave behind while a file is incomplete
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")

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


# ----------------------------------------------------------------------------- listing


def _is_hidden_or_temp(name: str) -> bool:
    low = name.lower()
    return name.startswith((".", "~", "_")) or low.endswith(_TEMP_SUFFIXES) or ".tmp-" in low


def list_slides(slides_dir: str | Path, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Slide files under ``slides_dir`` (known extensions), sorted by relative path.

    Hidden and temporary files (and hidden folders) are ignored, and so is ``exclude`` (the
    output folder when it lies inside the input folder).
    """
    from .io.slide import SLIDE_EXTS

    root = Path(slides_dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder of slides; pass a slide file or an existing folder")
    excl = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        # sorted in place so the walk order, and therefore logs, are deterministic too
        dirnames[:] = sorted(n for n in dirnames if not _is_hidden_or_temp(n) and (excl is None or (d / n).resolve() != excl))
        if not recursive:
            dirnames[:] = []
        for n in filenames:
            p = d / n
            if _is_hidden_or_temp(n) or p.suffix.lower() not in SLIDE_EXTS or not p.is_file():
                continue
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """``slide,mpp`` rows -> {slide (name or relative path): mpp}."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--mpp-csv {p} does not exist or is not a file; expected a CSV file with columns slide,mpp")
    try:
        p.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise UsageError(
            f"--mpp-csv {p}: not a readable text file ({type(exc).__name__}); expected a CSV file with columns slide,mpp"
        ) from None
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "slide" not in cols or "mpp" not in cols:
            raise UsageError(f"--mpp-csv {p}: expected columns slide,mpp, found {','.join(cols) or 'no header'}")
        out: dict[str, float] = {}
        for i, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("slide"):
                continue
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise UsageError(f"--mpp-csv {p} line {i}: mpp must be a positive number of um/px, found {row['mpp']!r}")
            out[row["slide"].replace("\\", "/")] = mpp
    return out


def output_path(out_dir: Path, rel: Path) -> Path:
    return out_dir / rel.with_suffix(".zarr")


def plan_jobs(
    slides_dir: Path, out_dir: Path, config: ScanConfig, recursive: bool, mpp_overrides: dict[str, float]
) -> tuple[list[SlideJob], list[SlideOutcome]]:
    """Jobs for every slide, plus outcomes already decided (two slides that map to one output)."""
    jobs: list[SlideJob] = []
    clashes: list[SlideOutcome] = []
    taken: dict[str, str] = {}
    used_keys: set[str] = set()
    for p in list_slides(slides_dir, recursive, exclude=out_dir):
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
                cfg = dataclasses.replace(config, mpp=mpp_overrides[k], mpp_source=f"user (--mpp-csv, row {k})")
                used_keys.add(k)
                break
        jobs.append(SlideJob(str(p), key, str(out), str(out_dir), cfg))
    unused = sorted(set(mpp_overrides) - used_keys)
    if unused:
        log.warning("--mpp-csv rows that match no slide: %s", ", ".join(unused))
    return jobs, clashes


# ----------------------------------------------------------------------------- locks


class SlideLock:
    """An exclusive lock per output, held with ``flock`` on a small file under OUT_DIR/.locks.

    ``flock`` is released by the kernel when its holder dies, even by SIGKILL, so a killed run
    never leaves a lock that a later run has to judge stale. The file records pid and host for
    people reading it; it is removed by its holder, and an acquirer checks it still locks the file
    that is on disk (another holder may have removed it between open and flock).
    """

    def __init__(self, out_dir: Path, rel: str) -> None:
        # a readable name plus a hash of the exact path: "a/b.tif" and "a__b.tif" stay distinct
        digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
        self.path = out_dir / LOCK_DIR / f"{rel.replace('/', '__')}.{digest}.lock"
        self.fd: int | None = None

    def acquire(self, blocking: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.fd = fd
            return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def clean_debris(out: Path) -> list[Path]:
    """Remove temporary stores of killed writers of ``out`` (call only while holding its lock)."""
    removed = []
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*"):
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


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


def process_slide(job: SlideJob, model: Any = None, blocking: bool = False, progress: bool = False) -> SlideOutcome:
    """Scan one slide of a folder unless its heatmap is complete and current.

    Returns status "busy" (without waiting) when another run holds the slide's lock and
    ``blocking`` is false. Never raises for a problem of this slide: it becomes status "failed".
    """
    from .io.heatmap import read_attrs
    from .scan import scan_slide, settings_hash

    out = Path(job.out)
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
        clean_debris(out)
        loaded = _model_for(model)
        want = settings_hash(loaded.sha256, job.config)
        cfg = job.config
        if out.exists():
            attrs = read_attrs(out) or {}
            complete = attrs.get("status") == "complete"
            same_hash = complete and attrs.get("settings_hash") == want
            # a slide replaced by another file of the same name must not keep the old result
            same_slide = complete and attrs.get("slide", {}).get("size_bytes") == os.stat(job.path).st_size
            if not job.config.overwrite and same_hash and same_slide:
                return _outcome_from_attrs(job, "skipped", attrs)
            why = (
                "--overwrite"
                if job.config.overwrite
                else "incomplete"
                if not complete
                else "made with another model or settings"
                if not same_hash
                else "the slide file changed size"
            )
            log.info("%s: redoing existing %s (%s)", job.rel, out, why)
            cfg = dataclasses.replace(cfg, overwrite=True)
        # a stale store is replaced, but its interrupted scan's finished blocks are kept unless
        # the user asked to start afresh
        res = scan_slide(job.path, out, cfg, model=loaded, progress=progress, restart=job.config.overwrite)
        attrs = read_attrs(out) or {}
        o = _outcome_from_attrs(job, "ok", attrs)
        return dataclasses.replace(o, timings_s=dict(res.timings_s), cells_per_s=res.cells_per_s)
    except (Exception, MemoryError) as exc:  # noqa: BLE001 - contained: one slide never stops the run
        return _failure(job, exc)
    finally:
        lock.release()


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _file_log(out_dir: Path) -> Iterator[None]:
    from .io.outputs import writing

    with writing(out_dir / LOG_NAME, "run log"):
        handler = logging.FileHandler(out_dir / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s pid {os.getpid()} %(levelname)s %(message)s"))
    pkg = logging.getLogger("wsi_scan")
    old_level = pkg.level
    pkg.addHandler(handler)
    # readers warn about damaged files on stderr; in a folder run the slide's failure is already
    # recorded, so their warnings go to the log file instead of between the progress bars
    readers = [logging.getLogger(n) for n in ("tifffile", "openslide")]
    for lg in readers:
        lg.addHandler(handler)
    if pkg.level == logging.NOTSET or pkg.level > logging.INFO:
        pkg.setLevel(logging.INFO)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        for lg in readers:
            lg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


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


def _run_distributed(
    jobs: Sequence[SlideJob], model: Any, workers: int | None, address: str | None, bar: _FolderBar
) -> list[SlideOutcome]:
    from distributed import Client, LocalCluster, as_completed

    from .io.model_files import LoadedModel

    with contextlib.ExitStack() as stack:
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
        ref: Any = model
        if isinstance(model, LoadedModel):
            # a model file on disk is reloaded by path in each worker (cached there); an
            # in-memory model is sent once to every worker instead of once per slide
            ref = model.path if Path(model.path).is_file() else client.scatter(model, broadcast=True)
        elif model is not None:
            ref = str(Path(model).resolve())
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


def _write_summary(out_dir: Path, outcomes: Sequence[SlideOutcome], meta: dict[str, Any]) -> tuple[Path, Path]:
    from .io.outputs import atomic_write

    rows = [o.row() for o in outcomes]
    csv_path, json_path = out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON
    fields = list(SlideOutcome("", "", "", "ok").row())
    # concurrent runs: a reader sees one whole file or the other
    with atomic_write(csv_path, "run summary") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with atomic_write(json_path, "run summary") as tmp:
        tmp.write_text(json.dumps({"generator": MARK, **meta, "slides": rows}, indent=1, allow_nan=False), encoding="utf-8")
    return csv_path, json_path


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
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, found {workers}")
    if workers is not None and scheduler_address:
        raise UsageError("pass either --workers (start a local cluster) or --scheduler (use a running one), not both")
    if config.mpp is not None:
        from .io.mpp import resolve_mpp

        try:
            resolve_mpp({}, config.mpp, "--mpp")
        except MppError as exc:
            raise UsageError(str(exc)) from None
    if slides_dir.resolve() == out_dir.resolve():
        raise UsageError(f"--out {out_dir} is the slides folder itself; choose a separate output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; a folder of slides needs an output folder")
    mpp_overrides = read_mpp_csv(mpp_csv) if mpp_csv is not None else {}
    from .io.outputs import check_replaceable, prepare_parent
    from .io.slide import SLIDE_EXTS

    if not list_slides(slides_dir, recursive, exclude=out_dir):
        named = slides_dir.suffix.lower() in SLIDE_EXTS
        raise SlideNotFoundError(
            f"{slides_dir} is a folder{' named like a slide' if named else ''} with no slide files "
            f"({', '.join(SLIDE_EXTS)}){'' if recursive else ' at its top level (--recursive looks in subfolders)'}; "
            "nothing was written"
        )

    # the run rewrites these at its end: refuse at the start, not after hours, if one is a user's file
    for name in (SUMMARY_CSV, SUMMARY_JSON, REPORT_HTML):
        check_replaceable(out_dir / name, True, kind="file")
    prepare_parent(out_dir / SUMMARY_CSV)
    with _file_log(out_dir):
        jobs, outcomes = plan_jobs(slides_dir, out_dir, config, recursive, mpp_overrides)
        log.info(
            "folder run: %d slides in %s -> %s (%s)",
            len(jobs) + len(outcomes),
            slides_dir,
            out_dir,
            f"cluster {scheduler_address}" if scheduler_address else f"{workers} local workers" if workers else "serial",
        )
        if not jobs and not outcomes:
            log.warning("no slides found in %s", slides_dir)
        loaded = _model_for(model)  # once for the run; fails the run early when the model is unusable
        bar = _FolderBar(len(jobs) + len(outcomes), progress)
        try:
            for o in outcomes:
                _log_outcome(o)
                bar.update(o)
            if workers is not None or scheduler_address:
                outcomes += _run_distributed(jobs, model, workers, scheduler_address, bar)
            else:
                outcomes += _run_serial(jobs, loaded, progress, bar)
        finally:
            bar.close()
        outcomes.sort(key=lambda o: o.slide)
        from . import __version__

        meta = {
            "wsi_scan": __version__,
            "slides_dir": str(slides_dir.resolve()),
            "out_dir": str(out_dir.resolve()),
            "model": {"path": loaded.path, "sha256": loaded.sha256, "name": loaded.card.name, "threshold": loaded.card.threshold},
            "counts": {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "skipped", "failed")},
        }
        csv_path, json_path = _write_summary(out_dir, outcomes, meta)
        html_path = None
        if report:
            from .report import write_report

            html_path = write_report(out_dir, outcomes, meta)
        res = BatchResult(slides_dir, out_dir, tuple(outcomes), csv_path, json_path, html_path, time.perf_counter() - t0)
        log.info("folder run done: %d ok, %d skipped, %d failed in %.1f s", res.n_ok, res.n_skipped, res.n_failed, res.seconds)
    return res


__all__ = ["BatchResult", "SlideJob", "SlideOutcome", "list_slides", "process_slide", "read_mpp_csv", "scan_folder"]
