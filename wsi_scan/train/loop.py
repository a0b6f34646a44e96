"""The training loop: plain, seeded, resumable, selecting the best epoch by validation AUC."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import FEW_PATCHES_PER_CLASS, TrainConfig
from ..device import autocast, resolve_device
from ..errors import UsageError
from ..io.datasets import open_patch_data
from ..io.model_files import save_model
from ..model.card import ModelCard
from ..model.nets import build_network
from ..model.transforms import to_input
from .augment import brightness_contrast, hed_jitter, random_dihedral
from .data import RowsDataset, Splits, decode_rows, labels_of, make_loader, make_splits, patch_ids
from .distill import score_training_patches, training_targets
from .evaluate import predict_probs
from .metrics import BinaryMetrics, binary_metrics


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def software_versions() -> dict[str, str]:
    from .. import __version__

    return {
        "wsi_scan": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _norm_stats(splits: Splits, seed: int, n: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    rng = np.random.default_rng([seed, 99])
    pick = splits.train[rng.choice(len(splits.train), size=min(n, len(splits.train)), replace=False)]
    px = np.stack([splits.sets[s].read(i) for s, i in pick]).reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(np.round(px.mean(0), 4).tolist()), tuple(np.round(px.std(0), 4).tolist())


def state_path(out: Path) -> Path:
    """Where the resumable training state of ``out`` lives."""
    return out.with_name(out.name + ".train-state.pt")


STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_auc", "best_epoch", "history", "mean", "std")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the resumable state atomically: a kill mid-write leaves the previous epoch's."""
    from ..io.model_files import torch_save
    from ..io.outputs import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "training state") as tmp:
        torch_save(state, tmp, path, "training state")


#: options that may differ between a run and its --resume: they change how fast, not what is trained
RESUME_FREE = ("threads", "loader_workers", "device", "cache_patches", "final_tta", "valid_batch_size")


def check_resumable(state: dict[str, Any], path: Path, cfg: TrainConfig, data: dict[str, Any], out_card: Any) -> None:
    """A state continues only the run that saved it: the same options (those of RESUME_FREE
    aside) and the same data. Its own record, or for states written before it kept one, the
    card of the model file beside it."""
    saved_cfg, saved_data = _json_field(state, "config"), _json_field(state, "data")
    if saved_cfg is None and out_card is not None:
        saved_cfg = out_card.training.get("config")
        saved_data = {k: v for k, v in out_card.training.get("data", {}).items() if k != "seen_patches"}
    if isinstance(saved_cfg, dict):
        now = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples become lists
        differ = [
            f"--{k.replace('_', '-')} {saved_cfg[k]} (now {now[k]})"
            for k in sorted(now)
            if k in saved_cfg and k not in RESUME_FREE and saved_cfg[k] != now[k]
        ]
        if differ:
            raise UsageError(
                f"--resume: the training state {path} was saved by a run with {', '.join(differ)}; a resumed run "
                "continues that run: give its options, or start a new --out without --resume"
            )
    if isinstance(saved_data, dict) and _comparable(saved_data) != _comparable(data):
        raise UsageError(
            f"--resume: the training state {path} was saved by a run on other data ({_data_words(saved_data)}; now "
            f"{_data_words(data)}); give the same data folders, or start a new --out without --resume"
        )


def _json_field(state: dict[str, Any], key: str) -> dict[str, Any] | None:
    try:
        v = json.loads(state[key]) if isinstance(state.get(key), str) else None
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def _card_beside(out: Path) -> Any:
    """The card of the model file a run is resuming, or None (removed, damaged or foreign)."""
    from ..io.model_files import read_card

    try:
        return read_card(out)
    except Exception:  # noqa: BLE001 - the state's own record is then all there is to compare
        return None


def _is_state(path: Path) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything that does not load as a state is not ours
        return False
    return isinstance(state, dict) and all(k in state for k in STATE_KEYS)


