"""Does the tissue mask keep every patch and leave the glass out? Mosaic slides of labelled patches
in several layouts (issue 11), at the model's 0.972 um/px and as a 40x JPEG pyramid.

For each layout and tissue method: the share of patches whose cell is scanned (of all patches, and
of those with stain in their central 32 x 32 px), the share of glass
cells scanned (cells at least one patch width from any patch), the tissue share of the slide and
the tissue stage's time; with --auc also the end-to-end AUC over all patches (an unscanned patch
scores 0) against the patch-level AUC of the same model on the same patches.

    python scripts/tissue_eval.py ../shared/data/pcam-jpeg-sample --split valid [--auc] [--limit N]
        [--scan-mpp 0.25] [--methods otsu,glass] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsi_scan.config import PCAM_CELL_PX, ScanConfig, TissueConfig
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import load_model
from wsi_scan.io.mosaic import LAYOUTS, Mosaic, write_mosaic
from wsi_scan.io.mpp import resolve_mpp
from wsi_scan.io.slide import open_slide
from wsi_scan.plan import plan_scan
from wsi_scan.scan import scan_slide
from wsi_scan.train.metrics import binary_metrics


def patch_level_probs(model: object, ps: object, idx: np.ndarray) -> np.ndarray:
    from wsi_scan.inference import Predictor

    pred = Predictor(model.net, model.card, __import__("torch").device("cpu"), "patch")  # type: ignore[attr-defined]
    out = []
    for s in range(0, len(idx), 256):
        x = np.stack([ps.read(int(i)) for i in idx[s : s + 256]])  # type: ignore[attr-defined]
        out.append(pred._probs(x).reshape(-1))
    return np.concatenate(out)


def centre_stained(ps: object, idx: np.ndarray) -> np.ndarray:
    """Patches with any stained pixel in their central 32 x 32 px (the part the label is about):
    HSV saturation >= 0.08 (above any glass), value >= 0.45 and not pen (G <= R + 6), at full
    resolution. A patch without one is glass with tissue at its rim at most, or an artefact."""
    out = np.zeros(len(idx), dtype=bool)
    for n, i in enumerate(idx):
        c = ps.read(int(i))[32:64, 32:64].astype(np.int16)  # type: ignore[attr-defined]
        hi, lo = c.max(-1), c.min(-1)
        stained = (hi - lo >= 0.08 * np.maximum(hi, 1)) & (hi >= 0.45 * 255) & (c[..., 1] <= c[..., 0] + 6)
        out[n] = bool(stained.any())
    return out


def glass_cells(m: Mosaic, shape_rc: tuple[int, int]) -> np.ndarray:
    """Cells at least one patch width (3 cells) away from every patch."""
    near = np.zeros(shape_rc, dtype=bool)
    occ = m.occupied()
    rr, cc = np.nonzero(occ)
    for r, c in zip(rr, cc):
        near[3 * r : 3 * r + 3, 3 * c : 3 * c + 3] = True
    near = ndimage.binary_dilation(near, iterations=3)
    return ~near


def run_layout(
    ps: object,
    idx: np.ndarray,
    layout: str,
    method: str,
    scan_mpp: float | None,
    tmp: Path,
    model: object | None,
    patch_probs: np.ndarray | None,
    overrides: dict[str, float],
    stained: np.ndarray,
) -> dict[str, object]:
    m = write_mosaic(tmp / f"{layout}.tif", ps, idx, scan_mpp=scan_mpp, layout=layout)  # type: ignore[arg-type]
    cfg = ScanConfig(tissue=TissueConfig(method=method, **overrides))  # type: ignore[arg-type]
    slide = open_slide(m.path)
    try:
        mpp = resolve_mpp(slide.info.metadata, None, str(m.path))
        t = time.perf_counter()
        sp = plan_scan(slide, mpp.xy, 0.972, PCAM_CELL_PX, 96, cfg)
        seconds = time.perf_counter() - t
    finally:
        slide.close()
    cells = sp.cells
    scanned = np.array([cells[m.cell_of(k)] for k in range(len(idx))])
    glass = glass_cells(m, cells.shape)
    row: dict[str, object] = {
        "layout": layout,
        "method": method,
        **({"overrides": overrides} if overrides else {}),
        "scan_mpp": scan_mpp,
        "patches": len(idx),
        "patches_scanned": round(float(scanned.mean()), 4),
        "patches_centre_stained": int(stained.sum()),
        "centre_stained_scanned": round(float(scanned[stained].mean()), 4),
        "glass_cells_scanned": round(float((cells & glass).sum() / max(1, glass.sum())), 4),
        "glass_cells": int(glass.sum()),
        "tissue_share_of_slide": round(float(m.occupied().mean()), 3),
        "mask_share_of_slide": round(sp.tissue.fraction, 3),
        "threshold": sp.tissue.params.get("saturation_threshold"),
        "tissue_seconds": round(seconds, 2),
    }
    if model is not None and patch_probs is not None:
        res = scan_slide(m.path, tmp / f"{layout}-{method}.zarr", cfg, model=model)
        hm = open_heatmap(res.out)
        probs = np.array([hm.probs[m.cell_of(k)] for k in range(len(idx))])
        labels = m.labels
        thr = model.card.threshold  # type: ignore[attr-defined]
        row["auc_slide"] = round(binary_metrics(labels, np.where(np.isfinite(probs), probs, 0.0), thr).auc, 4)
        row["auc_patch"] = round(binary_metrics(labels, patch_probs, thr).auc, 4)
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--limit", type=int, default=0, help="use the first N patches only")
    ap.add_argument(
        "--scan-mpp", type=float, default=None, help="store the mosaics enlarged to this um/px, JPEG-tiled with a pyramid"
    )
    ap.add_argument("--methods", default="otsu,glass")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--auc", action="store_true", help="also scan end to end with the bundled (or --model) model")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a TissueConfig field")
    args = ap.parse_args()
    ps = open_patch_data(args.data).splits[args.split]
    n = len(ps) if not args.limit else min(args.limit, len(ps))
    idx = np.random.default_rng(0).permutation(len(ps))[:n] if args.limit else np.arange(n)
    model = load_model(args.model) if args.auc else None
    patch_probs = patch_level_probs(model, ps, idx) if model is not None else None
    overrides = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    stained = centre_stained(ps, idx)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            for method in args.methods.split(","):
                rows.append(run_layout(ps, idx, layout, method, args.scan_mpp, Path(tmp), model, patch_probs, overrides, stained))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
