"""Writers of the export files: images, GeoJSON, pyramidal TIFF, HDF5 patch sets.

Each is written under a temporary name beside the target and renamed once complete, so an
interrupted export never leaves a file that looks finished; an existing output is replaced only
with ``overwrite``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputExistsError, UsageError
from .outputs import MARK, atomic_write, check_replaceable, prepare_parent, temp_name

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _check_out(out: Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an output that exists and is not a replaceable wsi-scan file; create its folder."""
    out_abs = check_replaceable(out, overwrite, kind="file", flag=flag)
    prepare_parent(out, flag)
    return out_abs


@contextmanager
def _atomic(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``out`` (checked replaceable), moved onto it only if the block finishes."""
    with atomic_write(_check_out(out, overwrite)) as tmp:
        yield tmp


def image_format(out: Path, flag: str = "--out") -> str:
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"{flag} {out}: expected a .png, .jpg or .jpeg file name, found suffix {out.suffix or '(none)'!r}")
    return fmt


def check_image_out(out: str | Path, overwrite: bool) -> None:
    """Fail on a bad picture name or an existing picture before a long scan, not after it."""
    out = Path(out)
    image_format(out, "--overlay")
    check_replaceable(out, overwrite, kind="file", flag="--overlay")
    prepare_parent(out, "--overlay")


def write_image(out: str | Path, rgb: np.ndarray, overwrite: bool = False) -> Path:
    """An (h, w, 3) uint8 image as PNG or JPEG, chosen by the file's extension."""
    from PIL import Image

    out = Path(out)
    fmt = image_format(out)
    with _atomic(out, overwrite) as tmp:
        from PIL.PngImagePlugin import PngInfo

        kw: dict[str, Any]
        if fmt == "JPEG":  # the mark that lets a later --overwrite know the file is ours
            kw = {"quality": 92, "comment": MARK.encode()}
        else:
            info = PngInfo()
            info.add_text("Software", MARK)
            kw = {"optimize": True, "pnginfo": info}
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format=fmt, **kw)
    return out


def write_json(out: str | Path, obj: Mapping[str, Any], overwrite: bool = False) -> Path:
    out = Path(out)
    with _atomic(out, overwrite) as tmp:
        tmp.write_text(json.dumps({**obj, "generator": MARK}, allow_nan=False))
    return out


