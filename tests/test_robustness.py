"""Bad and hostile input across commands: never lose a user's file, one line and an exit code.

Each test builds its damaged input itself and checks the exit code, the single stderr line,
that nothing is left behind and that the inputs are unchanged (by checksum).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._support import assert_clean_failure, run, write_called_store
from wsi_scan.config import ScanConfig
from wsi_scan.scan import scan_slide


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (or root itself) with its sha256: proof that nothing was touched."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def heatmap(make_slide, mock_model, tmp_path) -> tuple[Path, Path]:
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    out = tmp_path / "h.zarr"
    scan_slide(slide, out, ScanConfig(), model=mock_model)
    return slide, out


# ----------------------------------------------------------------------------- data loss


def test_overwrite_never_deletes_a_user_folder(make_slide, tmp_path):
    slide = make_slide()
    docs = tmp_path / "my_folder"
    docs.mkdir()
    (docs / "thesis.docx").write_bytes(b"years of work")
    (docs / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    before = tree_digest(docs)
    code, _, err = run(slide, "--out", docs, "--overwrite", "--quiet")
    assert_clean_failure(code, err, None, "not a wsi-scan heatmap store")
    assert code == 4 and tree_digest(docs) == before


def test_overwrite_never_deletes_the_slide_or_its_folder(make_slide, tmp_path):
    slide = make_slide()
    (tmp_path / "neighbour.svs").write_bytes(b"another slide")
    before = tree_digest(tmp_path)
    for out in (tmp_path, slide, tmp_path.parent):
        code, _, err = run(slide, "--out", out, "--overwrite", "--quiet")
        assert_clean_failure(code, err, None)
        assert code == 4
    assert tree_digest(tmp_path) == before


def test_overwrite_onto_a_regular_file_is_refused_and_leaves_nothing(make_slide, tmp_path):
    slide = make_slide()
    f = tmp_path / "notes.zarr"
    f.write_text("mine")
    code, _, err = run(slide, "--out", f, "--overwrite", "--quiet")
    assert_clean_failure(code, err, None, "is a file that is not a wsi-scan heatmap store")
    assert code == 4 and f.read_text() == "mine" and not leftovers(tmp_path)


def test_a_store_with_user_files_inside_is_not_replaced(heatmap, make_slide):
    slide, out = heatmap
    (out / "my_notes.txt").write_text("keep me")
    code, _, err = run(slide, "--out", out, "--overwrite", "--quiet")
    assert code == 4 and (out / "my_notes.txt").read_text() == "keep me", err


def test_overwrite_replaces_our_store_without_leftovers(heatmap):
    slide, out = heatmap
    code, _, err = run(slide, "--out", out, "--overwrite", "--quiet")
    assert code == 0, err
    assert not leftovers(out.parent)


def test_out_dot_and_symlink_loop(make_slide, tmp_path, monkeypatch):
    slide = make_slide()
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    code, _, err = run(slide, "--out", ".", "--overwrite", "--quiet")
    assert_clean_failure(code, err, None)
    assert code == 4 and tree_digest(tmp_path) == before
    loop = tmp_path / "loop.zarr"
    os.symlink(loop, loop)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(slide, "--out", loop, "--quiet", *extra)
        assert_clean_failure(code, err, None)
        assert code == 4 and loop.is_symlink()


@pytest.mark.parametrize(
    ("command", "name", "extra"),
    [
        ("overlay", "picture.png", []),
        ("overlay", "picture.jpg", []),
        ("geojson", "tumour.geojson", []),
        ("heatmap-tiff", "heatmap.tif", []),
    ],
)
def test_exports_replace_only_their_own_files(heatmap, tmp_path, command, name, extra):
    _, hm = heatmap
    user = tmp_path / "user" / name
    user.parent.mkdir()
    if name.endswith((".png", ".jpg")):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(user)
    else:
        user.write_bytes(b"II*\x00 a user's file" if name.endswith(".tif") else b'{"type": "FeatureCollection"}')
    before = tree_digest(user)
    code, _, err = run(command, hm, "--out", user, "--overwrite", *extra)
    assert_clean_failure(code, err, None, "not a file written by wsi-scan")
    assert code == 4 and tree_digest(user) == before and not leftovers(user.parent)
    ours = tmp_path / "ours" / name
    assert run(command, hm, "--out", ours, *extra)[0] == 0
    code, _, err = run(command, hm, "--out", ours, *extra)
    assert code == 4 and "--overwrite" in err
    code, _, err = run(command, hm, "--out", ours, "--overwrite", *extra)
    assert code == 0, err
    assert not leftovers(ours.parent)


def test_scan_overlay_onto_a_user_picture_is_refused_before_the_scan(make_slide, tmp_path):
    slide = make_slide()
    pic = tmp_path / "holiday.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pic)
    before = tree_digest(pic)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--overlay", pic, "--overwrite", "--quiet")
    assert_clean_failure(code, err, out, "not a file written by wsi-scan")
    assert tree_digest(pic) == before


def test_folder_run_never_replaces_user_files(make_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    make_slide("slides/a.tif")
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.csv").write_text("patient,diagnosis\n1,secret\n")
    before = tree_digest(results)
    code, _, err = run(slides, "--out", results, "--overwrite", "--quiet")
    assert_clean_failure(code, err, None, "summary.csv")
    assert code == 4 and tree_digest(results) == before
    (results / "summary.csv").unlink()
    user_store = results / "a.zarr"
    user_store.mkdir()
    (user_store / "keep.txt").write_text("mine")
    code, _, err = run(slides, "--out", results, "--overwrite", "--quiet")
    assert code == 8 and "not a wsi-scan heatmap store" in err
    assert (user_store / "keep.txt").read_text() == "mine"
    # and a second run, whose summary files are now its own, replaces them
    (user_store / "keep.txt").unlink()
    user_store.rmdir()
    assert run(slides, "--out", results, "--quiet")[0] == 0
    assert run(slides, "--out", results, "--overwrite", "--quiet")[0] == 0


def test_train_never_replaces_a_foreign_file(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"somebody else's weights")
    code, _, err = run("train", tmp_path / "no-data", "--out", target, "--overwrite", "--quiet")
    assert_clean_failure(code, err, None, "not a file written by wsi-scan")
    assert target.read_bytes() == b"somebody else's weights"


# ----------------------------------------------------------------------------- options and sizes


@pytest.mark.parametrize(
    "opt",
    [
        ["--tissue-mpp", "-1"],
        ["--tissue-mpp", "0"],
        ["--tissue-mpp", "nan"],
        ["--min-cell-fraction", "2"],
        ["--min-cell-fraction", "nan"],
        ["--mpp", "1e-4"],
        ["--mpp", "inf"],
        ["--min-saturation", "-0.5"],
        ["--min-object-um2", "nan"],
    ],
)
def test_invalid_option_values_are_usage_errors(make_slide, tmp_path, opt):
    slide = make_slide()
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--quiet", *opt)
    assert_clean_failure(code, err, out, opt[0])
    assert code == 2


def test_option_ranges_hold_in_the_python_api_too():
    from wsi_scan.config import ScanConfig, TissueConfig
    from wsi_scan.errors import UsageError

    with pytest.raises(UsageError):
        TissueConfig(mask_mpp=float("nan"))
    with pytest.raises(UsageError):
        ScanConfig(mpp_override=1e-9)


@pytest.mark.parametrize("mpp", [1e-4, 1e4])
def test_absurd_pixel_size_in_metadata_is_refused(make_slide, tmp_path, mpp):
    slide = make_slide(mpp=mpp)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--quiet")
    assert_clean_failure(code, err, out, "--mpp")
    assert code == 3


def test_a_header_declaring_a_huge_image_is_refused_at_once(make_slide, tmp_path):
    import time

    import tifffile

    slide = make_slide(size_wh=(512, 512), downsamples=(1,), tissue=((0, 0, 512, 512),))
    with tifffile.TiffFile(slide, mode="r+b") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(1_000_000)
        tf.pages[0].tags["ImageLength"].overwrite(1_000_000)
    out = tmp_path / "h.zarr"
    t0 = time.monotonic()
    code, _, err = run(slide, "--out", out, "--quiet")
    assert_clean_failure(code, err, out)
    assert code == 3 and time.monotonic() - t0 < 30
    # a plausible size with a lying pixel size is refused before anything is allocated
    code, _, err = run(make_slide("big.tif", size_wh=(4000, 3000)), "--out", out, "--mpp", "40", "--quiet")
    assert code == 3, err


def test_mpp_override_of_a_different_recorded_value_warns_and_records_both(make_slide, tmp_path):
    from wsi_scan.io.heatmap import open_heatmap

    slide = make_slide(mpp=0.243)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--mpp", "0.25", "--quiet")
    assert code == 0 and "wsi-scan: warning:" in err and "0.243" in err
    s = open_heatmap(out).attrs["slide"]
    assert s["mpp_xy"] == [0.25, 0.25] and s["mpp_recorded_xy"] == pytest.approx([0.243, 0.243], rel=1e-6)
    assert s["mpp_source"] == "user (--mpp)" and "mpp" in s["mpp_recorded_source"]


def test_config_names_no_override_when_the_metadata_was_used(heatmap):
    from wsi_scan.io.heatmap import open_heatmap

    attrs = open_heatmap(heatmap[1]).attrs
    assert attrs["config"]["mpp_source"] == "" and attrs["config"]["mpp"] is None
    assert "user" not in attrs["slide"]["mpp_source"]


# ----------------------------------------------------------------------------- lying models


def _model_file(path: Path, **card_changes) -> Path:
    """The bundled network's weights under an edited card (a model file is data from anywhere)."""
    import json

    from safetensors.torch import save_file

    from wsi_scan.io.model_files import CARD_KEY, load_model

    m = load_model()
    card = {**m.card.to_dict(), **card_changes}
    state = {k: v.contiguous() for k, v in m.net.state_dict().items()}
    save_file(state, str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"cell_px": 16}, "cell_px"),
        ({"input_px": 64}, "input"),
        ({"input_px": 128}, "input"),
        ({"mpp": 1e9}, "mpp"),
        ({"mean": "0.5"}, "mean"),
        ({"threshold": "high"}, "threshold"),
        ({"arch_kwargs": {"width": 1_000_000}}, "width"),
        ({"arch_kwargs": {"width": 32, "depth": 9}}, "depth"),
        ({"temperature": 2.0}, "temperature"),
    ],
)
@pytest.mark.parametrize("mode", ["dense", "patch"])
def test_a_card_that_disagrees_with_its_network_is_refused_at_load(make_slide, tmp_path, change, needle, mode):
    slide = make_slide()
    model = _model_file(tmp_path / "lying.safetensors", **change)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--model", model, "--mode", mode, "--quiet")
    assert_clean_failure(code, err, out, needle)
    assert code == 5


