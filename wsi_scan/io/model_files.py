"""Model files: weights plus their card, loaded without executing code.

Formats, by extension:
- ``.pt`` / ``.pth``: a torch zip holding ``{"card": <json>, "state_dict": ...}``, read with
  ``torch.load(weights_only=True)`` so a pickle that would run code is refused;
- ``.safetensors``: tensors plus the card JSON in the header metadata (key ``wsi_scan_card``);
- ``.ts`` / ``.torchscript``: a TorchScript module from elsewhere with its card in a JSON file
  beside it (``model.ts`` -> ``model.json``); it always runs in patch mode.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ModelError, OutputWriteError
from ..model.card import ModelCard

#: the model a command uses when none is named: ``fast`` ranks patches and slides better than
#: the network it replaced at the same cost, and makes the fewest false lesions on held-out
#: negatives (docs/model.md, "Bundled models"); ``accurate`` (two networks' mean, one 1.5x as wide) ranks
#: patches and slides best, at 3.25x the multiply-adds per cell and more false lesions, so it
#: is not the default
BUNDLED_MODEL = "fast.safetensors"
CARD_KEY = "wsi_scan_card"
#: the model file formats (module docstring), by their exact suffix
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class LoadedModel:
    net: Any  # torch.nn.Module in eval mode
    card: ModelCard
    path: str
    sha256: str


def bundled_model_path() -> Path:
    return Path(str(resources.files("wsi_scan.model").joinpath(BUNDLED_MODEL)))


def bundled_models() -> dict[str, Path]:
    """The models shipped inside the package, by name (the file's stem), sorted."""
    folder = Path(str(resources.files("wsi_scan.model")))
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}


