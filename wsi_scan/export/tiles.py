"""Patch data sets cut from a slide: tissue-masked 96x96 windows at the model's mpp.

The windows are exactly those a scan classifies (same grid, same block reads and resampling),
so a model trained on them sees what it will see when scanning. Labels, when a GeoJSON of
tumour annotations or a label mask is given, follow PCam: a window is positive when its
central cell holds any tumour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PCAM_CELL_PX, PCAM_INPUT_PX, PCAM_MPP, TILE_STRIDE_CELLS, ScanConfig, TissueConfig
from ..errors import DataError, UsageError
from ..geometry import CellBlock


@dataclass(frozen=True)
class TileResult:
    files: list[Path]
    n_patches: int
    n_positive: int | None
    target_mpp: float
    stride_cells: int
    l0_window_size_xy: tuple[float, float]
    attrs: dict[str, Any] = field(default_factory=dict)


#: GeoJSON's geometry types: an object of one of these is a geometry, not a Feature
GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection")


def _class_name(feature: dict[str, Any]) -> str | None:
    """A feature's class as QuPath writes it (``classification: {name}``) or as a bare string some
    tools write; None when it has none."""
    props = feature.get("properties")
    cls = props.get("classification") if isinstance(props, dict) else None
    if isinstance(cls, dict):
        cls = cls.get("name")
    return None if cls is None else str(cls)


def _polygons(g: Any) -> tuple[list[Any], list[str]]:
    """The polygons of a shapely geometry (those inside a GeometryCollection too) and the types
    of its parts that are not areas."""
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return [g], []
    if g.geom_type == "GeometryCollection":
        polys: list[Any] = []
        other: list[str] = []
        for part in g.geoms:
            p, o = _polygons(part)
            polys += p
            other += o
        return polys, other
    return [], [g.geom_type]


def tumour_geometry(geojson: dict[str, Any], where: str, class_name: str | None = "Tumor") -> Any:
    """Union of the (multi)polygons of a GeoJSON, keeping only ``class_name`` when classes are
    given (``None``: every polygon). Points and lines mark no area: when they are all there is,
    a warning says so, since the result (nothing) would otherwise look like an unannotated file;
    likewise polygons of other classes only. A bare geometry (no Feature around it) counts as
    one unclassified feature, and the polygons inside a GeometryCollection count."""
    import logging

    import shapely
    from shapely.geometry import shape

    kind = geojson.get("type")
    if kind not in ("FeatureCollection", "Feature", *GEOMETRY_TYPES):
        # any other JSON (a wsi-scan evaluation, a config) would read as a file that marks nothing
        raise DataError(
            f"{where}: not GeoJSON: expected an object of type FeatureCollection, Feature or a geometry, found "
            f"{'no type' if kind is None else f'type {str(kind)[:40]!r}'}; export the annotations as GeoJSON (QuPath: "
            "File > Export objects as GeoJSON)"
        )
    feats = geojson.get("features") if kind == "FeatureCollection" else [geojson]
    if not isinstance(feats, list):
        raise DataError(
            f"{where}: expected a GeoJSON FeatureCollection whose 'features' is a list, found "
            f"{type(feats).__name__ if feats is not None else 'none'}"
        )
    geoms = []
    not_areas: dict[str, int] = {}
    other_classes: dict[str, int] = {}
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise DataError(f"{where}: feature {i} is a JSON {type(f).__name__}, expected a GeoJSON Feature object")
        cls = _class_name(f)
        if class_name is not None and cls is not None and cls.lower() not in (class_name.lower(), "tumour"):
            other_classes[cls] = other_classes.get(cls, 0) + 1
            continue
        geometry = f if f.get("type") in GEOMETRY_TYPES else f.get("geometry")
        try:
            g = shape(geometry) if geometry else None
        except Exception as exc:  # noqa: BLE001 - shapely's errors for malformed coordinates vary
            raise DataError(f"{where}: a feature's geometry cannot be read ({type(exc).__name__}: {exc!s:.80})") from None
        if g is None or g.is_empty:
            continue
        polys, other = _polygons(g)
        geoms += [p if p.is_valid else shapely.make_valid(p) for p in polys]
        for t in other:
            not_areas[t] = not_areas.get(t, 0) + 1
    log = logging.getLogger("wsi_scan.annotations")
    if not geoms and not_areas:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(not_areas.items()))
        log.warning(
            f"{where}: its features are {kinds} and no polygon: points and lines mark no area, so they are not "
            "used; draw the regions as polygons (QuPath: the brush, wand or polygon tool)"
        )
    if not geoms and other_classes:
        kinds = ", ".join(f"{n} {c!r}" for c, n in sorted(other_classes.items()))
        log.warning(
            f"{where}: no region is classified {class_name} (or Tumour) or unclassified, and {kinds} are not "
            f"tumour, so the file marks no tumour; classify the tumour regions {class_name} if they are"
        )
    return shapely.union_all(geoms) if geoms else None


def cell_labels(grid: Any, cells_rc: np.ndarray, tumour: Any) -> np.ndarray:
    """1 where the cell's level-0 rectangle shares area with ``tumour`` (PCam's rule), else 0.

    "Shares area" means at least ``MIN_LABEL_OVERLAP_L0_PX2``: annotations are drawn to the
    level-0 pixel and cell edges fall between pixels, so a sliver below half a pixel is the
    rounding of a shared edge, not tumour inside the cell."""
    import shapely

    from ..config import MIN_LABEL_OVERLAP_L0_PX2

    if tumour is None or len(cells_rc) == 0:
        return np.zeros(len(cells_rc), dtype=np.uint8)
    rects = np.array([grid.cell_to_l0_rect(int(r), int(c)) for r, c in cells_rc])
    boxes = shapely.box(rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3])
    shapely.prepare(tumour)
    hit = shapely.intersects(tumour, boxes)
    out = np.zeros(len(cells_rc), dtype=np.uint8)
    idx = np.flatnonzero(hit)
    if idx.size:
        # touching along an edge is not tumour inside the cell
        out[idx] = (shapely.area(shapely.intersection(boxes[idx], tumour)) >= MIN_LABEL_OVERLAP_L0_PX2).astype(np.uint8)
    return out


#: the patch file's size as a share of the patches' raw bytes, rounded up from the share measured
#: on the sample slide (docs/exports.md, "Patch data sets from your own slides")
TILE_COMPRESSED_SHARE = 0.9


def check_free_space(out: Path, raw_bytes: int) -> None:
    """Refuse before writing when the disk cannot hold the patches: HDF5 meeting a full disk
    mid-write can crash the whole process (h5py segfaults when it closes the file)."""
    import shutil

    from ..errors import OutputWriteError
    from ..io.outputs import absolute

    folder = absolute(out)
    while not folder.exists():
        folder = folder.parent
    need = int(raw_bytes * TILE_COMPRESSED_SHARE) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputWriteError(
            f"--out {out}: about {need / 2**20:.0f} MiB are needed for the patches and {free / 2**20:.1f} MiB "
            "are free there; free some space or choose another --out"
        )


def check_mask_shape(shape_rc: tuple[int, ...], l0_size_wh: tuple[int, int], where: str) -> None:
    """A mask must cover the slide's level-0 frame at one downsample in x and y."""
    mh, mw = shape_rc[:2]
    w0, h0 = l0_size_wh
    # a mask made by downsampling by d rounds w0 / d and h0 / d: some d must give both sizes
    # within one mask pixel
    d_lo = max(w0 / (mw + 1), h0 / (mh + 1))
    d_hi = min(w0 / max(mw - 1, 1e-9), h0 / max(mh - 1, 1e-9))
    if d_lo > d_hi:
        raise DataError(
            f"{where}: mask of {mw} x {mh} px does not have the shape of the slide's level 0 ({w0} x {h0} px); "
            "expected the slide's frame at one downsample in x and y"
        )


