"""End-to-end scans of synthetic slides: alignment cell by cell in level-0 coordinates, dense == patch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests._support import assert_same_heatmap_across_readers, expected_share, share_from_prob
from wsi_scan.config import ScanConfig
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.scan import scan_slide

TUMOUR = ((1013, 707, 1511, 1209), (2203, 1500, 2431, 1699))


def _check_alignment(hm_path: Path, tumour: tuple[tuple[int, int, int, int], ...], tol: float = 0.08) -> int:
    hm = open_heatmap(hm_path)
    checked = 0
    rows, cols = hm.grid.shape_rc
    for r in range(rows):
        for c in range(cols):
            p = hm.probs[r, c]
            if not np.isfinite(p):
                continue
            want = expected_share(hm.cell_to_l0_rect(r, c), tumour)
            got = float(share_from_prob(np.array([p]))[0])
            assert abs(got - want) <= tol, (r, c, hm.cell_to_l0_rect(r, c), got, want)
            checked += 1
    return checked


@pytest.mark.parametrize(
    ("mpp", "downsamples", "size"),
    [
        (0.243, (1, 4, 16), (3000, 2400)),  # 40x Camelyon: read at level 1, ~1:1
        (0.25, (1, 4, 16), (3001, 2399)),  # 40x: level 1 (1.0 um/px) enlarged 3% (--read-level nearest)
        (0.25, (1, 2, 4, 8), (2999, 2401)),  # read at level 1 (0.5 um/px), odd sizes
        (0.5, (1, 4, 16), (1601, 1203)),  # 20x: level 0, shrink 1.9x
    ],
)
@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_heatmap_aligns_with_painted_tumour(make_slide, mock_model, tmp_path, mpp, downsamples, size, backend):
    scale = 0.243 / mpp  # keep the painted squares at the same physical place
    tissue = ((int(200 * scale), int(200 * scale), int(2800 * scale), int(2200 * scale)),)
    tumour = tuple(tuple(int(v * scale) for v in b) for b in TUMOUR)
    slide = make_slide(size_wh=size, mpp=mpp, downsamples=downsamples, tissue=tissue, tumour=tumour)
    out = tmp_path / "h.zarr"
    res = scan_slide(slide, out, ScanConfig(backend=backend, block_cells=8), model=mock_model)
    assert res.n_tissue_cells > 100
    n = _check_alignment(out, tumour)  # type: ignore[arg-type]
    assert n == res.n_tissue_cells
    hm = open_heatmap(out)
    # the tumour squares are found, the rest of the tissue is not
    assert np.nanmax(hm.probs) > 0.85 and np.nanmin(hm.probs) < 0.15


def test_dense_equals_patch(make_slide, mock_model, tmp_path):
    slide = make_slide(tumour=TUMOUR)
    a = scan_slide(slide, tmp_path / "dense.zarr", ScanConfig(mode="dense", block_cells=7), model=mock_model)
    b = scan_slide(slide, tmp_path / "patch.zarr", ScanConfig(mode="patch", block_cells=7, batch_size=33), model=mock_model)
    pa, pb = open_heatmap(a.out).probs, open_heatmap(b.out).probs
    np.testing.assert_array_equal(np.isnan(pa), np.isnan(pb))
    np.testing.assert_allclose(pa[np.isfinite(pa)], pb[np.isfinite(pb)], atol=1e-5, rtol=0)


def test_dense_equals_patch_with_trained_network(make_slide, tmp_path):
    """The bundled network (dense-exact) gives the same numbers both ways, to 1e-5."""
    slide = make_slide(tumour=TUMOUR)
    a = scan_slide(slide, tmp_path / "dense.zarr", ScanConfig(mode="dense", block_cells=5))
    b = scan_slide(slide, tmp_path / "patch.zarr", ScanConfig(mode="patch", block_cells=5))
    pa, pb = open_heatmap(a.out).probs, open_heatmap(b.out).probs
    assert np.isfinite(pa).sum() > 100
    np.testing.assert_array_equal(np.isnan(pa), np.isnan(pb))
    np.testing.assert_allclose(pa[np.isfinite(pa)], pb[np.isfinite(pb)], atol=1e-5, rtol=0)


def test_block_size_does_not_change_results(make_slide, mock_model, tmp_path):
    slide = make_slide(tumour=TUMOUR)
    a = scan_slide(slide, tmp_path / "a.zarr", ScanConfig(block_cells=4), model=mock_model)
    b = scan_slide(slide, tmp_path / "b.zarr", ScanConfig(block_cells=64, threads=1), model=mock_model)
    np.testing.assert_allclose(open_heatmap(a.out).probs, open_heatmap(b.out).probs, atol=1e-6, equal_nan=True)


def test_empty_slide_gives_all_nan(make_slide, mock_model, tmp_path):
    slide = make_slide(tissue=())
    res = scan_slide(slide, tmp_path / "h.zarr", ScanConfig(), model=mock_model)
    hm = open_heatmap(res.out)
    assert res.n_tissue_cells == 0 and np.isnan(hm.probs).all() and not hm.tissue.any()
    assert "no tissue" in hm.attrs["tissue"]["note"]


def test_tissue_blocks_only_are_read(make_slide, mock_model, tmp_path, monkeypatch):
    import wsi_scan.graph as graph

    seen: list[tuple[int, int, int, int]] = []
    orig = graph.read_block

    def spy(plan, block):
        seen.append(block)
        return orig(plan, block)

    monkeypatch.setattr(graph, "read_block", spy)
    slide = make_slide(size_wh=(4000, 3000), tissue=((100, 100, 900, 800),))
    res = scan_slide(slide, tmp_path / "h.zarr", ScanConfig(block_cells=8), model=mock_model)
    hm = open_heatmap(res.out)
    assert seen, "no block read"
    for r0, c0, nr, nc in seen:
        assert hm.tissue[r0 : r0 + nr, c0 : c0 + nc].any()
    assert len(seen) < (hm.grid.shape_rc[0] // 8) * (hm.grid.shape_rc[1] // 8) / 4


def test_scan_decodes_each_tile_once(make_slide, mock_model, tmp_path):
    """Neighbouring blocks share their margins' tiles; with the reads announced, each is decoded once."""
    from wsi_scan.regions import cached_slide

    slide = make_slide(size_wh=(3001, 2399), mpp=0.25, tumour=TUMOUR)  # read at level 0, 256 px tiles
    handle = cached_slide(str(slide), "tifffile")
    before = handle.read_stats.tiles_decoded
    # level 0: the one both readers frame alike (OpenSlide keeps one downsample for both axes)
    res = scan_slide(
        slide, tmp_path / "h.zarr", ScanConfig(backend="tifffile", block_cells=4, read_level="exact"), model=mock_model
    )
    hm = open_heatmap(res.out)
    plan_level = hm.attrs["grid"]["read_level"]
    decoded = handle.read_stats.tiles_decoded - before
    # the distinct tiles under the blocks' reads, from the same geometry the scan used
    from wsi_scan.grid import crop_to_tissue, tissue_blocks
    from wsi_scan.regions import ReadPlan, block_reads

    blocks = crop_to_tissue(hm.tissue, tissue_blocks(hm.tissue, 4))
    plan = ReadPlan(str(slide), "tifffile", plan_level, handle.info.levels[plan_level].downsample_xy, hm.grid)
    reads = block_reads(plan, blocks)
    per_read = [handle._tile_keys(plan_level, handle._lv_box(xy, plan_level, wh)) for xy, wh in reads]
    distinct = {k for keys in per_read for k in keys}
    assert decoded == len(distinct) < sum(len(k) for k in per_read)
    assert handle._cache.nbytes == 0
    assert_same_heatmap_across_readers(
        hm.probs,
        open_heatmap(
            scan_slide(
                slide, tmp_path / "o.zarr", ScanConfig(backend="openslide", block_cells=4, read_level="exact"), model=mock_model
            ).out
        ).probs,
    )


