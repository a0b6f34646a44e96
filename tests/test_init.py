from __future__ import annotations

import subprocess
import sys

import wsi_scan


def test_import_is_light():
    code = "import sys, wsi_scan, wsi_scan.cli; print(sorted(m for m in ('torch', 'openslide', 'zarr', 'dask', 'skimage') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves():
    for name in ("scan_slide", "open_heatmap", "open_slide", "load_model", "ScanConfig"):
        assert callable(getattr(wsi_scan, name))