def mask_table(mask: np.ndarray, l0_size_wh: tuple[int, int], where: str) -> np.ndarray:
    """Summed-area table of a label mask, once its shape is checked against the slide's level 0.

    The mask covers the slide's level-0 frame at one scale in x and y (any downsample), as
    CAMELYON16's masks and most annotation exports do.
    """
    check_mask_shape(mask.shape, l0_size_wh, where)
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return sat


def mask_cell_labels(grid: Any, cells_rc: np.ndarray, sat: np.ndarray, l0_size_wh: tuple[int, int]) -> np.ndarray:
    """1 where the cell's level-0 rectangle overlaps a non-zero mask pixel (PCam's rule).

    ``sat`` is the mask's ``mask_table``; mask pixels are areas, so a cell counts a mask pixel
    it overlaps by any area.
    """
    if len(cells_rc) == 0:
        return np.zeros(0, dtype=np.uint8)
    mh, mw = sat.shape[0] - 1, sat.shape[1] - 1
    sx, sy = mw / l0_size_wh[0], mh / l0_size_wh[1]
    rects = np.array([grid.cell_to_l0_rect(int(r), int(c)) for r, c in cells_rc], dtype=np.float64)
    eps = 1e-9  # a cell edge on a mask pixel edge does not reach into that pixel
    x0 = np.clip(np.floor(rects[:, 0] * sx + eps), 0, mw).astype(np.int64)
    y0 = np.clip(np.floor(rects[:, 1] * sy + eps), 0, mh).astype(np.int64)
    x1 = np.clip(np.ceil(rects[:, 2] * sx - eps), 0, mw).astype(np.int64)
    y1 = np.clip(np.ceil(rects[:, 3] * sy - eps), 0, mh).astype(np.int64)
    count = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (count > 0).astype(np.uint8)