@pytest.mark.real_data
def test_real_svs_gives_the_same_heatmap_with_either_backend(mock_model, tmp_path):
    from tests._support import shared_path

    cmu = shared_path("slides", "cmu-1-small-region.svs")
    a = scan_slide(cmu, tmp_path / "a.zarr", ScanConfig(block_cells=8), model=mock_model)  # auto: tifffile
    b = scan_slide(cmu, tmp_path / "b.zarr", ScanConfig(backend="openslide", block_cells=8), model=mock_model)
    ha, hb = open_heatmap(a.out), open_heatmap(b.out)
    assert (ha.attrs["slide"]["backend"], hb.attrs["slide"]["backend"]) == ("tifffile", "openslide")
    assert ha.attrs["slide"]["mpp_source"] == hb.attrs["slide"]["mpp_source"]
    assert np.isfinite(ha.probs).sum() > 100
    np.testing.assert_allclose(ha.probs, hb.probs, atol=1e-6, equal_nan=True)


def test_interrupted_scan_resumes_with_its_finished_blocks(make_slide, mock_model, tmp_path, monkeypatch):
    import wsi_scan.graph as graph
    from wsi_scan.io.resume import partial_path

    slide = make_slide(tumour=TUMOUR)
    cfg = ScanConfig(block_cells=4, threads=1, checkpoint_s=1e-9)  # save after every block
    whole = scan_slide(slide, tmp_path / "whole.zarr", cfg, model=mock_model)
    out = tmp_path / "h.zarr"
    orig = graph.block_task
    calls: list[tuple[int, int, int, int]] = []

    def dies_after_5(plan, block, cells, predictor):
        if len(calls) == 5:
            raise RuntimeError("killed")
        calls.append(block)
        return orig(plan, block, cells, predictor)

    monkeypatch.setattr(graph, "block_task", dies_after_5)
    with pytest.raises(RuntimeError, match="killed"):
        scan_slide(slide, out, cfg, model=mock_model)
    assert partial_path(out).is_file() and not out.exists()

    calls.clear()
    monkeypatch.setattr(graph, "block_task", lambda *a: (calls.append(a[1]), orig(*a))[1])
    res = scan_slide(slide, out, cfg, model=mock_model)
    n_blocks = len(calls)
    assert res.resumed_cells > 0 and open_heatmap(out).attrs["resumed_cells"] == res.resumed_cells
    np.testing.assert_array_equal(open_heatmap(out).probs, open_heatmap(whole.out).probs)
    assert not partial_path(out).exists()  # gone once the store is complete

    # the same output again with --overwrite, or another setting: nothing is taken over
    calls.clear()
    monkeypatch.setattr(graph, "block_task", dies_after_5)
    with pytest.raises(RuntimeError):
        scan_slide(slide, tmp_path / "t.zarr", cfg, model=mock_model)
    calls.clear()
    monkeypatch.setattr(graph, "block_task", lambda *a: (calls.append(a[1]), orig(*a))[1])
    other = scan_slide(slide, tmp_path / "t.zarr", ScanConfig(block_cells=4, threads=1, tta=True), model=mock_model)
    assert other.resumed_cells == 0 and len(calls) == n_blocks + 5


