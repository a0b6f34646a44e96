"""Batch-size choice of the predictor (runs everywhere; the CUDA branch is in test_gpu.py)."""

from __future__ import annotations

import numpy as np
import torch

from wsi_scan.config import CPU_PATCH_BATCH
from wsi_scan.inference import Predictor, auto_batch_size
from wsi_scan.io.model_files import load_model


def test_cpu_patch_batches_are_capped_where_larger_ones_only_cost_memory():
    loaded = load_model(None)
    cpu = torch.device("cpu")
    assert auto_batch_size(cpu, loaded.card) == CPU_PATCH_BATCH
    assert Predictor(loaded.net, loaded.card, cpu, "patch", batch_size=0).batch_size == CPU_PATCH_BATCH
    assert Predictor(loaded.net, loaded.card, cpu, "patch", batch_size=256).batch_size == CPU_PATCH_BATCH
    assert Predictor(loaded.net, loaded.card, cpu, "patch", batch_size=7).batch_size == 7


def test_patch_results_do_not_depend_on_the_batch_size():
    loaded = load_model(None)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    region = rng.integers(0, 256, (32 * 12 + 64, 32 * 12 + 64, 3), dtype=np.uint8)
    cells = rng.random((12, 12)) < 0.8
    outs = [Predictor(loaded.net, loaded.card, cpu, "patch", batch_size=b).predict_block(region, cells) for b in (1, 7, 32)]
    dense = Predictor(loaded.net, loaded.card, cpu, "dense").predict_block(region, cells)
    for out in outs:
        assert np.array_equal(np.isnan(out), ~cells)
        np.testing.assert_allclose(out[cells], dense[cells], rtol=0, atol=1e-5)


def test_cpu_predictor_keeps_freed_memory_where_glibc_allows_it():
    import platform

    from wsi_scan.inference import keep_freed_memory

    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