def tile_slide(
    slide_path: str | Path,
    out: str | Path,
    stride_cells: int = TILE_STRIDE_CELLS,
    labels_geojson: str | Path | None = None,
    model: Any = None,
    backend: str = "auto",
    mpp: float | None = None,
    tissue_config: TissueConfig = TissueConfig(),
    split: str = "train",
    block_cells: int = 16,
    workers: int = 2,
    overwrite: bool = False,
    labels_mask: str | Path | None = None,
) -> TileResult:
    """Cut the tissue windows of a slide into a PCam-layout HDF5 patch set.

    Labels come from ``labels_geojson`` (tumour annotations) or ``labels_mask`` (an image of the
    slide's level-0 frame at any downsample, non-zero = tumour), never both.
    ``out`` ending in ``.h5`` gets one file with ``x``, ``y`` (with labels), ``l0_xy`` (window
    top-left, level-0 px) and ``cell_rc``; any other ``out`` is a folder that receives
    ``camelyonpatch_level_2_split_<split>_{x,y}.h5``, which ``wsi-scan train`` reads.
    ``stride_cells`` is the step between windows in cells (32 px at the model's mpp): 3 gives
    non-overlapping 96 px windows. ``model`` (a path or LoadedModel) sets mpp and window size;
    the default is PCam's 0.972 um/px, 96 px windows, 32 px cells.
    """
    from ..io.datasets import PATCH_FILE_SUFFIXES
    from ..io.outputs import check_folder_name

    if stride_cells < 1:
        raise UsageError(f"--stride-cells must be at least 1, found {stride_cells}")
    if Path(out).suffix.lower() not in PATCH_FILE_SUFFIXES:
        check_folder_name(Path(out), "a patch set is one .h5 file or a folder of PCam-layout files", ".h5")
    if split not in ("train", "valid", "test"):
        raise UsageError(f"split must be train, valid or test, found {split!r}")
    if labels_geojson is not None and labels_mask is not None:
        raise UsageError("give labels as a GeoJSON or as a mask, not both")
    target_mpp, patch_px, cell_px = _window_contract(model)
    labels = Labeller(labels_geojson, labels_mask)
    plan = plan_tiles(
        Path(slide_path), backend, mpp, target_mpp, patch_px, cell_px, tissue_config, stride_cells, block_cells, labels
    )
    res = cut_tiles(plan, out, split, workers, overwrite, labels)
    import logging

    log = logging.getLogger("wsi_scan.tile")
    if res.n_patches == 0:
        log.warning(f"{slide_path}: no tissue window to cut: the patch file is empty (the scan would say 'no tissue found')")
    elif labels.has_tumour() and res.n_positive == 0:
        # points, lines or regions off the slide label nothing: all-negative patches are then a surprise
        log.warning(
            f"{slide_path}: the labels ({labels.geojson or labels.mask}) make no window positive: every patch is "
            "labelled 0; check that they hold tumour areas in this slide's level-0 pixels"
        )
    return res


