"""Choose a trained model's threshold on held-out patches and write the model anew.

The rule is the one training applies (``with_threshold``): the lowest threshold at which the
validation negatives' specificity is at least the one asked for. ``wsi-scan threshold`` calls
``rethreshold_model``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..config import FEW_PATCHES_PER_CLASS, TrainConfig
from ..errors import DataError, ModelError, UsageError
from ..io.datasets import PatchSet, patch_split
from ..io.model_files import MODEL_SUFFIXES, load_model, resolve_model, save_model
from ..io.outputs import check_replaceable, expect_suffix, prepare_parent
from ..model.card import ModelCard
from .evaluate import evaluate_patchset, trained_on
from .loop import validation_metrics, with_threshold


def check_out_file(out: Path, overwrite: bool, inputs: list[str | Path]) -> None:
    """Refuse, before any work, an ``out`` that is not a model file name, may not be replaced,
    or is one of the input models (replacing it would lose the model it was made from)."""
    expect_suffix(out, MODEL_SUFFIXES, any_case=False)
    check_replaceable(out, overwrite, kind="file")
    for p in inputs:
        if out.exists() and Path(p).exists() and out.samefile(p):
            raise UsageError(f"--out {out} is an input model; expected a new file (the input would be lost)")
    prepare_parent(out, "--out")


def check_rule_inputs(specificity: float, ps: PatchSet) -> None:
    """The rule needs a specificity in RULE_SPECIFICITY_RANGE (the command line's), and patches of
    both classes: it is chosen on the negatives, and the card's sensitivity and AUC need the positives."""
    from ..config import RULE_SPECIFICITY_RANGE

    lo, hi = RULE_SPECIFICITY_RANGE
    if not (isinstance(specificity, (int, float)) and math.isfinite(specificity) and lo <= specificity <= hi):
        raise UsageError(f"--specificity must be a number from {lo} to {hi}, found {specificity!r}")
    n_pos = int(np.count_nonzero(ps.labels))
    n_neg = len(ps) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"{ps.name}: {n_neg} negative and {n_pos} positive patches; choosing a threshold and scoring it "
            "needs both classes: pass a validation split that holds both"
        )
    if min(n_pos, n_neg) < FEW_PATCHES_PER_CLASS:
        logging.getLogger("wsi_scan.train").warning(
            f"{ps.name}: a threshold chosen on {n_neg} negative and {n_pos} positive patches: each negative moves the "
            f"specificity by {1 / n_neg:.3f}, so the card's numbers rest on few patches; choose it on a validation "
            f"split of at least {FEW_PATCHES_PER_CLASS} patches of each class"
        )


def check_rule_met(card: ModelCard, labels: np.ndarray, probs: np.ndarray, what: str) -> None:
    """A model whose scores are saturated (all negatives at 1.0) has no threshold that keeps the
    specificity; say so rather than write a card whose rule is not met (``with_threshold``
    records whether it was)."""
    rule = card.training["threshold_rule"]
    if not rule["met"]:
        neg = probs[np.asarray(labels) == 0]
        raise ModelError(
            f"{what}: no threshold reaches specificity {rule['specificity']} on these patches (at most {rule['reached']:.4f}: "
            f"{int(np.sum(neg >= 1.0))} of {neg.size} negatives score 1.0); its weights look damaged"
        )


def rethreshold_model(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    specificity: float = TrainConfig().threshold_specificity,
    split: str = "valid",
    device: str = "auto",
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelCard:
    """Copy the model at ``model_path`` to ``out`` with its card's threshold chosen on ``data``'s ``split``.

    The new card records the rule, its ``valid`` metrics are those at the new threshold, and its
    ``valid_tta`` metrics are dropped (measured at the former threshold; ``evaluate --tta`` gives
    them again). ``name`` replaces the card's name. Refuses, before any work, an ``out`` that is not
    a model file name or may not be replaced, and patches the model was trained on.
    """
    out = Path(out)
    source = resolve_model(model_path)
    check_out_file(out, overwrite, [source])
    if source.suffix in (".ts", ".torchscript"):
        raise UsageError(
            f"{model_path}: a TorchScript model's card is its JSON file beside it; set the threshold there "
            "(wsi-scan writes weights, not TorchScript)"
        )
    ps = patch_split(data, split)
    check_rule_inputs(specificity, ps)
    model = load_model(model_path)
    seen = trained_on(model.card, ps)
    if seen is not None:
        raise UsageError(
            f"{ps.name}: {model.card.name!r} was trained on these patches ({seen}); "
            "expected held-out validation patches to choose a threshold on"
        )
    ev = evaluate_patchset(model, ps, device, progress=progress)
    card = with_threshold(model.card, ev.labels, ev.probs, specificity, ps.name)
    check_rule_met(card, ev.labels, ev.probs, str(model_path))
    metrics = {**model.card.metrics, **validation_metrics(card, ev.labels, ev.probs, None)}
    metrics.pop("valid_tta", None)  # measured at the former threshold: evaluate --tta gives it again
    card = ModelCard.from_dict({**card.to_dict(), "metrics": metrics, "name": name or card.name})
    save_model(out, model.net, card)
    return card
