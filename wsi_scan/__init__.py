"""wsi-scan: find metastases in whole-slide images of lymph-node sections.

The public API is imported lazily so that ``import wsi_scan`` stays light (no torch, no
OpenSlide) until a function is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "scan_slide": "wsi_scan.scan",
    "scan_folder": "wsi_scan.batch",
    "open_heatmap": "wsi_scan.io.heatmap",
    "open_slide": "wsi_scan.io.slide",
    "load_model": "wsi_scan.io.model_files",
    "render_overlay": "wsi_scan.export.overlay",
    "to_geojson": "wsi_scan.export.geojson",
    "ScanConfig": "wsi_scan.config",
    "TissueConfig": "wsi_scan.config",
    "TrainConfig": "wsi_scan.config",
}

__all__ = sorted([*_API, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from .config import ScanConfig, TissueConfig, TrainConfig  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'wsi_scan' has no attribute {name!r}")