def _window_contract(model: Any) -> tuple[float, int, int]:
    """(um/px, window px, cell px): the model card's, or PCam's without a model."""
    if model is None:
        return PCAM_MPP, PCAM_INPUT_PX, PCAM_CELL_PX
    from ..io.model_files import LoadedModel, load_model

    card = (model if isinstance(model, LoadedModel) else load_model(model)).card
    return card.mpp, card.input_px, card.cell_px


class Labeller:
    """The labels of cells from a GeoJSON of tumour annotations or a label mask (or none)."""

    def __init__(self, geojson: str | Path | None, mask: str | Path | None) -> None:
        from ..io.annotations import read_json

        self.geojson, self.mask = geojson, mask
        self.tumour = tumour_geometry(read_json(geojson), str(geojson)) if geojson is not None else None
        self.mask_sat: np.ndarray | None = None  # summed-area table of the mask, once the slide's size is known

    @property
    def labelled(self) -> bool:
        return self.geojson is not None or self.mask is not None

    def attach(self, level0_size_wh: tuple[int, int]) -> None:
        from ..io.annotations import read_label_mask

        if self.mask is not None:
            self.mask_sat = mask_table(read_label_mask(self.mask), level0_size_wh, str(self.mask))

    def has_tumour(self) -> bool:
        """Whether the labels hold any tumour area at all (a negative slide's labels hold none)."""
        if self.tumour is not None:
            return not self.tumour.is_empty and self.tumour.area > 0
        return self.mask_sat is not None and float(self.mask_sat[-1, -1]) > 0

    def rule(self) -> str | None:
        if not self.labelled:
            return None
        if self.geojson is not None:
            return "1 where the central cell_px square shares area with a Tumor annotation"
        return "1 where the central cell_px square overlaps a non-zero mask pixel"

    def __call__(self, grid: Any, rc: np.ndarray, level0_size_wh: tuple[int, int]) -> np.ndarray | None:
        if self.mask_sat is not None:
            return mask_cell_labels(grid, rc, self.mask_sat, level0_size_wh)
        return cell_labels(grid, rc, self.tumour) if self.geojson is not None else None


@dataclass(frozen=True)
class TilePlan:
    """What ``cut_tiles`` reads: the scan's grid and read plan, the windows kept and their blocks."""

    grid: Any
    read: Any
    cells: np.ndarray  # (rows, cols) bool: windows to cut (tissue cells on the stride)
    blocks: list[CellBlock]
    patch_px: int
    cell_px: int
    level0_size_wh: tuple[int, int]
    attrs: dict[str, Any]


