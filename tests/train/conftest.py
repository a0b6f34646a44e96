"""Tiny labelled data sets in both layouts. Label-1 patches carry a dark square in the centre."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(170, 240, size=(n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.uint8)
    x[y == 1, 36:60, 36:60] = (90, 40, 140)
    return x, y


def write_kaggle(root: Path, n: int = 64, ext: str = ".png", valid: int = 0, seed: int = 0) -> Path:
    for split, count in (("train", n), ("valid", valid)):
        if not count:
            continue
        x, y = _patches(count, seed + (split == "valid"))
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = ["id,label"]
        for i in range(count):
            ident = f"{split}{i:04d}"
            Image.fromarray(x[i]).save(root / split / f"{ident}{ext}")
            rows.append(f"{ident},{int(y[i])}")
        (root / f"{split}_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def write_h5(root: Path, n: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("valid", 1)):
        x, y = _patches(n, seed)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=x, chunks=(8, 96, 96, 3))
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=y.reshape(-1, 1, 1, 1))
    return root


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    return write_kaggle(tmp_path / "kaggle", n=96, ext=".tif", valid=32)


@pytest.fixture
def h5_dir(tmp_path: Path) -> Path:
    return write_h5(tmp_path / "h5")
