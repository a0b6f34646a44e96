"""Batch-size choice of the predictor (runs everywhere; the CUDA branch is in test_gpu.py)."""

from __future__ import annotations

import torch

from wsi_scan.inference import Predictor, auto_batch_size
from wsi_scan.io.checkpoint import load_model


def test_cpu_auto_batch_size_keeps_the_default():
    loaded = load_model(None)
    assert auto_batch_size(torch.device("cpu"), loaded.card) == 256
    assert Predictor(loaded.net, loaded.card, torch.device("cpu"), "patch", batch_size=0).batch_size == 256
    assert Predictor(loaded.net, loaded.card, torch.device("cpu"), "patch", batch_size=7).batch_size == 7
