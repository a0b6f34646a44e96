from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from wsi_scan.errors import ModelError
from wsi_scan.io.model_files import bundled_model_path, load_model, save_model
from wsi_scan.model.card import ModelCard
from wsi_scan.model.nets import DenseCNN, build_network


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_roundtrip(tmp_path, ext):
    torch.manual_seed(0)
    net = DenseCNN(width=8).eval()
    card = ModelCard(arch="dense-cnn", arch_kwargs={"width": 8}, dense_exact=True, name="t", threshold=0.4)
    p = save_model(tmp_path / f"m{ext}", net, card)
    m = load_model(p)
    assert m.card.threshold == 0.4 and m.card.arch_kwargs == {"width": 8} and m.card.dense_exact
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(m.net(x), net(x))
    # a model is shared like any output: the mode a new file gets (safetensors alone gives 0600)
    (tmp_path / "plain").touch()
    assert p.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.parametrize("name", ["fast", "accurate"])
def test_bundled_model_has_a_full_card(name):
    from wsi_scan.io.model_files import bundled_models

    assert bundled_model_path().is_file() and name in bundled_models()
    m = load_model(name)
    c = m.card
    assert c.name == name
    assert c.dense_exact and c.input_px == 96 and c.cell_px == 32 and c.mpp == pytest.approx(0.972)
    assert c.class_names == ("normal", "tumour")
    # trained, or combined from trained members (each with its command and card metrics)
    members = c.training.get("ensemble", {}).get("members", [])
    assert c.training["command"].startswith("wsi-scan ensemble " if members else "wsi-scan train ")
    assert all(m["training"]["command"].startswith("wsi-scan train ") and m["metrics"]["valid"]["auc"] for m in members)
    assert (c.arch == "dense-cnn-ensemble") == bool(members)
    # where it was validated: the training's split, or for an ensemble the split of its own threshold rule
    assert "validation" in c.training["data"] or (members and c.training["threshold_rule"]["data"] == "pcam-jpeg-sample/valid")
    assert 0.93 < c.metrics["valid"]["auc"] <= 1.0
    # every training split by its fingerprint, so evaluate and threshold know it under any folder name
    splits = [sp for src in c.training["data"]["sources"] for key, sp in src["splits"].items() if key == "train"]
    assert len(splits) == 3 and all(len(sp["fingerprint"]) == 64 for sp in splits)
    # and every training patch by its pixels, so a part of a split or a mix is recognised too
    (seen,) = c.training["data"]["seen_patches"]
    assert seen["n"] == c.training["data"]["train"]["n"] == 31081
    # a full card: the 8-view score as well, at the same threshold
    # (not necessarily higher: the ensemble's 8 views score 0.0003 below its single view)
    assert 0.93 < c.metrics["valid_tta"]["auc"] <= 1.0 and c.metrics["valid_tta"]["threshold"] == c.threshold
    # the threshold rule, and the specificity it promises
    assert c.training["threshold_rule"]["specificity"] == 0.93
    assert c.threshold == c.metrics["valid"]["threshold"] and c.metrics["valid"]["specificity"] >= 0.93


def test_card_without_required_keys(tmp_path):
    torch.save({"card": json.dumps({"name": "x"}), "state_dict": {}}, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="lacks"):
        load_model(tmp_path / "m.pt")


def test_weights_that_do_not_fit(tmp_path):
    card = ModelCard(arch="dense-cnn", arch_kwargs={"width": 8})
    torch.save({"card": card.to_json(), "state_dict": {"w": torch.zeros(1)}}, tmp_path / "m.pt")
    # the message names what does not fit, not only that something does not
    with pytest.raises(ModelError, match="do not match .*missing: features.0.weight.*1 not of this network: w\\)"):
        load_model(tmp_path / "m.pt")


def test_torchscript_with_card(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 96), torch.nn.Flatten())
    torch.jit.script(net).save(str(tmp_path / "m.ts"))
    (tmp_path / "m.json").write_text(ModelCard(arch="external", name="ext").to_json())
    m = load_model(tmp_path / "m.ts")
    assert not m.card.dense_exact
    with torch.no_grad():
        assert m.net(torch.randn(3, 3, 96, 96)).shape == (3, 1, 1, 1)
    (tmp_path / "m.json").unlink()
    with pytest.raises(ModelError, match="card beside it"):
        load_model(tmp_path / "m.ts")


