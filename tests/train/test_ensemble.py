"""Combining trained models into one: the mean of their logits, thresholded by the training rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_scan.config import TrainConfig
from wsi_scan.errors import ModelError, OutputExistsError, UsageError
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.model_files import describe_model, load_model, save_model
from wsi_scan.model.card import ModelCard
from wsi_scan.model.nets import build_network
from wsi_scan.train.ensemble import combine_models
from wsi_scan.train.evaluate import evaluate_patchset, trained_on
from wsi_scan.train.loop import train

TINY = dict(batch_size=16, epochs=1, loader_workers=0, threads=1)


@pytest.fixture
def members(kaggle_dir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    train([kaggle_dir], a, TrainConfig(**TINY, width=8), progress=False)
    train([kaggle_dir], b, TrainConfig(**TINY, width=4, seed=1), progress=False)
    return a, b


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_the_ensemble_scores_the_mean_logit_and_carries_its_members(members, kaggle_dir, tmp_path):
    a, b = members
    out = tmp_path / "e.safetensors"
    card = combine_models([a, b], kaggle_dir, out, specificity=0.75, name="both", command="wsi-scan ensemble ...", progress=False)
    m = load_model(out)
    assert m.card.to_dict() == card.to_dict()
    assert card.arch == "dense-cnn-ensemble" and card.arch_kwargs["widths"] == [8, 4] and card.dense_exact
    assert card.name == "both" and card.training["command"] == "wsi-scan ensemble ..."

    valid = open_patch_data(kaggle_dir).splits["valid"]
    probs = {p: evaluate_patchset(load_model(p), valid).probs for p in (a, b)}
    ev = evaluate_patchset(m, valid)
    np.testing.assert_allclose(_logit(ev.probs), (_logit(probs[a]) + _logit(probs[b])) / 2, atol=2e-4)

    # the threshold rule, from its definition, on the ensemble's own validation probabilities
    neg = ev.probs[ev.labels == 0]
    assert card.training["threshold_rule"]["specificity"] == 0.75
    assert (neg < card.threshold).mean() >= 0.75
    assert card.metrics["valid"]["threshold"] == card.threshold and card.metrics["valid"]["n"] == 32
    assert "valid_tta" in card.metrics and card.metrics["valid_tta"]["n"] == 32

    # each member is recorded, and the training data makes evaluate warn on the members' patches
    recs = card.training["ensemble"]["members"]
    assert [r["file"] for r in recs] == ["a.safetensors", "b.pt"]
    assert all(r["software"]["torch"] == torch.__version__ for r in recs) and card.software["torch"] == torch.__version__
    assert [r["sha256"] for r in recs] == [load_model(a).sha256, load_model(b).sha256]
    assert trained_on(m.card, open_patch_data(kaggle_dir).splits["train"]) == "kaggle/train"
    # both members saw the same patches: their one filter is kept once
    assert card.training["data"]["seen_patches"] == load_model(a).card.training["data"]["seen_patches"]
    d = describe_model(m)
    assert [x["width"] for x in d["members"]] == [8, 4] and d["train_patches"] == 96
    single = describe_model(load_model(a))
    assert single["members"] == [] and d["macs_per_cell"] > single["macs_per_cell"]


def test_members_normalised_otherwise_are_mapped_to_their_own_normalisation(members, kaggle_dir, tmp_path):
    """A member trained with another seed measures another mean/std: the ensemble keeps its
    first member's and maps the pixel exactly into each other member's, so every member scores
    what it scores alone."""
    a, b = members
    other = load_model(b)
    torch.manual_seed(0)
    for mod in other.net.modules():  # a one-epoch network barely looks at its input: make it look
        if isinstance(mod, torch.nn.Conv2d):
            mod.weight.data.normal_(0, 1.0 / mod.weight[0].numel() ** 0.5)
    shifted = ModelCard.from_dict({**other.card.to_dict(), "mean": [0.2, 0.8, 0.3], "std": [0.5, 0.1, 0.4]})
    c = tmp_path / "c.pt"
    save_model(c, other.net, shifted)
    save_model(tmp_path / "b2.pt", other.net, other.card)
    out = tmp_path / "e.safetensors"
    card = combine_models([a, c], kaggle_dir, out, specificity=0.75, tta=False, progress=False)
    assert card.mean == load_model(a).card.mean and card.std == load_model(a).card.std
    affine = card.arch_kwargs["input_affine"]
    assert len(affine) == 2 and affine[0] == pytest.approx([1, 1, 1, 0, 0, 0])
    valid = open_patch_data(kaggle_dir).splits["valid"]
    alone = (_logit(evaluate_patchset(load_model(a), valid).probs) + _logit(evaluate_patchset(load_model(c), valid).probs)) / 2
    np.testing.assert_allclose(_logit(evaluate_patchset(load_model(out), valid).probs), alone, atol=2e-4)
    # the members record their normalisation, so a dropped or edited map is refused at load
    m = load_model(out)
    assert [r["mean"] for r in card.training["ensemble"]["members"]] == [list(load_model(a).card.mean), [0.2, 0.8, 0.3]]
    for edit in (None, [affine[0], [*affine[1][:5], affine[1][5] + 0.01]], [affine[0], ["x"] * 6]):
        kw = {**card.arch_kwargs, "input_affine": edit}
        edited = tmp_path / "edited.pt"
        torch.save({"card": {**json.loads(card.to_json()), "arch_kwargs": kw}, "state_dict": m.net.state_dict()}, edited)
        with pytest.raises(ModelError, match="input_affine"):
            load_model(edited)
    # nor can the members' records go, leaving a map nothing checks
    training = {**card.training, "ensemble": {**card.training["ensemble"], "members": []}}
    torch.save({"card": {**json.loads(card.to_json()), "training": training}, "state_dict": m.net.state_dict()}, edited)
    with pytest.raises(ModelError, match="records no members"):
        load_model(edited)
    # without the map the second member would see other pixels: the test can tell
    unmapped = evaluate_patchset(load_model(tmp_path / "b2.pt"), valid).probs
    assert np.abs(_logit(evaluate_patchset(load_model(c), valid).probs) - _logit(unmapped)).max() > 1e-2


def test_the_ensemble_is_dense_exact_in_a_scan(members, kaggle_dir, tmp_path, make_slide):
    from wsi_scan.config import ScanConfig
    from wsi_scan.io.heatmap import open_heatmap
    from wsi_scan.scan import scan_slide

    a, b = members
    out = tmp_path / "e.safetensors"
    combine_models([a, b], kaggle_dir, out, specificity=0.75, tta=False, progress=False)
    slide = make_slide()
    d = scan_slide(slide, tmp_path / "d.zarr", ScanConfig(mode="dense", block_cells=5), model=str(out))
    p = scan_slide(slide, tmp_path / "p.zarr", ScanConfig(mode="patch", block_cells=5), model=str(out))
    pd, pp = open_heatmap(d.out).probs, open_heatmap(p.out).probs
    assert np.isfinite(pd).sum() > 100
    np.testing.assert_array_equal(np.isnan(pd), np.isnan(pp))
    np.testing.assert_allclose(pd[np.isfinite(pd)], pp[np.isfinite(pp)], atol=1e-5, rtol=0)


def test_a_p4m_model_alone_and_as_a_member_scans_dense_as_patch_by_patch(members, kaggle_dir, tmp_path, make_slide):
    from wsi_scan.config import ScanConfig
    from wsi_scan.io.heatmap import open_heatmap
    from wsi_scan.scan import scan_slide

    a, _ = members
    p4m = tmp_path / "p4m.safetensors"
    train([kaggle_dir], p4m, TrainConfig(**TINY, arch="dense-cnn-p4m", width=8, seed=2), progress=False)
    out = tmp_path / "e.safetensors"
    card = combine_models([p4m, a], kaggle_dir, out, specificity=0.75, tta=False, progress=False)
    assert card.arch_kwargs["archs"] == ["dense-cnn-p4m", "dense-cnn"] and card.arch_kwargs["widths"] == [8, 8]
    assert [m["arch"] for m in describe_model(load_model(out))["members"]] == ["dense-cnn-p4m", "dense-cnn"]
    valid = open_patch_data(kaggle_dir).splits["valid"]
    probs = [evaluate_patchset(load_model(p), valid).probs for p in (p4m, a)]
    np.testing.assert_allclose(
        _logit(evaluate_patchset(load_model(out), valid).probs), (_logit(probs[0]) + _logit(probs[1])) / 2, atol=2e-4
    )
    slide = make_slide()
    for model in (p4m, out):
        d = scan_slide(slide, tmp_path / f"d-{model.stem}.zarr", ScanConfig(mode="dense", block_cells=5), model=str(model))
        p = scan_slide(slide, tmp_path / f"p-{model.stem}.zarr", ScanConfig(mode="patch", block_cells=5), model=str(model))
        pd, pp = open_heatmap(d.out).probs, open_heatmap(p.out).probs
        assert np.isfinite(pd).sum() > 100
        np.testing.assert_array_equal(np.isnan(pd), np.isnan(pp))
        np.testing.assert_allclose(pd[np.isfinite(pd)], pp[np.isfinite(pp)], atol=1e-5, rtol=0)


def test_what_an_ensemble_refuses(members, kaggle_dir, tmp_path):
    a, b = members
    with pytest.raises(UsageError, match="takes 2 to 4 models, found 1"):
        combine_models([a], kaggle_dir, tmp_path / "e.pt", progress=False)
    with pytest.raises(UsageError, match="named twice"):
        combine_models([a, a], kaggle_dir, tmp_path / "e.pt", progress=False)
    # the same weights in the other format, under another name: once taken as two members
    same = load_model(a)
    save_model(tmp_path / "a-again.pt", same.net, ModelCard.from_dict({**same.card.to_dict(), "name": "other"}))
    with pytest.raises(UsageError, match="same weights"):
        combine_models([a, tmp_path / "a-again.pt"], kaggle_dir, tmp_path / "e.pt", progress=False)
    with pytest.raises(UsageError, match="trained on these patches"):
        combine_models([a, b], kaggle_dir, tmp_path / "e.pt", split="train", progress=False)
    with pytest.raises(UsageError, match="expected a .safetensors, .pt or .pth"):
        combine_models([a, b], kaggle_dir, tmp_path / "e.txt", progress=False)

    # another pixel size: the members disagree on the contract
    other = load_model(b)
    changed = ModelCard.from_dict({**other.card.to_dict(), "mpp": 0.5})
    save_model(tmp_path / "c.pt", other.net, changed)
    with pytest.raises(UsageError, match="its card's mpp"):
        combine_models([a, tmp_path / "c.pt"], kaggle_dir, tmp_path / "e.pt", progress=False)

    # a normalisation no exact map of the card's range reaches
    far = ModelCard.from_dict({**other.card.to_dict(), "std": [1e-3, 0.2, 0.2]})
    save_model(tmp_path / "far.pt", other.net, far)
    with pytest.raises(UsageError, match="too far from .* to be mapped exactly"):
        combine_models([a, tmp_path / "far.pt"], kaggle_dir, tmp_path / "e.pt", progress=False)

    # a patch-mode member would make the ensemble patch-mode only
    res = ModelCard(arch="resnet18", dense_exact=False, name="r")
    save_model(tmp_path / "r.pt", build_network("resnet18"), res)
    with pytest.raises(UsageError, match="dense-exact dense-cnn and dense-cnn-p4m models only"):
        combine_models([a, tmp_path / "r.pt"], kaggle_dir, tmp_path / "e.pt", progress=False)
    assert not list(tmp_path.glob("e.*"))

    # an ensemble as a member: its own members are named instead
    combine_models([a, b], kaggle_dir, tmp_path / "ab.pt", tta=False, progress=False)
    with pytest.raises(UsageError, match=r"itself an ensemble \(of a.safetensors, b.pt\)"):
        combine_models([a, tmp_path / "ab.pt"], kaggle_dir, tmp_path / "e.pt", progress=False)

    # an existing file is kept unless asked
    out = tmp_path / "e.pt"
    combine_models([a, b], kaggle_dir, out, tta=False, progress=False)
    with pytest.raises(OutputExistsError):
        combine_models([a, b], kaggle_dir, out, tta=False, progress=False)
    with pytest.raises(UsageError, match="is an input model"):
        combine_models([a, out], kaggle_dir, out, tta=False, overwrite=True, progress=False)
    combine_models([b, a], kaggle_dir, out, tta=False, overwrite=True, progress=False)
    assert load_model(out).card.arch_kwargs["widths"] == [4, 8]
    assert torch.is_tensor(next(iter(load_model(out).net.state_dict().values())))


def test_the_ensemble_command(members, kaggle_dir, tmp_path):
    from tests._support import assert_clean_failure, run

    a, b = members
    out = tmp_path / "e.safetensors"
    code, stdout, err = run("ensemble", a, b, "--data", kaggle_dir, "--out", out, "--name", "duo", "--no-tta", "--quiet")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: AUC ") and "threshold" in stdout and "with TTA" not in stdout
    card = load_model(out).card
    assert card.name == "duo" and "valid_tta" not in card.metrics
    assert card.training["command"].startswith("wsi-scan ")

    code, stdout, err = run("models", "--json")  # the bundled ones list; this file is not one of them
    assert code == 0 and "duo" not in stdout

    for args, needle in (
        ((a,), "takes 2 to 4"),
        ((a, tmp_path / "none.safetensors"), "does not exist"),
        ((a, b, b), "named twice"),
    ):
        target = tmp_path / "f.safetensors"
        code, _, err = run("ensemble", *args, "--data", kaggle_dir, "--out", target, "--quiet")
        assert_clean_failure(code, err, target, needle)
    code, _, err = run("ensemble", a, b, "--data", tmp_path / "nowhere", "--out", tmp_path / "f.pt", "--quiet")
    assert_clean_failure(code, err, tmp_path / "f.pt")
    code, _, err = run("ensemble", a, b, "--data", kaggle_dir, "--out", out, "--quiet")
    assert_clean_failure(code, err, None, "exists")


def test_the_ensemble_lists_each_training_split_once_and_no_member_validation(kaggle_dir, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    train([kaggle_dir], a, TrainConfig(**TINY, width=4), progress=False)
    # the same data through another spelling of its path
    train(
        [kaggle_dir.parent / ".." / kaggle_dir.parent.name / kaggle_dir.name],
        b,
        TrainConfig(**TINY, width=4, seed=2),
        progress=False,
    )
    assert load_model(a).card.training["data"]["sources"][0]["root"] != load_model(b).card.training["data"]["sources"][0]["root"]
    card = combine_models([a, b], kaggle_dir, tmp_path / "e.pt", specificity=0.75, tta=False, progress=False)
    data = card.training["data"]
    assert len(data["sources"]) == 1 and data["train"]["n"] == 96
    assert "valid" not in data and "validation" not in data  # the members' own; the ensemble's is its rule
    assert card.training["threshold_rule"]["data"] == "kaggle/valid" and card.metrics["valid"]["n"] == 32
