"""The heatmap store: OME-Zarr 0.5 on zarr v3 (DESIGN section 5), writer and reader.

Layout::

    heatmap.zarr/            group; attrs "ome" (multiscales) and "wsi_scan" (the contract)
      0, 1, 2, ...           float32 tumour probability per cell, NaN off tissue; 1+ are 2x means
      labels/tissue/0        uint8 tissue label on the same cell grid (1 = scanned tissue)

OME transforms put each cell's centre where a viewer that shows the slide at
``scale = mpp`` (pixel centres at integer indices) puts the centre of that cell's level-0
rectangle, so slide and heatmap overlay exactly in napari. The store is written under a hidden
temporary name beside the target and renamed once complete, with ``status = "complete"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MAX_SLIDE_EXTENT_MM, MPP_RANGE_UM
from ..errors import HeatmapError, OutsideGridError
from ..geometry import GridGeometry
from .outputs import check_replaceable, move_into_place, remove_path, remove_stale_temps, temp_name, writing

FORMAT_VERSION = 1
OME_VERSION = "0.5"
MIN_LEVEL_SIZE = 64  # stop the pyramid once a level fits in this many cells per side
MAX_GRID_SIDE = 1 << 20  # cells per side of any real slide are far fewer (100 mm / 31 um ~ 3,200)


def check_output(out: Path, overwrite: bool, slide_path: str | None = None) -> None:
    """Refuse, before any work is done, an output that may not be written: the slide, a folder
    holding it, anything that is not a wsi-scan store, an existing store without ``overwrite``,
    or a folder that cannot be written."""
    from .outputs import check_folder_name, prepare_parent

    # what may not be replaced is said first: "the slide itself" matters more than its name
    check_replaceable(out, overwrite, kind="store", protect=[slide_path] if slide_path else [])
    check_folder_name(out)
    prepare_parent(out)


def _pyramid(probs: np.ndarray) -> list[np.ndarray]:
    levels = [probs]
    while max(levels[-1].shape) > MIN_LEVEL_SIZE:
        a = levels[-1]
        h, w = a.shape
        pad = np.full((h + h % 2, w + w % 2), np.nan, dtype=np.float32)
        pad[:h, :w] = a
        blocks = pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2)
        valid = ~np.isnan(blocks)
        n = valid.sum(axis=(1, 3))
        s = np.where(valid, blocks, 0).sum(axis=(1, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            levels.append(np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32))
    return levels


def _label_pyramid(mask: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """2x coarser masks matching the image levels; a coarse pixel is tissue if any of its cells is."""
    levels = [mask]
    for _ in range(1, n_levels):
        a = levels[-1]
        h, w = a.shape
        pad = np.zeros((h + h % 2, w + w % 2), dtype=bool)
        pad[:h, :w] = a
        levels.append(np.asarray(pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2).any(axis=(1, 3)), dtype=bool))
    return levels


def ome_multiscales(grid: GridGeometry, mpp_xy: tuple[float, float], n_levels: int, name: str) -> list[dict[str, Any]]:
    sx_um = grid.l0_cell_size_xy[0] * mpp_xy[0]
    sy_um = grid.l0_cell_size_xy[1] * mpp_xy[1]
    datasets = []
    for k in range(n_levels):
        f = 2**k
        # centre of level-k pixel 0 = centre of its first cell block, in the slide's
        # pixel-centre world frame: (l0 continuous coordinate - 0.5) * mpp
        tx = (grid.l0_origin_xy[0] + f * grid.l0_cell_size_xy[0] / 2 - 0.5) * mpp_xy[0]
        ty = (grid.l0_origin_xy[1] + f * grid.l0_cell_size_xy[1] / 2 - 0.5) * mpp_xy[1]
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [sy_um * f, sx_um * f]},
                    {"type": "translation", "translation": [ty, tx]},
                ],
            }
        )
    return [
        {
            "name": name,
            "axes": [
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
        }
    ]


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(512, max(1, s)) for s in shape)


def write_heatmap(
    out: Path,
    probs: np.ndarray,
    tissue: np.ndarray,
    grid: GridGeometry,
    mpp_xy: tuple[float, float],
    attrs: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write the store under a temporary name and move it into place once complete."""
    given = Path(out)
    out = check_replaceable(given, overwrite, kind="store")
    remove_stale_temps(out)
    tmp = temp_name(out)
    with writing(given, "heatmap store"):
        _write_store(tmp, out, probs, tissue, grid, mpp_xy, attrs)
    return given