def test_a_damaged_partial_file_is_ignored(make_slide, mock_model, tmp_path):
    from wsi_scan.io.resume import partial_path

    slide = make_slide(tumour=TUMOUR)
    out = tmp_path / "h.zarr"
    partial_path(out).write_bytes(b"not an npz")
    res = scan_slide(slide, out, ScanConfig(), model=mock_model)
    assert res.resumed_cells == 0 and not partial_path(out).exists()


def test_a_folder_at_the_partial_path_costs_the_resume_file_not_the_scan(make_slide, mock_model, tmp_path, caplog):
    from wsi_scan.io.resume import partial_path

    slide = make_slide(tumour=TUMOUR)
    out = tmp_path / "h.zarr"
    partial_path(out).mkdir()
    (partial_path(out) / "mine.txt").write_text("a user's file")
    # a checkpoint after every block: each save meets the folder
    res = scan_slide(slide, out, ScanConfig(block_cells=8, checkpoint_s=1e-6), model=mock_model)
    assert res.out == out and open_heatmap(out).tissue.any()
    assert (partial_path(out) / "mine.txt").read_text() == "a user's file"
    assert "without a resume file" in caplog.text


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_nearest_read_level_enlarges_the_coarser_level_in_place(make_slide, mock_model, tmp_path, backend):
    """--read-level nearest on a 40x slide: the 1.0 um/px level is read and enlarged 3% for a
    0.972 um/px model; cells stay aligned in level 0, and the choice is in the attrs and hash."""
    scale = 0.243 / 0.25
    tissue = ((int(200 * scale), int(200 * scale), int(2800 * scale), int(2200 * scale)),)
    tumour = tuple(tuple(int(v * scale) for v in b) for b in TUMOUR)
    slide = make_slide(size_wh=(3001, 2399), mpp=0.25, downsamples=(1, 4, 16), tissue=tissue, tumour=tumour)
    exact = scan_slide(
        slide, tmp_path / "e.zarr", ScanConfig(backend=backend, block_cells=8, read_level="exact"), model=mock_model
    )
    near = scan_slide(
        slide, tmp_path / "n.zarr", ScanConfig(backend=backend, block_cells=8, read_level="nearest"), model=mock_model
    )
    assert _check_alignment(near.out, tumour) == near.n_tissue_cells == exact.n_tissue_cells  # type: ignore[arg-type]
    he, hn = open_heatmap(exact.out), open_heatmap(near.out)
    assert (he.attrs["grid"]["read_level"], hn.attrs["grid"]["read_level"]) == (0, 1)
    assert (he.attrs["config"]["read_level"], hn.attrs["config"]["read_level"]) == ("exact", "nearest")
    assert he.attrs["settings_hash"] != hn.attrs["settings_hash"]


def test_roi_enters_attrs_and_settings_hash_by_content(make_slide, mock_model, tmp_path):
    import json

    from wsi_scan.plan import file_sha256
    from wsi_scan.scan import settings_hash

    slide = make_slide(size_wh=(4000, 3000), tissue=((100, 100, 3900, 2900),))
    roi = tmp_path / "roi.geojson"
    square = [[0, 0], [2000, 0], [2000, 1500], [0, 1500], [0, 0]]
    roi.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}))
    cfg = ScanConfig(roi=str(roi))
    attrs = open_heatmap(scan_slide(slide, tmp_path / "r.zarr", cfg, model=mock_model).out).attrs
    assert attrs["tissue"]["roi"] == {"path": str(roi), "sha256": file_sha256(str(roi))}
    assert attrs["settings_hash"] == settings_hash(mock_model.sha256, cfg)  # as a folder run recomputes it
    assert attrs["settings_hash"] != settings_hash(mock_model.sha256, ScanConfig())


def test_a_slide_smaller_than_one_window_is_scanned_with_a_warning(make_slide, mock_model, tmp_path, caplog):
    slide = make_slide(size_wh=(300, 300), tissue=((0, 0, 300, 300),), downsamples=(1,))
    scan_slide(slide, tmp_path / "h.zarr", ScanConfig(), model=mock_model)
    assert "less than one 96 px window" in caplog.text
