"""Test helpers shared across the suite: mock model, expected values, data paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_scan.model.card import ModelCard

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOCK_SCALE = 4.0  # logit = MOCK_SCALE * (tumour fraction of the centre - 0.5)


def shared_path(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present: {p}")
    return p


class ColourProbe(nn.Module):
    """Dense-exact mock: the share of tumour-coloured pixels in each window's central 32x32.

    Its logit is linear in that share, so a test can read the share back from the heatmap and
    compare it with the painted squares in level-0 coordinates.
    """

    dense_exact = True

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean
        tumour = (rgb[:, 1:2] < 0.4).float()  # green is low only in the tumour colour
        centre = tumour[..., 32:-32, 32:-32]
        return MOCK_SCALE * (F.avg_pool2d(centre, 32, 32) - 0.5)


def mock_card(**kw: Any) -> ModelCard:
    base: dict[str, Any] = dict(
        arch="mock-colour-probe", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dense_exact=True, name="mock", trained=False
    )
    base.update(kw)
    return ModelCard(**base)


def share_from_prob(p: np.ndarray) -> np.ndarray:
    """Invert the mock's sigmoid: the tumour share each cell's window centre saw."""
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p)) / MOCK_SCALE + 0.5


def expected_share(cell_rect: tuple[float, float, float, float], boxes: tuple[tuple[int, int, int, int], ...]) -> float:
    x0, y0, x1, y1 = cell_rect
    area = (x1 - x0) * (y1 - y0)
    cover = 0.0
    for bx0, by0, bx1, by1 in boxes:  # boxes do not overlap in the tests
        w = max(0.0, min(x1, bx1) - max(x0, bx0))
        h = max(0.0, min(y1, by1) - max(y0, by0))
        cover += w * h
    return cover / area


def run(*args: Any) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr); an uncaught exception fails the test."""
    from click.testing import CliRunner

    from wsi_scan.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback would have been printed: fail loudly
    return res.exit_code, res.stdout, res.stderr


def assert_clean_failure(code: int, err: str, out_path: Path | None, *needles: str) -> None:
    """One 'wsi-scan: error:' line, no traceback, the needles in it, and no output left."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("wsi-scan: error:")
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    if out_path is not None:
        assert not out_path.exists()
        assert not [p for p in out_path.parent.iterdir() if p.name.startswith(f".{out_path.name}.tmp")]


def assert_same_heatmap_across_readers(a: np.ndarray, b: np.ndarray, atol: float = 1e-6) -> None:
    """Two readers' heatmaps of one slide: equal on every cell both scanned; their tissue may
    differ only in cells on the tissue's edge (OpenSlide resamples a thumbnail read that starts
    between level pixels, so a thumbnail pixel that tissue barely covers can fall either way)."""
    from scipy import ndimage

    ta, tb = np.isfinite(a), np.isfinite(b)
    both = ta & tb
    np.testing.assert_allclose(a[both], b[both], atol=atol)
    differ = ta ^ tb
    edge = ndimage.binary_dilation(~(ta & tb), iterations=1) & (ta | tb)
    assert not (differ & ~edge).any(), "tissue differs inside the tissue, not only on its edge"
    assert differ.sum() <= max(4, 0.02 * (ta | tb).sum()), f"{int(differ.sum())} cells differ"


def write_called_store(out: Path, call: str) -> Path:
    """A heatmap store whose node call is ``call`` (negative, itc, micro or macro), written
    without a scan: a square lesion of 0.99 sized for the class on a 0.243 um/px slide."""
    from wsi_scan.config import LesionConfig
    from wsi_scan.geometry import GridGeometry
    from wsi_scan.io.heatmap import FORMAT_VERSION, write_heatmap
    from wsi_scan.lesions import call_slide

    mpp = 0.243
    cell = 32 * 0.972 / mpp  # 31.1 um a cell
    grid = GridGeometry((0, 0), (cell, cell), (120, 120), 32, 96, 0.972)
    probs = np.full(grid.shape_rc, 0.01, dtype=np.float32)
    side = {"negative": 0, "itc": 2, "micro": 20, "macro": 90}[call]
    probs[10 : 10 + side, 10 : 10 + side] = 0.99
    tissue = np.ones(grid.shape_rc, dtype=bool)
    got = call_slide(probs, grid, (mpp, mpp), 0.5, LesionConfig())
    assert got.call == call, got.call
    wh = [int(120 * cell), int(120 * cell)]
    attrs = {
        "format_version": FORMAT_VERSION,
        "slide": {"name": out.stem, "mpp_xy": [mpp, mpp], "level0_size_wh": wh},
        "grid": {
            "l0_origin_xy": [0, 0],
            "l0_cell_size_xy": [cell, cell],
            "shape_rc": list(grid.shape_rc),
            "cell_px": 32,
            "patch_px": 96,
            "target_mpp": 0.972,
        },
        "model": {"threshold": 0.5},
        "summary": {"call": got.call},
    }
    write_heatmap(out, probs, tissue, grid, (mpp, mpp), attrs)
    return out
