"""Blocks cropped to their tissue cells: fewer pixels read, the same cells covered."""

from __future__ import annotations

import numpy as np

from wsi_scan.grid import crop_to_tissue, tissue_blocks


def test_crop_keeps_every_tissue_cell_once_and_drops_glass():
    rng = np.random.default_rng(1)
    cells = np.zeros((40, 50), dtype=bool)
    cells[5:23, 7:31] = rng.random((18, 24)) > 0.3
    cells[30, 45] = True  # a lone cell in its own block
    blocks = tissue_blocks(cells, 16)
    cropped = crop_to_tissue(cells, blocks)
    assert len(cropped) == len(blocks)
    seen = np.zeros(cells.shape, dtype=int)
    for (r0, c0, nr, nc), (br, bc, bnr, bnc) in zip(cropped, blocks):
        assert br <= r0 and bc <= c0 and r0 + nr <= br + bnr and c0 + nc <= bc + bnc  # inside its block
        sub = cells[r0 : r0 + nr, c0 : c0 + nc]
        # tight: every edge row and column of the crop holds tissue
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        seen[r0 : r0 + nr, c0 : c0 + nc] += sub
    np.testing.assert_array_equal(seen, cells.astype(int))
    assert (30, 45, 1, 1) in cropped
    assert sum(nr * nc for _, _, nr, nc in cropped) < sum(nr * nc for _, _, nr, nc in blocks)


def test_crop_drops_empty_blocks():
    cells = np.zeros((8, 8), dtype=bool)
    assert crop_to_tissue(cells, [(0, 0, 8, 8)]) == []
