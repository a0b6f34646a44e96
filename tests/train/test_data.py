"""Training rows: decoded once (``--cache-patches``) or per epoch, the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_scan.config import TrainConfig
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.model_files import load_model
from wsi_scan.train.data import RowsDataset, decode_rows, make_splits
from wsi_scan.train.loop import train

from .conftest import write_kaggle


def test_decoded_rows_give_the_samples_of_per_epoch_decoding(tmp_path):
    # JPEG files, JPEG re-encoding and softening on: every random step sees the same input
    k = write_kaggle(tmp_path / "k", n=24, ext=".jpg", valid=8)
    splits = make_splits([open_patch_data(k)], 0.1, 0)
    rows = splits.train
    decoded = decode_rows(splits.sets, rows)
    assert decoded.shape == (24, 96, 96, 3) and decoded.dtype == np.uint8
    plain = RowsDataset(splits.sets, rows, 3, 0.5, (50, 95), 0.5, 1.15)
    cached = RowsDataset(splits.sets, rows, 3, 0.5, (50, 95), 0.5, 1.15, decoded=decoded)
    for k_ in range(3 * len(rows)):  # three epochs' indices
        (xa, ya), (xb, yb) = plain[k_], cached[k_]
        assert ya == yb and torch.equal(xa, xb)
    xb, _ = cached[0]
    xb[0, 0, 0] ^= 255  # a sample is the caller's to change: the cache must not change with it
    assert np.array_equal(decoded, decode_rows(splits.sets, rows))
    with pytest.raises(ValueError, match="decoded holds 3 patches for 24 rows"):
        RowsDataset(splits.sets, rows, decoded=decoded[:3])


def test_cache_patches_trains_the_same_weights(kaggle_dir, tmp_path):
    tiny = dict(width=8, batch_size=16, epochs=1, loader_workers=0, threads=1)
    a = train([kaggle_dir], tmp_path / "a.safetensors", TrainConfig(**tiny), progress=False)
    b = train([kaggle_dir], tmp_path / "b.safetensors", TrainConfig(**tiny, cache_patches=True), progress=False)
    assert [h["valid_auc"] for h in a.history] == [h["valid_auc"] for h in b.history]
    wa, wb = load_model(a.model_path).net.state_dict(), load_model(b.model_path).net.state_dict()
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert load_model(b.model_path).card.training["config"]["cache_patches"] is True


def test_cache_patches_refuses_what_memory_cannot_hold(tmp_path, monkeypatch):
    import psutil

    from wsi_scan.errors import UsageError

    k = write_kaggle(tmp_path / "k", n=8)
    splits = make_splits([open_patch_data(k)], 0.25, 0)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=100_000))
    with pytest.raises(UsageError, match=r"--cache-patches: 6 patches need 0\.0 GiB in memory, 0\.0 GiB is available"):
        decode_rows(splits.sets, splits.train)
