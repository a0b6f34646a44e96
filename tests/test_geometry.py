"""Pure frame conversions: grids, level choice, read plans."""

from __future__ import annotations

import math

import pytest

from wsi_scan.errors import MppError
from wsi_scan.geometry import (
    blocks,
    box_in_read,
    check_resolution,
    choose_level,
    level_read_plan,
    plan_grid,
)


def test_grid_starts_at_bounds_and_keeps_full_frame():
    # MIRAX-like: image data starts at (1234, 567) of the level-0 frame
    g = plan_grid((1234, 567, 10_000, 5_000), (0.243, 0.243), 0.972, 32, 96)
    assert g.l0_origin_xy == (1234, 567)
    assert g.l0_cell_size_xy == pytest.approx((128.0, 128.0))
    assert g.shape_rc == (math.ceil(5000 / 128), math.ceil(10000 / 128))
    assert g.cell_to_l0_rect(0, 0) == pytest.approx((1234, 567, 1362, 695))
    assert g.l0_to_cell(1234 + 128 * 3 + 5, 567 + 128 * 2) == (2, 3)
    # a block's window box reaches one margin (32 target px = 128 l0 px) beyond its cells
    assert g.block_l0_box_xyxy(0, 0, 2, 2) == pytest.approx((1234 - 128, 567 - 128, 1234 + 384, 567 + 384))


def test_non_square_mpp_within_tolerance_gives_per_axis_cells():
    g = plan_grid((0, 0, 1000, 1000), (0.25, 0.251), 0.972, 32, 96)
    assert g.l0_cell_size_xy[0] == pytest.approx(32 * 0.972 / 0.25)
    assert g.l0_cell_size_xy[1] == pytest.approx(32 * 0.972 / 0.251)


@pytest.mark.parametrize(
    ("downsamples", "mpp", "want"),
    [
        ([(1, 1), (4, 4), (16, 16)], 0.243, 1),  # 0.972 exactly: use it
        ([(1, 1), (4, 4), (16, 16)], 0.25, 0),  # 1.0 is coarser than 0.972
        ([(1, 1), (3.9998, 3.9998), (15.9992, 15.9992)], 0.243, 1),  # TCGA-style, not int()-ed
        ([(1, 1), (2, 2), (4, 4), (8, 8)], 0.25, 1),
        ([(1, 1), (2, 2)], 0.5, 0),
        ([(1, 1)], 1.05, 0),  # slightly coarser than the model: level 0 (accepted by check_resolution)
    ],
)
def test_choose_level(downsamples, mpp, want):
    assert choose_level(downsamples, (mpp, mpp), 0.972) == want


def test_too_coarse_is_refused():
    check_resolution((1.05, 1.05), 0.972, 1.1, "s")
    with pytest.raises(MppError, match="too coarse"):
        check_resolution((2.0, 2.0), 0.972, 1.1, "s")


@pytest.mark.parametrize("ds", [1.0, 2.0, 3.9998, 4.0, 15.957])
@pytest.mark.parametrize("origin_shift", [0.0, 0.3, 0.999])
def test_read_plan_covers_box_for_both_backends(ds, origin_shift):
    box = (1000.7, 2000.2, 1500.1, 2300.9)
    pad = 3
    (lx, ly), (w, h) = level_read_plan(box, (ds, ds), pad)
    # OpenSlide starts at l0/ds (sub-pixel); tifffile at floor(l0/ds)
    for ox, oy in ((lx / ds, ly / ds), (math.floor(lx / ds), math.floor(ly / ds))):
        b = box_in_read(box, (ds, ds), (ox, oy))
        assert b[0] >= pad - 1 and b[1] >= pad - 1
        assert b[2] <= w - pad + 1 and b[3] <= h - pad + 1


def test_blocks_tile_the_grid_exactly():
    bl = blocks((70, 33), 32)
    covered = set()
    for r0, c0, nr, nc in bl:
        for r in range(r0, r0 + nr):
            for c in range(c0, c0 + nc):
                assert (r, c) not in covered
                covered.add((r, c))
    assert len(covered) == 70 * 33


@pytest.mark.parametrize(
    ("downsamples", "mpp", "want"),
    [
        ([(1, 1), (4, 4), (16, 16)], 0.25, 1),  # 1.0 um/px, 3% coarser than 0.972: enlarged
        ([(1, 1), (4, 4), (16, 16)], 0.243, 1),  # exactly the model's
        ([(1, 1), (4, 4), (16, 16)], 0.3, 0),  # 1.2 um/px is past max_upsample: level 0
        ([(1, 1), (2, 2), (4, 4)], 0.265, 2),  # 1.06 (9% coarse, within 1.1x) is nearer than 0.53
        ([(1, 1), (2, 2), (4, 4)], 0.2, 2),  # 0.8 is nearer than 1.6 (too coarse anyway)
        ([(1, 1)], 1.05, 0),
    ],
)
def test_choose_level_nearest(downsamples, mpp, want):
    assert choose_level(downsamples, (mpp, mpp), 0.972, "nearest", 1.1) == want


def test_read_level_policy_is_range_checked():
    from wsi_scan.config import ScanConfig
    from wsi_scan.errors import UsageError

    with pytest.raises(UsageError, match="--read-level must be one of exact, nearest"):
        ScanConfig(read_level="coarsest")  # type: ignore[arg-type]