def resolve_model(spec: str | Path | None) -> Path:
    """The file a ``--model`` value means: None is the bundled default; a bare name without a
    suffix or a folder (``fast``) is the bundled model of that name (write ``./name`` for a
    file of that name in the current folder); anything else is a path."""
    if spec is None:
        return bundled_model_path()
    text = str(spec)
    bundled = bundled_models()
    if text in bundled and Path(text).name == text and not Path(text).suffix:
        return bundled[text]
    if "/" not in text and "\\" not in text and not Path(text).suffix and not Path(text).exists():
        # scripts written before 2026-11-30 name the model that was bundled as "default" then
        renamed = (
            "; the model bundled as `default` until 2026-11-30 is `training-runs/former-default.safetensors` in the "
            "source repository, and the default is now `fast`"
            if text == "default"
            else ""
        )
        raise ModelError(
            f"--model {text}: not a bundled model ({', '.join(bundled) or 'none installed'}) and no such file; "
            f"pass a bundled model's name or a model file (see `wsi-scan models`){renamed}"
        )
    return Path(text)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(path: str | Path, net: Any, card: ModelCard) -> Path:
    """Write weights and card; the format follows the extension (.pt or .safetensors)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .outputs import atomic_write

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_write(path, "model file") as tmp:
        try:
            if path.suffix == ".safetensors":
                from safetensors import SafetensorError
                from safetensors.torch import save_file

                # safetensors writes its files readable by their owner only; a model is shared
                # like any other output, so it gets the mode a new file gets here (the umask's)
                tmp.touch()
                mode = tmp.stat().st_mode & 0o777
                try:
                    save_file(state, str(tmp), metadata={CARD_KEY: card.to_json()})
                except SafetensorError as exc:  # its own error for a full disk, not an OSError
                    raise OutputWriteError(
                        f"cannot write the model file {path}: {exc}; free space or choose another --out"
                    ) from None
                os.chmod(tmp, mode)
            else:
                torch_save({"card": card.to_json(), "state_dict": state}, tmp, path, "model file")
        except RuntimeError as exc:
            raise _write_error(path, "model file", exc) from None
    return path


def torch_save(obj: Any, tmp: Path, path: Path, what: str) -> None:
    """``torch.save`` to ``tmp`` (the temporary file of ``path``), a full disk one OutputWriteError."""
    import torch

    try:
        torch.save(obj, tmp)
    except RuntimeError as exc:
        raise _write_error(path, what, exc) from None


def _write_error(path: Path, what: str, exc: RuntimeError) -> OutputWriteError:
    # torch's zip writer (and safetensors' Rust code) report a full disk as a RuntimeError
    msg = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
    return OutputWriteError(f"cannot write the {what} {path} ({msg}); free space or choose another --out")


def _read_weights(path: Path) -> tuple[ModelCard, dict[str, Any]]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
        if CARD_KEY not in meta:
            raise ModelError(
                f"{path}: safetensors file has no '{CARD_KEY}' metadata; a model must carry "
                "its card (train it with `wsi-scan train`)"
            )
        return ModelCard.from_json(meta[CARD_KEY]), state
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path}: not a readable model file (expected a torch zip archive, a .safetensors or a .ts file with its JSON card)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        why = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "unsafe pickle")
        raise ModelError(
            f"{path}: refused to load, the file needs code to be executed to unpickle "
            f"({why[:160]}); only weights with a card are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable model file ({msg[:160]})") from None
    if not isinstance(obj, dict) or "card" not in obj or "state_dict" not in obj:
        keys = [str(k) for k in obj] if isinstance(obj, dict) else []
        shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")
        bare = bool(keys) and all(isinstance(v, torch.Tensor) for v in obj.values())  # type: ignore[union-attr]
        hint = "; bare weights without the card training writes (scale, normalisation, threshold): use the file `wsi-scan train` wrote"
        raise ModelError(
            f"{path}: expected a dict with 'card' and 'state_dict', found "
            f"{type(obj).__name__}{' with keys ' + shown if keys else ''}"
            f"{hint if bare else ''}"
        )
    card, state = obj["card"], obj["state_dict"]
    if not isinstance(card, (str, dict)) or not isinstance(state, dict):
        raise ModelError(
            f"{path}: expected 'card' to be JSON text or a dict and 'state_dict' a dict of tensors, found "
            f"{type(card).__name__} and {type(state).__name__}"
        )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{path}: 'state_dict' must map names to tensors; it holds other values")
    card = ModelCard.from_json(card) if isinstance(card, str) else ModelCard.from_dict(card)
    return card, state


def read_card(path: str | Path) -> ModelCard:
    """The card of a model file (.pt, .pth or .safetensors), without building its network."""
    return _read_weights(Path(path))[0]


def _load_torchscript(path: Path) -> tuple[Any, ModelCard]:
    import torch

    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ModelError(
            f"{path}: a TorchScript model needs its card beside it as {card_path.name} "
            "(JSON with arch, input_px, mpp, mean, std, threshold)"
        )
    card = ModelCard.from_json(card_path.read_text())
    import warnings

    try:
        with warnings.catch_warnings():  # torch's deprecation notice is not the user's business
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a readable TorchScript file ({str(exc)[:160]})") from None
    from ..model.nets import PatchClassifier

    class _Flat(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            per_window = out.numel() // max(1, x.shape[0])
            if per_window not in (1, 2) or out.numel() != per_window * x.shape[0]:
                # one logit, or two class logits, per window: anything else is not a classifier's output
                raise ModelError(
                    f"the TorchScript model returns {tuple(out.shape)} for {x.shape[0]} windows; "
                    "expected one tumour logit (or two class logits) per window"
                )
            return out.reshape(x.shape[0], -1)[:, -1:]  # last logit is the tumour class

    card = ModelCard.from_dict({**card.to_dict(), "dense_exact": False})
    return PatchClassifier(_Flat(net)).eval(), card


def load_model(path: str | Path | None = None, unfinished_ok: bool = False) -> LoadedModel:
    """Load a model file (or the bundled default) in eval mode on the CPU. The file of a training
    run that has not finished (killed, failed, or still running) is refused unless
    ``unfinished_ok``: it holds the best epoch so far with the untuned threshold 0.5."""
    p = resolve_model(path)
    if not p.exists():
        if path is None:
            raise ModelError(f"the bundled default model is missing ({p}); reinstall wsi-scan or pass --model")
        raise ModelError(
            f"model file {p} does not exist; pass an existing model file or a bundled model's name (`wsi-scan models`)"
        )
    if p.is_dir():
        raise ModelError(f"model path {p} is a directory; expected a .pt, .safetensors or .ts file")
    try:
        return _load_file(p, unfinished_ok)
    except ModelError as exc:
        # a card's fault names its field, not its file: with three models on one command line
        # (ensemble) the user must be told which one
        if str(p) in str(exc):
            raise
        raise ModelError(f"{p}: {exc}") from None


def _load_file(p: Path, unfinished_ok: bool) -> LoadedModel:
    from ..model.nets import build_network

    if p.suffix in (".ts", ".torchscript"):
        net, card = _load_torchscript(p)
        check_card_against_network(net, card, str(p))
        return LoadedModel(net=net, card=card, path=str(p), sha256=_sha256(p))
    card, state = _read_weights(p)
    unfinished = card.training.get("unfinished")
    if unfinished and not unfinished_ok:
        u = unfinished if isinstance(unfinished, dict) else {}
        raise ModelError(
            f"{p}: the model of a training run that has not finished (its best epoch so far, after epoch "
            f"{u.get('epoch', '?')} of {u.get('epochs', '?')}, with the untuned threshold 0.5): let the run "
            "finish, or continue it with `wsi-scan train ... --resume` and the same --out"
        )
    net = build_network(card.arch, **card.arch_kwargs)
    expected = net.state_dict()
    for k, v in state.items():
        # load_state_dict casts silently: integer or half weights would load as other numbers
        if k in expected and v.dtype != expected[k].dtype:
            raise ModelError(
                f"{p}: weight {k!r} is stored as {v.dtype}, the network needs {expected[k].dtype}; "
                "the file is damaged or was edited: use the file as training wrote it"
            )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{p}: weights do not match architecture {card.arch!r} with its card's settings {card.arch_kwargs} "
            f"({_weights_mismatch(state, expected) or str(exc).splitlines()[0][:160]}); the file is damaged or its card was edited"
        ) from None
    net.eval()
    if card.dense_exact != bool(getattr(net, "dense_exact", False)):
        card = ModelCard.from_dict({**card.to_dict(), "dense_exact": bool(net.dense_exact)})
    check_card_against_network(net, card, str(p))
    return LoadedModel(net=net, card=card, path=str(p.resolve()), sha256=_sha256(p))


def _weights_mismatch(state: dict[str, Any], expected: dict[str, Any]) -> str:
    """Which tensors do not fit, in words: torch's own message lists every name on lines of its own."""

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} in the file, {list(expected[k].shape)} for the network"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(missing)} missing: {first(missing)}" if missing else "",
        f"{len(extra)} not of this network: {first(extra)}" if extra else "",
        f"{len(shapes)} of another shape: {first(shapes)}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)


