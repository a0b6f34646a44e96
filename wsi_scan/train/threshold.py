"""Choose a trained model's threshold on held-out patches and write the model anew.

The rule is the one training applies (``with_threshold``): the lowest threshold at which the
validation negatives' specificity is at least the one asked for. ``wsi-scan threshold`` calls
``rethreshold_model``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import UsageError
from ..io.datasets import patch_split
from ..io.model_files import load_model, save_model
from ..io.outputs import check_replaceable, prepare_parent
from ..model.card import ModelCard
from .evaluate import evaluate_patchset, trained_on
from .loop import validation_metrics, with_threshold

MODEL_SUFFIXES = (".safetensors", ".pt")


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
    if out.suffix not in MODEL_SUFFIXES:
        raise UsageError(f"--out {out}: expected a .safetensors or .pt file name, found suffix {out.suffix or '(none)'!r}")
    check_replaceable(out, overwrite, kind="file")
    prepare_parent(out, "--out")
    ps = patch_split(data, split)
    model = load_model(model_path)
    seen = trained_on(model.card, ps)
    if seen is not None:
        raise UsageError(
            f"{ps.name}: {model.card.name!r} was trained on these patches ({seen}); "
            "expected held-out validation patches to choose a threshold on"
        )
    ev = evaluate_patchset(model, ps, device, progress=progress)
    card = with_threshold(model.card, ev.labels, ev.probs, specificity, ps.name)
    metrics = {**model.card.metrics, **validation_metrics(card, ev.labels, ev.probs, None)}
    metrics.pop("valid_tta", None)  # measured at the former threshold: evaluate --tta gives it again
    card = ModelCard.from_dict({**card.to_dict(), "metrics": metrics, "name": name or card.name})
    save_model(out, model.net, card)
    return card
