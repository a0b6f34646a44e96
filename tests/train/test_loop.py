"""Training smoke runs in both layouts, resume, evaluation, figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_scan.cli import main
from wsi_scan.config import TrainConfig
from wsi_scan.errors import UsageError
from wsi_scan.io.model_files import load_model
from wsi_scan.train.loop import train

TINY = dict(width=8, batch_size=16, epochs=1, loader_workers=0, threads=1)


def test_one_epoch_writes_loadable_model_with_card(kaggle_dir, tmp_path):
    out = tmp_path / "m.pt"
    res = train(
        [kaggle_dir], out, TrainConfig(**TINY), report_dir=tmp_path / "rep", progress=False, command="wsi-scan train test"
    )
    m = load_model(out)
    assert m.card.dense_exact and m.card.arch == "dense-cnn" and m.card.arch_kwargs == {"width": 8}
    assert m.card.training["command"] == "wsi-scan train test"
    assert "given" in m.card.training["data"]["validation"]
    assert m.card.training["data"]["valid"]["n"] == 32
    assert set(m.card.metrics) >= {"valid", "valid_tta", "epoch"}
    assert res.best_epoch == 1 and len(res.history) == 1
    for f in ("curves.png", "roc.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 1000


def test_a_p4m_network_trains_and_its_width_counts_fields_of_eight(kaggle_dir, tmp_path):
    train([kaggle_dir], tmp_path / "p.pt", TrainConfig(**{**TINY, "arch": "dense-cnn-p4m"}), progress=False)
    m = load_model(tmp_path / "p.pt")
    assert m.card.arch == "dense-cnn-p4m" and m.card.arch_kwargs == {"width": 8} and m.card.dense_exact
    r = CliRunner().invoke(
        main, ["train", str(kaggle_dir), "--arch", "dense-cnn-p4m", "--width", "12", "--out", str(tmp_path / "q.pt")]
    )
    assert r.exit_code == 2 and "must be a multiple of 8 (e.g. 8 or 16)" in r.output
    r = CliRunner().invoke(
        main, ["train", str(kaggle_dir), "--arch", "dense-cnn-p4m", "--width", "4", "--out", str(tmp_path / "q.pt")]
    )
    assert r.exit_code == 2 and "must be a multiple of 8 (e.g. 8)" in r.output
    assert not (tmp_path / "q.pt").exists()


def test_h5_layout_and_stratified_split_when_no_valid(h5_dir, tmp_path):
    res = train([h5_dir], tmp_path / "a.safetensors", TrainConfig(**TINY), progress=False)
    assert load_model(res.model_path).card.training["data"]["valid"]["n"] == 64
    from tests.train.conftest import write_kaggle

    k = write_kaggle(tmp_path / "k", n=80)
    res = train([k], tmp_path / "b.pt", TrainConfig(**TINY, val_fraction=0.25), progress=False)
    d = load_model(res.model_path).card.training["data"]
    assert "stratified" in d["validation"] and d["valid"] == {"n": 20, "positive": 10, "negative": 10}


def test_seeded_runs_are_identical(kaggle_dir, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    a = train([kaggle_dir], tmp_path / "a.pt", cfg, progress=False)
    b = train([kaggle_dir], tmp_path / "b.pt", TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    assert [h["valid_auc"] for h in a.history] == [h["valid_auc"] for h in b.history]


def test_resume_continues_from_saved_epoch(kaggle_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.pt"
    full = train([kaggle_dir], tmp_path / "full.pt", TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    # a 2-epoch run interrupted during its second epoch's validation, then resumed
    import wsi_scan.train.loop as loop

    calls = {"n": 0}
    orig = loop.binary_metrics

    def stop_after_first(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(loop, "binary_metrics", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train([kaggle_dir], out, TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    monkeypatch.setattr(loop, "binary_metrics", orig)
    res = train([kaggle_dir], out, TrainConfig(**{**TINY, "epochs": 2}), resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert [h["valid_auc"] for h in res.history] == pytest.approx([h["valid_auc"] for h in full.history], abs=1e-9)


def test_evaluate_cli_json(kaggle_dir, tmp_path):
    out = tmp_path / "m.pt"
    train([kaggle_dir], out, TrainConfig(**TINY), progress=False)
    r = CliRunner().invoke(main, ["evaluate", str(kaggle_dir), "--model", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for k in ("auc", "accuracy", "sensitivity", "specificity", "n"):
        assert k in d
    assert d["n"] == 32 and d["tta"] is False
    r2 = CliRunner().invoke(main, ["evaluate", str(kaggle_dir), "--model", str(out), "--json", "--tta", "--split", "train"])
    d2 = json.loads(r2.stdout)
    assert d2["n"] == 96 and d2["tta"] is True and 0 <= d2["auc"] <= 1
    # accuracy agrees with the confusion matrix
    assert d2["accuracy"] == pytest.approx((d2["tp"] + d2["tn"]) / d2["n"])


def test_explore_figures(kaggle_dir, tmp_path):
    r = CliRunner().invoke(main, ["explore", str(kaggle_dir), "--out", str(tmp_path / "ex")])
    assert r.exit_code == 0, r.output
    for f in ("label_distribution.png", "samples.png", "colour_histograms.png"):
        assert (tmp_path / "ex" / f).stat().st_size > 1000
    # figures inside the data folder would be among its files next time it is read
    before = sorted(p.name for p in kaggle_dir.rglob("*"))
    for inside in (kaggle_dir, kaggle_dir / "figures"):
        r = CliRunner().invoke(main, ["explore", str(kaggle_dir), "--out", str(inside)])
        assert r.exit_code == 4 and "inside the data folder" in r.stderr, r.output
    assert sorted(p.name for p in kaggle_dir.rglob("*")) == before


def test_bad_data_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["train", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 6
    assert "no data set found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_resnet18_trains_in_patch_mode(kaggle_dir, tmp_path):
    out = tmp_path / "r.pt"
    # one step and no final 8-view pass: a ResNet-18 at 96 px without a strided stem is the
    # suite's most expensive network, and the test is about the patch-mode contract, not learning
    quick = {k: v for k, v in TINY.items() if k != "width"}
    with pytest.raises(UsageError, match="resnet18 has a fixed width"):  # once silently ignored
        TrainConfig(**{**quick, "arch": "resnet18", "width": 8})
    train([kaggle_dir], out, TrainConfig(**{**quick, "arch": "resnet18", "max_train": 16, "final_tta": False}), progress=False)
    m = load_model(out)
    assert m.card.arch == "resnet18" and not m.card.dense_exact
    assert np.isfinite(m.card.metrics["valid"]["auc"])


def test_weight_averaging_saves_the_averaged_weights_and_resumes(kaggle_dir, tmp_path):
    import torch

    from wsi_scan.train.loop import state_path

    plain = train([kaggle_dir], tmp_path / "p.pt", TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    ema = train([kaggle_dir], tmp_path / "e.pt", TrainConfig(**{**TINY, "epochs": 2, "ema_decay": 0.9}), progress=False)
    a, b = load_model(plain.model_path), load_model(ema.model_path)
    assert b.card.training["config"]["ema_decay"] == 0.9
    diff = [float((a.net.state_dict()[k].float() - b.net.state_dict()[k].float()).abs().max()) for k in a.net.state_dict()]
    assert max(diff) > 0  # the saved weights are the average, not the last step's
    state = torch.load(state_path(tmp_path / "e.pt"), weights_only=True)
    assert "ema" in state
    res = train(
        [kaggle_dir], tmp_path / "e.pt", TrainConfig(**{**TINY, "epochs": 2, "ema_decay": 0.9}), resume=True, progress=False
    )
    assert len(res.history) == 2 and load_model(res.model_path).card.training["config"]["ema_decay"] == 0.9


def test_quick_run_options(kaggle_dir, tmp_path):
    out = tmp_path / "q.pt"
    code = CliRunner().invoke(
        main,
        [
            "train",
            str(kaggle_dir),
            "--out",
            str(out),
            "--width",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--loader-workers",
            "0",
            "--max-valid",
            "10",
            "--no-final-tta",
            "--quiet",
        ],
    )
    assert code.exit_code == 0, code.stderr
    card = load_model(out).card
    assert "valid_tta" not in card.metrics and card.metrics["valid"]["n"] == 10
    assert card.training["data"]["valid_used"] == 10 and card.training["config"]["final_tta"] is False
    assert "(no TTA pass)" in code.stdout and "nan" not in code.stdout
    # drawn per class: a plain draw of a few patches could hold one class and end the run
    v = card.metrics["valid"]
    assert 3 <= v["tp"] + v["fn"] <= 7 and 3 <= v["tn"] + v["fp"] <= 7


def test_threshold_rule_sets_card_threshold_on_validation(kaggle_dir, tmp_path):
    from wsi_scan.io.datasets import open_patch_data
    from wsi_scan.train.evaluate import evaluate_patchset

    out = tmp_path / "t.pt"
    train([kaggle_dir], out, TrainConfig(**TINY, threshold_specificity=0.9), report_dir=tmp_path / "rep", progress=False)
    m = load_model(out)
    rule = m.card.training["threshold_rule"]
    assert rule["specificity"] == 0.9 and rule["threshold"] == m.card.threshold and rule["met"] is True
    ev = evaluate_patchset(m, open_patch_data(kaggle_dir).splits["valid"])
    neg = ev.probs[ev.labels == 0]
    # the rule, checked from its definition: at least 90% of negatives below, and no lower 1e-4 step would do
    assert (neg < m.card.threshold).mean() >= 0.9
    assert (neg < m.card.threshold - 1e-4).mean() < 0.9 or m.card.threshold == 0.0
    assert m.card.metrics["valid"]["threshold"] == m.card.threshold
    lo, hi = m.card.metrics["valid"]["auc_ci95"]
    assert lo <= m.card.metrics["valid"]["auc"] <= hi
    rows = (tmp_path / "rep" / "valid_predictions.csv").read_text().splitlines()
    assert rows[0].startswith("patch_set,index,patch_id,label,prob,prob_tta,predicted") and len(rows) == 33
    # 0 keeps the former fixed threshold
    train([kaggle_dir], tmp_path / "f.pt", TrainConfig(**TINY, threshold_specificity=0.0), progress=False)
    assert load_model(tmp_path / "f.pt").card.threshold == 0.5


def test_evaluate_out_folder_and_warning_on_training_patches(kaggle_dir, tmp_path):
    out = tmp_path / "m.pt"
    train([kaggle_dir], out, TrainConfig(**TINY), progress=False)
    r = CliRunner().invoke(
        main, ["evaluate", str(kaggle_dir), "--model", str(out), "--split", "valid", "--out", str(tmp_path / "ev")]
    )
    assert r.exit_code == 0, r.output
    assert "trained on" not in r.stderr and "95% CI" in r.stdout
    # 16 patches a class: said, since a handful of them moves every number by points
    assert "holds 16 negative and 16 positive patches" in r.stderr
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "patch_set,index,patch_id,label,prob,predicted" and len(rows) == 33
    assert rows[1].split(",")[:4] == ["kaggle/valid", "0", "valid0000", "0"]
    d = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert d["n"] == 32 and len(d["auc_ci95"]) == 2 and d["trained_on_these_patches"] is False
    assert (tmp_path / "ev" / "roc.png").stat().st_size > 1000
    # the training split, under another folder name: recognised by its fingerprint
    import shutil

    shutil.copytree(kaggle_dir, tmp_path / "renamed")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "renamed"), "--model", str(out), "--split", "train", "--json"])
    assert r.exit_code == 0 and "was trained on kaggle/train" in r.stderr
    assert json.loads(r.stdout)["trained_on_these_patches"] is True
    # a rerun replaces its own files; a user's file of the same name is kept
    (tmp_path / "ev" / "predictions.csv").write_text("mine\n")
    r = CliRunner().invoke(
        main, ["evaluate", str(kaggle_dir), "--model", str(out), "--split", "valid", "--out", str(tmp_path / "ev")]
    )
    assert r.exit_code == 4 and (tmp_path / "ev" / "predictions.csv").read_text() == "mine\n"
    # nor into the data folder, before any scoring
    r = CliRunner().invoke(main, ["evaluate", str(kaggle_dir), "--model", str(out), "--out", str(kaggle_dir / "ev")])
    assert r.exit_code == 4 and "inside the data folder" in r.stderr and not (kaggle_dir / "ev").exists()


def test_an_evaluation_that_fails_half_way_leaves_no_mix_of_two_runs(kaggle_dir, tmp_path, monkeypatch):
    """A disk that fills before metrics.json: the earlier evaluation's files were removed before
    the first new one, and the new predictions and ROC, already written, are removed with the
    failure, so the folder holds no evaluation rather than one without its numbers (or with
    another run's). A user's file in the folder stays."""
    from wsi_scan.errors import OutputWriteError

    out = tmp_path / "m.pt"
    train([kaggle_dir], out, TrainConfig(**TINY), progress=False)
    args = ["evaluate", str(kaggle_dir), "--model", str(out), "--split", "valid", "--out", str(tmp_path / "ev")]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (tmp_path / "ev" / "metrics.json").is_file()
    mine = tmp_path / "ev" / "notes.txt"
    mine.write_text("a user's file\n")
    # an earlier evaluation is replaced only when asked: it may be another model's numbers
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 4 and "holds an earlier evaluation" in r.stderr and (tmp_path / "ev" / "metrics.json").is_file()

    def full(*a, **k):
        raise OutputWriteError("cannot write metrics.json: No space left on device")

    monkeypatch.setattr("wsi_scan.io.exports.write_json", full)
    r = CliRunner().invoke(main, args + ["--tta", "--overwrite"])
    assert r.exit_code == 9 and "No space left" in r.stderr
    assert "files written before it were removed: predictions.csv, roc.png" in r.stderr
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["notes.txt"]
    assert mine.read_text() == "a user's file\n"


def test_threshold_command(kaggle_dir, tmp_path):
    out = tmp_path / "m.pt"
    train([kaggle_dir], out, TrainConfig(**TINY, threshold_specificity=0.0), progress=False)
    r = CliRunner().invoke(
        main,
        [
            "threshold",
            str(out),
            str(kaggle_dir),
            "--specificity",
            "0.75",
            "--out",
            str(tmp_path / "t.safetensors"),
            "--name",
            "fast",
        ],
    )
    assert r.exit_code == 0, r.output
    m = load_model(tmp_path / "t.safetensors")
    assert m.card.name == "fast"
    assert m.card.training["threshold_rule"]["data"] == "kaggle/valid" and m.card.metrics["valid"]["specificity"] >= 0.75
    assert "valid_tta" not in m.card.metrics  # measured at the former threshold
    # on the patches it was trained on: refused
    r = CliRunner().invoke(main, ["threshold", str(out), str(kaggle_dir), "--split", "train", "--out", str(tmp_path / "u.pt")])
    assert r.exit_code == 2 and "trained on these patches" in r.stderr and not (tmp_path / "u.pt").exists()
    r = CliRunner().invoke(main, ["threshold", str(out), str(kaggle_dir), "--out", str(tmp_path / "u.txt")])
    assert r.exit_code == 2 and "expected a .safetensors, .pt or .pth" in r.stderr


def test_evaluate_refuses_a_network_that_gives_non_finite_scores(kaggle_dir):
    import torch

    from wsi_scan.errors import ModelError
    from wsi_scan.io.datasets import open_patch_data
    from wsi_scan.io.model_files import LoadedModel
    from wsi_scan.model.card import ModelCard
    from wsi_scan.train.evaluate import evaluate_patchset

    class Nan(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 1, 1, 1), float("nan"))

    m = LoadedModel(Nan(), ModelCard(arch="external", name="nan"), "nan.ts", "")
    with pytest.raises(ModelError, match="non-finite outputs .* on 32 of 32 patches"):
        evaluate_patchset(m, open_patch_data(kaggle_dir).splits["valid"])


def test_evaluate_warns_when_the_patches_hold_one_class(kaggle_dir, tmp_path):
    import shutil

    from wsi_scan.io.model_files import bundled_model_path

    shutil.copytree(kaggle_dir, tmp_path / "neg")
    lines = (tmp_path / "neg" / "valid_labels.csv").read_text().splitlines()
    (tmp_path / "neg" / "valid_labels.csv").write_text(
        "\n".join([lines[0], *[ln for ln in lines[1:] if ln.endswith(",0")]]) + "\n"
    )
    r = CliRunner().invoke(
        main, ["evaluate", str(tmp_path / "neg"), "--model", str(bundled_model_path()), "--split", "valid", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("wsi-scan: warning: neg/valid holds only negative patches: the AUC is undefined")
    assert "AUC nan" in r.stdout
    # JSON has no NaN: the undefined numbers are null, on stdout and in metrics.json
    args = ["evaluate", str(tmp_path / "neg"), "--model", str(bundled_model_path()), "--split", "valid", "--quiet"]
    r = CliRunner().invoke(main, [*args, "--json", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["auc"] is None and d["auc_ci95"] == [None, None] and d["sensitivity"] is None
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["auc_ci95"] == [None, None]
    # no patches at all: one error line
    (tmp_path / "neg" / "valid_labels.csv").write_text("id,label\n")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 6 and "no labelled rows" in r.stderr  # (an empty HDF5 split: "holds no patches")


def test_a_saturated_run_is_kept_with_its_failed_rule_recorded_and_a_warning(kaggle_dir, tmp_path, monkeypatch, caplog):
    """Scores with every negative at 1.0 meet no specificity: the hours of training are kept,
    but the card and a warning say that its threshold does not meet the rule."""
    import numpy as np

    import wsi_scan.train.loop as loop

    real = loop.with_threshold
    monkeypatch.setattr(loop, "with_threshold", lambda card, labels, probs, *a: real(card, labels, np.ones_like(probs), *a))
    out = tmp_path / "s.pt"
    with caplog.at_level("WARNING", logger="wsi_scan.train"):
        train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    rule = load_model(out).card.training["threshold_rule"]
    assert rule["met"] is False and rule["reached"] == 0.0
    assert any("do not use this model for calls" in r.getMessage() for r in caplog.records)


def test_mixup_blends_images_and_targets_alike_and_repeats_with_the_seed():
    import torch

    from wsi_scan.train.loop import mixup

    n = 8
    values = torch.arange(n, dtype=torch.float32)
    x = values.view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    # targets proportional to the images: blended with the same weight and partner, they stay so
    y = (values / (n - 1)).view(n, 1, 1, 1)
    xm, ym = mixup(x, y, 0.2, torch.Generator().manual_seed(3))
    xm2, ym2 = mixup(x, y, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    assert not torch.equal(xm, x)
    assert torch.allclose(ym.flatten(), xm[:, 0, 0, 0] / (n - 1), atol=1e-6)
    assert torch.allclose(xm, xm[:, :1, :1, :1].expand_as(xm))  # one weight for every pixel of an image
    assert abs(float(y.mean()) - float(ym.mean())) < 1e-6  # a permutation blend keeps the batch's mean target


def test_mixup_run_records_alpha_in_the_card(kaggle_dir, tmp_path):
    res = train([kaggle_dir], tmp_path / "m.pt", TrainConfig(**{**TINY, "mixup_alpha": 0.2, "final_tta": False}), progress=False)
    assert load_model(res.model_path).card.training["config"]["mixup_alpha"] == 0.2
    with pytest.raises(Exception, match="mixup_alpha"):
        TrainConfig(mixup_alpha=-1)


def test_a_file_at_the_state_path_is_never_replaced_and_an_earlier_state_needs_overwrite(kaggle_dir, tmp_path):
    from wsi_scan.errors import OutputExistsError
    from wsi_scan.train.loop import state_path

    out = tmp_path / "m.safetensors"
    state_path(out).write_text("my notes\n")
    with pytest.raises(OutputExistsError, match="is a file wsi-scan did not write"):
        train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    with pytest.raises(OutputExistsError, match="is a file wsi-scan did not write"):
        train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False, overwrite=True)
    assert state_path(out).read_text() == "my notes\n" and not out.exists()
    state_path(out).unlink()
    train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    out.unlink()  # the model removed, its state left: a new run must say so, not take it over
    with pytest.raises(OutputExistsError, match="training state of an earlier run"):
        train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False, overwrite=True)


def test_report_and_figure_folders_are_checked_before_training(kaggle_dir, tmp_path):
    from tests._support import write_called_store
    from wsi_scan.errors import OutputExistsError
    from wsi_scan.io.heatmap import open_heatmap

    store = write_called_store(tmp_path / "s.zarr", "micro")
    out = tmp_path / "m.safetensors"
    for report in (store / "rep", store):
        with pytest.raises(OutputExistsError, match="heatmap store"):
            train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), report_dir=report, progress=False)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "curves.png").write_text("mine")
    with pytest.raises(OutputExistsError, match="--report .*curves.png"):
        train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), report_dir=tmp_path / "rep", progress=False)
    assert not out.exists()  # refused before any training
    r = CliRunner().invoke(main, ["explore", str(kaggle_dir), "--out", str(store / "figs")])
    assert r.exit_code == 4 and "heatmap store" in r.stderr
    open_heatmap(store)  # still a store
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["evaluate", str(kaggle_dir), "--model", "fast", "--out", str(tmp_path / "afile")])
    assert r.exit_code == 2 and "is a file; expected a folder" in r.stderr


def test_model_state_report_data_and_teacher_are_kept_apart_before_training(kaggle_dir, tmp_path):
    from wsi_scan.errors import OutputExistsError

    out = tmp_path / "m.safetensors"
    quick = TrainConfig(**TINY, final_tta=False)
    # once trained for the whole run, then failed writing the model into the report's folder
    for report in (out, tmp_path / "m.safetensors.train-state.pt"):
        with pytest.raises(UsageError, match="expected a folder of its own"):
            train([kaggle_dir], out, quick, report_dir=report, progress=False)
    with pytest.raises(OutputExistsError, match="inputs are never written to"):
        train([kaggle_dir], kaggle_dir / "m.safetensors", quick, progress=False)
    with pytest.raises(OutputExistsError, match="inputs are never written to"):
        train([kaggle_dir], out, quick, report_dir=kaggle_dir / "report", progress=False)
    assert not out.exists() and not (kaggle_dir / "m.safetensors").exists() and not (kaggle_dir / "report").exists()


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(kaggle_dir, tmp_path):
    from wsi_scan.errors import OutputExistsError
    from wsi_scan.io.folder_run import training_lock

    out = tmp_path / "m.safetensors"
    lock = training_lock(out)
    assert lock.acquire(blocking=False)
    try:
        with pytest.raises(OutputExistsError, match="another training run is writing"):
            train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    finally:
        lock.release()
    train([kaggle_dir], out, TrainConfig(**TINY, final_tta=False), progress=False)
    assert not training_lock(out).path.exists()  # released and removed


def test_resume_continues_only_the_run_that_saved_the_state(kaggle_dir, tmp_path, monkeypatch):
    import torch

    import wsi_scan.train.loop as loop
    from tests.train.conftest import write_kaggle
    from wsi_scan.errors import ModelError, UsageError

    out = tmp_path / "r.safetensors"
    cfg = dict(TINY, epochs=2, final_tta=False)
    orig = loop.finalize

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        train([kaggle_dir], out, TrainConfig(**cfg), progress=False)
    monkeypatch.setattr(loop, "finalize", orig)
    # the file left by the killed run is not taken for a model
    with pytest.raises(ModelError, match="has not finished"):
        load_model(out)
    r = CliRunner().invoke(main, ["evaluate", str(kaggle_dir), "--model", str(out)])
    assert r.exit_code == 5 and "has not finished" in r.stderr
    for change, words in (
        ({"epochs": 3}, "--epochs 2 (now 3)"),
        ({"width": 16}, "--width 8 (now 16)"),
        ({"mixup_alpha": 0.2}, "--mixup-alpha"),
    ):
        with pytest.raises(UsageError, match=re.escape(words)):
            train([kaggle_dir], out, TrainConfig(**{**cfg, **change}), resume=True, progress=False)
    other = write_kaggle(tmp_path / "other", n=96, ext=".png", valid=32, seed=5)
    with pytest.raises(UsageError, match="other data"):
        train([other], out, TrainConfig(**cfg), resume=True, progress=False)
    # a damaged value under a key that is there
    sp = loop.state_path(out)
    good = sp.read_bytes()
    s = torch.load(sp, weights_only=True)
    s["history"] = "not json"
    torch.save(s, sp)
    with pytest.raises(UsageError, match="cannot be used"):
        train([kaggle_dir], out, TrainConfig(**cfg), resume=True, progress=False)
    sp.write_bytes(good)
    # the options that only change the speed may differ
    res = train([kaggle_dir], out, TrainConfig(**{**cfg, "threads": 2}), resume=True, progress=False)
    assert "unfinished" not in load_model(res.model_path).card.training


def test_training_refuses_a_seed_out_of_range_and_the_same_data_twice(kaggle_dir, tmp_path):
    from wsi_scan.errors import DataError, UsageError

    for seed in (-1, 2**31):
        with pytest.raises(UsageError, match="seed"):
            TrainConfig(seed=seed)
    with pytest.raises(DataError, match="the same patches as"):
        train([kaggle_dir, kaggle_dir], tmp_path / "m.pt", TrainConfig(**TINY, final_tta=False), progress=False)


def test_a_full_disk_while_saving_the_state_is_one_write_error(tmp_path, monkeypatch):
    import torch

    from wsi_scan.errors import OutputWriteError
    from wsi_scan.train.loop import save_state

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 119360 vs 119248")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputWriteError, match="cannot write the training state"):
        save_state(tmp_path / "s.pt", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_hdf5_pairs_that_lie_are_data_errors(tmp_path):
    import h5py

    from tests.train.conftest import write_h5
    from wsi_scan.errors import DataError
    from wsi_scan.io.datasets import open_patch_data

    root = write_h5(tmp_path / "g", n=16)
    with h5py.File(root / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_group("x")
    with pytest.raises(DataError, match="'x' is a Group"):
        open_patch_data(root)
    root = write_h5(tmp_path / "big", n=16)
    with h5py.File(root / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", shape=(10**13,), dtype="u1")  # a tiny file declaring 10^13 labels
    with pytest.raises(DataError, match="16 patches but 10000000000000 labels"):
        open_patch_data(root)


def test_a_validation_split_that_repeats_training_patches_is_warned_about(tmp_path, caplog):
    import shutil

    from tests.train.conftest import write_kaggle

    k = write_kaggle(tmp_path / "k", n=96, ext=".png", valid=32)
    # half the validation patches replaced by training patches (same pixels, other ids)
    rows = (k / "valid_labels.csv").read_text().splitlines()
    train_rows = (k / "train_labels.csv").read_text().splitlines()[1:17]
    for i, row in enumerate(train_rows):
        ident, label = row.split(",")
        shutil.copy(k / "train" / f"{ident}.png", k / "valid" / f"valid{i:04d}.png")
        rows[1 + i] = f"valid{i:04d},{label}"
    (k / "valid_labels.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="wsi_scan.train"):
        train([k], tmp_path / "m.pt", TrainConfig(**TINY, final_tta=False), progress=False)
    assert "the validation split repeats training patches (about 50% of these patches" in caplog.text
