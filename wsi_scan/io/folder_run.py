"""The files of a folder run: which slides a folder holds, the mpp CSV, the output folder's
layout, per-slide locks, debris of killed runs, the run log and the summary files.

The run itself (what to scan, in which process, what to report) is ``batch.py``'s; everything
here opens, lists or writes files so that it need not.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import MPP_RANGE_UM
from ..errors import SlideNotFoundError, UsageError
from .outputs import MARK

LOG_NAME = "wsi-scan.log"
SUMMARY_CSV, SUMMARY_JSON, REPORT_HTML = "summary.csv", "summary.json", "report.html"
LOCK_DIR = ".locks"
#: the bytes of a slide's relative path kept in its lock's name (the rest is told by the hash)
LOCK_NAME_BYTES = 200
# names editors, copy tools and our own writers leave behind while a file is incomplete
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


# ----------------------------------------------------------------------------- the slides folder


def _is_hidden_or_temp(name: str) -> bool:
    low = name.lower()
    return name.startswith((".", "~", "_")) or low.endswith(_TEMP_SUFFIXES) or ".tmp-" in low


def list_slides(slides_dir: str | Path, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Slide files under ``slides_dir`` (known extensions), sorted by relative path.

    Hidden and temporary files (and hidden folders) are ignored, and so is ``exclude`` (the
    output folder when it lies inside the input folder).
    """
    from .slide import SLIDE_EXTS

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
            # a FIFO, socket or dangling link with a slide's name is listed, to fail as that
            # slide with its reason; skipped, it would be missing from the run without a word
            if _is_hidden_or_temp(n) or p.suffix.lower() not in SLIDE_EXTS or p.is_dir():
                continue
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def require_slides(slides_dir: Path, recursive: bool, exclude: Path) -> list[Path]:
    """``list_slides``, refusing a folder without slides before anything is written in the
    output folder."""
    from .slide import SLIDE_EXTS, refuse_heatmap_store

    slides = list_slides(slides_dir, recursive, exclude=exclude)
    if not slides:
        refuse_heatmap_store(slides_dir)
        named = slides_dir.suffix.lower() in SLIDE_EXTS
        raise SlideNotFoundError(
            f"{slides_dir} is a folder{' named like a slide' if named else ''} with no slide files "
            f"({', '.join(SLIDE_EXTS)}){'' if recursive else ' at its top level (--recursive looks in subfolders)'}; "
            "nothing was written"
        )
    return slides


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
        lines: dict[str, int] = {}
        lo, hi = MPP_RANGE_UM
        for i, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("slide"):
                continue
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and lo <= mpp <= hi):
                raise UsageError(f"--mpp-csv {p} line {i}: mpp must be a number of um/px from {lo} to {hi}, found {row['mpp']!r}")
            key = row["slide"].replace("\\", "/")
            if key in out and out[key] != mpp:
                # keeping either would be a silent factor between the two on every size and distance
                raise UsageError(
                    f"--mpp-csv {p}: slide {key} is given two pixel sizes, {out[key]} (line {lines[key]}) and {mpp} "
                    f"(line {i}); keep one row per slide"
                )
            out[key], lines[key] = mpp, i
    return out


def slide_size_bytes(path: str | Path) -> int:
    """The slide file's size, which tells a replaced slide from the one a store was made from."""
    return os.stat(path).st_size


# ----------------------------------------------------------------------------- the output folder


def check_run_folders(slides_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the slides folder itself or an existing file."""
    if slides_dir.resolve() == out_dir.resolve():
        raise UsageError(f"--out {out_dir} is the slides folder itself; choose a separate output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; a folder of slides needs an output folder")


def prepare_out_dir(out_dir: Path) -> None:
    """Create the output folder and check the run may replace its summary files."""
    from .outputs import check_replaceable, prepare_parent

    # the run rewrites these at its end: refuse at the start, not after hours, if one is a user's file
    for name in (SUMMARY_CSV, SUMMARY_JSON, REPORT_HTML):
        check_replaceable(out_dir / name, True, kind="file")
    prepare_parent(out_dir / SUMMARY_CSV)


def output_path(out_dir: Path, rel: Path) -> Path:
    return out_dir / rel.with_suffix(".zarr")


def stored_attrs(out: Path) -> dict[str, Any] | None:
    """The attrs of what a run left at ``out``: None where nothing is there, {} where it is no readable store."""
    from .heatmap import read_attrs

    if not out.exists():
        return None
    return read_attrs(out) or {}


class FileLock:
    """An exclusive lock held with ``flock`` on a small file at ``path``.

    ``flock`` is released by the kernel when its holder dies, even by SIGKILL, so a killed run
    never leaves a lock that a later run has to judge stale. The file records pid and host for
    people reading it; it is removed by its holder, and an acquirer checks it still locks the file
    that is on disk (another holder may have removed it between open and flock).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
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


class SlideLock(FileLock):
    """The lock of one slide's output in a folder run, under OUT_DIR/.locks."""

    def __init__(self, out_dir: Path, rel: str) -> None:
        # a readable name plus a hash of the exact path: "a/b.tif" and "a__b.tif" stay distinct
        digest = hashlib.sha1(rel.encode()).hexdigest()[:8]
        # cut to fit a file name (255 bytes): a slide deep in long folder names is no lock error
        readable = rel.replace("/", "__").encode()[:LOCK_NAME_BYTES].decode("utf-8", "ignore")
        super().__init__(out_dir / LOCK_DIR / f"{readable}.{digest}.lock")


def training_lock(out: Path) -> FileLock:
    """The lock a training run holds on its --out (a hidden file beside it): two runs writing one
    model file and one state would each report the other's epochs as their own."""
    return FileLock(out.with_name(f".{out.name}.lock"))


def clean_debris(out: Path) -> list[Path]:
    """Remove temporary stores of killed writers of ``out`` (call only while holding its lock)."""
    removed = []
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*"):
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------- the run's own files


@contextlib.contextmanager
def file_log(out_dir: Path) -> Iterator[None]:
    """Copy the package's log records of INFO and up into OUT_DIR/wsi-scan.log while the block runs."""
    from .outputs import writing

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


def write_summary(
    out_dir: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
) -> tuple[Path, Path]:
    """summary.csv (``fields`` as columns, None as empty) and summary.json (``meta`` and the rows)."""
    from .outputs import atomic_write

    csv_path, json_path = out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON
    # concurrent runs: a reader sees one whole file or the other
    with atomic_write(csv_path, "run summary") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with atomic_write(json_path, "run summary") as tmp:
        doc = {"generator": MARK, **meta, "slides": list(rows)}
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    return csv_path, json_path