MAX_BLANK_LOGIT = 1e4


def check_card_against_network(net: Any, card: ModelCard, where: str) -> None:
    """Run the network on blank inputs of the card's sizes: a card that disagrees with its
    network (another window or cell size) would otherwise crash mid-scan or, in patch mode,
    write a heatmap on the wrong grid. A dense-exact network must give one output for a window
    and 2 x 2 for a window grown by one cell."""
    import torch

    sizes = [card.input_px] + ([card.input_px + card.cell_px] if card.dense_exact else [])
    for n, px in enumerate(sizes):
        try:
            with torch.inference_mode():
                y = net(torch.zeros(1, 3, px, px))
        except Exception as exc:  # noqa: BLE001 - any failure here is the card's or the network's
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{where}: the network cannot run on the card's {px} x {px} px input ({msg}); "
                f"the card (input_px {card.input_px}, cell_px {card.cell_px}) does not fit the network"
            ) from None
        want = (1, 1, 1 + n, 1 + n)
        if tuple(y.shape) != want:
            raise ModelError(
                f"{where}: on a {px} x {px} px input the network gives an output of shape {tuple(y.shape)}, "
                f"the card (input_px {card.input_px}, cell_px {card.cell_px}) needs {want}"
            )
        if not bool(torch.isfinite(y).all()):
            raise ModelError(
                f"{where}: the network gives non-finite outputs (NaN or infinity) on a blank input; the weights are damaged"
            )
        # a sigmoid is 1.0 in float32 from a logit of 17: a logit of 1e4 on a blank input means every
        # cell of every slide scores 1.0 (a bias of 1e30 scanned to a slide of tumour)
        if float(y.abs().max()) > MAX_BLANK_LOGIT:
            raise ModelError(
                f"{where}: the network gives a logit of {float(y.abs().max()):.3g} on a blank input, where a trained "
                f"classifier gives at most tens (limit {MAX_BLANK_LOGIT:g}); the weights are damaged"
            )