def _write_store(
    tmp: Path,
    out: Path,
    probs: np.ndarray,
    tissue: np.ndarray,
    grid: GridGeometry,
    mpp_xy: tuple[float, float],
    attrs: Mapping[str, Any],
) -> None:
    import zarr

    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        levels = _pyramid(probs.astype(np.float32))
        for k, arr in enumerate(levels):
            z = root.create_array(
                str(k),
                shape=arr.shape,
                chunks=_chunks(arr.shape),
                dtype="float32",
                fill_value=float("nan"),
                dimension_names=["y", "x"],
            )
            z[...] = arr
        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": OME_VERSION, "labels": ["tissue"]}
        lab = labels.create_group("tissue")
        # as many levels as the image: OME-Zarr validators (ome-zarr-models) require it
        for k, t in enumerate(_label_pyramid(tissue.astype(bool), len(levels))):
            zt = lab.create_array(
                str(k), shape=t.shape, chunks=_chunks(t.shape), dtype="uint8", fill_value=0, dimension_names=["y", "x"]
            )
            zt[...] = t.astype(np.uint8)
        lab.attrs["ome"] = {
            "version": OME_VERSION,
            "multiscales": ome_multiscales(grid, mpp_xy, len(levels), "tissue"),
            "image-label": {
                "version": OME_VERSION,
                "colors": [{"label-value": 1, "rgba": [0, 160, 0, 255]}],
                "properties": [{"label-value": 1, "name": "tissue"}],
                "source": {"image": "../../"},
            },
        }
        name = str(attrs.get("slide", {}).get("name", "heatmap"))
        meta = dict(attrs)
        # a reader checks the arrays against this: a deleted or damaged chunk would otherwise
        # read back as NaN, i.e. as "no tissue", and every export would go on silently
        meta["data_sha256"] = data_digest(levels[0], tissue.astype(bool))
        meta["status"] = "writing"
        root.attrs.update(
            {
                "ome": {
                    "version": OME_VERSION,
                    "multiscales": ome_multiscales(grid, mpp_xy, len(levels), f"{name} tumour probability"),
                },
                "wsi_scan": meta,
            }
        )
        meta["status"] = "complete"  # last: a store without it was interrupted
        root.attrs["wsi_scan"] = meta
        move_into_place(tmp, out)
    except BaseException:
        _settle_zarr()
        raise
    finally:
        if tmp.exists():
            remove_path(tmp)


def _settle_zarr() -> None:
    """Wait for zarr's writes still in flight after one failed: zarr runs a write's chunks as
    concurrent tasks and reports the first failure at once, and a write finishing after the
    temporary store was removed created it again (seen on a full disk: a stray
    ``.NAME.tmp-*/0/zarr.json`` beside the error that said it was removed)."""
    import asyncio

    async def drain() -> None:
        me = asyncio.current_task()
        for _ in range(100):  # bounded: a hung store must not hang the error path
            others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not others:
                return
            await asyncio.wait(others, timeout=0.1)

    try:
        from zarr.core.sync import sync

        sync(drain(), timeout=15)
    except Exception:  # noqa: BLE001 - zarr's internals may differ; the removal below still runs
        return


@dataclass(frozen=True)
class Heatmap:
    """A heatmap read back: probabilities per cell and the mapping to the slide."""

    path: str
    probs: np.ndarray  # (rows, cols) float32, NaN off tissue
    tissue: np.ndarray  # (rows, cols) bool
    grid: GridGeometry
    attrs: dict[str, Any]

    @property
    def mpp_xy(self) -> tuple[float, float]:
        x, y = self.attrs["slide"]["mpp_xy"]
        return (float(x), float(y))

    @property
    def threshold(self) -> float:
        return float(self.attrs["model"]["threshold"])  # present and in (0, 1]: _check_contract

    def cell_to_l0_rect(self, r: int, c: int) -> tuple[float, float, float, float]:
        return self.grid.cell_to_l0_rect(r, c)

    def l0_to_cell(self, l0_x: float, l0_y: float) -> tuple[int, int]:
        """The (row, col) of the cell holding a level-0 point; raises OutsideGridError for a point
        off the grid (a negative or too large index would silently wrap or fail in numpy)."""
        r, c = self.grid.l0_to_cell(l0_x, l0_y)
        rows, cols = self.grid.shape_rc
        if not (0 <= r < rows and 0 <= c < cols):
            raise OutsideGridError(
                f"level-0 point ({l0_x}, {l0_y}) lies outside the heatmap's grid "
                f"(cells 0..{rows - 1} x 0..{cols - 1}, origin {self.grid.l0_origin_xy})"
            )
        return r, c


