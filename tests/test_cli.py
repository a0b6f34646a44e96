"""The command line: the literal scan command, info, help, and every bad input from the issue.

Each bad input must give one line on stderr, a non-zero exit, no traceback and no output left.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests._support import assert_clean_failure, run, shared_path
from wsi_scan.io.heatmap import open_heatmap


def test_scan_literal_command_and_info(make_slide, tmp_path):
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    out = tmp_path / "heatmap.zarr"
    code, stdout, err = run(slide, "--out", out, "--quiet")
    assert code == 0, err
    hm = open_heatmap(out)
    assert hm.attrs["status"] == "complete"
    assert hm.attrs["slide"]["mpp_source"].startswith("openslide.mpp") or "Resolution" in hm.attrs["slide"]["mpp_source"]
    assert hm.attrs["model"]["name"] == "fast"
    code, stdout, err = run("info", slide)
    assert code == 0 and "downsample" in stdout and "tissue" in stdout and "0.243" in stdout


def test_patch_mode_with_batch_size_chosen_for_device_matches_dense(make_slide, tmp_path):
    slide = make_slide(size_wh=(1600, 1300), tissue=((200, 200, 1400, 1100),))
    code, _, err = run(slide, "--out", tmp_path / "d.zarr", "--quiet")
    assert code == 0, err
    code, _, err = run(slide, "--out", tmp_path / "p.zarr", "--quiet", "--mode", "patch", "--batch-size", "0")
    assert code == 0, err
    p = open_heatmap(tmp_path / "p.zarr")
    assert p.attrs["config"]["batch_size"] == 0 and p.attrs["config"]["mode"] == "patch"
    np.testing.assert_allclose(p.probs, open_heatmap(tmp_path / "d.zarr").probs, atol=1e-5, equal_nan=True)


def test_help_lists_options_with_defaults():
    code, stdout, _ = run("scan", "--help")
    assert code == 0
    for opt in ("--mode", "--device", "--backend", "--mpp", "--model", "--overwrite", "--quiet", "--block-cells"):
        assert opt in stdout
    assert "default: auto" in stdout


def test_missing_file(tmp_path):
    out = tmp_path / "h.zarr"
    code, _, err = run(tmp_path / "nope.svs", "--out", out)
    assert_clean_failure(code, err, out, "does not exist")


def test_directory_where_file_expected(tmp_path, make_slide):
    d = tmp_path / "dir.svs"
    d.mkdir()
    code, _, err = run("info", d)
    assert_clean_failure(code, err, None, "directory")
    slide = make_slide()
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--model", tmp_path)
    assert_clean_failure(code, err, out, "directory")


def test_text_file_named_svs(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    out = tmp_path / "h.zarr"
    code, _, err = run(p, "--out", out)
    assert_clean_failure(code, err, out, "expected a whole-slide image")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    out = tmp_path / "h.zarr"
    code, _, err = run(p, "--out", out)
    assert_clean_failure(code, err, out, "empty file")


def test_png_photo(tmp_path):
    p = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(p)
    out = tmp_path / "h.zarr"
    code, _, err = run(p, "--out", out)
    assert_clean_failure(code, err, out, "PNG")


def test_truncated_synthetic_tiff(make_slide, tmp_path):
    slide = make_slide(size_wh=(3000, 2400))
    data = slide.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "h.zarr"
    code, _, err = run(cut, "--out", out)
    assert_clean_failure(code, err, out, "truncated")
    assert code == 3
    # cut just before the last image's directory: the chain of directories points past the end
    import tifffile

    with tifffile.TiffFile(slide) as tf:
        last = tf.pages[len(tf.pages) - 1].offset
    cut.write_bytes(data[:last])
    code, _, err = run(cut, "--out", out)
    assert_clean_failure(code, err, out, "truncated slide: image directory")


@pytest.mark.real_data
def test_truncated_real_svs(tmp_path):
    real = shared_path("slides", "cmu-1-small-region.svs")
    data = real.read_bytes()
    # cut in level 0 (its directories, written after the pixels, are gone), and cut after
    # level 0 and the thumbnail (a reduced level and the label are gone): both said to be truncated
    for keep in (len(data) // 2, 1_500_000, 7):
        cut = tmp_path / "cut.svs"
        cut.write_bytes(data[:keep])
        out = tmp_path / "h.zarr"
        code, _, err = run(cut, "--out", out)
        assert_clean_failure(code, err, out, "truncated slide")
        assert code == 3


def test_slide_without_mpp_then_with_mpp(make_slide, tmp_path):
    slide = make_slide(resolution_unit=None)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out)
    assert_clean_failure(code, err, out, "--mpp")
    code, _, err = run(slide, "--out", out, "--mpp", "0.243", "--quiet")
    assert code == 0, err
    assert open_heatmap(out).attrs["slide"]["mpp_source"] == "user (--mpp)"


def test_slide_too_coarse(make_slide, tmp_path):
    slide = make_slide(mpp=2.0, size_wh=(800, 600), tissue=((50, 50, 700, 500),))
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out)
    assert_clean_failure(code, err, out, "too coarse")


def test_output_exists(make_slide, tmp_path):
    slide = make_slide()
    out = tmp_path / "h.zarr"
    out.mkdir()
    (out / "keep").write_text("x")
    # a folder that is not a wsi-scan store is never replaced, whatever the flags: said the
    # same with and without --overwrite, so nobody is sent to add a flag that cannot help
    for flags in ((), ("--overwrite",)):
        code, _, err = run(slide, "--out", out, *flags, "--quiet")
        assert code == 4 and "not a wsi-scan heatmap store" in err and (out / "keep").read_text() == "x"
    dangling = tmp_path / "link.zarr"
    dangling.symlink_to(tmp_path / "nowhere.zarr")
    for flags in ((), ("--overwrite",)):
        code, _, err = run(slide, "--out", dangling, *flags, "--quiet")
        assert code == 4 and "is a symbolic link" in err and dangling.is_symlink() and not (tmp_path / "nowhere.zarr").exists()
    ours = tmp_path / "ours.zarr"
    assert run(slide, "--out", ours, "--quiet")[0] == 0
    code, _, err = run(slide, "--out", ours, "--quiet")
    assert code == 4 and "pass --overwrite" in err
    code, _, err = run(slide, "--out", ours, "--overwrite", "--quiet")
    assert code == 0, err
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_unloadable_model(make_slide, tmp_path):
    slide = make_slide()
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00not a model" * 100)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--model", bad)
    assert_clean_failure(code, err, out, "not a readable model")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # runs os.system on unpickling
        return (os.system, (f"touch {self.marker}",))


def test_malicious_model_refused(make_slide, tmp_path):
    slide = make_slide()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"card": "{}", "state_dict": _Evil(str(marker))}, evil)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--model", evil)
    assert_clean_failure(code, err, out, "refused")
    assert not marker.exists()


def test_real_process_prints_no_traceback(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("hello")
    r = subprocess.run(
        [sys.executable, "-m", "wsi_scan", str(p), "--out", str(tmp_path / "h.zarr")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 3
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.real_data
def test_real_slides(tmp_path):
    cmu = shared_path("slides", "cmu-1-small-region.svs")
    tcga = shared_path("slides", "tcga-cr-7395-01a-01-ts1.svs")
    out = tmp_path / "cmu.zarr"
    code, _, err = run(cmu, "--out", out, "--quiet")
    assert code == 0, err
    hm = open_heatmap(out)
    assert hm.attrs["slide"]["mpp_xy"] == [0.499, 0.499]
    # 2220 x 2967 px at 0.499 um/px -> cells of 32 * 0.972 / 0.499 level-0 px
    assert hm.grid.l0_cell_size_xy[0] == pytest.approx(32 * 0.972 / 0.499)
    assert hm.grid.shape_rc == (int(np.ceil(2967 / hm.grid.l0_cell_size_xy[1])), int(np.ceil(2220 / hm.grid.l0_cell_size_xy[0])))
    assert 0.1 < hm.tissue.mean() < 0.8
    out2 = tmp_path / "tcga.zarr"
    code, _, err = run(tcga, "--out", out2)
    assert_clean_failure(code, err, out2, "--mpp")
    code, _, err = run(tcga, "--out", out2, "--mpp", "0.25", "--quiet")
    assert code == 0, err
    hm2 = open_heatmap(out2)
    assert hm2.attrs["slide"]["mpp_source"] == "user (--mpp)" and hm2.tissue.any()


def test_model_given_as_dot_slash_name_is_the_file_not_the_bundled_model(make_slide, tmp_path, monkeypatch):
    # click.Path once turned ./fast into fast, and the bundled model of that name ran instead
    slide = make_slide()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "h.zarr"
    code, _, err = run(slide, "--out", out, "--model", "./fast")
    assert_clean_failure(code, err, out, "fast does not exist")
    (tmp_path / "fast").write_bytes(b"not a model")
    code, _, err = run(slide, "--out", out, "--model", "./fast")
    assert_clean_failure(code, err, out, "not a readable model file")


def test_a_blank_argument_is_named_as_such(tmp_path):
    """`--out " "` was called "an empty argument ... of \\"\\"" though the user typed a space (2026-12-05)."""
    code, _, err = run("info", " ")
    assert code == 2 and "empty or blank argument" in err and "spaces only" in err and len(err.strip().splitlines()) == 1, err
