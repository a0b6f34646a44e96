"""Combine trained dense-exact models into one: the mean of their logits, with its own card.

Members trained on the same data make different errors on held-out patches (another width,
another schedule), so their mean ranks patches better than either (docs/model.md). The result
is one model file with one contract: the members must agree on the window, cell, pixel size
and classes (a member normalised otherwise, e.g. trained with another seed, gets an exact
per-channel map from the ensemble's normalisation to its own), and the combined model is
thresholded by the rule training applies, on held-out patches none of the members was trained on. ``wsi-scan ensemble`` calls
``combine_models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import UsageError
from ..io.datasets import patch_split
from ..io.model_files import LoadedModel, load_model, resolve_model, save_model
from ..model.card import CONTRACT_FIELDS, ModelCard
from ..model.nets import ENSEMBLE_SIZE, MEMBER_ARCHITECTURES, affine_row_in_range, build_network, member_affine
from .evaluate import evaluate_patchset, trained_on
from .loop import software_versions, validation_metrics, with_threshold
from .threshold import check_out_file, check_rule_inputs, check_rule_met

#: the card fields every member must share: they are the combined model's contract (mean and
#: std may differ: see ``input_affine``)


def _check_members(members: list[LoadedModel]) -> None:
    lo, hi = ENSEMBLE_SIZE
    if not lo <= len(members) <= hi:
        raise UsageError(f"an ensemble takes {lo} to {hi} models, found {len(members)}")
    for m in members:
        if m.card.arch == "dense-cnn-ensemble":
            names = [r.get("file") for r in m.card.training.get("ensemble", {}).get("members", [])]
            raise UsageError(
                f"{m.path} is itself an ensemble (of {', '.join(map(str, names)) or '?'}); pass its members' files instead"
            )
        if m.card.arch not in MEMBER_ARCHITECTURES or not m.card.dense_exact:
            raise UsageError(
                f"{m.path}: architecture {m.card.arch!r}; an ensemble combines dense-exact "
                f"{' and '.join(MEMBER_ARCHITECTURES)} models only "
                "(so that it stays dense-exact)"
            )
    first = members[0]
    for m in members[1:]:
        for key in CONTRACT_FIELDS:
            a, b = getattr(first.card, key), getattr(m.card, key)
            if a != b:
                raise UsageError(
                    f"{m.path}: its card's {key} is {b!r}, {first.path}'s is {a!r}; the members of an ensemble "
                    "must share window, cell, pixel size and classes (train them on the same data)"
                )
    dropouts = {m.card.arch_kwargs.get("dropout", 0.2) for m in members}
    if len(dropouts) > 1:  # dropout is off at inference, but one setting rebuilds every member
        raise UsageError(f"the members' dropout settings differ ({sorted(dropouts)}); expected one")
    # by the weights, not the file: the same network saved as .pt and .safetensors, or with an
    # edited card, is still the same network
    digests = [_weights_digest(m) for m in members]
    if len(set(digests)) < len(digests):
        raise UsageError(
            "the same network is named twice (the same weights, whatever the file or card); an ensemble of a model "
            "with itself is that model"
        )


def _weights_digest(m: LoadedModel) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(m.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _merged_data(members: list[LoadedModel]) -> dict[str, Any]:
    """The training data of all members: every split any member was trained on (so that
    `evaluate` warns and `threshold` refuses on any of them), each listed once, recognised by its
    fingerprints (or names and counts) whatever folder path the member was trained from. The
    members' validation records are left out: the ensemble's own validation is its
    ``threshold_rule`` and ``metrics``."""
    sources: list[dict[str, Any]] = []
    seen: set[str] = set()
    for m in members:
        for src in m.card.training.get("data", {}).get("sources", []):
            splits = src.get("splits", {})
            key = repr(sorted((k, sp.get("fingerprint") or (sp.get("name"), sp.get("n"))) for k, sp in splits.items()))
            if key not in seen:
                seen.add(key)
                sources.append(src)
    data: dict[str, Any] = {"sources": sources}
    filters: list[dict[str, Any]] = []
    for m in members:  # members trained on the same patches carry the same filter: kept once
        for f in m.card.training.get("data", {}).get("seen_patches", []):
            if f not in filters:
                filters.append(f)
    if filters:
        data["seen_patches"] = filters
    trains = [m.card.training.get("data", {}).get("train") for m in members]
    if all(t == trains[0] for t in trains) and trains[0] is not None:
        data["train"] = trains[0]  # otherwise each member's record keeps its own count
    return data


def _member_record(m: LoadedModel) -> dict[str, Any]:
    training = {k: v for k, v in m.card.training.items() if k not in ("data", "history")}
    return {
        "name": m.card.name,
        "file": Path(m.path).name,
        "sha256": m.sha256,
        "arch": m.card.arch,
        "arch_kwargs": m.card.arch_kwargs,
        # its own normalisation: what the ensemble card's input_affine must map to (card.py checks)
        "mean": list(m.card.mean),
        "std": list(m.card.std),
        "threshold": m.card.threshold,
        "metrics": m.card.metrics,
        "software": m.card.software,
        "training": training,
        "history": m.card.training.get("history", []),
        "train": m.card.training.get("data", {}).get("train"),
    }


def combine_models(
    model_paths: list[str | Path],
    data: str | Path,
    out: str | Path,
    specificity: float = TrainConfig().threshold_specificity,
    split: str = "valid",
    device: str = "auto",
    name: str = "ensemble",
    tta: bool = True,
    command: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelCard:
    """Write to ``out`` the model whose logit is the mean of the models' at ``model_paths``.

    Its threshold is chosen by the training rule on ``data``'s ``split`` (refused if any member
    was trained on it), its ``valid`` metrics are measured there at that threshold and, with
    ``tta``, its ``valid_tta`` ones too. The card records each member (file, sha256, card
    metrics, recipe and curve) and the union of their training data.
    """
    import torch

    out = Path(out)
    check_out_file(out, overwrite, [resolve_model(p) for p in model_paths])
    members = [load_model(p) for p in model_paths]
    _check_members(members)
    ps = patch_split(data, split)
    check_rule_inputs(specificity, ps)
    for m in members:
        seen = trained_on(m.card, ps)
        if seen is not None:
            raise UsageError(
                f"{ps.name}: the member {m.card.name!r} was trained on these patches ({seen}); "
                "expected held-out validation patches to choose the ensemble's threshold on"
            )
    widths = [int(m.card.arch_kwargs.get("width", 32)) for m in members]
    kwargs: dict[str, Any] = {"widths": widths}
    archs = [m.card.arch for m in members]
    if any(a != "dense-cnn" for a in archs):  # absent when all are dense-cnn: earlier files read the same
        kwargs["archs"] = archs
    if "dropout" in members[0].card.arch_kwargs:
        kwargs["dropout"] = members[0].card.arch_kwargs["dropout"]
    first = members[0].card
    if any((m.card.mean, m.card.std) != (first.mean, first.std) for m in members[1:]):
        # the ensemble takes its first member's normalisation; the others map from it exactly
        affine = [member_affine(first.mean, first.std, m.card.mean, m.card.std) for m in members]
        for m, row in zip(members, affine, strict=True):
            if not affine_row_in_range(row):  # the bounds a card's map is read back with
                raise UsageError(
                    f"{m.path}: its normalisation (mean {list(m.card.mean)}, std {list(m.card.std)}) is too far from "
                    f"{members[0].path}'s (mean {list(first.mean)}, std {list(first.std)}) to be mapped exactly; "
                    "expected members trained on the same data"
                )
        kwargs["input_affine"] = affine
    net = build_network("dense-cnn-ensemble", **kwargs)
    for member_net, m in zip(net.members, members, strict=True):  # type: ignore[arg-type]
        member_net.load_state_dict(m.net.state_dict(), strict=True)
    net.eval()
    training = {
        "command": command,
        "ensemble": {
            "rule": "mean of the members' logits",
            "members": [_member_record(m) for m in members],
        },
        "data": _merged_data(members),
    }
    card = ModelCard.from_dict(
        {
            **first.to_dict(),
            "arch": "dense-cnn-ensemble",
            "arch_kwargs": kwargs,
            "dense_exact": True,
            "name": name,
            "threshold": 0.5,
            "training": training,
            "metrics": {},
            "software": software_versions(),  # the members' own are in their records
        }
    )
    combined = LoadedModel(net=net, card=card, path=str(out), sha256="")
    ev = evaluate_patchset(combined, ps, device, progress=progress)
    card = with_threshold(card, ev.labels, ev.probs, specificity, ps.name)
    check_rule_met(card, ev.labels, ev.probs, "the ensemble")
    tta_probs = None
    if tta:
        tta_probs = evaluate_patchset(LoadedModel(net, card, str(out), ""), ps, device, tta=True, progress=progress).probs
    metrics = validation_metrics(card, ev.labels, ev.probs, tta_probs)
    card = ModelCard.from_dict({**card.to_dict(), "metrics": metrics})
    save_model(out, net.to(torch.device("cpu")), card)
    load_model(out)  # the file reads back, and its network fits its card (sizes, finite outputs)
    return card