def check_state_file(path: Path, out: Path, overwrite: bool, resume: bool) -> None:
    """The state file beside --out is an output too: a user's file of its name is never replaced,
    and an earlier run's state only with --overwrite (or continued with --resume)."""
    from ..errors import OutputExistsError

    if resume or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        raise OutputExistsError(
            f"{path}, where training keeps the state of --out {out.name} for --resume, is a folder; move it away or "
            "choose another --out"
        )
    if path.is_symlink() or not path.is_file() or not _is_state(path):
        raise OutputExistsError(
            f"{path}, where training keeps the state of --out {out.name} for --resume, is a file wsi-scan did not "
            "write; wsi-scan only ever replaces its own outputs: move it away or choose another --out"
        )
    if not overwrite:
        raise OutputExistsError(
            f"{path} holds the training state of an earlier run of --out {out.name}; pass --resume to continue that "
            "run or --overwrite to start again"
        )


def check_outputs_apart(out: Path, report_dir: str | Path | None, data: Sequence[str | Path], teacher: str | None) -> None:
    """Before any work: the model, its state and the report are three places, none of them in a
    data folder (a file added there would be read as data next time) and none the teacher's file
    (which --overwrite would otherwise replace with the student)."""
    from ..errors import ModelError
    from ..io.model_files import resolve_model
    from ..io.outputs import absolute, check_outside_inputs

    check_outside_inputs(out, data)
    if report_dir is not None:
        report_abs = absolute(report_dir)
        for what, path in (("--out", out), ("the training state of --out", state_path(out))):
            if report_abs == absolute(path):
                raise UsageError(
                    f"--report {report_dir} is {what}; expected a folder of its own for the figures, e.g. {out.stem}-report"
                )
    if teacher:
        try:
            t = resolve_model(teacher)
        except ModelError as exc:
            raise ModelError(f"--teacher: {exc}") from None
        if t.resolve() == out.resolve():  # resolve(), not absolute(): a link to --out is --out too
            raise UsageError(
                f"--teacher {teacher} is --out: training would replace the teacher with its student; choose another --out"
            )


def warn_if_validation_was_trained_on(splits: Splits) -> None:
    """A validation split that repeats the training patches measures memory, not the task."""
    from .seen import PatchFilter, sample_indices, seen_share

    described: list[dict[str, Any]] = list(splits.description.get("seen_patches") or [])  # type: ignore[call-overload]
    filters = [PatchFilter.from_dict(f) for f in described]
    if not filters:
        return
    pick = splits.valid[sample_indices(len(splits.valid))]
    share = seen_share(filters, (splits.sets[s].read(int(i)) for s, i in pick))
    if share.clearly_seen:
        logging.getLogger("wsi_scan.train").warning(
            f"the validation split repeats training patches ({share.describe()}): its AUC, the epoch it chooses "
            "and the threshold measure patches the network has seen; give a validation split of other patches"
        )


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """The data as the patches' fingerprints and counts say, not the folders' names (a resumed
    run may name the same folders by another path)."""
    sources = [{k: v for k, v in src.items() if k != "root"} if isinstance(src, dict) else src for src in d.get("sources", [])]
    return {**{k: v for k, v in d.items() if k != "seen_patches"}, "sources": sources}


def _data_words(d: dict[str, Any]) -> str:
    # a state records its data without the folders' names (a resumed run may name them otherwise)
    roots = [
        str(src.get("root") or f"a {src.get('layout', 'patch')} folder") if isinstance(src, dict) else "a folder"
        for src in d.get("sources", [])
    ]
    n = {k: (d.get(k) or {}).get("n", "?") if isinstance(d.get(k), dict) else "?" for k in ("train", "valid")}
    return f"{', '.join(roots) or '?'}: {n['train']} training, {n['valid']} validation patches"


def load_state(path: Path) -> dict[str, Any]:
    """The training state beside a model; a missing or damaged one is a clear error."""
    if path.is_dir():
        raise UsageError(
            f"--resume: {path}, where training keeps the state of its --out, is a folder; move it away, or start without --resume"
        )
    if not path.is_file():
        raise UsageError(f"--resume: no training state at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unsafe files alike
        why = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"--resume: {path} cannot be read as a training state ({why}): it is damaged or not a file wsi-scan "
            "wrote; move it away and start without --resume"
        ) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"--resume: the training state {path} lacks {', '.join(missing)}; delete it and start without --resume")
    return state


