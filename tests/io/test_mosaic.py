from __future__ import annotations

import numpy as np

from wsi_scan.io.datasets import PatchSet
from wsi_scan.io.mosaic import write_mosaic
from wsi_scan.io.mpp import resolve_mpp
from wsi_scan.io.slide import open_slide
from wsi_scan.regions import resample_region


class _Flat(PatchSet):
    """Patches of one flat colour each, so any misplacement shows as a colour error."""

    def __init__(self, n: int) -> None:
        self.labels = np.arange(n) % 2
        self.name = "flat"
        self.colours = np.random.default_rng(0).integers(30, 220, (n, 3), dtype=np.uint8)

    def read(self, i: int) -> np.ndarray:
        return np.broadcast_to(self.colours[i], (96, 96, 3)).copy()


def test_mosaic_as_a_40x_scan_keeps_each_patch_on_its_cell(tmp_path):
    ps = _Flat(10)
    m = write_mosaic(tmp_path / "m.tif", ps, np.arange(10), scan_mpp=0.25)
    slide = open_slide(m.path)
    assert slide.info.backend == "tifffile"  # OpenSlide and tifffile agree on its levels
    assert [lv.size_wh for lv in slide.info.levels][1:] == [
        (-(-slide.info.level0_size_wh[0] // f), -(-slide.info.level0_size_wh[1] // f)) for f in (4, 16)
    ]
    mpp = resolve_mpp(slide.info.metadata, None, str(m.path))
    w_small = m.grid_rc[1] * 96
    assert abs(mpp.x - 0.972 * w_small / slide.info.level0_size_wh[0]) < 1e-9
    assert abs(mpp.x - 0.25) < 0.001
    fx, fy = 0.972 / mpp.x, 0.972 / mpp.y  # level-0 px per model px
    for k in range(10):
        i, j = divmod(k, m.grid_rc[1])
        # the inner 64 px of the patch, read back at the model's mpp (patch borders blend with neighbours)
        box = ((j * 96 + 16) * fx, (i * 96 + 16) * fy, (j * 96 + 80) * fx, (i * 96 + 80) * fy)
        got = resample_region(slide, 0, (1.0, 1.0), box, (64, 64)).astype(int)
        assert np.abs(got - ps.colours[k].astype(int)).max() <= 6, k  # JPEG q90 on a flat colour
    slide.close()