def card_summary(card: ModelCard) -> dict[str, Any]:
    """The card as plain JSON-able data (what goes into heatmap attrs)."""
    return json.loads(card.to_json())


def describe_model(model: LoadedModel, name: str | None = None) -> dict[str, Any]:
    """What ``wsi-scan models`` shows of a model: its contract, validation metrics, training data
    and recipe, size, and its cost per heatmap cell in multiply-adds (counted, not timed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    card = model.card
    n = 8 if card.dense_exact else 1  # a dense network classifies n x n cells in one pass
    px = card.input_px + (n - 1) * card.cell_px
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.net(torch.zeros(1, 3, px, px))
    training = card.training
    cfg = training.get("config", {})
    valid = card.metrics.get("valid", {})
    return {
        "name": name or card.name,
        "path": model.path,
        "sha256": model.sha256,
        "size_bytes": Path(model.path).stat().st_size if Path(model.path).is_file() else None,
        "arch": card.arch,
        "arch_kwargs": card.arch_kwargs,
        "dense_exact": card.dense_exact,
        "parameters": int(sum(p.numel() for p in model.net.parameters())),
        "macs_per_cell": int(fc.get_total_flops() // 2 // (n * n)),
        "input_px": card.input_px,
        "cell_px": card.cell_px,
        "mpp": card.mpp,
        "threshold": card.threshold,
        "threshold_rule": training.get("threshold_rule"),
        "valid": {k: valid.get(k) for k in ("n", "auc", "auc_ci95", "sensitivity", "specificity")},
        "valid_tta_auc": card.metrics.get("valid_tta", {}).get("auc"),
        "epoch": card.metrics.get("epoch"),
        "train_patches": training.get("data", {}).get("train", {}).get("n"),
        "train_sets": [
            sp.get("name")
            for src in training.get("data", {}).get("sources", [])
            for key, sp in src.get("splits", {}).items()
            if key == "train"
        ],
        "recipe": _recipe(cfg),
        "members": [
            {
                "name": m.get("name"),
                "arch": m.get("arch", "dense-cnn"),  # ensembles made before members recorded it: all dense-cnn
                "width": m.get("arch_kwargs", {}).get("width"),
                "epoch": m.get("metrics", {}).get("epoch"),
                "valid_auc": m.get("metrics", {}).get("valid", {}).get("auc"),
                "recipe": _recipe(m.get("training", {}).get("config", {})),
            }
            for m in training.get("ensemble", {}).get("members", [])
        ],
    }


def _recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs", "lr", "optimizer", "schedule", "ema_decay", "stain_jitter", "label_smoothing", "mixup_alpha")
    distilled = ("teacher", "distill_weight") if cfg.get("teacher") else ()
    return {k: cfg[k] for k in (*keys, *distilled) if k in cfg}
