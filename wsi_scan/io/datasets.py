"""Labelled patch data sets on disk, in the two layouts the field uses.

- Kaggle "Histopathologic Cancer Detection": ``<split>_labels.csv`` (``id,label``) beside a
  folder ``<split>/`` of ``<id>.tif`` (or .tiff/.png/.jpg/.jpeg/.webp) 96x96 RGB patches.
  ``train`` is required; ``valid`` and ``test``, when present, are given splits.
- PCam HDF5: ``camelyonpatch_level_2_split_<split>_{x,y}.h5`` (or ``.h5.gz``), read lazily.

Both give a ``PatchSet``: a length, labels as an array, and ``read(i)`` returning one patch as
a (96, 96, 3) uint8 array. Files are opened on first use, so a set can be sent to a
DataLoader worker process.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, OutputExistsError, OutputWriteError, UsageError
from .outputs import check_output_file, remove_stale_temps, temp_name

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp")
H5_PREFIX = "camelyonpatch_level_2_split_"
#: a patch set written to a name with one of these suffixes is one file; any other name is a folder
PATCH_FILE_SUFFIXES = (".h5", ".hdf5")
SPLITS = ("train", "valid", "test")
PATCH_SHAPE = (96, 96, 3)


class PatchSet:
    """A labelled set of 96x96 RGB patches."""

    name: str
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def patch_id(self, i: int) -> str:
        """A name of patch ``i`` that means something outside this program (a file id where the
        layout has one)."""
        return str(i)

    def fingerprint(self) -> str:
        """sha256 of the labels and of 16 patches spread over the set: enough to recognise the same
        patches under another folder name (``evaluate`` warns when they were trained on)."""
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        n = len(self)
        for i in sorted({int(k) for k in np.linspace(0, n - 1, num=min(16, n))} if n else set()):
            h.update(np.ascontiguousarray(self.read(i)).tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        pos = int(self.labels.sum())
        return {
            "name": self.name,
            "n": len(self),
            "positive": pos,
            "negative": len(self) - pos,
            "fingerprint": self.fingerprint(),
        }


def _check_patch(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.shape != PATCH_SHAPE or arr.dtype != np.uint8:
        raise DataError(f"{where}: expected a 96x96 RGB 8-bit patch, found shape {arr.shape} {arr.dtype}")
    return arr


class KagglePatches(PatchSet):
    def __init__(self, root: Path, split: str, ids: list[str], files: list[str], labels: np.ndarray):
        self.root = root
        self.split = split
        self.ids = ids
        self.files = files
        self.labels = labels
        self.name = f"{root.name}/{split}"

    def patch_id(self, i: int) -> str:
        return self.ids[i]

    def read(self, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.split / self.files[i]
        try:
            with Image.open(path) as im:
                if im.mode != "RGB":
                    raise DataError(f"{path}: expected an RGB patch, found mode {im.mode}")
                if _more_than_8_bits(im):
                    # Pillow keeps the high byte of each sample: right for full-range 16-bit
                    # data, a dark patch for a 12-bit camera's, and either way not PCam's pixels
                    raise DataError(
                        f"{path}: expected 8 bits per channel (as PCam's patches), found a 16-bit image; "
                        "convert it to 8-bit RGB with the scaling its values need"
                    )
                if im.size[0] > 4 * PATCH_SHAPE[1] or im.size[1] > 4 * PATCH_SHAPE[0]:  # before decoding a bomb
                    raise DataError(
                        f"{path}: expected a {PATCH_SHAPE[1]} x {PATCH_SHAPE[0]} patch, found {im.size[0]} x {im.size[1]} px"
                    )
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        return _check_patch(arr, str(path))


def _more_than_8_bits(im: Any) -> bool:
    """Whether Pillow decodes this RGB image from wider samples (raw mode ``RGB;16B`` etc.)."""
    for tile in getattr(im, "tile", ()) or ():
        args = getattr(tile, "args", None)
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _read_labels_csv(csv_path: Path) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    labels: list[int] = []
    first_line: dict[str, tuple[int, int]] = {}  # id -> (line, label) where it was first listed
    try:
        # utf-8-sig: Excel starts a "CSV UTF-8" file with a byte-order mark, which is no part of "id"
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["id", "label"]:
                raise DataError(f"{csv_path}: expected a header 'id,label', found {header}")
            for row in reader:
                lineno = reader.line_num  # the file's line, also after a quoted field spanning lines
                if not row:
                    continue
                if len(row) < 2:
                    raise DataError(f"{csv_path}:{lineno}: expected 'id,label', found {row}")
                ident, lab = row[0].strip(), row[1].strip()
                if lab not in ("0", "1"):
                    raise DataError(f"{csv_path}:{lineno}: label must be 0 or 1, found {lab!r} for {ident}")
                if ident in first_line:
                    # one patch counted twice weighs double in the loss and the AUC; with two labels
                    # it is also both tumour and normal: either way the table is not what was meant
                    line0, lab0 = first_line[ident]
                    same = "the same label" if int(lab) == lab0 else f"labels {lab0} and {lab}"
                    raise DataError(
                        f"{csv_path}:{lineno}: expected each id once, found {ident!r} again (first on line "
                        f"{line0}, {same}); remove the duplicate row"
                    )
                first_line[ident] = (lineno, int(lab))
                ids.append(ident)
                labels.append(int(lab))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{csv_path}: expected UTF-8 text, found byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
            "that is not UTF-8; save the table as UTF-8 CSV (id,label)"
        ) from None
    except csv.Error as exc:  # a field over csv's size limit, a NUL byte, a broken quote
        raise DataError(
            f"{csv_path}: expected a CSV table of id,label, found unreadable CSV ({exc}); "
            "check that this is the labels file and not a binary or damaged one"
        ) from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    if not ids:
        raise DataError(f"{csv_path}: no labelled rows")
    return ids, np.asarray(labels, dtype=np.int64)


def _kaggle_split(root: Path, split: str) -> KagglePatches:
    csv_path = root / f"{split}_labels.csv"
    img_dir = root / split
    if not img_dir.is_dir():
        raise DataError(f"{csv_path} has no image folder {img_dir} beside it")
    ids, labels = _read_labels_csv(csv_path)
    by_stem: dict[str, list[str]] = {}
    with os.scandir(img_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTS:
                by_stem.setdefault(stem, []).append(entry.name)
    files: list[str] = []
    missing: list[str] = []
    ambiguous: list[list[str]] = []
    for ident in ids:
        names = by_stem.get(ident)
        if names is None:
            missing.append(ident)
        elif len(names) > 1:
            ambiguous.append(sorted(names))
        else:
            files.append(names[0])
    if ambiguous:
        # which one the labels mean cannot be known, and the two may be different patches
        raise DataError(
            f"{img_dir}: {len(ambiguous)} id(s) have more than one image (first: {', '.join(ambiguous[0])}); "
            "expected one image per id of the labels CSV: remove or rename the others"
        )
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} id(s) have no image in {img_dir} "
            f"(first: {missing[0]!r}; looked for {', '.join(IMAGE_EXTS)})"
        )
    return KagglePatches(root, split, ids, files, labels)


class H5Patches(PatchSet):
    def __init__(self, x_path: Path, y_path: Path, split: str):
        import h5py

        self.x_path = x_path
        self.y_path = y_path
        self.split = split
        self.name = f"pcam-h5/{split}"
        try:
            with h5py.File(x_path, "r") as fx:
                x = fx["x"]
                if not isinstance(x, h5py.Dataset):
                    raise DataError(f"{x_path}: 'x' is a {type(x).__name__}, expected a dataset of (N, 96, 96, 3) patches")
                shape = x.shape
            if tuple(shape[1:]) != PATCH_SHAPE:
                raise DataError(f"{x_path}: expected x of shape (N, 96, 96, 3), found {shape}")
            with h5py.File(y_path, "r") as fy:
                yd = fy["y"]
                if not isinstance(yd, h5py.Dataset):
                    raise DataError(f"{y_path}: 'y' is a {type(yd).__name__}, expected a dataset of N labels")
                # compared before reading: a small file may declare more labels than memory holds
                n_y = int(np.prod(yd.shape)) if yd.shape else 1
                if n_y != shape[0]:
                    raise DataError(f"{x_path}: {shape[0]} patches but {n_y} labels in {y_path}")
                y = np.asarray(yd).reshape(-1)
        except (OSError, KeyError) as exc:
            raise DataError(f"{x_path.parent}: not a readable PCam HDF5 pair ({exc})") from None
        bad = np.flatnonzero((y != 0) & (y != 1))
        if bad.size:
            raise DataError(f"{y_path}: label at index {bad[0]} is {y[bad[0]]}, expected 0 or 1")
        self.labels = y.astype(np.int64)
        self._fh: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = None  # h5py handles do not cross processes; each worker opens its own
        return state

    def read(self, i: int) -> np.ndarray:
        import h5py

        if self._fh is None:
            self._fh = h5py.File(self.x_path, "r")
        return _check_patch(np.asarray(self._fh["x"][i]), f"{self.x_path}[{i}]")


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _cache_full(path: Path, cache_dir: Path, exc: OSError) -> OSError:
    return OutputWriteError(
        f"cannot write the decompressed {path.name} into {cache_dir} ({exc.strerror or exc}); "
        "free some space or set WSI_SCAN_CACHE to a folder with room for it"
    )


def _gunzip_cached(path: Path, cache_dir: Path) -> Path:
    """HDF5 cannot be read lazily through gzip: decompress once into a cache.

    The cache entry is named by the sha256 of the .gz file's bytes: a key made of name, size and
    mtime is shared by two different files (two folders copied with the same size and time), and
    the second folder would silently be read as the first. Hashing costs seconds even for PCam's
    6 GB training file, decompressing it minutes. The entry is written under a temporary name and
    renamed when complete, so a failed or interrupted run leaves no partial entry behind."""
    try:
        digest = _sha256_file(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the file and its permissions") from None
    out = cache_dir / f"{path.stem}.sha256-{digest}"
    if out.is_file():
        return out
    tmp = temp_name(out)
    try:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            dst = tmp.open("wb")
        except OSError as exc:
            raise OutputWriteError(
                f"cannot write the decompression cache {cache_dir} ({exc.strerror or exc}); "
                "set WSI_SCAN_CACHE to a writable folder with room for the decompressed file"
            ) from None
        with dst, gzip.open(path, "rb") as src:
            while True:
                try:
                    chunk = src.read(1 << 22)
                except (EOFError, OSError, zlib.error) as exc:  # truncated, not gzip, or corrupt
                    raise DataError(
                        f"{path}: expected a complete gzip file, found a truncated or damaged one "
                        f"({exc!s:.80}); download it again or give the .h5 file"
                    ) from None
                if not chunk:
                    break
                try:
                    dst.write(chunk)
                except OSError as exc:
                    raise _cache_full(path, cache_dir, exc) from None
        tmp.replace(out)
    except OutputWriteError:
        raise
    except OSError as exc:  # the last buffered bytes meet a full disk when the file is closed
        raise _cache_full(path, cache_dir, exc) from None
    finally:
        tmp.unlink(missing_ok=True)  # after the rename there is nothing left under this name
    return out


def _h5_file(root: Path, split: str, xy: str, cache_dir: Path) -> Path | None:
    plain = root / f"{H5_PREFIX}{split}_{xy}.h5"
    if plain.is_file():
        return plain
    gz = root / f"{H5_PREFIX}{split}_{xy}.h5.gz"
    if gz.is_file():
        return _gunzip_cached(gz, cache_dir)
    return None


@dataclass(frozen=True)
class PatchData:
    """The splits found in one data folder."""

    root: str
    layout: str  # "kaggle" or "pcam-h5"
    splits: dict[str, PatchSet] = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("WSI_SCAN_CACHE", Path.home() / ".cache" / "wsi-scan"))


def open_patch_data(folder: str | Path, cache_dir: Path | None = None) -> PatchData:
    """Detect the layout of ``folder`` and open every split it has."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    # the data files themselves decide the layout, not any file of PCam's name (a README)
    has_h5 = any(root.glob(f"{H5_PREFIX}*_x.h5*")) or any(root.glob(f"{H5_PREFIX}*_y.h5*"))
    csvs = [root / f"{split}_labels.csv" for split in SPLITS if (root / f"{split}_labels.csv").exists()]
    if has_h5 and csvs:
        raise DataError(
            f"{root} holds both PCam HDF5 files and {csvs[0].name} (the Kaggle layout); which patches to use is "
            "not clear: give a folder with one layout"
        )
    for c in csvs:
        if not c.is_file():
            raise DataError(f"{c} is not a file; expected the CSV of ids and labels of the Kaggle layout")
    if has_h5:
        cache = cache_dir or default_cache_dir() / "h5"
        h5_splits: dict[str, PatchSet] = {}
        for split in SPLITS:
            x = _h5_file(root, split, "x", cache)
            y = _h5_file(root, split, "y", cache)
            if x is None and y is None:
                continue
            if x is None or y is None:
                raise DataError(f"{root}: split {split!r} has only one of its _x/_y HDF5 files")
            try:
                h5_splits[split] = H5Patches(x, y, split)
            except DataError:
                # a decompressed copy of a file that is not a PCam split is of no later use, and
                # it may be gigabytes in the user's home
                for p in (x, y):
                    if p.parent == cache:
                        p.unlink(missing_ok=True)
                raise
        return PatchData(str(root), "pcam-h5", h5_splits)
    kaggle: dict[str, PatchSet] = {}
    for split in SPLITS:
        if (root / f"{split}_labels.csv").is_file():
            kaggle[split] = _kaggle_split(root, split)
    if not kaggle:
        raise DataError(
            f"{root}: no data set found; expected train_labels.csv with a train/ folder (Kaggle "
            f"layout) or {H5_PREFIX}<split>_x.h5 files (PCam HDF5)"
        )
    return PatchData(str(root), "kaggle", kaggle)


