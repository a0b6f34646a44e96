"""Real PCam patches laid out as a slide: the scan gives each patch the probability that
patch-level evaluation gives it, so detection on a slide is measured with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from tests._support import shared_path
from wsi_scan.config import ScanConfig, TissueConfig
from wsi_scan.io.datasets import PatchSet, open_patch_data
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import load_model
from wsi_scan.io.mosaic import write_mosaic
from wsi_scan.scan import scan_slide
from wsi_scan.train.evaluate import evaluate_patchset


@pytest.mark.real_data
@pytest.mark.parametrize("mode", ["dense", "patch"])
def test_mosaic_scan_equals_patch_evaluation(tmp_path, mode):
    valid = open_patch_data(shared_path("pcam-jpeg-sample")).splits["valid"]
    idx = np.random.default_rng(0).choice(len(valid), size=64, replace=False)
    mosaic = write_mosaic(tmp_path / "mosaic.tif", valid, idx)
    model = load_model(None)
    # every patch counts, fatty ones included: no size filtering, holes between patches filled
    cfg = ScanConfig(mode=mode, tissue=TissueConfig(min_cell_fraction=0.0, min_object_um2=0.0, min_hole_um2=1e9))
    scan_slide(mosaic.path, tmp_path / "m.zarr", cfg, model=model)
    hm = open_heatmap(tmp_path / "m.zarr")
    assert hm.attrs["grid"]["l0_cell_size_xy"] == pytest.approx([32.0, 32.0])

    class Subset(PatchSet):
        def __init__(self) -> None:
            self.labels = valid.labels[idx]
            self.name = "subset"

        def read(self, i: int) -> np.ndarray:
            return valid.read(int(idx[i]))

    ev = evaluate_patchset(model, Subset(), "cpu", workers=0)
    slide_probs = np.array([hm.probs[mosaic.cell_of(k)] for k in range(len(idx))])
    scanned = np.isfinite(slide_probs)
    assert scanned.mean() > 0.9  # nearly every patch is tissue
    np.testing.assert_allclose(slide_probs[scanned], ev.probs[scanned], atol=1e-4, rtol=0)
