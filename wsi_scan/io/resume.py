"""Resuming an interrupted scan of one slide: the cells of its finished blocks, kept in a file
beside the output (``.NAME.partial.npz``) until the store is written.

What they may be reused for is fixed by a key (model and settings, the slide file, the grid, the
level read); a file with another key, or one that cannot be read, is ignored and replaced. A
folder run's resume (slides whose store is complete and current are skipped) is ``batch.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputWriteError
from ..geometry import CellBlock
from .outputs import atomic_write


def partial_key(settings: str, slide_identity: str, grid: Any, read_level: int) -> str:
    """What an interrupted scan's finished cells depend on: model and settings, the slide file,
    the cell grid and the pyramid level read."""
    payload = json.dumps(
        [
            settings,
            slide_identity,
            list(grid.l0_origin_xy),
            list(grid.l0_cell_size_xy),
            list(grid.shape_rc),
            grid.patch_px,
            grid.cell_px,
            read_level,
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class Checkpoint:
    """Keeps the cells of finished blocks and saves them every ``every_s`` seconds (and when
    the scan fails), so that a scan killed at any point resumes with the blocks it finished."""

    def __init__(
        self,
        out: Path,
        key: str,
        probs: np.ndarray,
        done: np.ndarray,
        blocks: dict[str, CellBlock],
        every_s: float,
    ) -> None:
        self.out, self.key, self.probs, self.done, self.blocks, self.every_s = out, key, probs, done, blocks, every_s
        self.dirty = False
        self.last = time.monotonic()

    def record(self, name: str, result: np.ndarray) -> None:
        block = self.blocks.get(name)
        if block is None:
            return
        r0, c0, nr, nc = block
        self.probs[r0 : r0 + nr, c0 : c0 + nc] = result
        self.done[r0 : r0 + nr, c0 : c0 + nc] = True
        self.dirty = True
        if self.every_s > 0 and time.monotonic() - self.last >= self.every_s:
            self.save()

    def save(self) -> None:
        if self.dirty and self.every_s > 0:
            try:
                save_partial(self.out, self.key, self.probs, self.done)
            except OutputWriteError as exc:
                # the resume file only saves work on a rerun: failing the scan for it would throw
                # away the heatmap itself; the store's own write reports a full disk
                logging.getLogger("wsi_scan.resume").warning("%s; the scan goes on without a resume file", exc)
                self.every_s = 0.0
            self.dirty = False
            self.last = time.monotonic()

    def callback(self) -> Any:
        from dask.callbacks import Callback

        record = self.record

        class _CB(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:  # noqa: A002
                record(str(key[0] if isinstance(key, tuple) else key), result)

        return _CB()


def partial_path(out: Path) -> Path:
    """Where a scan of ``out`` keeps the cells of its finished blocks until the store is written."""
    return out.with_name(f".{out.name}.partial.npz")


def save_partial(out: Path, key: str, probs: np.ndarray, done: np.ndarray) -> None:
    """Write the finished cells atomically: a kill at any moment leaves the old file or the new."""
    with atomic_write(partial_path(out), "resume file") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, key=np.array(key), probs=probs, done=done)


def load_partial(out: Path, key: str, shape_rc: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """The (probs, done) of an interrupted scan of ``out`` made with the same ``key``, else None.

    A file from another slide, model, setting or grid, or one that cannot be read, is ignored
    (and replaced by the next save): it can only cost the work it held, never mix results.
    """
    path = partial_path(out)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            probs, done = z["probs"], z["done"]
    except Exception:  # noqa: BLE001 - truncated, empty or foreign: BadZipFile, EOFError, OSError, ValueError...
        return None
    if probs.shape != shape_rc or done.shape != shape_rc or probs.dtype != np.float32 or done.dtype != bool:
        return None
    return probs, done


def drop_partial(out: Path) -> None:
    path = partial_path(out)
    if path.is_dir() and not path.is_symlink():
        return  # not a file this tool wrote (save_partial writes files): left as it is
    path.unlink(missing_ok=True)
