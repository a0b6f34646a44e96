"""Which paths wsi-scan may write to, and how it replaces what it wrote before.

One rule for every command: an existing path is replaced only with ``overwrite`` *and* only when
it is something wsi-scan wrote itself (a heatmap store, or a file carrying the wsi-scan mark
that every writer puts in it). A user's folder, a slide, or any foreign file is refused with
exit code 4 whatever the flags, because ``--overwrite`` onto the wrong ``--out`` must never
delete a user's files.

The marks, per kind of file:

- heatmap store: a folder whose ``zarr.json`` has ``attributes.wsi_scan`` and that holds only
  the entries a store has (``zarr.json``, ``labels``, numbered levels, ``lesions``);
- PNG: a ``Software`` text chunk ``wsi-scan``; JPEG: a comment starting ``wsi-scan``;
- TIFF: the Software tag ``wsi-scan``; HDF5: a ``wsi_scan`` attribute; JSON: a top-level
  ``generator`` starting ``wsi-scan`` (or the summary's ``wsi_scan`` version key);
- CSV: the folder summary's first columns; HTML: a ``<meta name="generator" content="wsi-scan">``;
- model files: a model card in their metadata.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError, OutputWriteError, UsageError

MARK = "wsi-scan"
STORE_ENTRIES = {"zarr.json", "labels", "lesions"}
#: first columns of the CSV files wsi-scan writes: folder summary, lesions, patient stages, patch predictions
CSV_MARKS = (
    "slide,path,out,status,",
    "lesion_id,size_class,",
    "patient,stage,nodes_with_metastases,",
    "patch_set,index,patch_id,label,prob,",
)
HTML_MARK = f'<meta name="generator" content="{MARK}">'
#: first bytes of a file read to find its mark (marks sit in headers)
_HEAD_BYTES = 1 << 16


def absolute(out: str | Path) -> Path:
    """``out`` made absolute without following links, so that ``.`` has a name and a parent."""
    return Path(os.path.abspath(os.fspath(out)))


def _lexists(p: Path) -> bool:
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UsageError(f"--out {p}: cannot be examined ({exc.strerror}); choose another path") from None
    return True


def is_heatmap_store(path: Path) -> bool:
    """A folder wsi-scan wrote as a heatmap store (complete or not), holding nothing else."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
        names = os.listdir(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not (isinstance(meta, dict) and isinstance(meta.get("attributes"), dict) and "wsi_scan" in meta["attributes"]):
        return False
    return all(n in STORE_ENTRIES or n.isdigit() for n in names)


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_HEAD_BYTES)