def write_text(out: str | Path, text: str, overwrite: bool = False) -> Path:
    """A text file (CSV) written atomically; its first line is wsi-scan's mark (a known header)."""
    out = Path(out)
    with _atomic(out, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def write_predictions_csv(out: str | Path, ids: Sequence[tuple[str, int, str]], labels: np.ndarray, probs: np.ndarray,
                          probs_tta: np.ndarray | None, threshold: float, overwrite: bool = False) -> Path:
    """One row per patch: its set, index and id, label, probability (and the 8-view one), the call
    at ``threshold``."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patch_set", "index", "patch_id", "label", "prob", *(["prob_tta"] if probs_tta is not None else []), "predicted"])
    for k, (name, i, pid) in enumerate(ids):
        tta = [f"{probs_tta[k]:.6f}"] if probs_tta is not None else []
        w.writerow([name, i, pid, int(labels[k]), f"{probs[k]:.6f}", *tta, int(probs[k] >= threshold)])
    return write_text(out, buf.getvalue(), overwrite)


def read_json(path: str | Path) -> dict[str, Any]:
    from ..errors import DataError

    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{p} does not exist; expected a GeoJSON file of tumour annotations") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p}: not a readable JSON file ({exc}); expected GeoJSON (e.g. exported from QuPath)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: expected a GeoJSON object, found a JSON {type(obj).__name__}")
    return obj


def read_label_mask(path: str | Path, max_px: int = 1 << 28) -> np.ndarray:
    """A label mask image as a bool array (True where a pixel is non-zero).

    PNG, JPEG or TIFF; of a pyramidal TIFF (e.g. a CAMELYON16 mask) the finest level with at
    most ``max_px`` pixels, so that a 200k x 100k px mask does not fill the memory.
    """
    from ..errors import DataError
    from .slide import TIFF_MAGIC

    p = Path(path)
    if not p.is_file():
        raise DataError(f"label mask {p} does not exist or is not a file; expected a PNG or TIFF mask of the slide")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
        if magic in TIFF_MAGIC:
            import tifffile

            with tifffile.TiffFile(str(p)) as tf:
                levels = tf.series[0].levels
                fits = [lv for lv in levels if int(np.prod(lv.shape[:2])) <= max_px] or [levels[-1]]
                arr = fits[0].asarray()
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:  # codec and format errors of a broken or foreign file
        raise DataError(f"{p}: not a readable mask image ({exc}); expected a PNG or TIFF, non-zero = tumour") from None
    if arr.ndim == 3:
        arr = arr.max(axis=-1) if arr.shape[-1] <= 4 else arr.max(axis=0)
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2-D mask image, found an array of shape {arr.shape}")
    return arr > 0


def write_pyramid_tiff(
    out: str | Path,
    level_sizes_wh: list[tuple[int, int]],
    render_tile: Callable[[int, int, int, int, int], np.ndarray],
    channels: int,
    dtype: np.dtype[Any] | type,
    mpp_xy: tuple[float, float],
    tile_px: int = 512,
    overwrite: bool = False,
) -> Path:
    """A tiled pyramid whose tiles come from ``render_tile(level, x0, y0, w, h)``.

    Tiles are produced one at a time, so the full-resolution image never exists in memory.
    Levels are consecutive pages (reduced-resolution subfile type) with resolution tags in
    centimeters, the layout OpenSlide's generic-tiff reader and tifffile both take as a pyramid.
    """
    import tifffile

    out = Path(out)
    w0, h0 = level_sizes_wh[0]
    photometric = "rgb" if channels >= 3 else "minisblack"
    extrasamples = ("unassalpha",) if channels == 4 else None

    def tiles(level: int) -> Iterable[np.ndarray]:
        lw, lh = level_sizes_wh[level]
        for ty in range(0, lh, tile_px):
            for tx in range(0, lw, tile_px):
                w, h = min(tile_px, lw - tx), min(tile_px, lh - ty)
                tile = np.zeros((tile_px, tile_px, channels), dtype=dtype)
                tile[:h, :w] = render_tile(level, tx, ty, w, h).reshape(h, w, channels)
                yield tile if channels > 1 else tile[..., 0]

    with _atomic(out, overwrite) as tmp, tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * channels * np.dtype(dtype).itemsize > 2**31) as tw:
        for level, (lw, lh) in enumerate(level_sizes_wh):
            dx, dy = w0 / lw, h0 / lh
            shape = (lh, lw, channels) if channels > 1 else (lh, lw)
            tw.write(
                tiles(level),  # type: ignore[arg-type]
                shape=shape,
                dtype=dtype,
                tile=(tile_px, tile_px),
                photometric=photometric,
                extrasamples=extrasamples,
                compression="zlib",
                compressionargs={"level": 1},  # mostly empty or flat tiles: speed matters more than size
                maxworkers=2,  # compression is most of the time; tiles compress independently
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp_xy[0] * dx), 1e4 / (mpp_xy[1] * dy)),
                resolutionunit="CENTIMETER",
                software=MARK,
                metadata=None,
            )
    return out


class PatchWriter:
    """Appends patches to HDF5 in the PCam layout: ``x`` (N, 96, 96, 3) uint8, ``y`` (N, 1, 1, 1).

    With a folder as target it writes the pair ``camelyonpatch_level_2_split_<split>_{x,y}.h5``
    that the PCam reader opens; with a ``.h5`` file, one file holding every dataset.
    """

    def __init__(self, out: str | Path, patch_shape: tuple[int, int, int], labelled: bool, attrs: Mapping[str, Any],
                 split: str = "train", overwrite: bool = False) -> None:
        import h5py

        from .datasets import H5_PREFIX

        self.out = Path(out)
        self.labelled = labelled
        if self.out.suffix.lower() in (".h5", ".hdf5"):
            targets = [self.out]
        else:
            if self.out.exists() and not self.out.is_dir():
                raise OutputExistsError(f"--out {self.out} is a file; give a folder for the PCam pair or a .h5 file name")
            targets = [self.out / f"{H5_PREFIX}{split}_x.h5"] + ([self.out / f"{H5_PREFIX}{split}_y.h5"] if labelled else [])
        for t in targets:
            _check_out(t, overwrite)
        self._targets = targets
        self._tmps = [temp_name(t) for t in targets]
        self._files = [h5py.File(t, "w") for t in self._tmps]
        fx = self._files[0]
        fy = self._files[-1]
        self._x = fx.create_dataset("x", shape=(0, *patch_shape), maxshape=(None, *patch_shape), dtype="uint8",
                                    chunks=(64, *patch_shape), compression="gzip", compression_opts=4)
        self._xy = fx.create_dataset("l0_xy", shape=(0, 2), maxshape=(None, 2), dtype="float64", chunks=(4096, 2))
        self._rc = fx.create_dataset("cell_rc", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        self._y = (fy.create_dataset("y", shape=(0, 1, 1, 1), maxshape=(None, 1, 1, 1), dtype="uint8", chunks=(4096, 1, 1, 1))
                   if labelled else None)
        for f in self._files:
            f.attrs["wsi_scan"] = json.dumps(dict(attrs))
        self.n = 0

    def append(self, x: np.ndarray, l0_xy: np.ndarray, cell_rc: np.ndarray, y: np.ndarray | None = None) -> None:
        try:
            self._append(x, l0_xy, cell_rc, y)
        except (OSError, RuntimeError) as exc:  # h5py reports a full disk as either
            from ..errors import OutputWriteError

            raise OutputWriteError(f"cannot write the patch file {self._targets[0]}: {str(exc).splitlines()[0][:120]}; "
                                   "its temporary files are removed, free some space and run again") from None

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
        for f in self._files:
            try:
                f.close()
            except (OSError, RuntimeError):
                if ok:
                    raise
        for tmp, t in zip(self._tmps, self._targets):
            if ok:
                tmp.replace(t)
            elif tmp.exists():
                tmp.unlink()
        return self._targets if ok else []
