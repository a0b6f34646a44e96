"""Knowledge distillation: the targets, the teacher's record, its scores kept for --resume, and the
refusal of a teacher that saw the validation patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.train.conftest import write_kaggle
from wsi_scan.cli import main
from wsi_scan.config import TrainConfig
from wsi_scan.errors import DataError, ModelError, UsageError
from wsi_scan.io.model_files import load_model
from wsi_scan.train.distill import smoothed_targets, training_targets
from wsi_scan.train.loop import state_path, train

TINY = dict(width=8, batch_size=16, epochs=1, loader_workers=0, threads=1, final_tta=False)


def test_targets_are_the_smoothed_labels_blended_with_the_teacher():
    y = np.array([0, 1, 1, 0], dtype=np.uint8)
    p = np.array([0.2, 0.9, 0.4, 0.0], dtype=np.float32)
    assert smoothed_targets(y, 0.05).tolist() == pytest.approx([0.025, 0.975, 0.975, 0.025])
    # without a teacher, the same float32 values the loss took before distillation existed
    assert np.array_equal(training_targets(y, 0.05, None, 0.5), (torch.tensor(y).float() * 0.95 + 0.025).numpy())
    assert training_targets(y, 0.05, p, 0.5).tolist() == pytest.approx([0.1125, 0.9375, 0.6875, 0.0125])
    assert np.array_equal(training_targets(y, 0.05, p, 1.0), p)
    with pytest.raises(ValueError, match="3 teacher scores for 4"):
        training_targets(y, 0.05, p[:3], 0.5)
    with pytest.raises(Exception, match="distill_weight"):
        TrainConfig(teacher="fast", distill_weight=1.5)
    with pytest.raises(Exception, match="no teacher was given"):
        TrainConfig(distill_weight=0.7)


@pytest.fixture
def teacher(kaggle_dir, tmp_path):
    return train([kaggle_dir], tmp_path / "teacher.pt", TrainConfig(**TINY), progress=False).model_path


def test_a_student_records_its_teacher_and_learns_its_scores(kaggle_dir, teacher, tmp_path, monkeypatch):
    import wsi_scan.train.loop as loop

    seen_targets = []
    orig = loop.RowsDataset

    def spy(*a, **k):
        ds = orig(*a, **k)
        if k.get("targets") is not None:
            seen_targets.append(k["targets"])
        return ds

    monkeypatch.setattr(loop, "RowsDataset", spy)
    out = tmp_path / "student.pt"
    train([kaggle_dir], out, TrainConfig(**TINY, teacher=str(teacher), distill_weight=1.0), progress=False)
    card = load_model(out).card
    t = load_model(teacher)
    assert card.training["teacher"]["sha256"] == t.sha256 and card.training["teacher"]["name"] == "teacher"
    assert card.training["config"]["teacher"] == str(teacher)
    from wsi_scan.io.model_files import describe_model

    assert describe_model(load_model(out))["recipe"]["teacher"] == str(teacher)
    assert "teacher" not in describe_model(t)["recipe"]
    # the teacher's own training patches count as seen by the student
    assert len(card.training["data"]["seen_patches"]) == 2
    state = torch.load(state_path(out), weights_only=True)
    from wsi_scan.io.datasets import patch_split
    from wsi_scan.train.data import RowsDataset
    from wsi_scan.train.evaluate import predict_probs

    ps = patch_split(kaggle_dir, "train")
    rows = np.stack([np.zeros(len(ps), dtype=np.int64), np.arange(len(ps))], axis=1)
    want = predict_probs(t.net, t.card, RowsDataset([ps], rows), torch.device("cpu"))
    assert np.allclose(state["teacher_probs"].numpy(), want, atol=1e-6)
    # with distill_weight 1 the targets are the teacher's scores
    assert np.array_equal(seen_targets[0], state["teacher_probs"].numpy())


def test_a_resumed_student_keeps_the_scores_of_the_state_even_when_the_teacher_changed(
    kaggle_dir, teacher, tmp_path, monkeypatch
):
    import wsi_scan.train.loop as loop

    out = tmp_path / "student.pt"
    cfg = dict(TINY, epochs=2, teacher=str(teacher))
    calls = {"n": 0}
    orig = loop.binary_metrics

    def stop_in_the_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(loop, "binary_metrics", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train([kaggle_dir], out, TrainConfig(**cfg), progress=False)
    monkeypatch.setattr(loop, "binary_metrics", orig)
    before = torch.load(state_path(out), weights_only=True)["teacher_probs"]
    sha = load_model(teacher).sha256
    # the teacher's file replaced by another model before the resume
    train([kaggle_dir], teacher, TrainConfig(**{**TINY, "seed": 3}), progress=False, overwrite=True)
    assert load_model(teacher).sha256 != sha
    res = train([kaggle_dir], out, TrainConfig(**cfg), progress=False, resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert torch.equal(torch.load(state_path(out), weights_only=True)["teacher_probs"], before)
    card = load_model(out).card
    assert card.training["teacher"]["sha256"] == sha and len(card.training["data"]["seen_patches"]) == 2


def test_a_teacher_trained_on_the_validation_patches_is_refused(kaggle_dir, tmp_path):
    # the student's validation patches (seed 1 in write_kaggle) are the teacher's training patches
    other = write_kaggle(tmp_path / "other", n=32, ext=".tif", valid=32, seed=1)
    t = train([other], tmp_path / "t.pt", TrainConfig(**TINY), progress=False).model_path
    with pytest.raises(DataError, match="was trained on this run's validation patches"):
        train([kaggle_dir], tmp_path / "s.pt", TrainConfig(**TINY, teacher=str(t)), progress=False)
    assert not (tmp_path / "s.pt").exists()


def test_train_cli_takes_a_teacher_and_says_a_missing_one_in_a_line(kaggle_dir, teacher, tmp_path):
    r = CliRunner().invoke(
        main, ["train", str(kaggle_dir), "--out", str(tmp_path / "s.pt"), "--teacher", str(tmp_path / "nope.pt"), "--quiet"]
    )
    assert r.exit_code == 5 and "--teacher: model file" in r.output and "nope.pt" in r.output
    assert "Traceback" not in r.output
    args = ["train", str(kaggle_dir), "--out", str(tmp_path / "s.pt"), "--teacher", str(teacher), "--distill-weight", "0.7"]
    args += ["--epochs", "1", "--width", "8", "--batch-size", "16", "--loader-workers", "0", "--no-final-tta", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "s.pt").card.training["config"]["distill_weight"] == 0.7


def test_a_teacher_that_is_the_output_or_reads_another_scale_is_refused_before_training(kaggle_dir, teacher, tmp_path):
    from wsi_scan.io.model_files import save_model
    from wsi_scan.model.card import ModelCard

    own = tmp_path / "own.pt"
    own.write_bytes(teacher.read_bytes())
    before = own.read_bytes()
    # --overwrite once replaced the teacher with its student
    with pytest.raises(UsageError, match="would replace the teacher"):
        train([kaggle_dir], own, TrainConfig(**TINY, teacher=str(own)), progress=False, overwrite=True)
    assert own.read_bytes() == before
    t = load_model(teacher)
    save_model(tmp_path / "t05.pt", t.net, ModelCard.from_dict({**t.card.to_dict(), "mpp": 0.5}))
    with pytest.raises(ModelError, match="card's mpp is 0.5"):
        train([kaggle_dir], tmp_path / "s.pt", TrainConfig(**TINY, teacher=str(tmp_path / "t05.pt")), progress=False)
    assert not (tmp_path / "s.pt").exists()