def test_a_model_with_nan_weights_is_refused(make_slide, tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from wsi_scan.io.model_files import CARD_KEY, load_model

    m = load_model()
    state = {
        k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v).contiguous() for k, v in m.net.state_dict().items()
    }
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path), metadata={CARD_KEY: json.dumps(m.card.to_dict())})
    out = tmp_path / "h.zarr"
    code, _, err = run(make_slide(), "--out", out, "--model", path, "--quiet")
    assert_clean_failure(code, err, out, "non-finite")
    assert code == 5


def test_nan_outputs_on_tissue_never_make_a_complete_store(make_slide, mock_model, tmp_path):
    import dataclasses

    import torch

    from wsi_scan.errors import ModelError
    from wsi_scan.io.heatmap import read_attrs

    class NanOnTissue(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return torch.where(torch.sigmoid(y) > 0.3, torch.full_like(y, float("nan")), y)

    broken = dataclasses.replace(mock_model, net=NanOnTissue(mock_model.net))
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    out = tmp_path / "h.zarr"
    with pytest.raises(ModelError, match="non-finite"):
        scan_slide(slide, out, ScanConfig(checkpoint_s=0), model=broken)
    assert read_attrs(out) is None and not out.exists()


# ----------------------------------------------------------------------------- damaged stores


def _damage(store: Path, how: str) -> None:
    import json

    if how == "chunk":
        chunks = sorted(p for p in (store / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
        chunks[0].unlink()
        return
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if how == "garbled-chunk":
        chunk = sorted(p for p in (store / "0").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
        chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
        return
    del meta["attributes"]["wsi_scan"][how]
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["chunk", "garbled-chunk", "grid", "slide", "model"])
@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("overlay", "o.png"),
        ("geojson", "t.geojson"),
        ("heatmap-tiff", "h.tif"),
    ],
)
def test_every_export_refuses_a_damaged_store(heatmap, tmp_path, how, command, name):
    _, hm = heatmap
    _damage(hm, how)
    out = tmp_path / name
    code, _, err = run(command, hm, "--out", out)
    assert_clean_failure(code, err, out, "damaged")
    assert code == 7


def test_evaluate_out_is_checked_before_scoring(heatmap, tmp_path):
    from tests.train.conftest import write_kaggle

    data = write_kaggle(tmp_path / "k", n=8, valid=8)
    _, hm = heatmap
    # inside a heatmap store it would stop being a store that the next scan may replace
    code, _, err = run("evaluate", data, "--out", hm / "ev", "--quiet")
    assert code == 4 and "inside the heatmap store" in err and not (hm / "ev").exists()
    # a user's file of one of its names: refused before anything is written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("{}")
    code, _, err = run("evaluate", data, "--out", mine, "--quiet")
    assert code == 4 and "metrics.json" in err and sorted(p.name for p in mine.iterdir()) == ["metrics.json"]
    # a link to a folder: not written through
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run("evaluate", data, "--out", tmp_path / "link", "--quiet")
    assert code == 4 and "symbolic link" in err and not list((tmp_path / "real").iterdir())


def test_a_store_without_its_digest_is_read_with_a_warning(heatmap, tmp_path):
    _, hm = heatmap
    _damage(hm, "data_sha256")
    out = tmp_path / "t.geojson"
    code, _, err = run("geojson", hm, "--out", out)
    assert code == 0 and out.exists()
    assert err.count("wsi-scan: warning:") == 1 and "no data digest" in err and "rescan" in err


def test_a_store_with_impossible_probabilities_is_refused(heatmap, tmp_path):
    import zarr

    _, hm = heatmap
    _damage(hm, "data_sha256")  # without its digest, only the values themselves can tell
    arr = zarr.open_array(str(hm / "0"), mode="r+")
    block = arr[...]
    r, c = np.argwhere(np.isfinite(block))[0]
    block[r, c] = 5.0
    arr[...] = block
    code, _, err = run("lesions", hm)
    assert code == 7 and "probabilities outside [0, 1]" in err and "Traceback" not in err


def test_an_out_under_a_dangling_link_is_named(tmp_path, heatmap):
    _, hm = heatmap
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    code, _, err = run("overlay", hm, "--out", tmp_path / "gone" / "o.png")
    assert code == 2 and "is a symbolic link to" in err and "does not exist" in err, err


def test_a_truncated_resume_file_is_ignored(heatmap, make_slide):
    from wsi_scan.io.resume import partial_path

    slide, out = heatmap
    for content in (b"", b"PK\x03\x04 truncated", b"\x93NUMPY"):
        partial_path(out).write_bytes(content)
        code, _, err = run(slide, "--out", out, "--overwrite", "--quiet")
        assert code == 0, err


def test_l0_to_cell_refuses_points_off_the_grid(heatmap):
    from wsi_scan.errors import OutsideGridError
    from wsi_scan.io.heatmap import open_heatmap

    hm = open_heatmap(heatmap[1])
    x0, y0 = hm.grid.l0_origin_xy
    assert hm.l0_to_cell(x0 + 0.5, y0 + 0.5) == (0, 0)
    rows, cols = hm.grid.shape_rc
    sx, sy = hm.grid.l0_cell_size_xy
    for pt in ((x0 - 1, y0), (x0, y0 - 1), (x0 + cols * sx, y0), (x0, y0 + rows * sy)):
        with pytest.raises(OutsideGridError):
            hm.l0_to_cell(*pt)


# ----------------------------------------------------------------------------- handles


def test_scans_leak_no_file_descriptors(make_slide, mock_model, tmp_path):
    slide = make_slide()
    scan_slide(slide, tmp_path / "warm.zarr", ScanConfig(), model=mock_model)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        scan_slide(slide, tmp_path / f"h{i}.zarr", ScanConfig(backend="tifffile"), model=mock_model)
        scan_slide(slide, tmp_path / f"o{i}.zarr", ScanConfig(backend="openslide"), model=mock_model)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_slide_replaced_on_disk_is_read_anew(make_slide, mock_model, tmp_path):
    from wsi_scan.io.heatmap import open_heatmap

    slide = make_slide("s.tif", tumour=())
    a = scan_slide(slide, tmp_path / "a.zarr", ScanConfig(), model=mock_model)
    make_slide("s.tif", tumour=((1000, 700, 1500, 1200),))  # same path, new content
    b = scan_slide(slide, tmp_path / "b.zarr", ScanConfig(), model=mock_model)
    pa, pb = open_heatmap(a.out).probs, open_heatmap(b.out).probs
    assert np.nanmax(pb) > 0.8 > 0.2 > np.nanmax(pa)


def test_resumed_scan_rate_counts_only_the_cells_it_classified():
    from wsi_scan.scan import ScanResult

    r = ScanResult(Path("x"), "s", 100, 80, 1.0, 0.0, None, None, (0.25, 0.25), "m", {"scan": 2.0}, resumed_cells=60)
    assert r.cells_per_s == 10.0


# ----------------------------------------------------------------------------- damaged slides, odd paths


@pytest.mark.parametrize("keep", [0.99, 0.9, 0.5])
@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_a_truncated_slide_is_refused(make_slide, tmp_path, keep, backend):
    slide = make_slide()
    data = slide.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "h.zarr"
    code, _, err = run(cut, "--out", out, "--backend", backend, "--quiet")
    assert_clean_failure(code, err, out)
    assert code == 3


def test_a_folder_named_like_a_slide_is_not_scanned_as_an_empty_folder(tmp_path):
    d = tmp_path / "x.svs"
    d.mkdir()
    out = tmp_path / "results"
    code, _, err = run(d, "--out", out, "--quiet")
    assert_clean_failure(code, err, out, "no slide files")
    assert code == 3
    (d / "notes.txt").write_text("not a slide")
    code, _, err = run(d, "--out", out, "--quiet")
    assert code == 3 and not out.exists()


def _flip_bytes_in_a_tile(slide: Path, dest: Path, tile: int = 5) -> Path:
    import tifffile

    b = bytearray(slide.read_bytes())
    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        off, n = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    for i in range(off + n // 2, off + n // 2 + 40, 3):
        b[i] ^= 0xFF
    dest.write_bytes(bytes(b))
    return dest


def test_corrupt_jpeg_data_is_recorded_or_refused(make_slide, mock_model, tmp_path):
    from wsi_scan.errors import SlideFormatError
    from wsi_scan.io.heatmap import open_heatmap

    slide = make_slide(size_wh=(2048, 2048), downsamples=(1,), mpp=0.9, tissue=((0, 0, 2048, 2048),))
    bad = _flip_bytes_in_a_tile(slide, tmp_path / "bad.tif")
    # tifffile path: the damage is decoded with a warning that the store and the CLI report
    res = scan_slide(bad, tmp_path / "t.zarr", ScanConfig(backend="tifffile"), model=mock_model)
    assert res.decoder_warnings >= 1 and "Corrupt JPEG data" in res.decoder_warning
    dw = open_heatmap(res.out).attrs["slide"]["decoder_warnings"]
    assert dw["count"] == res.decoder_warnings and "tile 5" in dw["first"]
    code, _, err = run(bad, "--out", tmp_path / "cli.zarr", "--backend", "tifffile", "--quiet")
    assert code == 0 and "wsi-scan: warning:" in err and "corrupt" in err
    # OpenSlide treats the same damage as a read error: the scan fails with one line
    out = tmp_path / "o.zarr"
    with pytest.raises(SlideFormatError):
        scan_slide(bad, out, ScanConfig(backend="openslide"), model=mock_model)
    assert not out.exists()
    # an intact slide reports none
    ok = scan_slide(slide, tmp_path / "ok.zarr", ScanConfig(backend="tifffile"), model=mock_model)
    assert ok.decoder_warnings == 0 and open_heatmap(ok.out).attrs["slide"]["decoder_warnings"]["count"] == 0


# ----------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_fs(tmp_path):
    """mount_fs(size, read_only) -> a folder on a tmpfs of that size; skipped where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount_fs(size: str = "256k", read_only: bool = False) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here (needs root in a container that allows it): {r.stderr!r:.80}")
        mounted.append(d)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d

    yield mount_fs

    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_single_slide_gives_one_line_and_no_debris(make_slide, small_fs):
    slide = make_slide(size_wh=(6000, 4800), tissue=((100, 100, 5900, 4700),))
    fs = small_fs("24k")
    out = fs / "h.zarr"
    code, _, err = run(slide, "--out", out, "--quiet")
    assert_clean_failure(code, err, out, "no space")
    assert code == 9 and not [p.name for p in fs.iterdir() if not p.name.startswith(".") or ".tmp-" in p.name]


def test_full_disk_folder_run_gives_one_line_and_no_debris(make_slide, small_fs, tmp_path):
    slides = tmp_path / "slides"
    make_slide("slides/a.tif")
    make_slide("slides/b.tif")
    fs = small_fs("48k")
    out = fs / "results"
    code, _, err = run(slides, "--out", out, "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code in (8, 9) and len(lines) == 1 and "Traceback" not in err, err
    debris = [p for p in out.rglob("*") if ".tmp-" in p.name or p.suffix == ".lock"]
    assert not debris


def test_read_only_output_folder_fails_before_the_scan(make_slide, small_fs):
    slide = make_slide()
    fs = small_fs(read_only=True)
    for args in ([slide, "--out", fs / "h.zarr"], [slide.parent, "--out", fs / "results"]):
        code, _, err = run(*args, "--quiet")
        assert_clean_failure(code, err, None, "writable")
        assert code == 2


# ----------------------------------------------------------------------------- found by attacking the CLI


@pytest.mark.parametrize("args", [["--block-cells", "0"], ["--no-such-option"], ["--threads", "-1"], []])
def test_click_usage_errors_are_one_line(make_slide, tmp_path, args):
    slide = make_slide()
    extra = [] if not args else ["--out", tmp_path / "h.zarr"]
    code, _, err = run(slide, *extra, *args)
    assert_clean_failure(code, err, tmp_path / "h.zarr")
    assert code == 2


def test_outputs_inside_a_store_or_the_package_are_refused(heatmap, tmp_path):
    import wsi_scan

    _, hm = heatmap
    for command, name in (("geojson", "t.geojson"), ("overlay", "o.png"), ("heatmap-tiff", "h.tif")):
        code, _, err = run(command, hm, "--out", hm / name)
        assert_clean_failure(code, err, hm / name, "inside the heatmap store")
        assert code == 4
    bundled = Path(wsi_scan.__file__).parent / "model" / "fast.safetensors"
    before = bundled.read_bytes()
    code, _, err = run("train", tmp_path, "--out", bundled, "--overwrite", "--quiet")
    assert code == 4 and "package" in err and bundled.read_bytes() == before


def test_overlay_threshold_nan_and_unwritable_out(heatmap, make_slide):
    _, hm = heatmap
    code, _, err = run("overlay", hm, "--out", hm.parent / "o.png", "--threshold", "nan")
    assert_clean_failure(code, err, hm.parent / "o.png", "threshold")
    assert code == 2
    if Path("/proc/self").exists():
        code, _, err = run(make_slide("other.tif"), "--out", "/proc/x.zarr", "--quiet")
        assert_clean_failure(code, err, None, "not writable")
        assert code == 2


def test_a_tile_size_that_would_abort_openslide_is_refused(make_slide, tmp_path):
    import struct

    import tifffile

    slide = make_slide(size_wh=(1024, 1024), downsamples=(1,))
    with tifffile.TiffFile(slide) as tf:
        off = tf.pages[0].tags["TileWidth"].offset
    b = bytearray(slide.read_bytes())
    b[off + 2 : off + 4] = struct.pack("<H", 4)  # LONG
    b[off + 8 : off + 12] = struct.pack("<I", 2**30)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(b))
    for backend in ("auto", "openslide", "tifffile"):
        code, _, err = run(bad, "--out", tmp_path / "h.zarr", "--backend", backend, "--quiet")
        assert_clean_failure(code, err, tmp_path / "h.zarr")
        assert code == 3


def test_a_store_whose_slide_is_far_larger_than_its_grid_is_damaged(heatmap, tmp_path):
    import json

    _, hm = heatmap
    meta = json.loads((hm / "zarr.json").read_text())
    meta["attributes"]["wsi_scan"]["slide"]["level0_size_wh"] = [30000, 24000]
    (hm / "zarr.json").write_text(json.dumps(meta))
    for command, name in (("geojson", "t.geojson"), ("heatmap-tiff", "h.tif"), ("overlay", "o.png")):
        code, _, err = run(command, hm, "--out", tmp_path / name)
        assert_clean_failure(code, err, tmp_path / name, "damaged")
        assert code == 7


def test_a_torchscript_model_that_is_not_a_classifier_is_refused(make_slide, tmp_path):
    import json

    import torch

    from wsi_scan.io.model_files import load_model

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    path = tmp_path / "shape.ts"
    torch.jit.save(torch.jit.script(Identity()), str(path))
    path.with_suffix(".json").write_text(json.dumps({**load_model().card.to_dict(), "dense_exact": False}))
    code, _, err = run(make_slide(), "--out", tmp_path / "h.zarr", "--model", path, "--quiet")
    assert_clean_failure(code, err, tmp_path / "h.zarr")
    assert code == 5


def test_figures_never_replace_a_users_file(tmp_path):
    import matplotlib
    import numpy as np
    from PIL import Image

    from wsi_scan.train.plots import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    user = tmp_path / "samples.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(user)
    before = user.read_bytes()
    fig = plt.figure()
    from wsi_scan.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        save_figure(fig, user)
    assert user.read_bytes() == before
    save_figure(fig, tmp_path / "ours.png")
    save_figure(fig, tmp_path / "ours.png")  # its own figure is replaced
    plt.close(fig)


def test_tile_on_a_full_disk_gives_one_line_and_no_debris(make_slide, small_fs):
    slide = make_slide(size_wh=(6000, 4800), tissue=((100, 100, 5900, 4700),))
    fs = small_fs("64k")
    code, _, err = run("tile", slide, "--out", fs / "p.h5")
    assert_clean_failure(code, err, fs / "p.h5")
    assert code == 9 and not list(fs.iterdir())


def test_evaluate_on_a_broken_patch_is_one_line(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["id,label"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(data / "train" / f"p{i}.png")
        rows.append(f"p{i},{i % 2}")
    (data / "train" / "p3.png").write_text("not an image")
    (data / "train_labels.csv").write_text("\n".join(rows) + "\n")
    code, _, err = run("evaluate", data, "--quiet")
    assert_clean_failure(code, err, None, "p3")
    assert code == 6


def test_empty_arguments_fifos_and_overlay_names(make_slide, tmp_path):
    slide = make_slide()
    for args in (["", "--out", tmp_path / "h.zarr"], [slide, "--out", ""]):
        code, _, err = run(*args)
        assert_clean_failure(code, err, tmp_path / "h.zarr", "empty")
        assert code == 2
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    code, _, err = run(fifo, "--out", tmp_path / "h.zarr", "--quiet")
    assert_clean_failure(code, err, tmp_path / "h.zarr", "not a regular file")
    code, _, err = run(slide, "--out", tmp_path / "h.zarr", "--overlay", tmp_path / "o.txt", "--quiet")
    assert_clean_failure(code, err, tmp_path / "h.zarr", "--overlay")
    # a picture inside the store: refused before its folder (the store's path) is created
    code, _, err = run(slide, "--out", tmp_path / "h.zarr", "--overlay", tmp_path / "h.zarr" / "o.png", "--quiet")
    assert_clean_failure(code, err, tmp_path / "h.zarr", "inside --out")
    assert code == 2 and not os.path.lexists(tmp_path / "h.zarr")
    # the store written, the picture not (a kill between them): the way to the picture is named
    write_called_store(tmp_path / "done.zarr", "negative")
    code, _, err = run(slide, "--out", tmp_path / "done.zarr", "--overlay", tmp_path / "o.png", "--quiet")
    assert_clean_failure(code, err, tmp_path / "o.png", "wsi-scan overlay")
    assert code == 4


def test_overlay_refuses_another_slide_than_the_heatmaps(heatmap, make_slide, tmp_path):
    _, hm = heatmap
    other = make_slide("other.tif", size_wh=(3200, 2400))
    code, _, err = run("overlay", hm, "--out", tmp_path / "o.png", "--slide", other)
    assert_clean_failure(code, err, tmp_path / "o.png", "heatmap was made from")
    assert code == 3


def test_tile_labels_ignore_rounding_slivers():
    from shapely.geometry import box

    from wsi_scan.export.tiles import cell_labels
    from wsi_scan.geometry import GridGeometry

    g = GridGeometry((0, 0), (123.4, 123.4), (4, 4), 32, 96, 0.972)
    rc = np.array([[0, 0], [0, 1]])
    # a polygon ending 0.05 px into cell (0, 1): a shared edge's rounding, not tumour in that cell
    assert cell_labels(g, rc, box(0, 0, 123.4 + 0.05 / 123.4, 123.4)).tolist() == [1, 0]
    assert cell_labels(g, rc, box(0, 0, 123.4 + 2.0, 123.4)).tolist() == [1, 1]


def test_a_damaged_training_state_is_one_line(tmp_path):
    from wsi_scan.errors import UsageError
    from wsi_scan.train.loop import load_state

    bad = tmp_path / "m.pt.train-state.pt"
    bad.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(UsageError, match="cannot be read"):
        load_state(bad)
    with pytest.raises(UsageError, match="no training state"):
        load_state(tmp_path / "missing.pt")


def test_a_heatmap_store_given_as_the_slide_names_its_slide(heatmap, tmp_path):
    slide, store = heatmap
    for args in (("tile", store, "--out", tmp_path / "p.h5"), (store, "--out", tmp_path / "again.zarr")):
        code, out, err = run(*args)
        assert code == 3 and "is a heatmap store that wsi-scan wrote, not a slide" in err and str(slide) in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.h5").exists() and not (tmp_path / "again.zarr").exists()


def test_outputs_named_as_another_format_are_refused_before_any_work(heatmap, tmp_path):
    slide, store = heatmap
    for args, words in (
        ((slide, "--out", tmp_path / "o.png"), "a heatmap store is a folder (OME-Zarr)"),
        (("geojson", store, "--out", tmp_path / "g.png"), "expected a .geojson or .json file name"),
        (("heatmap-tiff", store, "--out", tmp_path / "h.png"), "expected a .tif or .tiff file name"),
        (("lesions", store, "--out", tmp_path / "l.png"), "expected a .csv, .geojson or .json file name"),
        (("overlay", store, "--out", tmp_path / "o.zarr"), "expected a .png, .jpg or .jpeg file name"),
        (("tile", slide, "--out", tmp_path / "p.png"), "a patch set is one .h5 file or a folder"),
        (("evaluate-slides", tmp_path, "--annotations", tmp_path, "--out", tmp_path / ".json"), "expected a .json file name"),
    ):
        code, _, err = run(*args)
        assert code == 2 and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (slide, store))
    # a store with no suffix, or one that names no file format, is still a store
    for name in ("heatmap", "run.2026.12"):
        code, _, err = run(slide, "--out", tmp_path / name, "--quiet")
        assert code == 0, err
