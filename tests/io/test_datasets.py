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