def _augment_batch(
    x_u8: torch.Tensor, cfg: TrainConfig, card: ModelCard, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    # on the training device: on a GPU the per-pixel stain arithmetic would otherwise hold the
    # main process's CPU while the loader workers wait
    rgb = x_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    rgb = random_dihedral(rgb, gen)
    rgb = hed_jitter(rgb, cfg.stain_jitter, gen)
    rgb = brightness_contrast(rgb, cfg.brightness_contrast, gen)
    u8 = (rgb * 255.0).round().permute(0, 2, 3, 1)
    return to_input(u8, card, device)


def train(
    data: list[str | Path],
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    report_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a classifier on one or more data folders and write the best epoch to ``out``.

    An existing ``out`` is replaced only when it is a wsi-scan model file and ``overwrite`` or
    ``resume`` is given (a resumed run rewrites its own best epoch)."""
    from ..errors import OutputExistsError
    from ..io.folder_run import training_lock
    from ..io.model_files import MODEL_SUFFIXES
    from ..io.outputs import check_replaceable, expect_suffix, prepare_parent
    from .plots import REPORT_FILES, check_figure_folder

    out = Path(out)
    expect_suffix(out, MODEL_SUFFIXES, any_case=False)
    check_outputs_apart(out, report_dir, data, cfg.teacher)
    check_replaceable(out, overwrite or resume, kind="file")
    check_state_file(state_path(out), out, overwrite, resume)
    if report_dir is not None:  # now, not after the hours of training
        check_figure_folder(Path(report_dir), REPORT_FILES, "--report", protect=[Path(d) for d in data])
    prepare_parent(out)
    lock = training_lock(out)
    if not lock.acquire(blocking=False):
        raise OutputExistsError(
            f"another training run is writing --out {out} (process {lock.holder()}); wait for it to finish or choose another --out"
        )
    try:
        return _train(data, out, cfg, report_dir, resume, progress, command)
    finally:
        lock.release()


def _train(
    data: list[str | Path],
    out: Path,
    cfg: TrainConfig,
    report_dir: str | Path | None,
    resume: bool,
    progress: bool,
    command: str | None,
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    splits, train_rows = prepare_data(data, cfg)
    decoded = decode_rows(splits.sets, train_rows, progress, "decode training patches") if cfg.cache_patches else None
    splits = with_seen_patches(splits, train_rows, decoded)
    state = load_state(state_path(out)) if resume else None
    if state is not None:
        check_resumable(state, state_path(out), cfg, splits.description, _card_beside(out))
    teacher_probs, teacher, teacher_seen = _teacher(cfg, splits, train_rows, decoded, device, state, progress)
    if teacher_seen:
        # the student learns what the teacher learnt from its own training patches too
        seen = [*splits.description["seen_patches"], *teacher_seen]  # type: ignore[misc]
        splits = dataclasses.replace(splits, description={**splits.description, "seen_patches": seen})
    warn_if_validation_was_trained_on(splits)
    run = build_run(cfg, splits, len(train_rows), device, state, out.stem, command or " ".join(sys.argv), teacher)
    run.teacher_probs, run.teacher_seen = teacher_probs, teacher_seen
    ds_train = RowsDataset(
        splits.sets,
        train_rows,
        cfg.seed,
        cfg.jpeg_prob if cfg.augment else 0.0,
        cfg.jpeg_quality,
        cfg.soften_prob if cfg.augment else 0.0,
        cfg.soften_max,
        decoded,
        targets=training_targets(labels_of(splits, train_rows), cfg.label_smoothing, teacher_probs, cfg.distill_weight),
    )
    ds_valid = RowsDataset(
        splits.sets,
        splits.valid,
        decoded=decode_rows(splits.sets, splits.valid, progress, "decode validation patches") if cfg.cache_patches else None,
    )
    val_labels = labels_of(splits, splits.valid)
    for epoch in range(run.start, cfg.epochs):
        t0 = time.time()
        losses = train_epoch(run, ds_train, cfg, epoch, device, progress)
        m, val_loss = validate(run, ds_valid, val_labels, cfg, device)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "valid_loss": val_loss,
            "valid_auc": m.auc,
            "valid_accuracy": m.accuracy,
            "seconds": round(time.time() - t0, 1),
        }
        run.history.append(row)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, valid loss {val_loss:.4f}, "
                f"AUC {m.auc:.4f}, accuracy {m.accuracy:.4f} ({row['seconds']} s)"
            )
        keep_epoch(run, out, m, epoch)
    return finalize(out, splits, device, run.history, report_dir, progress, cfg)


def _teacher(
    cfg: TrainConfig,
    splits: Splits,
    train_rows: np.ndarray,
    decoded: np.ndarray | None,
    device: torch.device,
    state: dict[str, Any] | None,
    progress: bool,
) -> tuple[np.ndarray | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """The teacher's scores of the training rows, its record for the card and its seen-patch
    filters: from the state when resuming, else scored now. None and [] without a teacher."""
    if not cfg.teacher:
        return None, None, []
    if state is not None and "teacher_probs" in state:
        probs, record = state["teacher_probs"], _json_field(state, "teacher")
        if not isinstance(probs, torch.Tensor) or probs.shape != (len(train_rows),) or record is None:
            raise UsageError(
                "--resume: the teacher's scores in the training state beside --out are damaged; delete it and start "
                "without --resume"
            )
        seen = record.pop("seen_patches", [])
        return probs.numpy().astype(np.float32), record, list(seen) if isinstance(seen, list) else []
    return score_training_patches(cfg.teacher, splits, train_rows, decoded, device, cfg.valid_batch_size, progress)


def prepare_data(data: list[str | Path], cfg: TrainConfig) -> tuple[Splits, np.ndarray]:
    """The splits (validation capped by ``max_valid``) and the training rows (capped by
    ``max_train``), both checked to hold both classes."""
    datas = [open_patch_data(d) for d in data]
    splits = make_splits(datas, cfg.val_fraction, cfg.seed)
    _refuse_repeated_splits(splits)
    if cfg.max_valid and cfg.max_valid < len(splits.valid):
        # a seeded subset: quick runs only; the card says how many patches chose the epoch. Drawn
        # per class in the split's proportions: a plain draw of a few patches could hold one class
        labels = labels_of(splits, splits.valid)
        rng = np.random.default_rng([cfg.seed, 6])
        pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        n_pos = min(len(pos), max(1, round(cfg.max_valid * len(pos) / len(labels)))) if len(pos) else 0
        n_neg = min(len(neg), cfg.max_valid - n_pos)
        keep = np.sort(np.concatenate([rng.permutation(pos)[:n_pos], rng.permutation(neg)[:n_neg]]))
        splits = dataclasses.replace(
            splits, valid=splits.valid[keep], description={**splits.description, "valid_used": int(cfg.max_valid)}
        )
    train_rows = splits.train
    if cfg.max_train and cfg.max_train < len(train_rows):
        train_rows = train_rows[np.random.default_rng([cfg.seed, 5]).permutation(len(train_rows))[: cfg.max_train]]
    for name, lab in (("training", labels_of(splits, train_rows)), ("validation", labels_of(splits, splits.valid))):
        if lab.size == 0 or lab.min() == lab.max():
            from ..errors import DataError

            raise DataError(
                f"the {name} patches hold {lab.size} patches of {'one class' if lab.size else 'no class'}; "
                "training and choosing an epoch need both tumour and normal patches"
            )
    val = labels_of(splits, splits.valid)
    n_pos = int(val.sum())
    if min(n_pos, len(val) - n_pos) < FEW_PATCHES_PER_CLASS:
        logging.getLogger("wsi_scan.train").warning(
            f"the validation split holds {len(val) - n_pos} negative and {n_pos} positive patches: the epoch kept, the "
            f"threshold and the card's numbers rest on so few that a handful of patches moves them by points; fine "
            f"for a quick run, not for a model to use (give at least {FEW_PATCHES_PER_CLASS} of each class)"
        )
    return splits, train_rows


def _refuse_repeated_splits(splits: Splits) -> None:
    """One split given twice (the same folder twice, or a copy) would weigh its patches double in
    the loss and the validation AUC, as an id listed twice in one labels CSV would."""
    from ..errors import DataError

    seen: dict[str, str] = {}
    sources: list[Any] = list(splits.description.get("sources") or [])  # type: ignore[call-overload]
    for src in sources:
        for split in (src.get("splits") or {}).values() if isinstance(src, dict) else ():
            fp, name = split.get("fingerprint"), str(split.get("name", "?"))
            if fp and fp in seen:
                raise DataError(
                    f"{name} holds the same patches as {seen[fp]} (the same fingerprint): a split given twice "
                    "counts each patch twice; give each data folder once"
                )
            if fp:
                seen[fp] = name


def with_seen_patches(splits: Splits, train_rows: np.ndarray, decoded: np.ndarray | None = None) -> Splits:
    """``splits`` whose description (the card's training data) carries a filter of the patches
    trained on, so that `evaluate` recognises any of them, not only a whole split (seen.py)."""
    from .seen import PatchFilter

    patches = decoded if decoded is not None else (splits.sets[s].read(i) for s, i in train_rows)
    f = PatchFilter.build(patches, len(train_rows))
    return dataclasses.replace(splits, description={**splits.description, "seen_patches": [f.to_dict()]})


@dataclass
class Run:
    """What a training run carries from epoch to epoch (and saves to resume)."""

    net: torch.nn.Module
    card: ModelCard
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    history: list[dict[str, Any]]
    best_auc: float = -math.inf
    best_epoch: int = -1
    start: int = 0
    teacher_probs: np.ndarray | None = None  # kept in the state: a resumed run learns the same targets
    teacher_seen: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def scored(self) -> torch.nn.Module:
        """The weights that are validated and kept: the averaged ones when averaging."""
        return self.ema.module if self.ema is not None else self.net


def build_run(
    cfg: TrainConfig,
    splits: Splits,
    n_train: int,
    device: torch.device,
    state: dict[str, Any] | None,
    name: str,
    command: str,
    teacher: dict[str, Any] | None = None,
) -> Run:
    """Network, card, optimiser, schedule, loss scaler and weight average, restored from ``state``
    when resuming."""
    arch_kwargs: dict[str, Any] = {"width": cfg.width} if cfg.arch in ("dense-cnn", "dense-cnn-p4m") else {}
    mean, std = (tuple(state["mean"]), tuple(state["std"])) if state is not None else _norm_stats(splits, cfg.seed)
    net = build_network(cfg.arch, **arch_kwargs).to(device).to(memory_format=torch.channels_last)
    card = ModelCard(
        arch=cfg.arch,
        arch_kwargs=arch_kwargs,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        dense_exact=bool(getattr(net, "dense_exact", False)),
        name=name,
        training={
            "command": command,
            "config": cfg.to_dict(),
            "data": splits.description,
            **({"teacher": teacher} if teacher is not None else {}),
        },
        software=software_versions(),
    )
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{n_train} training patches are fewer than one batch of {cfg.batch_size}")
    params = [
        {"params": [p for p in net.parameters() if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in net.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr)
    total = steps_per_epoch * cfg.epochs
    sched: torch.optim.lr_scheduler.LRScheduler
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.onecycle_pct_start)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    # fp16 autocast (CUDA without bf16) underflows small gradients to zero without loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    # weight averaging: an exponential moving average of the weights (batch-norm statistics
    # averaged too), used for validation and saved as the model
    ema = (
        torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )
        if cfg.ema_decay > 0
        else None
    )
    run = Run(net, card, opt, sched, scaler, ema, mean, std, [])
    if state is not None:
        try:
            net.load_state_dict(state["model"])
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            run.history = json.loads(state["history"])
            run.best_auc, run.best_epoch = float(state["best_auc"]), int(state["best_epoch"])
            run.start = int(state["epoch"]) + 1
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # all its keys present, a value of the wrong kind or shape: a damaged or edited state
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"--resume: the training state beside --out cannot be used ({first}); delete it and start without --resume"
            ) from None
        if not isinstance(run.history, list) or not 0 <= run.start <= cfg.epochs:
            raise UsageError(
                "--resume: the training state beside --out is damaged (its epoch or history); delete it and start without --resume"
            )
    return run


def train_epoch(
    run: Run, ds_train: RowsDataset, cfg: TrainConfig, epoch: int, device: torch.device, progress: bool
) -> list[float]:
    """One pass over the training rows; the batch losses. Seeded by epoch, so a resumed run
    repeats an uninterrupted one."""
    run.net.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout masks
    loader = make_loader(ds_train, epoch, cfg.seed, cfg.batch_size, cfg.loader_workers, shuffle=True, drop_last=True)
    losses: list[float] = []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, unit="batch")
    for x_u8, y in bar:
        x = _augment_batch(x_u8, cfg, run.card, gen, device) if cfg.augment else to_input(x_u8, run.card, device)
        target = y.float().to(device).view(-1, 1, 1, 1)  # the dataset's targets (distill.training_targets)
        if cfg.mixup_alpha > 0:
            x, target = mixup(x, target, cfg.mixup_alpha, gen)
        with autocast(device):
            logits = run.net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        if run.ema is not None:
            run.ema.update_parameters(run.net)
        losses.append(float(loss.detach()))
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
    return losses


def mixup(x: torch.Tensor, target: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend the batch with a permutation of itself by one Beta(alpha, alpha) weight; drawn from
    the epoch's CPU generator, so a resumed run repeats an uninterrupted one."""
    # numpy draws the Beta: torch.distributions cannot take a generator
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


def validate(
    run: Run, ds_valid: RowsDataset, val_labels: np.ndarray, cfg: TrainConfig, device: torch.device
) -> tuple[BinaryMetrics, float]:
    """Metrics and loss of the kept weights on the validation split."""
    probs = predict_probs(run.scored, run.card, ds_valid, device, cfg.valid_batch_size, workers=cfg.loader_workers)
    m = binary_metrics(val_labels, probs, run.card.threshold)
    val_loss = float(
        F.binary_cross_entropy(torch.from_numpy(probs).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(val_labels).double())
    )
    return m, val_loss


def keep_epoch(run: Run, out: Path, m: BinaryMetrics, epoch: int) -> None:
    """Write the model when this epoch is the best so far, and the training state every epoch."""
    if m.auc > run.best_auc:
        run.best_auc, run.best_epoch = m.auc, epoch + 1
        best_card = ModelCard.from_dict(
            {
                **run.card.to_dict(),
                "metrics": {"valid": m.to_dict(), "epoch": epoch + 1},
                # until finalize: load_model refuses the file of a run killed or failed before it
                "training": {
                    **run.card.training,
                    "history": run.history,
                    "unfinished": {"epoch": epoch + 1, "epochs": run.card.training["config"]["epochs"]},
                },
            }
        )
        save_model(out, run.scored, best_card)
    save_state(
        state_path(out),
        {
            "model": run.net.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "epoch": epoch,
            "best_auc": run.best_auc,
            "best_epoch": run.best_epoch,
            "history": json.dumps(run.history),
            "mean": list(run.mean),
            "std": list(run.std),
            "scaler": run.scaler.state_dict(),
            **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
            # what check_resumable compares a --resume against
            "config": json.dumps(run.card.training["config"]),
            "data": json.dumps(_comparable(run.card.training["data"])),
            **(
                {
                    "teacher_probs": torch.from_numpy(run.teacher_probs),
                    "teacher": json.dumps({**run.card.training["teacher"], "seen_patches": run.teacher_seen}),
                }
                if run.teacher_probs is not None
                else {}
            ),
        },
    )


def finalize(
    out: Path,
    splits: Splits,
    device: torch.device,
    history: list[dict[str, Any]],
    report_dir: str | Path | None,
    progress: bool,
    cfg: TrainConfig,
) -> TrainResult:
    """Score the chosen epoch (with TTA unless ``cfg.final_tta`` is off), choose the card's threshold on
    the validation split, store both in its card, draw the report."""
    from ..io.model_files import load_model

    model = load_model(out, unfinished_ok=True)
    net = model.net.to(device).to(memory_format=torch.channels_last)
    labels = labels_of(splits, splits.valid)
    ds_valid = RowsDataset(splits.sets, splits.valid)
    bs = cfg.valid_batch_size
    probs = predict_probs(net, model.card, ds_valid, device, bs, progress=progress, desc="valid")
    probs_tta = (
        predict_probs(net, model.card, ds_valid, device, bs, tta=True, progress=progress, desc="valid TTA")
        if cfg.final_tta
        else None
    )
    epoch = int(model.card.metrics.get("epoch", 0))
    finished = {k: v for k, v in model.card.training.items() if k != "unfinished"}
    card = ModelCard.from_dict({**model.card.to_dict(), "training": {**finished, "history": history}})
    if cfg.threshold_specificity > 0:
        card = with_threshold(card, labels, probs, cfg.threshold_specificity, "the training's validation split")
        rule = card.training["threshold_rule"]
        if not rule["met"]:
            # the run's hours are not thrown away: the file is written, its card says the rule
            # failed, and `wsi-scan threshold` refuses the same model on other patches
            logging.getLogger("wsi_scan.train").warning(
                f"{out}: no threshold reaches the rule's validation specificity {cfg.threshold_specificity} "
                f"(at most {rule['reached']:.4f}; the kept epoch's scores are saturated): the card records "
                "threshold_rule.met = false; do not use this model for calls"
            )
    card = ModelCard.from_dict(
        {**card.to_dict(), "metrics": {"epoch": epoch, **validation_metrics(card, labels, probs, probs_tta)}}
    )
    save_model(out, model.net, card)
    if report_dir is not None:
        from ..io.exports import write_predictions_csv
        from ..io.outputs import output_set
        from .plots import REPORT_FILES, training_report

        with output_set([Path(report_dir) / n for n in REPORT_FILES], "training report"):
            training_report(Path(report_dir), history, labels, probs, card.metrics["valid"]["auc"])
            write_predictions_csv(
                Path(report_dir) / "valid_predictions.csv",
                patch_ids(splits, splits.valid),
                labels,
                probs,
                probs_tta,
                card.threshold,
                overwrite=True,
            )
    return TrainResult(out, epoch, card.metrics, history)


def validation_metrics(card: ModelCard, labels: np.ndarray, probs: np.ndarray, probs_tta: np.ndarray | None) -> dict[str, Any]:
    """The card's ``valid`` (and ``valid_tta``) metrics at its threshold, with the AUC's 95% bootstrap interval."""
    from .metrics import bootstrap_auc_ci

    out: dict[str, Any] = {}
    for key, p in (("valid", probs), ("valid_tta", probs_tta)):
        if p is not None:
            out[key] = {**binary_metrics(labels, p, card.threshold).to_dict(), "auc_ci95": list(bootstrap_auc_ci(labels, p))}
    return out


def with_threshold(card: ModelCard, labels: np.ndarray, probs: np.ndarray, specificity: float, data: str) -> ModelCard:
    """The card with its threshold set by the documented rule, and the rule recorded in it."""
    from .metrics import threshold_for_specificity

    t = threshold_for_specificity(labels, probs, specificity)
    reached = float(np.mean(probs[np.asarray(labels) == 0] < t))
    rule = {
        "rule": "lowest threshold at which the validation negatives' specificity is at least `specificity` (single view)",
        "specificity": specificity,
        "data": data,
        "n": int(len(labels)),
        "threshold": t,
        # False only when scores are saturated (negatives at 1.0): no threshold keeps the rule
        "met": reached >= specificity,
        "reached": round(reached, 6),
    }
    # the metrics measured at the former threshold go: the callers measure them again at this one
    metrics = {k: v for k, v in card.metrics.items() if k not in ("valid", "valid_tta")}
    return ModelCard.from_dict(
        {**card.to_dict(), "threshold": t, "metrics": metrics, "training": {**card.training, "threshold_rule": rule}}
    )
