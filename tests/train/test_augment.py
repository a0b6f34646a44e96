from __future__ import annotations

import numpy as np

from wsi_scan.train.augment import soften


def test_soften_keeps_shape_and_the_centre_where_it_was():
    patch = np.full((96, 96, 3), 230, dtype=np.uint8)
    patch[32:64, 32:64] = 40  # the labelled centre square, dark
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = soften(patch, rng, 1.15)
        assert out.shape == patch.shape and out.dtype == np.uint8
        w = (255 - out[..., 0]).astype(np.float64)
        yy, xx = np.indices(w.shape)
        cy, cx = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
        assert abs(cy - 47.5) < 0.5 and abs(cx - 47.5) < 0.5, (cy, cx)


def test_soften_removes_fine_detail_and_factor_one_is_identity():
    checker = ((np.indices((96, 96)).sum(0) % 2) * 255).astype(np.uint8)
    patch = np.repeat(checker[..., None], 3, axis=2)
    assert np.array_equal(soften(patch, np.random.default_rng(1), 1.0), patch)
    out = soften(patch, np.random.default_rng(1), 1.15)
    assert out.std() < 0.5 * patch.std()  # a 1-px checkerboard does not survive a 1.0-1.15x shrink


def test_dataset_softening_is_seeded_and_off_by_default():
    from wsi_scan.train.data import RowsDataset

    class _Set:
        labels = np.array([0, 1])

        def read(self, i: int) -> np.ndarray:
            return np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)

    rows = np.array([[0, 0], [0, 1]])
    plain = RowsDataset([_Set()], rows, seed=3)
    assert np.array_equal(plain[1][0].numpy(), _Set().read(1))
    soft = RowsDataset([_Set()], rows, seed=3, soften_prob=1.0)
    a, b = soft[1][0].numpy(), soft[1][0].numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, _Set().read(1))
    assert not np.array_equal(soft[3][0].numpy(), a)  # another epoch, another draw
