"""What is in a slide: the data behind ``wsi-scan info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TissueConfig
from .errors import MppError


def slide_info(
    path: str | Path, backend: str = "auto", mpp_override: float | None = None, tissue_cfg: TissueConfig = TissueConfig()
) -> dict[str, Any]:
    from .io.slide import open_slide

    slide = open_slide(path, backend)
    try:
        return _describe(slide, path, mpp_override, tissue_cfg)
    finally:
        slide.close()


def _describe(slide: Any, path: str | Path, mpp_override: float | None, tissue_cfg: TissueConfig) -> dict[str, Any]:
    from .geometry import level_mpp
    from .io.mpp import check_extent, resolve_mpp

    info = slide.info
    d: dict[str, Any] = {
        "path": info.path,
        "vendor": info.vendor,
        "backend": info.backend,
        "size_bytes": info.size_bytes,
        "l0_bounds_xywh": list(info.l0_bounds_xywh),
        "levels": [{"size_wh": list(lv.size_wh), "downsample_xy": list(lv.downsample_xy)} for lv in info.levels],
        "mpp_xy": None,
        "mpp_source": None,
        "tissue_fraction": None,
    }
    try:
        mpp = resolve_mpp(info.metadata, mpp_override, str(path))
        check_extent(info.level0_size_wh, mpp, str(path))
    except MppError as exc:
        d["mpp_error"] = str(exc)
        return d
    d["mpp_xy"] = [mpp.x, mpp.y]
    d["mpp_source"] = mpp.source
    for lv, row in zip(info.levels, d["levels"]):
        row["mpp"] = max(level_mpp(mpp.xy, lv.downsample_xy))
    # the scan's own plan, so that info and the scan name the same tissue: the mask's area and
    # the area of the cells that a scan would classify (larger: a cell counts whole)
    from .config import PCAM_CELL_PX, PCAM_INPUT_PX, PCAM_MPP, ScanConfig
    from .plan import plan_scan

    sp = plan_scan(slide, mpp.xy, PCAM_MPP, PCAM_CELL_PX, PCAM_INPUT_PX, ScanConfig(tissue=tissue_cfg))
    mx, my = sp.tissue.mask_mpp_xy
    d["tissue_fraction"] = sp.tissue.fraction
    d["tissue_area_mm2"] = float(sp.tissue.mask.sum()) * mx * my / 1e6
    d["tissue_cells"] = int(sp.cells.sum())
    d["scanned_area_mm2"] = sp.tissue_area_mm2
    d["tissue_method"] = sp.tissue.params.get("method")
    return d