#: suffixes that name a file format: a heatmap store (a folder) given one would pass for that file
FILE_SUFFIXES = frozenset(
    (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ndpi", ".json", ".geojson", ".csv", ".h5", ".hdf5")
    + (".html", ".txt", ".xml", ".pt", ".safetensors", ".gz", ".zip")
)


def expect_suffix(out: Path, allowed: Sequence[str], flag: str = "--out", any_case: bool = True) -> str:
    """``out``'s suffix (lower case unless not ``any_case``) when it is one of ``allowed``; the
    writer's format is named by it, so a picture saved as ``.zarr`` or a TIFF as ``.png`` is
    refused before any work."""
    suffix = out.suffix.lower() if any_case else out.suffix
    if suffix not in allowed:
        names = ", ".join(allowed[:-1]) + (" or " if len(allowed) > 1 else "") + allowed[-1]
        raise UsageError(f"{flag} {out}: expected a {names} file name, found suffix {out.suffix or '(none)'!r}")
    return suffix


def check_folder_name(
    out: Path, what: str = "a heatmap store is a folder (OME-Zarr)", suggest: str = ".zarr", flag: str = "--out"
) -> None:
    """An output folder (a heatmap store, a patch folder) whose name has a file format's suffix
    (``o.png``) would be taken for that file by every program but wsi-scan."""
    if out.suffix.lower() in FILE_SUFFIXES:
        raise UsageError(
            f"{flag} {out}: {what}, found the suffix of a {out.suffix} file; name it {out.with_suffix(suggest).name}"
        )


def remove_earlier_set(paths: Iterable[Path]) -> None:
    """Remove the files of an earlier output set (wsi-scan's own, the rest is never touched)
    before a new one is written file by file: a write that fails half-way then leaves the new
    set's first files alone, not beside the rest of the old one, where they would read as one."""
    for p in paths:
        if written_by_wsi_scan(p):
            p.unlink(missing_ok=True)


@contextmanager
def output_set(paths: Sequence[Path], what: str) -> Iterator[None]:
    """Write a set of files one after another (after ``remove_earlier_set``) as a whole: when a
    write fails part-way (a full disk) or the writer is interrupted, the files of the set written
    so far are removed, so the folder holds the whole set or none of it, never the first files of
    a set read as a complete one. A failed write's one-line error says so."""
    try:
        yield
    except BaseException as exc:
        removed = [p for p in paths if written_by_wsi_scan(p)]
        for p in removed:
            p.unlink(missing_ok=True)
        if isinstance(exc, OutputWriteError) and removed:
            names = ", ".join(p.name for p in removed)
            raise OutputWriteError(f"{exc} (the {what}'s files written before it were removed: {names})") from None
        raise


def written_by_wsi_scan(path: Path) -> bool:
    """Whether a regular file carries the mark of one of wsi-scan's writers."""
    if path.is_symlink() or not path.is_file():
        return False
    suffix = path.suffix.lower()
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                software = im.info.get("Software", "") if suffix == ".png" else im.info.get("comment", b"")
            if isinstance(software, bytes):
                software = software.decode("latin-1")
            return str(software).startswith(MARK)
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                tag = tf.pages[0].tags.get("Software")  # type: ignore[union-attr]
                return tag is not None and str(tag.value).startswith(MARK)
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                return "wsi_scan" in f.attrs
        if suffix in (".json", ".geojson"):
            obj = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(obj, dict) and (str(obj.get("generator", "")).startswith(MARK) or "wsi_scan" in obj)
        if suffix == ".csv":
            first = _head(path).decode("utf-8-sig", "replace").splitlines()[:1]
            return bool(first) and first[0].startswith(CSV_MARKS)
        if suffix in (".html", ".htm"):
            return HTML_MARK.encode() in _head(path)
        from .model_files import MODEL_SUFFIXES, _read_weights

        if suffix in MODEL_SUFFIXES:
            _read_weights(path)
            return True
    except Exception:  # noqa: BLE001 - any file that cannot be read as ours is not ours
        return False
    return False


def check_not_in_store(out: str | Path, flag: str = "--out", itself: bool = False) -> None:
    """Refuse an output inside a heatmap store (or, with ``itself``, the store): a foreign file
    there makes the store no longer one, to every reader and to --overwrite."""
    out_abs = absolute(out)
    for folder in ((out_abs,) if itself else ()) + tuple(out_abs.parents):
        if is_heatmap_store(folder):
            where = "is or lies inside" if itself else "lies inside"
            raise OutputExistsError(f"{flag} {out} {where} the heatmap store {folder}; write it beside the store")


def check_outside_inputs(out: str | Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output that is or lies inside an input folder (data): a file added there would
    be read as data next time."""
    out_abs = absolute(out)
    for p in inputs:
        p_abs = absolute(p)
        if p_abs == out_abs or p_abs in out_abs.parents:
            raise OutputExistsError(
                f"{flag} {out} is or lies inside the data folder {p}; inputs are never written to, choose another {flag}"
            )


def check_replaceable(
    out: str | Path, overwrite: bool, kind: str = "file", flag: str = "--out", protect: Iterable[str | Path] = ()
) -> Path:
    """Refuse, before any work, an output that exists and may not be replaced; returns ``out`` absolute.

    ``kind`` is "store" (a heatmap store folder) or "file". ``protect`` are inputs (slides)
    that must be neither the output nor inside it.
    """
    out_abs = absolute(out)
    for p in protect:
        p_abs = absolute(p)
        if p_abs == out_abs or out_abs in p_abs.parents:
            raise OutputExistsError(
                f"{flag} {out} is or holds the input {p}; an input is never written to, choose another {flag}"
            )
    check_not_in_store(out, flag)
    package = Path(os.path.realpath(Path(__file__).parents[1]))
    real = Path(os.path.realpath(out_abs))  # realpath, unlike resolve(), does not raise on a link loop
    if real == package or package in real.parents:
        raise OutputExistsError(f"{flag} {out} lies inside the installed wsi-scan package; choose another {flag}")
    if not _lexists(out_abs):
        return out_abs
    # what --overwrite could never replace is said first, so a user who adds it is not then
    # told something else
    if out_abs.is_symlink():
        raise OutputExistsError(
            f"{flag} {out} is a symbolic link; wsi-scan replaces only its own outputs, give the real path or another {flag}"
        )
    ours = is_heatmap_store(out_abs) if kind == "store" else written_by_wsi_scan(out_abs)
    if not ours:
        what = "folder" if out_abs.is_dir() else "file" if out_abs.is_file() else "special file"
        expected = "a wsi-scan heatmap store" if kind == "store" else "a file written by wsi-scan"
        raise OutputExistsError(
            f"{flag} {out} is a {what} that is not {expected}; wsi-scan only ever replaces its "
            f"own outputs, whatever the flags: move it away or choose another {flag}"
        )
    if not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it or choose another {flag}")
    return out_abs


def check_output_file(out: Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an output file that exists and is not a replaceable wsi-scan file; create its folder."""
    out_abs = check_replaceable(out, overwrite, kind="file", flag=flag)
    prepare_parent(out, flag)
    return out_abs


#: the longest output name: file systems allow 255 bytes a name, and wsi-scan keeps hidden files
#: beside an output named after it, up to 40 bytes longer (``.NAME.partial.npz`` written as
#: ``..NAME.partial.npz.tmp-PID-XXXXXXXX``)
MAX_OUT_NAME_BYTES = 200


def prepare_parent(out: Path, flag: str = "--out") -> None:
    """Create the output's folder and check that it can be written, before a long job."""
    name_bytes = len(os.fsencode(absolute(out).name))
    if name_bytes > MAX_OUT_NAME_BYTES:
        # refused before the work: the file system's "File name too long" came after a whole scan
        raise UsageError(
            f"{flag} {out}: its name is {name_bytes} bytes long; wsi-scan writes hidden files beside an output "
            f"under names up to 40 bytes longer and file systems allow 255: choose a name of at most "
            f"{MAX_OUT_NAME_BYTES} bytes (in a folder run, shorten the slide's file name)"
        )
    parent = absolute(out).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        dangling = next((a for a in (parent, *parent.parents) if a.is_symlink() and not a.exists()), None)
        if dangling is not None:
            raise UsageError(
                f"{flag} {out}: {dangling} is a symbolic link to {os.readlink(dangling)}, which does not exist; "
                f"create its target or choose another {flag}"
            ) from None
        raise UsageError(f"{flag} {out}: {parent} is a file, not a folder") from None
    except OSError as exc:
        raise UsageError(
            f"cannot create the output folder {parent} ({exc.strerror}); choose a writable folder for {flag}"
        ) from None
    probe = parent / f".wsi-scan-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        # a real file, because os.access says yes to root on read-only mounts and /proc
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {out}: the folder {parent} is not writable ({exc.strerror}); choose another {flag}") from None


@contextmanager
def writing(out: Path, what: str = "output") -> Iterator[None]:
    """Turn a failed write (disk full, read-only, permission) into one OutputWriteError."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = {
            errno.ENOSPC: "free some space",
            errno.EDQUOT: "free some space",
            errno.EROFS: "choose a writable folder",
            errno.EACCES: "choose a writable folder",
        }.get(exc.errno or 0, "check the folder")
        raise OutputWriteError(
            f"cannot write the {what} {out}: {reason}; its temporary file was removed, {hint} and run again"
        ) from None


@contextmanager
def atomic_write(path: Path, what: str = "output", suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; when the block finishes it replaces ``path`` in
    one rename, so a reader or a kill at any moment sees the old file or the new, never half of
    one. The temporary file is always removed; a failed write is one OutputWriteError.
    ``suffix`` is appended for writers that choose their format by the name (matplotlib)."""
    remove_stale_temps(path)
    tmp = temp_name(path)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        with writing(path, what):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_name(out: Path) -> Path:
    """A hidden name beside ``out`` for writing it before the final rename."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporary files (or store folders) ``temp_name`` gave writers of ``out`` that
    were killed (their process is gone): a kill -9 cannot clean up, and each left one as large
    as the output."""
    import re

    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(\d+)-[0-9a-f]{{8}}(\..*)?$")
    with contextlib.suppress(OSError):
        for p in out.parent.iterdir():
            m = pattern.match(p.name)
            if m is None or p.is_symlink() or not (p.is_file() or p.is_dir()) or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # its writer is alive
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
            remove_path(p)
            removed.append(p)
    return removed


def remove_path(p: Path) -> None:
    """Delete a file or a folder tree we wrote (never follows a link out of it)."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)


def move_into_place(tmp: Path, out: Path) -> None:
    """Put a finished ``tmp`` at ``out``; an existing ``out`` (already checked replaceable) is
    moved aside first, so the switch is one rename, then deleted."""
    if not _lexists(out):
        os.rename(tmp, out)
        return
    if not tmp.is_dir() and not out.is_dir():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous output back rather than lose both
        raise
    remove_path(old)
