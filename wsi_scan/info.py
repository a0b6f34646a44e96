"""What is in a slide: the data behind ``wsi-scan info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TissueConfig
from .errors import MppError


def slide_info(path: str | Path, backend: str = "auto", mpp_override: float | None = None, tissue_cfg: TissueConfig = TissueConfig()) -> dict[str, Any]:
    from .io.slide import open_slide

    slide = open_slide(path, backend)
    try:
        return _describe(slide, path, mpp_override, tissue_cfg)
    finally:
        slide.close()


def _describe(slide: Any, path: str | Path, mpp_override: float | None, tissue_cfg: TissueConfig) -> dict[str, Any]:
    from .geometry import level_mpp
    from .io.mpp import check_extent, resolve_mpp
    from .regions import read_thumbnail
    from .tissue import compute_mask

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
    thumb, k = read_thumbnail(slide, mpp.xy, tissue_cfg.mask_mpp)
    mask_mpp = (k[0] * mpp.x, k[1] * mpp.y)
    mask, _ = compute_mask(thumb, mask_mpp, tissue_cfg)
    d["tissue_fraction"] = float(mask.mean())
    d["tissue_area_mm2"] = float(mask.sum()) * mask_mpp[0] * mask_mpp[1] / 1e6
    return d