def patch_split(folder: str | Path, split: str) -> PatchSet:
    """The named split of a patch folder ("auto": test, else valid, else train)."""
    pd = open_patch_data(folder)
    name = next((s for s in ("test", "valid", "train") if s in pd.splits), "") if split == "auto" else split
    if name not in pd.splits:
        raise DataError(f"{folder}: no {split!r} split; found {', '.join(pd.splits) or 'none'}")
    return pd.splits[name]


class _DiskSink(io.RawIOBase):
    """The file HDF5 writes a patch file through (h5py's file-object driver).

    HDF5 does not survive a failed write: a full disk met while it flushes leaves the library in
    a state where the next call, or the interpreter's exit, crashes the process (a segfault,
    measured with a tmpfs filled mid-write). So the first OSError is kept here and every later
    write is taken and dropped: HDF5 finishes and closes normally, and the writer then discards
    the file and reports the error."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._f = path.open("w+b", buffering=0)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b) or 0

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if self.error is None:
            try:
                # a raw write may be short: loop, so a partial write is never taken for a full one
                view = memoryview(b).cast("B")
                while view:
                    done = self._f.write(view)
                    view = view[done or 0 :]
                return n
            except OSError as exc:
                self.error = exc
        self._f.seek(n, 1)
        return n

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class PatchWriter:
    """Appends patches to HDF5 in the PCam layout: ``x`` (N, 96, 96, 3) uint8, ``y`` (N, 1, 1, 1).

    With a folder as target it writes the pair ``camelyonpatch_level_2_split_<split>_{x,y}.h5``
    that the PCam reader opens; with a ``.h5`` file, one file holding every dataset.
    """

    def __init__(
        self,
        out: str | Path,
        patch_shape: tuple[int, int, int],
        labelled: bool,
        attrs: Mapping[str, Any],
        split: str = "train",
        overwrite: bool = False,
    ) -> None:
        import h5py

        self.out = Path(out)
        self.labelled = labelled
        if self.out.suffix.lower() in PATCH_FILE_SUFFIXES:
            targets = [self.out]
        else:
            if self.out.exists() and not self.out.is_dir():
                raise OutputExistsError(f"--out {self.out} is a file; give a folder for the PCam pair or a .h5 file name")
            targets = [self.out / f"{H5_PREFIX}{split}_x.h5"] + ([self.out / f"{H5_PREFIX}{split}_y.h5"] if labelled else [])
        for t in targets:
            check_output_file(t, overwrite)
            remove_stale_temps(t)
        self._targets = targets
        self._tmps = [temp_name(t) for t in targets]
        self._sinks = [_DiskSink(t) for t in self._tmps]
        self._files = [h5py.File(s, "w") for s in self._sinks]
        fx = self._files[0]
        fy = self._files[-1]
        self._x = fx.create_dataset(
            "x",
            shape=(0, *patch_shape),
            maxshape=(None, *patch_shape),
            dtype="uint8",
            chunks=(64, *patch_shape),
            compression="gzip",
            compression_opts=4,
        )
        self._xy = fx.create_dataset("l0_xy", shape=(0, 2), maxshape=(None, 2), dtype="float64", chunks=(4096, 2))
        self._rc = fx.create_dataset("cell_rc", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        self._y = (
            fy.create_dataset("y", shape=(0, 1, 1, 1), maxshape=(None, 1, 1, 1), dtype="uint8", chunks=(4096, 1, 1, 1))
            if labelled
            else None
        )
        for f in self._files:
            f.attrs["wsi_scan"] = json.dumps(dict(attrs))
        self.n = 0

    def append(self, x: np.ndarray, l0_xy: np.ndarray, cell_rc: np.ndarray, y: np.ndarray | None = None) -> None:
        try:
            self._append(x, l0_xy, cell_rc, y)
        except (OSError, RuntimeError) as exc:  # h5py reports a failed write as either
            raise self._write_error(exc) from None
        self._check_sinks()

    def _write_error(self, exc: BaseException) -> OutputWriteError:
        return OutputWriteError(
            f"cannot write the patch file {self._targets[0]}: {str(exc).splitlines()[0][:120]}; "
            "its temporary files are removed, free some space and run again"
        )

    def _check_sinks(self) -> None:
        """Stop at the first write the disk refused (the sinks drop the rest), not at the end."""
        for s in self._sinks:
            if s.error is not None:
                raise self._write_error(s.error)

    def _append(self, x: np.ndarray, l0_xy: np.ndarray, cell_rc: np.ndarray, y: np.ndarray | None = None) -> None:
        k = x.shape[0]
        if k == 0:
            return
        for ds, v in ((self._x, x), (self._xy, l0_xy), (self._rc, cell_rc)):
            ds.resize(self.n + k, axis=0)
            ds[self.n :] = v
        if self._y is not None:
            if y is None:
                raise UsageError("labelled patch file: every append needs labels")
            self._y.resize(self.n + k, axis=0)
            self._y[self.n :] = np.asarray(y, dtype=np.uint8).reshape(k, 1, 1, 1)
        self.n += k

    def close(self, ok: bool = True) -> list[Path]:
        """Finish the files and move them onto their targets (``ok``), or discard them. A write
        the disk refused, here or earlier, discards them too and raises OutputWriteError."""
        failure: BaseException | None = None
        for f in self._files:
            try:
                f.close()
            except (OSError, RuntimeError) as exc:
                failure = failure or exc
        for s in self._sinks:
            failure = failure or s.error
            try:
                s.close()
            except OSError as exc:
                failure = failure or exc
        keep = ok and failure is None
        for tmp, t in zip(self._tmps, self._targets):
            if keep:
                tmp.replace(t)
            else:
                tmp.unlink(missing_ok=True)
        if ok and failure is not None:
            raise self._write_error(failure)
        return self._targets if keep else []
