"""Torch datasets over PatchSets: split selection, seeded per-sample augmentation, loaders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..io.datasets import PATCH_SHAPE, PatchData, PatchSet
from .augment import jpeg_roundtrip, soften


@dataclass(frozen=True)
class Splits:
    """Training and validation patches as (set index, item index) rows into ``sets``."""

    sets: tuple[PatchSet, ...]
    train: np.ndarray
    valid: np.ndarray
    description: dict[str, object]


def _rows(set_idx: int, ps: PatchSet) -> np.ndarray:
    return np.stack([np.full(len(ps), set_idx), np.arange(len(ps))], axis=1)


def make_splits(datas: Sequence[PatchData], val_fraction: float, seed: int) -> Splits:
    """Use the given validation splits where any folder has one; else a seeded stratified split."""
    sets: list[PatchSet] = []
    train_rows: list[np.ndarray] = []
    valid_rows: list[np.ndarray] = []
    for d in datas:
        if "train" in d.splits:
            sets.append(d.splits["train"])
            train_rows.append(_rows(len(sets) - 1, sets[-1]))
        if "valid" in d.splits:
            sets.append(d.splits["valid"])
            valid_rows.append(_rows(len(sets) - 1, sets[-1]))
    if not train_rows:
        from ..errors import DataError

        raise DataError("no training split found in the given folders (need train_labels.csv or *_train_x.h5)")
    train = np.concatenate(train_rows)
    if valid_rows:
        valid = np.concatenate(valid_rows)
        how = (
            "given: the validation split(s) shipped with the data ("
            + ", ".join(sets[int(r[0, 0])].name for r in valid_rows)
            + ")"
        )
    else:
        labels = np.array([sets[s].labels[i] for s, i in train])
        rng = np.random.default_rng(seed)
        is_val = np.zeros(len(train), dtype=bool)
        for cls in (0, 1):
            idx = np.flatnonzero(labels == cls)
            rng.shuffle(idx)
            is_val[idx[: int(round(len(idx) * val_fraction))]] = True
        valid, train = train[is_val], train[~is_val]
        how = f"seeded stratified random split of the training patches (fraction {val_fraction}, seed {seed})"

    def count(rows: np.ndarray) -> dict[str, int]:
        lab = np.array([sets[s].labels[i] for s, i in rows]) if len(rows) else np.zeros(0)
        return {"n": int(len(rows)), "positive": int(lab.sum()), "negative": int(len(rows) - lab.sum())}

    description: dict[str, object] = {
        "sources": [
            {"layout": d.layout, "root": d.root, "splits": {k: v.describe() for k, v in d.splits.items()}} for d in datas
        ],
        "validation": how,
        "train": count(train),
        "valid": count(valid),
    }
    return Splits(tuple(sets), train, valid, description)


def labels_of(splits: Splits, rows: np.ndarray) -> np.ndarray:
    return np.array([splits.sets[s].labels[i] for s, i in rows], dtype=np.int64)


def patch_ids(splits: Splits, rows: np.ndarray) -> list[tuple[str, int, str]]:
    """(set name, index in the set, patch id) of each row, for per-patch outputs."""
    return [(splits.sets[s].name, int(i), splits.sets[s].patch_id(int(i))) for s, i in rows]


class RowsDataset(torch.utils.data.Dataset[tuple[torch.Tensor, Any]]):
    """Patches addressed by rows; index ``epoch * len + pos`` seeds that sample's augmentation,
    so results do not depend on the number of loader workers or on resuming. Each patch comes
    with its label, or with its row's training target when ``targets`` are given."""

    def __init__(
        self,
        sets: Sequence[PatchSet],
        rows: np.ndarray,
        seed: int = 0,
        jpeg_prob: float = 0.0,
        jpeg_quality: tuple[int, int] = (50, 95),
        soften_prob: float = 0.0,
        soften_max: float = 1.15,
        decoded: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ) -> None:
        self.sets = list(sets)
        self.rows = rows
        for name, arr, unit in (("decoded", decoded, "patches"), ("targets", targets, "targets")):
            if arr is not None and len(arr) != len(rows):
                raise ValueError(f"{name} holds {len(arr)} {unit} for {len(rows)} rows")
        self.decoded = decoded
        self.targets = targets
        self.seed = seed
        self.jpeg_prob = jpeg_prob
        self.jpeg_quality = jpeg_quality
        self.soften_prob = soften_prob
        self.soften_max = soften_max

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, Any]:
        epoch, pos = divmod(int(k), len(self.rows))
        s, i = self.rows[pos]
        ps = self.sets[int(s)]
        patch = self.decoded[pos] if self.decoded is not None else ps.read(int(i))
        if self.jpeg_prob > 0 or self.soften_prob > 0:
            rng = np.random.default_rng([self.seed, epoch, pos])
            if rng.random() < self.jpeg_prob:
                patch = jpeg_roundtrip(patch, rng, self.jpeg_quality)
            # after the JPEG step, as a scan resamples the slide's decoded pixels
            if self.soften_prob > 0 and rng.random() < self.soften_prob:
                patch = soften(patch, rng, self.soften_max)
        label = self.targets[pos] if self.targets is not None else int(ps.labels[int(i)])
        return torch.from_numpy(np.array(patch, copy=True)), label


def decode_rows(sets: Sequence[PatchSet], rows: np.ndarray, progress: bool = False, desc: str = "decode") -> np.ndarray:
    """Every row's patch decoded, (n, 96, 96, 3) uint8, for ``RowsDataset(decoded=...)``. Made
    before the loader's workers start, so forked workers share it instead of copying it."""
    import psutil
    from tqdm import tqdm

    need = len(rows) * int(np.prod(PATCH_SHAPE))
    free = psutil.virtual_memory().available
    if need > 0.8 * free:  # the loaders, the network and the system need the rest
        from ..errors import UsageError

        raise UsageError(
            f"--cache-patches: {len(rows)} patches need {need / 2**30:.1f} GiB in memory, "
            f"{free / 2**30:.1f} GiB is available; train without --cache-patches"
        )
    out = np.empty((len(rows), *PATCH_SHAPE), dtype=np.uint8)
    for k, (s, i) in enumerate(tqdm(rows, desc=desc, disable=not progress, unit="patch")):
        out[k] = sets[int(s)].read(int(i))
    return out


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, yielding ``epoch * n + pos``."""

    def __init__(self, n: int, epoch: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.epoch, self.seed, self.shuffle = n, epoch, seed, shuffle

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n) if self.shuffle else np.arange(self.n)
        base = self.epoch * self.n
        return iter((base + order).tolist())


def make_loader(
    ds: RowsDataset, epoch: int, seed: int, batch_size: int, workers: int, shuffle: bool, drop_last: bool = False
) -> torch.utils.data.DataLoader[tuple[torch.Tensor, int]]:
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=EpochSampler(len(ds), epoch, seed, shuffle),
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )
