from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from tests.train.conftest import write_h5, write_kaggle
from wsi_scan.errors import DataError
from wsi_scan.io.datasets import open_patch_data, patch_split


@pytest.mark.parametrize("ext", [".tif", ".png", ".jpg", ".webp"])
def test_kaggle_layout(tmp_path, ext):
    root = write_kaggle(tmp_path / "k", n=10, ext=ext, valid=4)
    pd = open_patch_data(root)
    assert pd.layout == "kaggle" and set(pd.splits) == {"train", "valid"}
    tr = pd.splits["train"]
    assert len(tr) == 10 and tr.read(3).shape == (96, 96, 3)
    assert tr.labels.tolist() == [0, 1] * 5


def test_patch_split_by_name_and_auto(tmp_path):
    root = write_kaggle(tmp_path / "kaggle", n=6, valid=4)
    assert patch_split(root, "train").name == "kaggle/train" and len(patch_split(root, "train")) == 6
    assert patch_split(root, "auto").name == "kaggle/valid"  # no test split: valid before train
    with pytest.raises(DataError, match=r"no 'test' split; found train, valid"):
        patch_split(root, "test")
    assert patch_split(write_kaggle(tmp_path / "t", n=6), "auto").name == "t/train"


def test_h5_layout_plain_and_gz(tmp_path):
    root = write_h5(tmp_path / "h", n=12)
    pd = open_patch_data(root)
    assert pd.layout == "pcam-h5" and len(pd.splits["train"]) == 12
    a = pd.splits["valid"].read(5)
    for f in root.glob("*.h5"):
        with f.open("rb") as src, gzip.open(f.with_name(f.name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        f.unlink()
    pd2 = open_patch_data(root, cache_dir=tmp_path / "cache")
    assert np.array_equal(pd2.splits["valid"].read(5), a)


def test_missing_image(tmp_path):
    root = write_kaggle(tmp_path / "k", n=6)
    (root / "train" / "train0002.png").unlink()
    with pytest.raises(DataError, match="train0002"):
        open_patch_data(root)


def test_an_id_with_two_images_is_refused(tmp_path):
    root = write_kaggle(tmp_path / "k", n=6)
    shutil.copy(root / "train" / "train0002.png", root / "train" / "train0002.jpg")
    with pytest.raises(DataError, match=r"1 id\(s\) have more than one image \(first: train0002.jpg, train0002.png\)"):
        open_patch_data(root)
    (root / "train" / "extra.jpg").write_bytes(b"")  # an image no label names is not read
    (root / "train" / "train0002.jpg").unlink()
    assert len(open_patch_data(root).splits["train"]) == 6


def test_bad_label(tmp_path):
    root = write_kaggle(tmp_path / "k", n=6)
    csv = root / "train_labels.csv"
    csv.write_text(csv.read_text().replace("train0003,1", "train0003,2"))
    with pytest.raises(DataError, match=r"train_labels.csv:5.*0 or 1"):
        open_patch_data(root)


def test_missing_labels_file(tmp_path):
    (tmp_path / "k" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train_labels.csv"):
        open_patch_data(tmp_path / "k")


def test_wrong_patch_size(tmp_path):
    from PIL import Image

    root = write_kaggle(tmp_path / "k", n=4)
    Image.new("RGB", (50, 50)).save(root / "train" / "train0001.png")
    ps = open_patch_data(root).splits["train"]
    with pytest.raises(DataError, match=r"train0001.png.*96x96"):
        ps.read(1)


def test_a_16_bit_patch_is_refused_not_cut_to_its_high_bytes(tmp_path):
    import tifffile

    root = write_kaggle(tmp_path / "k", n=4, ext=".tif")
    # a 12-bit camera's values in 16-bit samples: their high bytes would be a near-black patch
    twelve_bit = np.random.default_rng(0).integers(0, 4096, (96, 96, 3)).astype(np.uint16)
    tifffile.imwrite(root / "train" / "train0001.tif", twelve_bit, photometric="rgb")
    ps = open_patch_data(root).splits["train"]
    assert ps.read(0).dtype == np.uint8  # 8-bit patches as before
    with pytest.raises(DataError, match=r"train0001.tif: expected 8 bits per channel .* found a 16-bit image"):
        ps.read(1)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (b"\xe9t\xe9,1\n", "expected UTF-8 text, found byte 0xe9"),  # Latin-1, e.g. from an old Excel
        (bytes(range(128, 256)), "expected UTF-8 text"),  # a binary file named like the table
        (b"train0099," + b"x" * 200_000 + b"\n", "field larger than field limit"),
    ],
)
def test_labels_csv_unreadable_is_a_data_error_naming_the_file(tmp_path, extra, needle):
    root = write_kaggle(tmp_path / "k", n=4)
    csv = root / "train_labels.csv"
    csv.write_bytes(csv.read_bytes() + extra)
    with pytest.raises(DataError, match=needle) as info:
        open_patch_data(root)
    assert str(csv) in str(info.value)


def test_labels_csv_with_a_byte_order_mark_is_read(tmp_path):
    root = write_kaggle(tmp_path / "k", n=4)
    csv = root / "train_labels.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))  # Excel's "CSV UTF-8"
    tr = open_patch_data(root).splits["train"]
    assert tr.labels.tolist() == [0, 1, 0, 1] and tr.patch_id(0) == "train0000"


@pytest.mark.parametrize(("row", "found"), [("train0001,1", "the same label"), ("train0001,0", "labels 1 and 0")])
def test_labels_csv_refuses_an_id_listed_twice(tmp_path, row, found):
    root = write_kaggle(tmp_path / "k", n=4)
    csv = root / "train_labels.csv"
    csv.write_text(csv.read_text() + row + "\ntrain0002," + "0\n")
    # header on line 1, train0001 on line 3, the repeat on line 6 (train0002's repeat is not reached)
    with pytest.raises(DataError, match=rf"train_labels.csv:6: .*'train0001' again \(first on line 3, {found}\)"):
        open_patch_data(root)


def _gzip_h5_pair(root):
    """Replace each .h5 of ``root`` with a gzip of fixed header (no name, mtime 0) and stored
    blocks: inputs of equal size give .gz files of equal size, whatever their content."""
    for f in sorted(root.glob("*.h5")):
        with (
            f.open("rb") as src,
            f.with_name(f.name + ".gz").open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", compresslevel=0, fileobj=raw, mtime=0) as dst,
        ):
            shutil.copyfileobj(src, dst)
        f.unlink()


def test_a_gz_that_holds_no_pcam_split_leaves_no_decompressed_copy(tmp_path):
    import h5py

    root = write_h5(tmp_path / "h", n=8)
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f.create_dataset("not_x", data=np.zeros(3))  # a valid gzip of an HDF5 file without "x"
    _gzip_h5_pair(root)
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        open_patch_data(root, cache_dir=cache)
    assert not [p.name for p in cache.iterdir() if "valid" in p.name]


def test_truncated_gz_is_a_data_error_and_leaves_no_partial_cache(tmp_path, monkeypatch):
    from tests._support import run

    root = write_h5(tmp_path / "h", n=8)
    _gzip_h5_pair(root)
    x_gz = root / "camelyonpatch_level_2_split_valid_x.h5.gz"
    x_gz.write_bytes(b"\x1f\x8b\x08" + np.random.default_rng(0).bytes(100))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"split_valid_x.h5.gz: expected a complete gzip file"):
        open_patch_data(root, cache_dir=cache)
    left = [p.name for p in cache.iterdir()]
    assert not [n for n in left if "valid_x" in n], left  # no .part / temporary file, no entry
    # the CLI: a data error (6), not "interrupted" (130) as the EOFError was reported
    monkeypatch.setenv("WSI_SCAN_CACHE", str(tmp_path / "cli-cache"))
    code, _, err = run("evaluate", root, "--quiet")
    assert code == 6 and "split_valid_x.h5.gz" in err and len(err.strip().splitlines()) == 1, err
    assert not [p for p in (tmp_path / "cli-cache" / "h5").iterdir() if "valid_x" in p.name]