def data_digest(probs: np.ndarray, tissue: np.ndarray) -> str:
    import hashlib

    canon = np.where(np.isnan(probs), np.float32(np.nan), probs).astype(np.float32)  # one NaN bit pattern
    h = hashlib.sha256(np.ascontiguousarray(canon).tobytes())
    h.update(np.ascontiguousarray(tissue, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _check_contract(p: Path, meta: Mapping[str, Any], ome: object) -> GridGeometry:
    """The attrs every reader relies on (``ome``: the root's OME block), checked for presence,
    type and sense."""
    try:
        grid = grid_from_attrs(meta["grid"])
        slide = meta["slide"]
        mpp_xy = [float(v) for v in slide["mpp_xy"]]
        level0_wh = [int(v) for v in slide["level0_size_wh"]]
        # no default: every store records its model's threshold, and one removed would be 0.5
        # whatever the model's (0.3993 for the bundled fast), changing every tumour area in silence
        threshold = float(meta["model"]["threshold"])
    # OverflowError: int() of an infinite value (JSON's Infinity, or 1e400, reads as one)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise HeatmapError(
            f"{p}: damaged heatmap store, its attrs lack or garble {exc!s:.80} "
            "(expected wsi_scan.grid, .slide.mpp_xy and .model); rerun the scan"
        ) from None
    lo, hi = MPP_RANGE_UM
    ok = (
        len(mpp_xy) == 2
        and all(lo <= v <= hi for v in mpp_xy)
        # as a model card's: 0 calls every cell tumour; 1.0 is the card of a run whose threshold rule
        # failed (flagged in its card and warned of when it was trained), so its scans read back
        and 0.0 < threshold <= 1.0
        and len(level0_wh) == 2
        and min(level0_wh) >= 1
        and max(level0_wh[0] * mpp_xy[0], level0_wh[1] * mpp_xy[1]) <= MAX_SLIDE_EXTENT_MM * 1000
        and min(grid.shape_rc) >= 1
        and max(grid.shape_rc) <= MAX_GRID_SIDE
        # no bound by the slide's size: a slide smaller than one cell (a 90 px crop) has a grid of
        # one cell larger than itself, and its store is what the scan wrote; the cell size is
        # pinned to the mpp below and the grid's extent to the slide's size after
        and all(math.isfinite(v) and v > 0 for v in grid.l0_cell_size_xy)
        and all(0 <= v <= w for v, w in zip(grid.l0_origin_xy, level0_wh))
        and 0 < grid.cell_px <= grid.patch_px <= 4096
        and lo <= grid.target_mpp <= hi
    )
    if ok:
        # the grid covers the slide's bounds (its whole level 0 but for MRXS-like offsets): a slide
        # size far beyond it would make exports draw the heatmap in a corner of a huge picture
        ends = [grid.l0_origin_xy[i] + grid.shape_rc[1 - i] * grid.l0_cell_size_xy[i] for i in (0, 1)]
        ok = all(ends[i] <= level0_wh[i] + 2 * grid.l0_cell_size_xy[i] and level0_wh[i] <= 4 * ends[i] for i in (0, 1))
    if not ok:
        raise HeatmapError(f"{p}: damaged heatmap store, its slide size, grid, mpp_xy or threshold make no sense; rerun the scan")
    # a cell is cell_px pixels at target_mpp by construction (geometry.grid_for); an edited mpp or
    # cell size would move and rescale every lesion while each value alone looks plausible
    want_cell = [grid.cell_px * grid.target_mpp / m for m in mpp_xy]
    if not all(_close(a, b) for a, b in zip(grid.l0_cell_size_xy, want_cell)):
        raise HeatmapError(
            f"{p}: damaged heatmap store, its cell size {list(grid.l0_cell_size_xy)} level-0 px is not "
            f"{grid.cell_px} px at {grid.target_mpp} um/px on a slide of {mpp_xy} um/px ({want_cell}); rerun the scan"
        )
    _check_ome(p, ome, grid, (mpp_xy[0], mpp_xy[1]))
    return grid


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _check_ome(p: Path, ome: object, grid: GridGeometry, mpp_xy: tuple[float, float]) -> None:
    """The OME scale and translation other viewers place the heatmap by must be the ones the
    contract gives: napari or QuPath read only these."""
    want = ome_multiscales(grid, mpp_xy, 1, "")[0]["datasets"][0]["coordinateTransformations"]
    try:
        got = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]  # type: ignore[index]
        same = all(
            g["type"] == w["type"]
            and len(g[w["type"]]) == 2
            and all(_close(float(a), b) for a, b in zip(g[w["type"]], w[w["type"]]))
            for g, w in zip(got, want, strict=True)
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
        same = False
    if not same:
        raise HeatmapError(
            f"{p}: damaged heatmap store, its OME scale/translation (attrs ome.multiscales) is missing or disagrees "
            "with its grid and mpp_xy, so other viewers would misplace it; rerun the scan"
        )


def grid_from_attrs(g: Mapping[str, Any]) -> GridGeometry:
    return GridGeometry(
        l0_origin_xy=(int(g["l0_origin_xy"][0]), int(g["l0_origin_xy"][1])),
        l0_cell_size_xy=(float(g["l0_cell_size_xy"][0]), float(g["l0_cell_size_xy"][1])),
        shape_rc=(int(g["shape_rc"][0]), int(g["shape_rc"][1])),
        cell_px=int(g["cell_px"]),
        patch_px=int(g["patch_px"]),
        target_mpp=float(g["target_mpp"]),
    )


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """The ``wsi_scan`` attrs of a store, or None where there is no readable store."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - any unreadable store is "not there"
        return None
    meta = root.attrs.get("wsi_scan")
    return dict(meta) if isinstance(meta, Mapping) else None


def open_heatmap(path: str | Path) -> Heatmap:
    """Open a complete heatmap store; raises HeatmapError for anything else."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise HeatmapError(f"heatmap {p} does not exist")
    if not p.is_dir():
        raise HeatmapError(
            f"{p} is a file, not a heatmap store (a folder); expected the --out of a scan (`wsi-scan SLIDE --out H.zarr`)"
        )
    try:
        root = zarr.open_group(str(p), mode="r")
        meta: dict[str, Any] = dict(root.attrs["wsi_scan"])  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        raise HeatmapError(
            f"{p}: not a wsi-scan heatmap store ({type(exc).__name__}: {exc!s:.100}); expected the --out of a scan "
            "(`wsi-scan SLIDE --out H.zarr`)"
        ) from None
    arrays: list[Any] = []
    for name in ("0", "labels/tissue/0"):
        try:
            arrays.append(root[name])
        except Exception as exc:  # noqa: BLE001 - a store of ours with a part deleted or garbled
            why = "missing" if isinstance(exc, KeyError) else f"unreadable: {type(exc).__name__}: {exc!s:.80}"
            raise HeatmapError(f"{p}: damaged heatmap store, its array {name} is {why}; rerun the scan") from None
    arr0, arr_tissue = arrays
    if meta.get("status") != "complete":
        raise HeatmapError(f"{p}: heatmap is incomplete (status {meta.get('status')!r}); rerun the scan")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise HeatmapError(f"{p}: damaged heatmap store, format_version is {version!r}; rerun the scan")
    if version > FORMAT_VERSION:
        raise HeatmapError(
            f"{p}: format_version {meta.get('format_version')} is newer than this wsi-scan understands ({FORMAT_VERSION})"
        )
    grid = _check_contract(p, meta, root.attrs.get("ome"))
    if tuple(arr0.shape) != grid.shape_rc or tuple(arr_tissue.shape) != grid.shape_rc:
        raise HeatmapError(
            f"{p}: array shapes {tuple(arr0.shape)} / {tuple(arr_tissue.shape)} disagree with grid shape_rc {grid.shape_rc}"
        )
    try:
        probs = np.asarray(arr0[...], dtype=np.float32)
        tissue = np.asarray(arr_tissue[...]).astype(bool)
    except Exception as exc:  # noqa: BLE001 - codec or file errors of a damaged chunk
        raise HeatmapError(
            f"{p}: damaged heatmap store, a data chunk cannot be read ({type(exc).__name__}); rerun the scan"
        ) from None
    finite = probs[np.isfinite(probs)]
    if finite.size and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
        raise HeatmapError(
            f"{p}: damaged heatmap store, probabilities outside [0, 1] (from {float(finite.min()):.3g} to "
            f"{float(finite.max()):.3g}); rerun the scan"
        )
    want = meta.get("data_sha256")
    if want is not None and data_digest(probs, tissue) != want:
        raise HeatmapError(
            f"{p}: damaged heatmap store, its data differ from what was written (a chunk is missing or altered); rerun the scan"
        )
    if want is None:
        if bool((tissue & ~np.isfinite(probs)).any()):
            raise HeatmapError(
                f"{p}: damaged heatmap store, tissue cells without a probability (a chunk is missing); rerun the scan"
            )
        # every store this version writes has one: the attribute was lost or the store is older
        logging.getLogger("wsi_scan.heatmap").warning(
            f"{p}: the store records no data digest (data_sha256), so an altered chunk cannot be told from the "
            "scan's data; rescan the slide to have one"
        )
    return Heatmap(str(p), probs, tissue, grid, meta)
