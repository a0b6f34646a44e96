"""Detection quality on a slide with known truth: lay a labelled split out as a mosaic slide,
scan it end to end, and score the cells whose windows are the patches.

    python scripts/mosaic_eval.py ../shared/data/pcam-jpeg-sample --split valid [--model M] [--tta]
    python scripts/mosaic_eval.py ../shared/data/pcam-jpeg-sample --split valid --scan-mpp 0.25  # as a 40x scan
    # the read-level policies on one 40x mosaic (1/4/16 pyramid: the 4x level is 1.0 um/px),
    # interleaved rounds, one JSON line per scan and a summary line (medians of the times)
    python scripts/mosaic_eval.py ../shared/data/pcam-jpeg-sample --split valid --scan-mpp 0.25 \\
        --read-level exact,nearest --rounds 3 --mosaic /tmp/mosaic40x.tif
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_scan.config import ScanConfig, TissueConfig, TrainConfig
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import load_model
from wsi_scan.io.mosaic import Mosaic, write_mosaic
from wsi_scan.scan import scan_slide
from wsi_scan.train.metrics import binary_metrics, threshold_for_specificity


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def scan_once(mosaic: Mosaic, model: Any, args: argparse.Namespace, read_level: str, tmp: Path) -> dict[str, Any]:
    cfg = ScanConfig(
        mode=args.mode,
        tta=args.tta,
        read_level=read_level,  # type: ignore[arg-type]  # main() checks the policies
        overwrite=True,
        tissue=TissueConfig(min_cell_fraction=0.0, min_object_um2=0.0, min_hole_um2=1e9),
    )
    t, c = time.perf_counter(), _cpu_s()
    res = scan_slide(mosaic.path, tmp / f"m-{read_level}.zarr", cfg, model=model, progress=False)
    seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    hm = open_heatmap(res.out)
    probs = np.array([hm.probs[mosaic.cell_of(k)] for k in range(len(mosaic.indices))])
    scanned = np.isfinite(probs)
    # a patch the tissue mask left out counts as "no tumour found" (probability 0)
    probs = np.where(scanned, probs, 0.0)
    m = binary_metrics(mosaic.labels, probs, model.card.threshold)
    # the card's threshold was chosen on the patches; what the same rule would choose on this slide
    # says how far the slide's resampling moves the operating point
    slide_t = threshold_for_specificity(mosaic.labels, probs, args.rule_specificity)
    at_slide_t = binary_metrics(mosaic.labels, probs, slide_t)
    return {
        **m.to_dict(),
        "slide_rule": {
            "specificity_asked": args.rule_specificity,
            "threshold": slide_t,
            "specificity": at_slide_t.specificity,
            "sensitivity": at_slide_t.sensitivity,
        },
        "read_level": read_level,
        "level_read": hm.attrs["grid"]["read_level"],
        "patches_scanned": int(scanned.sum()),
        "tta": args.tta,
        "mode": res.mode,
        "scan_mpp": args.scan_mpp,
        "slide_mpp": list(res.mpp_xy),
        "scan_seconds": round(seconds, 2),
        "scan_stage_s": round(res.timings_s["scan"], 2),
        "cpu_s": round(cpu, 2),
        "tissue_cells": res.n_tissue_cells,
        "model": model.card.name,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="use the first N patches only")
    ap.add_argument(
        "--scan-mpp",
        type=float,
        default=None,
        help="enlarge the mosaic to this um/px (e.g. 0.25, a 40x scan) and store it JPEG-tiled with a pyramid",
    )
    ap.add_argument("--read-level", default="exact", help="comma-separated read-level policies to compare (exact, nearest)")
    ap.add_argument(
        "--rule-specificity",
        type=float,
        default=TrainConfig().threshold_specificity,
        help="also report the threshold the card's rule would choose on this slide's cells (default: the rule's)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every policy (times: medians)")
    ap.add_argument("--mosaic", type=Path, default=None, help="keep the mosaic slide here and reuse it when it exists")
    args = ap.parse_args()
    policies = args.read_level.split(",")
    if unknown := set(policies) - {"exact", "nearest"}:
        ap.error(f"--read-level: expected exact and/or nearest, got {', '.join(sorted(unknown))}")
    if not 0.0 <= args.rule_specificity < 1.0:
        ap.error(f"--rule-specificity: expected a fraction in [0, 1), got {args.rule_specificity}")
    ps = open_patch_data(args.data).splits[args.split]
    idx = np.arange(len(ps) if not args.limit else min(args.limit, len(ps)))
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        path = args.mosaic or tmp / "mosaic.tif"
        mosaic = (
            _truth(path, ps, idx)
            if args.mosaic is not None and args.mosaic.exists()
            else write_mosaic(path, ps, idx, scan_mpp=args.scan_mpp)
        )
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
        for _ in range(args.rounds):
            for policy in policies:
                r = scan_once(mosaic, model, args, policy, tmp)
                runs[policy].append(r)
                print(json.dumps(r), flush=True)
    summary = {
        p: {k: rs[0][k] for k in ("auc", "accuracy", "sensitivity", "specificity", "level_read", "patches_scanned") if k in rs[0]}
        | {
            "scan_seconds_median": statistics.median(r["scan_seconds"] for r in rs),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
            "rounds": len(rs),
        }
        for p, rs in runs.items()
    }
    print(json.dumps({"summary": summary, "dataset": f"{ps.name} as a mosaic slide", "n": len(idx)}))
    return 0


def _truth(path: Path, ps: Any, idx: np.ndarray) -> Mosaic:
    """The truth of a kept mosaic (the original layout: row by row, ``write_mosaic``'s rule)."""
    return Mosaic(
        path,
        (int(np.ceil(len(idx) / np.ceil(np.sqrt(len(idx))))), int(np.ceil(np.sqrt(len(idx))))),
        np.asarray(idx),
        ps.labels[np.asarray(idx)],
    )


if __name__ == "__main__":
    sys.exit(main())
