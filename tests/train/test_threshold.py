"""Choosing a trained model's threshold on held-out patches, as a library call."""

from __future__ import annotations

import pytest

from wsi_scan.config import TrainConfig
from wsi_scan.errors import OutputExistsError, UsageError
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.model_files import load_model
from wsi_scan.train.evaluate import evaluate_patchset
from wsi_scan.train.loop import train
from wsi_scan.train.threshold import rethreshold_model

TINY = dict(width=8, batch_size=16, epochs=1, loader_workers=0, threads=1)


def test_rethreshold_model_applies_the_rule_and_keeps_the_rest(kaggle_dir, tmp_path):
    src = tmp_path / "m.pt"
    train([kaggle_dir], src, TrainConfig(**TINY, threshold_specificity=0.0), progress=False)
    before = load_model(src).card
    assert before.threshold == 0.5 and "valid_tta" in before.metrics

    out = tmp_path / "t.safetensors"
    card = rethreshold_model(src, kaggle_dir, out, specificity=0.75, progress=False)
    m = load_model(out)
    assert m.card.to_dict() == card.to_dict() and card.name == before.name  # name kept when none is given
    rule = card.training["threshold_rule"]
    assert rule["specificity"] == 0.75 and rule["data"] == "kaggle/valid" and rule["n"] == 32
    assert rule["threshold"] == card.threshold
    # the rule, checked from its definition on the model's own validation probabilities
    ev = evaluate_patchset(m, open_patch_data(kaggle_dir).splits["valid"])
    neg = ev.probs[ev.labels == 0]
    assert (neg < card.threshold).mean() >= 0.75
    assert (neg < card.threshold - 1e-4).mean() < 0.75 or card.threshold == 0.0
    # the card's validation metrics are those at the new threshold; the TTA ones (at the old) are dropped
    v = card.metrics["valid"]
    assert v["threshold"] == card.threshold and v["n"] == 32 and v["specificity"] == pytest.approx((neg < card.threshold).mean())
    assert "valid_tta" not in card.metrics and card.metrics["epoch"] == before.metrics["epoch"]
    assert card.training["data"] == before.training["data"]

    # an existing file is replaced only when asked; a new name is taken
    with pytest.raises(OutputExistsError):
        rethreshold_model(src, kaggle_dir, out, specificity=0.9, progress=False)
    assert load_model(out).card.threshold == card.threshold
    again = rethreshold_model(src, kaggle_dir, out, specificity=0.9, name="strict", overwrite=True, progress=False)
    assert load_model(out).card.name == "strict" == again.name and again.training["threshold_rule"]["specificity"] == 0.9

    # the patches it was trained on are refused, and nothing is written
    with pytest.raises(UsageError, match="trained on these patches"):
        rethreshold_model(src, kaggle_dir, tmp_path / "u.pt", split="train", progress=False)
    assert not (tmp_path / "u.pt").exists()


def test_rethreshold_model_refuses_a_non_model_out_before_any_work(tmp_path):
    # neither the model nor the data exist: the file name is refused first
    with pytest.raises(UsageError, match="expected a .safetensors, .pt or .pth"):
        rethreshold_model(tmp_path / "none.pt", tmp_path / "none", tmp_path / "u.txt", progress=False)
    assert not (tmp_path / "u.txt").exists()


def _split_of(src, dst, keep):
    """A copy of the Kaggle folder ``src`` whose valid split keeps the rows ``keep`` chooses."""
    import shutil

    shutil.copytree(src, dst)
    lines = (dst / "valid_labels.csv").read_text().splitlines()
    (dst / "valid_labels.csv").write_text("\n".join([lines[0], *[ln for ln in lines[1:] if keep(ln)]]) + "\n")
    return dst


def test_the_rule_refuses_what_it_cannot_measure_and_writes_nothing(kaggle_dir, tmp_path):
    import math

    import torch

    from wsi_scan.errors import DataError, ModelError
    from wsi_scan.io.model_files import save_model

    src = tmp_path / "m.safetensors"
    train([kaggle_dir], src, TrainConfig(**TINY), progress=False)
    out = tmp_path / "t.safetensors"
    # one class only: no negatives to choose on, or no positives to score
    for keep, name in ((lambda ln: ln.endswith(",1"), "pos"), (lambda ln: ln.endswith(",0"), "neg")):
        data = _split_of(kaggle_dir, tmp_path / name, keep)
        with pytest.raises(DataError, match="needs both classes"):
            rethreshold_model(src, data, out, progress=False)
        assert not out.exists()
    # a specificity outside the command line's range (0.5 to 0.9999), or not a number
    for bad in (math.nan, 1.0, 0.0, 0.4, math.inf):
        with pytest.raises(UsageError, match="--specificity must be a number from 0.5 to 0.9999"):
            rethreshold_model(src, kaggle_dir, out, specificity=bad, progress=False)
    # its own input, even when asked to overwrite: the model it is made from would be lost
    before = src.read_bytes()
    with pytest.raises(UsageError, match="is an input model"):
        rethreshold_model(src, kaggle_dir, src, overwrite=True, progress=False)
    assert src.read_bytes() == before
    # saturated scores: no threshold keeps the specificity, and the card would say otherwise
    m = load_model(src)
    with torch.no_grad():
        m.net.head[-1].bias.fill_(1e4)
    save_model(tmp_path / "sat.safetensors", m.net, m.card)
    with pytest.raises(ModelError, match="no threshold reaches specificity"):
        rethreshold_model(tmp_path / "sat.safetensors", kaggle_dir, out, progress=False)
    assert not out.exists()
    # a TorchScript model's card is its JSON file: nothing to write it into
    (tmp_path / "x.ts").write_bytes(b"")
    with pytest.raises(UsageError, match="TorchScript"):
        rethreshold_model(tmp_path / "x.ts", kaggle_dir, out, progress=False)
