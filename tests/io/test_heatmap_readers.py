"""Third-party OME-Zarr readers open the heatmap at the slide's physical scale."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from wsi_scan.config import ScanConfig
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.scan import scan_slide

MPP = 0.243


@pytest.fixture
def heatmap_path(make_slide, mock_model, tmp_path):
    # wide enough for a second pyramid level (> 64 cells)
    slide = make_slide(size_wh=(9000, 2400), mpp=MPP, tissue=((300, 300, 8700, 2100),), tumour=((1013, 707, 1511, 1209),))
    out = tmp_path / "h.zarr"
    scan_slide(slide, out, ScanConfig(block_cells=32), model=mock_model)
    return out


def _world_um(transforms: list, rc: tuple[float, float]) -> np.ndarray:
    """Apply OME scale-then-translation to an array index (y, x)."""
    p = np.asarray(rc, float)
    for t in transforms:
        if t["type"] == "scale":
            p = p * np.asarray(t["scale"], float)
        elif t["type"] == "translation":
            p = p + np.asarray(t["translation"], float)
    return p


def test_ome_zarr_py_reads_physical_scale(heatmap_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    hm = open_heatmap(heatmap_path)
    nodes = list(Reader(parse_url(str(heatmap_path)))())
    image = nodes[0]  # the reader yields the image first, then its labels
    assert image.load(Multiscales) is not None and image.load(Label) is None
    md = image.metadata
    assert [a["name"] for a in md["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" for a in md["axes"])
    assert len(image.data) >= 2
    np.testing.assert_array_equal(np.asarray(image.data[0]), hm.probs)
    for k, transforms in enumerate(md["coordinateTransformations"][:2]):
        f = 2**k
        # a level-k pixel centre sits on the centre of its f x f cells, in the slide's world frame
        # (napari shows slide pixel (x, y) centred at (x * mpp, y * mpp))
        x0, y0, _, _ = hm.cell_to_l0_rect(3 * f, 5 * f)
        _, _, x1, y1 = hm.cell_to_l0_rect(3 * f + f - 1, 5 * f + f - 1)
        want = np.array([((y0 + y1) / 2 - 0.5) * MPP, ((x0 + x1) / 2 - 0.5) * MPP])
        np.testing.assert_allclose(_world_um(transforms, (3, 5)), want, rtol=0, atol=1e-6)
        assert transforms[0]["scale"] == pytest.approx([32 * 0.972 * f] * 2)
    labels = [n for n in nodes if n.load(Label) is not None]
    assert len(labels) == 1
    np.testing.assert_array_equal(np.asarray(labels[0].data[0]).astype(bool), hm.tissue)


def test_ome_zarr_models_validates(heatmap_path):
    from ome_zarr_models.v05 import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    root = zarr.open_group(str(heatmap_path), mode="r")
    ms = Image.from_zarr(root).attributes.ome.multiscales[0]
    assert [a.unit for a in ms.axes] == ["micrometer", "micrometer"]
    assert ms.datasets[0].coordinateTransformations[0].scale == pytest.approx([32 * 0.972] * 2)
    label = ImageLabel.from_zarr(root["labels/tissue"])
    assert label.attributes.ome.image_label is not None