def plan_tiles(
    slide_path: Path,
    backend: str,
    mpp: float | None,
    target_mpp: float,
    patch_px: int,
    cell_px: int,
    tissue_config: TissueConfig,
    stride_cells: int,
    block_cells: int,
    labels: Labeller,
) -> TilePlan:
    """The slide opened, its pixel size resolved and checked, the scan's own plan made, the
    cells thinned to the stride and grouped into blocks."""
    from ..geometry import check_resolution
    from ..grid import tissue_blocks
    from ..io.mpp import check_extent, resolve_mpp
    from ..io.slide import open_slide
    from ..plan import plan_scan

    with open_slide(slide_path, backend) as slide:
        info = slide.info
        res = resolve_mpp(info.metadata, mpp, str(slide_path), ScanConfig().mpp_xy_tolerance)
        check_extent(info.level0_size_wh, res, str(slide_path))
        check_resolution(res.xy, target_mpp, ScanConfig().max_upsample, str(slide_path))
        # the scan's own plan, so that the windows cut are the cells a scan would classify
        sp = plan_scan(slide, res.xy, target_mpp, cell_px, patch_px, ScanConfig(tissue=tissue_config))
        labels.attach(info.level0_size_wh)
    rr, cc = np.indices(sp.grid.shape_rc)
    cells = sp.cells & (rr % stride_cells == 0) & (cc % stride_cells == 0)
    if sp.cells.any() and not cells.any():
        raise UsageError(
            f"--stride-cells {stride_cells} leaves no window on the tissue ({int(sp.cells.sum())} tissue cells on a grid of "
            f"{sp.grid.shape_rc[0]} x {sp.grid.shape_rc[1]}); expected a stride that meets it: pass a smaller one"
        )
    # blocks start on multiples of the stride, so every block sees the same window phase
    block_list = tissue_blocks(cells, max(block_cells // stride_cells, 1) * stride_cells)
    fx, fy = sp.grid.l0_per_tgt_xy
    attrs = {
        "slide": {
            "path": str(slide_path.resolve()),
            "name": slide_path.name,
            "mpp_xy": list(res.xy),
            "mpp_source": res.source,
            "level0_size_wh": list(info.level0_size_wh),
        },
        "target_mpp": target_mpp,
        "patch_px": patch_px,
        "cell_px": cell_px,
        "stride_cells": stride_cells,
        "l0_xy": "top-left corner of each window, level-0 px",
        "l0_window_size_xy": [patch_px * fx, patch_px * fy],
        "labels": str(labels.geojson or labels.mask) if labels.labelled else None,
        "label_rule": labels.rule(),
    }
    return TilePlan(sp.grid, sp.read, cells, block_list, patch_px, cell_px, info.level0_size_wh, attrs)


def cut_tiles(plan: TilePlan, out: str | Path, split: str, workers: int, overwrite: bool, labels: Labeller) -> TileResult:
    """Read the blocks (a few at a time on Dask threads), cut their windows, label and append them."""
    import dask

    from ..grid import block_windows
    from ..io.datasets import PatchWriter
    from ..regions import expected_reads, read_block

    grid, cells, patch_px, cell_px = plan.grid, plan.cells, plan.patch_px, plan.cell_px

    def cut(block: CellBlock) -> tuple[np.ndarray, np.ndarray]:
        r0, c0, nr, nc = block
        sel = cells[r0 : r0 + nr, c0 : c0 + nc]
        region = read_block(plan.read, block)
        r, c = np.nonzero(sel)
        return block_windows(region, sel, patch_px, cell_px), np.stack([r + r0, c + c0], axis=1)

    check_free_space(Path(out), int(cells.sum()) * patch_px * patch_px * 3)
    writer = PatchWriter(out, (patch_px, patch_px, 3), labels.labelled, plan.attrs, split, overwrite)
    ok = False
    n_pos = 0
    try:
        task = dask.delayed(cut, pure=False)
        step = max(1, 4 * workers)  # a few blocks in flight: bounded memory, both cores busy
        with expected_reads(plan.read, plan.blocks, ScanConfig().tile_cache_mib << 20):
            for i in range(0, len(plan.blocks), step):
                parts = dask.compute(*[task(b) for b in plan.blocks[i : i + step]], scheduler="threads", num_workers=workers)
                for x, rc in parts:
                    m = grid.margin_px
                    l0_xy = np.array([grid.tgt_to_l0(float(c * cell_px - m), float(r * cell_px - m)) for r, c in rc]).reshape(
                        -1, 2
                    )
                    y = labels(grid, rc, plan.level0_size_wh)
                    n_pos += int(y.sum()) if y is not None else 0
                    writer.append(x, l0_xy, rc, y)
        ok = True
    finally:
        files = writer.close(ok)
    fx, fy = grid.l0_per_tgt_xy
    return TileResult(
        files,
        writer.n,
        n_pos if labels.labelled else None,
        plan.attrs["target_mpp"],
        plan.attrs["stride_cells"],
        (patch_px * fx, patch_px * fy),
        plan.attrs,
    )