def test_bundled_models_by_name(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wsi_scan.cli import main
    from wsi_scan.errors import ModelError
    from wsi_scan.io.model_files import bundled_models, resolve_model

    names = bundled_models()
    assert sorted(names) == ["accurate", "fast"] and resolve_model("fast") == names["fast"] == bundled_model_path()
    assert resolve_model(None) == bundled_model_path()
    monkeypatch.chdir(tmp_path)
    # a bare name that is neither bundled nor a file: one message naming the bundled models
    with pytest.raises(ModelError, match="not a bundled model .*accurate, fast"):
        resolve_model("fastest")
    with pytest.raises(ModelError, match="not a bundled model .*former-default.safetensors"):  # the former default's name
        resolve_model("default")
    # a path, even one spelled like a name, stays a path
    assert resolve_model("./fast") == Path("./fast") and resolve_model("m.pt") == Path("m.pt")
    assert load_model("fast").sha256 == load_model(None).sha256
    r = CliRunner().invoke(main, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    d = next(x for x in rows if x["name"] == "fast")
    assert d["default"] is True and d["dense_exact"] is True and d["parameters"] > 0
    # multiply-adds per cell of a dense-exact net: one pass over 8 x 8 cells, divided by 64
    assert 1e6 < d["macs_per_cell"] < 1e8
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "fast  (default)" in r.stdout and "multiply-adds per cell" in r.stdout
    with pytest.raises(ModelError, match="not a bundled model"):
        load_model("fastest")


def _tiny_model(tmp_path):
    card = ModelCard(arch="dense-cnn", arch_kwargs={"width": 4}, dense_exact=True, name="t")
    return card, build_network("dense-cnn", width=4).eval()


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"arch": "dense-cnn", "input_px": 96, "mpp": 1, "std": [1, 1, 1], "mean": [' + "9" * 400 + ", 0.5, 0.5]}", "too large"),
        ('{"arch": "dense-cnn", "mpp": ' + "9" * 5000 + "}", "not a readable JSON object"),
        ("[" * 100_000 + "]" * 100_000, "not a readable JSON object"),
        (
            '{"arch": "dense-cnn", "input_px": 96, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "mpp": 1' + "0" * 400 + "}",
            "found 1000000000",
        ),
    ],
)
def test_cards_with_absurd_numbers_or_nesting_are_one_error(text, needle):
    with pytest.raises(ModelError, match=needle) as exc:
        ModelCard.from_json(text)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda card, state: (card, [1, 2]), "'state_dict' a dict"),
        (lambda card, state: (5, state), "'card' to be JSON text or a dict"),
        (lambda card, state: (card, {**state, "x": 3}), "names to tensors"),
        (
            lambda card, state: (card, {k: (v.int() if i == 0 else v) for i, (k, v) in enumerate(state.items())}),
            "stored as torch.int32",
        ),
        (lambda card, state: ({**card, "training": {"data": "x"}}, state), "training.data must be an object"),
        (lambda card, state: ({**card, "training": {"data": {"sources": [{"splits": "x"}]}}}, state), "splits"),
        (lambda card, state: ({**card, "training": {"ensemble": {"members": [1, 2]}}}, state), "ensemble.members"),
        (lambda card, state: ({**card, "training": {"ensemble": "x"}}, state), "training.ensemble must be"),
        (lambda card, state: ({**card, "training": {"data": {"seen_patches": "x"}}}, state), "seen_patches must be a list"),
        # cards that lie: each once ran, and scored or reported nonsense without a word
        (lambda card, state: ({**card, "class_names": ["tumour", "normal"]}, state), "second output as tumour"),
        (lambda card, state: ({**card, "class_names": ["cat", "dog"]}, state), "second output as tumour"),
        (lambda card, state: ({**card, "threshold": 0.0}, state), "strictly between 0 and 1"),
        (
            lambda card, state: ({**card, "threshold": 0.01, "metrics": {"valid": {"threshold": 0.4989}}}, state),
            "not the one its validation metrics were measured at",
        ),
        (lambda card, state: ({**card, "std": [1e-30, 0.2, 0.2]}, state), "normalisation of pixels scaled to [0, 1]"),
        (lambda card, state: ({**card, "std": [1e30, 0.2, 0.2]}, state), "normalisation of pixels scaled to [0, 1]"),
        (lambda card, state: ({**card, "mean": [-100, 0, 100]}, state), "normalisation of pixels scaled to [0, 1]"),
        (lambda card, state: ({**card, "card_version": 0}, state), "card_version 0"),
        # finite but absurd: every cell of every slide would score 1.0
        (lambda card, state: (card, {**state, "head.4.bias": torch.tensor([1e30])}), "a logit of 1e+30 on a blank input"),
    ],
)
def test_damaged_or_edited_model_files_are_refused_with_one_error(tmp_path, damage, needle):
    card, net = _tiny_model(tmp_path)
    c, state = damage(card.to_dict(), dict(net.state_dict()))
    torch.save({"card": c, "state_dict": state}, tmp_path / "m.pt")
    with pytest.raises(ModelError, match=re.escape(needle)) as exc:
        load_model(tmp_path / "m.pt")
    # with three models on one command line (ensemble) the message must say which one
    assert str(exc.value).startswith(str(tmp_path / "m.pt"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_full_disk_while_saving_a_model_is_one_write_error(tmp_path, monkeypatch, suffix):
    import safetensors.torch
    from safetensors import SafetensorError

    from wsi_scan.errors import OutputWriteError

    def full(*args, **kwargs):
        if suffix == ".pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(torch, "save", full)
    card, net = _tiny_model(tmp_path)
    with pytest.raises(OutputWriteError, match="cannot write the model file"):
        save_model(tmp_path / f"m{suffix}", net, card)
    assert list(tmp_path.iterdir()) == []  # no temporary file left