def test_gz_cache_tells_apart_files_of_equal_name_size_and_mtime(tmp_path):
    import os

    import h5py

    roots = [write_h5(tmp_path / name, n=8) for name in ("a", "b")]
    with h5py.File(roots[1] / "camelyonpatch_level_2_split_valid_y.h5", "r+") as f:
        f["y"][...] = 1 - f["y"][...]  # the other folder's labels are the opposite
    for root in roots:
        _gzip_h5_pair(root)
        for f in root.glob("*.gz"):
            os.utime(f, (1_700_000_000, 1_700_000_000))
    ya, yb = (r / "camelyonpatch_level_2_split_valid_y.h5.gz" for r in roots)
    assert ya.stat().st_size == yb.stat().st_size and ya.read_bytes() != yb.read_bytes()  # the premise
    cache = tmp_path / "cache"
    la = open_patch_data(roots[0], cache_dir=cache).splits["valid"].labels
    lb = open_patch_data(roots[1], cache_dir=cache).splits["valid"].labels
    assert lb.tolist() == (1 - la).tolist()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_the_data_files_decide_the_layout(tmp_path):
    # a stray file of PCam's name does not hide a Kaggle folder's labels
    k = write_kaggle(tmp_path / "k", n=8)
    (k / "camelyonpatch_level_2_split_README.txt").write_text("notes")
    assert open_patch_data(k).layout == "kaggle"
    # both layouts complete: which patches to use is not guessed
    both = write_h5(write_kaggle(tmp_path / "both", n=8), n=8)
    with pytest.raises(DataError, match="holds both PCam HDF5 files and train_labels.csv"):
        open_patch_data(both)
    d = tmp_path / "d"
    (d / "train_labels.csv").mkdir(parents=True)
    with pytest.raises(DataError, match="train_labels.csv is not a file"):
        open_patch_data(d)
