"""Writers of the export files: images, JSON and GeoJSON, CSV, pyramidal TIFF.

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

from ..errors import UsageError
from .outputs import MARK, absolute, atomic_write, check_output_file, check_replaceable, prepare_parent

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


@contextmanager
def _atomic(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``out`` (checked replaceable), moved onto it only if the block finishes."""
    with atomic_write(check_output_file(out, overwrite)) as tmp:
        yield tmp


def image_format(out: Path, flag: str = "--out") -> str:
    from .outputs import expect_suffix

    return IMAGE_FORMATS[expect_suffix(out, tuple(IMAGE_FORMATS), flag)]


def check_image_out(out: str | Path, overwrite: bool, store: str | Path | None = None) -> None:
    """Fail on a bad picture name or an existing picture before a long scan, not after it.
    ``store`` is the heatmap store the scan will write: a picture inside it would be a foreign
    file in the store (and its folder would be created before the store, then refused as foreign)."""
    out = Path(out)
    image_format(out, "--overlay")
    if store is not None:
        a, b = absolute(out), absolute(Path(store))
        if a == b or b in a.parents:
            raise UsageError(f"--overlay {out} lies inside --out {store}; write the picture beside the store")
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


#: the keys every cohort evaluation (evaluation.evaluate_cohort) writes
EVALUATION_KEYS = ("froc", "slide_auc", "confusion", "slides")


def check_evaluation_json(out: Path, results: Path, overwrite: bool) -> None:
    """``evaluate-slides --out``: a .json that is not one of the folder run's own files and, where
    it exists, is an earlier evaluation: with --overwrite it would otherwise replace any file
    wsi-scan wrote (a model, patches, the run's summary)."""
    from ..errors import OutputExistsError
    from .folder_run import REPORT_HTML, SUMMARY_CSV, SUMMARY_JSON
    from .outputs import expect_suffix

    expect_suffix(out, (".json",))
    if absolute(out).parent == absolute(results) and out.name in (SUMMARY_JSON, SUMMARY_CSV, REPORT_HTML):
        raise OutputExistsError(f"--out {out} is the folder run's own {out.name}; choose another --out")
    check_output_file(out, overwrite)
    if out.is_file():
        try:
            obj = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            obj = None
        if not (isinstance(obj, dict) and all(k in obj for k in EVALUATION_KEYS)):
            raise OutputExistsError(
                f"--out {out} is a file wsi-scan wrote but not an evaluation; --overwrite replaces only an earlier "
                "evaluation: choose another --out"
            )


def write_text(out: str | Path, text: str, overwrite: bool = False) -> Path:
    """A text file (CSV) written atomically; its first line is wsi-scan's mark (a known header)."""
    out = Path(out)
    with _atomic(out, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def write_predictions_csv(
    out: str | Path,
    ids: Sequence[tuple[str, int, str]],
    labels: np.ndarray,
    probs: np.ndarray,
    probs_tta: np.ndarray | None,
    threshold: float,
    overwrite: bool = False,
) -> Path:
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


def write_pyramid_tiff(
    out: str | Path,
    level_sizes_wh: list[tuple[int, int]],
    render_tile: Callable[[int, int, int, int, int], np.ndarray],
    channels: int,
    dtype: np.dtype[Any] | type,
    mpp_xy: tuple[float, float],
    tile_px: int = 512,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """A tiled pyramid whose tiles come from ``render_tile(level, x0, y0, w, h)``.

    Tiles are produced one at a time, so the full-resolution image never exists in memory.
    Levels are consecutive pages (reduced-resolution subfile type) with resolution tags in
    centimeters, the layout OpenSlide's generic-tiff reader and tifffile both take as a pyramid.
    ``progress`` shows a bar of tiles written: a CAMELYON-sized slide takes minutes, which without
    one looks like a hang.
    """
    import tifffile
    from tqdm import tqdm

    out = Path(out)
    w0, h0 = level_sizes_wh[0]
    photometric = "rgb" if channels >= 3 else "minisblack"
    extrasamples = ("unassalpha",) if channels == 4 else None
    n_tiles = sum(-(-lw // tile_px) * -(-lh // tile_px) for lw, lh in level_sizes_wh)

    def tiles(level: int, bar: Any) -> Iterable[np.ndarray]:
        lw, lh = level_sizes_wh[level]
        for ty in range(0, lh, tile_px):
            for tx in range(0, lw, tile_px):
                w, h = min(tile_px, lw - tx), min(tile_px, lh - ty)
                tile = np.zeros((tile_px, tile_px, channels), dtype=dtype)
                tile[:h, :w] = render_tile(level, tx, ty, w, h).reshape(h, w, channels)
                bar.update()
                yield tile if channels > 1 else tile[..., 0]

    with (
        _atomic(out, overwrite) as tmp,  # first: an output refused is refused before any bar is drawn
        tqdm(total=n_tiles, desc="tiles", unit="tile", disable=not progress, leave=False, dynamic_ncols=True) as bar,
        tifffile.TiffWriter(tmp, bigtiff=w0 * h0 * channels * np.dtype(dtype).itemsize > 2**31) as tw,
    ):
        for level, (lw, lh) in enumerate(level_sizes_wh):
            dx, dy = w0 / lw, h0 / lh
            shape = (lh, lw, channels) if channels > 1 else (lh, lw)
            tw.write(
                tiles(level, bar),  # type: ignore[arg-type]
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
