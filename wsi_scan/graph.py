"""The scan as a Dask graph: one task per tissue block, which reads the block (``regions.py``) and
classifies its cells (a ``BlockClassifier``, in practice ``inference.Predictor``)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .geometry import CellBlock
from .regions import ReadPlan, read_block


class BlockClassifier(Protocol):
    """What the graph runs on each block image (``inference.Predictor``): the probability of each
    selected cell, NaN elsewhere."""

    def predict_block(self, region: Any, cells: np.ndarray) -> np.ndarray: ...


def block_task(plan: ReadPlan, block: CellBlock, cells: np.ndarray, predictor: BlockClassifier) -> np.ndarray:
    """Read one block (on the CPU, or on the model's device: ``device_regions``) and classify
    its tissue cells: (nr, nc) float32, NaN off tissue."""
    if plan.decode_device:
        import torch

        from .device_regions import read_block_on_device

        return predictor.predict_block(read_block_on_device(plan, block, torch.device(plan.decode_device)), cells)
    return predictor.predict_block(read_block(plan, block), cells)


def block_key(block: CellBlock) -> str:
    """The Dask key of a block's task.

    Dask's local schedulers run independent tasks in (reverse) order of their keys; zero-padded
    cell positions make that order row by row, so neighbouring blocks run close together and
    the tiles they share leave the tile cache soon after their first decode.
    """
    return f"block-{block[0]:07d}-{block[1]:07d}"


def build_graph(plan: ReadPlan, cells: np.ndarray, block_list: list[CellBlock], predictor: BlockClassifier) -> list[Any]:
    """One Dask task per tissue block (read, then classify), in the order of ``block_list``."""
    import dask

    task = dask.delayed(block_task, pure=False)
    return [
        task(plan, b, cells[b[0] : b[0] + b[2], b[1] : b[1] + b[3]], predictor, dask_key_name=block_key(b)) for b in block_list
    ]
