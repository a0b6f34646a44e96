"""A scanned synthetic slide shared by the export tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from wsi_scan.config import ScanConfig
from wsi_scan.scan import scan_slide

#: painted "tumour" in level-0 px (x0, y0, x1, y1); cells are 128 l0 px at 0.243 um/px
TUMOUR = ((1013, 707, 1511, 1209), (2203, 1500, 2431, 1699))
TISSUE = ((300, 300, 2700, 2100),)
SIZE_WH = (3000, 2400)
MPP = 0.243

Scanned = Callable[..., tuple[Path, Path]]


@pytest.fixture
def scanned(make_slide, mock_model, tmp_path) -> Scanned:
    """scanned(tumour=..., tissue=...) -> (slide path, heatmap path), scanned with the mock model."""

    def go(tumour=TUMOUR, tissue=TISSUE, name: str = "slide.tif") -> tuple[Path, Path]:
        slide = make_slide(name, size_wh=SIZE_WH, mpp=MPP, tissue=tissue, tumour=tumour)
        out = tmp_path / (Path(name).stem + ".zarr")
        scan_slide(slide, out, ScanConfig(block_cells=16), model=mock_model)
        return slide, out

    return go
