"""The model card: the contract a model file carries with it.

Inference reads the input size, physical pixel size, normalisation, classes and threshold from
here and never from CLI defaults, so a model cannot be run at a scale it was not trained for.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import MPP_RANGE_UM, PCAM_CELL_PX, PCAM_INPUT_PX, PCAM_MPP
from ..errors import ModelError

CARD_VERSION = 1
#: what a model reads its input as: models that share these score the same patches alike
#: (an ensemble's members, a teacher and its student)
CONTRACT_FIELDS = ("input_px", "cell_px", "mpp", "class_names")
MIN_INPUT_PX, MAX_INPUT_PX = 8, 1024
#: pixel values are scaled to [0, 1] before (x - mean) / std: a mean outside this range or a std
#: outside that one maps every H&E pixel to nearly one value, and the model scores a constant
MEAN_RANGE, STD_RANGE = (-1.0, 2.0), (1e-3, 10.0)
#: the second output is read as tumour everywhere (heatmap, lesions, calls): a card must name its
#: classes in that order, in words a reader recognises
NEGATIVE_CLASS_WORDS = ("normal", "negative", "benign", "non-tumour", "non-tumor", "background", "healthy")
POSITIVE_CLASS_WORDS = ("tumour", "tumor", "metastasis", "cancer", "positive", "malignant")

#: the JSON type each card field must have (ints are accepted where a float is expected)
_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "arch_kwargs": (dict,),
    "input_px": (int,),
    "cell_px": (int,),
    "mpp": (int, float),
    "mean": (list, tuple),
    "std": (list, tuple),
    "class_names": (list, tuple),
    "threshold": (int, float),
    "dense_exact": (bool,),
    "name": (str,),
    "trained": (bool,),
    "training": (dict,),
    "metrics": (dict,),
    "software": (dict,),
    "card_version": (int,),
}


def _check_types(kw: dict[str, Any]) -> None:
    """Wrong JSON types give a ModelError naming the field, not a TypeError deep in a scan."""
    for k, v in kw.items():
        want = _TYPES.get(k, (object,))
        bad = not isinstance(v, want) or (isinstance(v, bool) and bool not in want)
        if k in ("mean", "std") and not bad:
            bad = not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if k == "class_names" and not bad:
            bad = not all(isinstance(x, str) for x in v)
        if bad:
            raise ModelError(
                f"model card field {k!r} must be {' or '.join(t.__name__ for t in want)}"
                f"{' of numbers' if k in ('mean', 'std') else ''}, found {v!r:.80}"
            )


MAX_SEEN_FILTERS = 8  # filters of training patches (train/seen.py) per card: one per run, an ensemble's members'


def _check_training(training: dict[str, Any]) -> None:
    """The parts of ``training`` that code reads (the data the model saw, an ensemble's members)
    must have their shapes: an edited card otherwise fails deep in `evaluate` or `ensemble`."""

    def bad(where: str, want: str, found: Any) -> ModelError:
        return ModelError(f"model card field training.{where} must be {want}, found {found!r:.60}; the card was edited")

    data = training.get("data", {})
    if not isinstance(data, dict):
        raise bad("data", "an object", data)
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(src, dict) for src in sources):
        raise bad("data.sources", "a list of objects", sources)
    for src in sources:
        splits = src.get("splits", {})
        if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
            raise bad("data.sources[].splits", "an object of objects", splits)
    seen = data.get("seen_patches", [])
    if not isinstance(seen, list) or not all(isinstance(f, dict) for f in seen) or len(seen) > MAX_SEEN_FILTERS:
        raise bad("data.seen_patches", f"a list of at most {MAX_SEEN_FILTERS} objects (one per training run)", seen)
    ensemble = training.get("ensemble", {})
    if not isinstance(ensemble, dict):
        raise bad("ensemble", "an object", ensemble)
    members = ensemble.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise bad("ensemble.members", "a list of objects", members)


@dataclass(frozen=True)
class ModelCard:
    """The contract a model file carries (its JSON card); each field is a key of that file."""

    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_px: int = PCAM_INPUT_PX  # the model's window side in px
    cell_px: int = PCAM_CELL_PX  # a heatmap cell's side in px: the central square of a window
    #: the model's input um/px (``mpp`` is the file format's key; a slide's own um/px is ``mpp_xy``)
    mpp: float = PCAM_MPP
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    class_names: tuple[str, ...] = ("normal", "tumour")
    threshold: float = 0.5
    dense_exact: bool = False
    name: str = "unnamed"
    trained: bool = True
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    software: dict[str, Any] = field(default_factory=dict)
    card_version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["class_names"] = list(self.class_names)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        version = d.get("card_version", CARD_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > CARD_VERSION:
            raise ModelError(
                f"model card_version {version!r} is not one this wsi-scan reads (<= {CARD_VERSION}); upgrade wsi-scan"
            )
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(
                f"model card has unknown settings {', '.join(map(repr, unknown))}; expected only "
                f"{', '.join(sorted(known))}: the card was edited or comes from another tool"
            )
        missing = [k for k in ("arch", "input_px", "mpp", "mean", "std") if k not in d]
        if missing:
            raise ModelError(
                f"model card lacks {', '.join(missing)}: a model file must say what it expects; "
                "retrain with `wsi-scan train` or add these keys to its card"
            )
        kw = {k: v for k, v in d.items() if k in known}
        try:
            _check_types(kw)
            _check_training(kw.get("training", {}))
            for key in ("mean", "std", "class_names"):
                if key in kw:
                    kw[key] = tuple(kw[key])
            card = cls(**kw)
            card.validate()
        except OverflowError:  # an integer beyond any float (400 digits) where a number is expected
            raise ModelError(
                "model card holds a number too large for a float where a number is expected; the card was edited"
            ) from None
        return card

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not valid JSON ({exc}); expected a JSON object") from None
        except (ValueError, RecursionError) as exc:  # an integer of 4,300+ digits, brackets nested 100k deep
            raise ModelError(f"model card is not a readable JSON object ({str(exc)[:80]}); the card was edited") from None
        if not isinstance(d, dict):
            raise ModelError(f"model card must be a JSON object, found {type(d).__name__}")
        return cls.from_dict(d)

    def validate(self) -> None:
        lo, hi = MPP_RANGE_UM
        if not (lo <= self.mpp <= hi):
            raise ModelError(f"model card mpp must lie between {lo:g} and {hi:g} um/px, found {self.mpp!r:.40}")
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or not all(math.isfinite(v) for v in (*self.mean, *self.std))
            or min(self.std) <= 0
        ):
            raise ModelError("model card mean/std must be three finite numbers each, std positive")
        (mlo, mhi), (slo, shi) = MEAN_RANGE, STD_RANGE
        if not (all(mlo <= v <= mhi for v in self.mean) and all(slo <= v <= shi for v in self.std)):
            raise ModelError(
                f"model card mean {list(self.mean)} / std {list(self.std)}: expected the normalisation of pixels scaled to "
                f"[0, 1] (means in [{mlo:g}, {mhi:g}], stds in [{slo:g}, {shi:g}]); the card was edited or is not wsi-scan's"
            )
        if not (MIN_INPUT_PX <= self.input_px <= MAX_INPUT_PX):
            raise ModelError(f"model card input_px must lie in [{MIN_INPUT_PX}, {MAX_INPUT_PX}], found {self.input_px!r:.40}")
        if self.input_px <= 0 or self.cell_px <= 0 or self.cell_px > self.input_px or (self.input_px - self.cell_px) % 2:
            raise ModelError(
                f"model card input_px={self.input_px!r:.40} and cell_px={self.cell_px!r:.40} must leave an equal margin on each side"
            )
        if len(self.class_names) != 2:
            raise ModelError(f"model card class_names must name two classes (normal, tumour), found {list(self.class_names)}")
        neg, pos = (str(c).strip().lower() for c in self.class_names)
        if neg not in NEGATIVE_CLASS_WORDS or pos not in POSITIVE_CLASS_WORDS:
            raise ModelError(
                f"model card class_names {list(self.class_names)}: wsi-scan reads the second output as tumour, so expected "
                f"a negative class first ({', '.join(NEGATIVE_CLASS_WORDS)}) and a tumour class second "
                f"({', '.join(POSITIVE_CLASS_WORDS)}); if the model's outputs are in that order, name them so in its card"
            )
        rule = self.training.get("threshold_rule")
        saturated = isinstance(rule, dict) and rule.get("met") is False  # kept by train, flagged in its card
        if not (0.0 < self.threshold < 1.0 or (self.threshold == 1.0 and saturated)):
            # 0 or 1 would call every cell tumour or none, whatever the model says
            raise ModelError(f"model card threshold must lie strictly between 0 and 1, found {self.threshold!r:.40}")
        chosen = self.metrics.get("valid", {}).get("threshold") if isinstance(self.metrics.get("valid"), dict) else None
        if isinstance(chosen, (int, float)) and not isinstance(chosen, bool) and abs(chosen - self.threshold) > 1e-6:
            raise ModelError(
                f"model card threshold {self.threshold!r:.12} is not the one its validation metrics were measured at "
                f"({chosen!r:.12}); the card was edited: choose a threshold with `wsi-scan threshold` (in a TorchScript "
                "model's JSON card, change metrics.valid.threshold with it) or pass --threshold to the export commands"
            )
        if self.card_version < 1:
            raise ModelError(f"model card_version {self.card_version!r} is not one wsi-scan writes (1 to {CARD_VERSION})")
        if self.arch == "dense-cnn-ensemble":
            self._check_member_normalisation()

    def _check_member_normalisation(self) -> None:
        """An ensemble whose members record their own mean/std must map its normalisation to
        theirs by exactly the ``input_affine`` those give: an edited or dropped map would feed
        each member other pixels than it was trained on, with plausible-looking scores."""
        from .nets import member_affine

        recs = self.training.get("ensemble", {}).get("members", [])
        if not recs and self.arch_kwargs.get("input_affine") is not None:
            raise ModelError(
                "model card: the ensemble maps its members' inputs (input_affine) but records no members "
                "(training.ensemble.members); the card was edited: rebuild it with `wsi-scan ensemble`"
            )
        if not recs or not all("mean" in r and "std" in r for r in recs):
            return  # ensembles made before members recorded them
        try:
            norms = [(tuple(float(v) for v in r["mean"]), tuple(float(v) for v in r["std"])) for r in recs]
            if not all(len(m) == 3 and len(sd) == 3 and min(sd) > 0 for m, sd in norms):
                raise ValueError
            want = (
                None
                if all(n == (self.mean, self.std) for n in norms)
                else [member_affine(self.mean, self.std, m, sd) for m, sd in norms]
            )
        except (TypeError, ValueError, OverflowError):
            raise ModelError(
                "model card field training.ensemble.members[].mean/std must be three numbers each, std positive"
            ) from None
        if not _affine_matches(self.arch_kwargs.get("input_affine"), want):
            raise ModelError(
                "model card: the ensemble's input_affine does not map its normalisation to the one its members record "
                "(training.ensemble.members[].mean/std); the card was edited: rebuild it with `wsi-scan ensemble`"
            )

    @property
    def margin_px(self) -> int:
        return (self.input_px - self.cell_px) // 2


def _affine_matches(got: object, want: list[list[float]] | None) -> bool:
    """Whether a card's ``input_affine`` is the map ``want`` (None: no map), to 1e-6 relative.
    Values that are not numbers are only "not the map" here; build_network names what is wrong."""
    if want is None:
        return got is None
    if not isinstance(got, list) or len(got) != len(want):
        return False
    try:
        return all(
            isinstance(g, list) and len(g) == 6 and all(abs(float(a) - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(g, w))
            for g, w in zip(got, want)
        )
    except (TypeError, ValueError, OverflowError):
        return False
