"""Seeded, time-bounded fuzzing of slide headers and heatmap attrs through the CLI.

Whatever the mutation, the command must end with a documented exit code, say at most one
error line (no traceback), leave no temporary files, and leave its inputs byte for byte as
they were. The seeds are fixed, so a failure reproduces; WSI_SCAN_FUZZ_CASES raises the count, WSI_SCAN_FUZZ_SEED (and _SECONDS) explore further.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests._support import run
from wsi_scan.config import ScanConfig
from wsi_scan.scan import scan_slide

DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
CASES = int(os.environ.get("WSI_SCAN_FUZZ_CASES", "24"))
TIME_BUDGET_S = float(os.environ.get("WSI_SCAN_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("WSI_SCAN_FUZZ_SEED", "0"))
ODD_VALUES: list[Any] = [None, -1, 0, 1e9, -1e-9, "x", "", [], {}, [1], [1, 2, 3], True, 1e-9, "nan", 2**63]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def check_outcome(code: int, err: str, folder: Path) -> None:
    assert code in DOCUMENTED_EXIT_CODES, (code, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("wsi-scan: warning:")]
    assert "Traceback" not in err, err
    if code != 0:
        assert len(lines) == 1 and lines[0].startswith("wsi-scan: error:"), err
    debris = [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not debris, debris


def _ifd_offsets(path: Path) -> list[int]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return [int(page.offset) for page in tf.pages]


@pytest.mark.slow
def test_fuzz_slide_headers(make_slide, tmp_path):
    base = make_slide("base.tif", size_wh=(1200, 900), tissue=((100, 100, 1100, 800),), downsamples=(1, 4))
    data = base.read_bytes()
    # mutate where the structure lives: the file header and every image directory
    hot = [0, *_ifd_offsets(base)]
    rng = random.Random(1234 + SEED)
    t0 = time.monotonic()
    for case in range(CASES):
        if time.monotonic() - t0 > TIME_BUDGET_S:
            break
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = min(len(b) - 1, rng.choice(hot) + rng.randint(0, 160))
            b[at] = rng.randrange(256)
        slide = tmp_path / f"case{case}.tif"
        slide.write_bytes(bytes(b))
        before = digest(slide)
        out = tmp_path / f"case{case}.zarr"
        code, _, err = run(slide, "--out", out, "--quiet")
        check_outcome(code, err, tmp_path)
        assert digest(slide) == before
        if code != 0:
            assert not out.exists()


def _mutate(obj: Any, rng: random.Random) -> Any:
    """Replace one random leaf of a JSON tree by an odd value (or drop a key)."""
    if isinstance(obj, dict) and obj:
        k = rng.choice(sorted(obj))
        if rng.random() < 0.15:
            return {kk: v for kk, v in obj.items() if kk != k}
        return {**obj, k: _mutate(obj[k], rng) if rng.random() < 0.7 else rng.choice(ODD_VALUES)}
    if isinstance(obj, list) and obj:
        i = rng.randrange(len(obj))
        return [*obj[:i], _mutate(obj[i], rng) if rng.random() < 0.7 else rng.choice(ODD_VALUES), *obj[i + 1 :]]
    return rng.choice(ODD_VALUES)


@pytest.mark.slow
def test_fuzz_heatmap_attrs(make_slide, mock_model, tmp_path):
    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    store = tmp_path / "h.zarr"
    scan_slide(slide, store, ScanConfig(), model=mock_model)
    meta_path = store / "zarr.json"
    original = json.loads(meta_path.read_text())
    slide_before = digest(slide)
    rng = random.Random(4321 + SEED)
    commands = [("overlay", "o.png"), ("geojson", "t.geojson"), ("heatmap-tiff", "h.tif")]
    t0 = time.monotonic()
    for case in range(CASES):
        if time.monotonic() - t0 > TIME_BUDGET_S:
            break
        meta = json.loads(json.dumps(original))
        for _ in range(rng.randint(1, 3)):
            meta["attributes"]["wsi_scan"] = _mutate(meta["attributes"]["wsi_scan"], rng)
        meta_path.write_text(json.dumps(meta))
        store_before = digest(store)
        command, name = rng.choice(commands)
        out = tmp_path / f"case{case}-{name}"
        code, _, err = run(command, store, "--out", out)
        check_outcome(code, err, tmp_path)
        assert digest(store) == store_before and digest(slide) == slide_before
        if code != 0:
            assert not out.exists()
    meta_path.write_text(json.dumps(original))
