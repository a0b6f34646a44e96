from __future__ import annotations

import numpy as np

from wsi_scan.io.mpp import resolve_mpp
from wsi_scan.io.slide import open_slide


def test_auto_reads_plain_pyramidal_tiff_with_tifffile_and_same_pixels_as_openslide(make_slide):
    path = make_slide(size_wh=(2100, 1700), downsamples=(1, 4, 16), tumour=((500, 400, 900, 800),))
    auto, osr, tfs = (open_slide(path, b) for b in ("auto", "openslide", "tifffile"))
    assert auto.info.backend == "tifffile"
    assert auto.info.vendor == osr.info.vendor == "generic-tiff"
    assert [lv.size_wh for lv in auto.info.levels] == [lv.size_wh for lv in osr.info.levels]
    mpp_a = resolve_mpp(auto.info.metadata, None, str(path))
    mpp_o = resolve_mpp(osr.info.metadata, None, str(path))
    assert np.allclose(mpp_a.xy, mpp_o.xy, rtol=1e-6)
    for level, l0_xy, wh in ((0, (237, 411), (301, 257)), (1, (-40, 1000), (200, 190)), (2, (0, 0), (132, 107))):
        a = tfs.read_region(l0_xy, level, wh)
        b = osr.read_region(l0_xy, level, wh)
        assert a.lv_origin_xy == b.lv_origin_xy
        assert np.array_equal(a.rgb, b.rgb), (level, l0_xy)
    for s in (auto, osr, tfs):
        s.close()
