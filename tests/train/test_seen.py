"""Recognising training patches by their pixels: a part of a training split, or a mix."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_scan.cli import main
from wsi_scan.config import TrainConfig
from wsi_scan.errors import ModelError, UsageError
from wsi_scan.io.model_files import load_model
from wsi_scan.train.loop import train
from wsi_scan.train.seen import PatchFilter, SeenShare, seen_share
from wsi_scan.train.threshold import rethreshold_model

TINY = dict(batch_size=16, epochs=1, loader_workers=0, threads=1, final_tta=False)


def _random_patches(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)


def test_the_filter_holds_every_patch_added_and_few_others():
    seen = _random_patches(300, 0)
    f = PatchFilter.build(seen, len(seen))
    assert f.n == 300 and all(p in f for p in seen)
    others = _random_patches(2000, 1)
    hits = sum(p in f for p in others)
    assert hits <= 10 and f.false_positive_rate() < 3e-3  # the design rate is 1e-3
    one_px = seen[0].copy()
    one_px[50, 50, 1] ^= 1  # one pixel value off by one is another patch
    assert one_px not in f
    assert PatchFilter.from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_duplicate_patches_count_once_and_the_card_reads_back():
    # a training set with 30% duplicates once wrote a filter its own fill check refused
    unique = _random_patches(100, 0)
    patches = np.concatenate([unique, np.repeat(unique[:1], 45, axis=0)])
    f = PatchFilter.build(patches, len(patches))
    assert f.n == 100 and all(p in f for p in unique)
    assert PatchFilter.from_dict(json.loads(json.dumps(f.to_dict()))) == f


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {**d, "kind": "other"},
        lambda d: {**d, "m_bits": d["m_bits"] + 8},
        lambda d: {**d, "k": 0},
        lambda d: {**d, "k": True},
        lambda d: {**d, "bits": "not base64!"},
        lambda d: {**d, "m_bits": 1 << 40},
        lambda d: "x",
        # plausible fields, implausible bits: every patch or none would count as seen
        lambda d: {**d, "bits": base64.b64encode(b"\xff" * (d["m_bits"] // 8)).decode()},
        lambda d: {**d, "bits": base64.b64encode(b"\x00" * (d["m_bits"] // 8)).decode()},
        lambda d: {**d, "k": 64},
        lambda d: {**d, "n": d["n"] * 10},
    ],
)
def test_a_damaged_filter_is_an_error_not_a_silent_miss(edit):
    d = PatchFilter.build(_random_patches(200, 0), 200).to_dict()
    with pytest.raises(ModelError, match="training.data.seen_patches"):
        PatchFilter.from_dict(edit(d))


def test_the_share_is_corrected_for_false_positives():
    # as many hits by chance less often than one in a million: seen
    assert not SeenShare(2000, 8, 2.0).clearly_seen and SeenShare(2000, 15, 2.0).clearly_seen
    assert SeenShare(3, 3, 0.003).clearly_seen and not SeenShare(3, 1, 0.003).clearly_seen
    assert not SeenShare(0, 0, 0.0).clearly_seen
    s = SeenShare(2000, 1001, 2.0)  # 1000 seen, and 1 of the 1000 others by chance
    assert s.clearly_seen and s.share == pytest.approx(0.5) and s.describe().startswith("about 50% of these patches")
    assert SeenShare(100, 100, 0.1).describe().startswith("all of these patches")
    seen = _random_patches(50, 0)
    f = PatchFilter.build(seen, 50)
    share = seen_share([f], list(seen[:20]) + list(_random_patches(20, 3)))
    assert share.checked == 40 and share.hits == 20 and share.clearly_seen


def _subset(src, dst, ids, extra=None):
    """A Kaggle folder holding some of ``src``'s training patches under other ids (and others)."""
    (dst / "train").mkdir(parents=True)
    labels = dict(line.split(",") for line in (src / "train_labels.csv").read_text().splitlines()[1:])
    rows = ["id,label"]
    for k, ident in enumerate(ids):
        shutil.copy(src / "train" / f"{ident}.tif", dst / "train" / f"copy{k:04d}.tif")
        rows.append(f"copy{k:04d},{labels[ident]}")
    for k, ident in enumerate(extra or []):
        shutil.copy(src / "valid" / f"{ident}.tif", dst / "train" / f"other{k:04d}.tif")
        rows.append(f"other{k:04d},{labels.get(ident, k % 2)}")
    (dst / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return dst


def test_evaluate_warns_and_threshold_refuses_on_part_of_the_training_patches(kaggle_dir, tmp_path):
    out = tmp_path / "m.pt"
    train([kaggle_dir], out, TrainConfig(**TINY), progress=False)
    (f,) = load_model(out).card.training["data"]["seen_patches"]
    assert f["n"] == 96  # the training patches, not the validation ones
    # 40 of the 96 training patches renamed, mixed with 24 validation patches
    part = _subset(
        kaggle_dir, tmp_path / "part", [f"train{i:04d}" for i in range(0, 80, 2)], [f"valid{i:04d}" for i in range(24)]
    )
    r = CliRunner().invoke(main, ["evaluate", str(part), "--model", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "was trained on about 62% of these patches, recognised by their pixels (40 of 64 checked)" in r.stderr
    assert json.loads(r.stdout)["trained_on_these_patches"] is True
    with pytest.raises(UsageError, match="trained on these patches"):
        rethreshold_model(out, part, tmp_path / "t.pt", split="train", progress=False)
    assert not (tmp_path / "t.pt").exists()
    # held-out patches only: no word
    held = _subset(kaggle_dir, tmp_path / "held", [], [f"valid{i:04d}" for i in range(32)])
    r = CliRunner().invoke(main, ["evaluate", str(held), "--model", str(out), "--json"])
    assert r.exit_code == 0 and "trained on" not in r.stderr and json.loads(r.stdout)["trained_on_these_patches"] is False


def test_a_card_holds_at_most_eight_filters(tmp_path):
    from wsi_scan.model.card import ModelCard

    f = PatchFilter.build(_random_patches(5, 0), 5).to_dict()
    card = ModelCard(arch="dense-cnn", arch_kwargs={"width": 4}, dense_exact=True, name="t").to_dict()
    ModelCard.from_dict({**card, "training": {"data": {"seen_patches": [f] * 8}}})
    with pytest.raises(ModelError, match="at most 8"):
        ModelCard.from_dict({**card, "training": {"data": {"seen_patches": [f] * 9}}})
