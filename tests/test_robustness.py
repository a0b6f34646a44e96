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

from tests._support import assert_clean_failure, run
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


@pytest.mark.parametrize(("command", "name", "extra"), [
    ("overlay", "picture.png", []),
    ("overlay", "picture.jpg", []),
    ("geojson", "tumour.geojson", []),
    ("heatmap-tiff", "heatmap.tif", []),
])
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
