"""Detection quality on a slide with known truth: lay a labelled split out as a mosaic slide,
scan it end to end, and score the cells whose windows are the patches.

    python scripts/mosaic_eval.py ../shared/data/pcam-jpeg-sample --split valid [--model M] [--tta]
    python scripts/mosaic_eval.py ../shared/data/pcam-jpeg-sample --split valid --scan-mpp 0.25  # as a 40x scan
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_scan.config import ScanConfig, TissueConfig
from wsi_scan.io.checkpoint import load_model
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.mosaic import write_mosaic
from wsi_scan.scan import scan_slide
from wsi_scan.train.metrics import binary_metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="use the first N patches only")
    ap.add_argument("--scan-mpp", type=float, default=None,
                    help="enlarge the mosaic to this um/px (e.g. 0.25, a 40x scan) and store it JPEG-tiled with a pyramid")
    args = ap.parse_args()
    ps = open_patch_data(args.data).splits[args.split]
    idx = np.arange(len(ps) if not args.limit else min(args.limit, len(ps)))
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        mosaic = write_mosaic(Path(tmp) / "mosaic.tif", ps, idx, scan_mpp=args.scan_mpp)
        cfg = ScanConfig(mode=args.mode, tta=args.tta,  # type: ignore[arg-type]
                         tissue=TissueConfig(min_cell_fraction=0.0, min_object_um2=0.0, min_hole_um2=1e9))
        t = time.perf_counter()
        res = scan_slide(mosaic.path, Path(tmp) / "m.zarr", cfg, model=model, progress=True)
        seconds = time.perf_counter() - t
        hm = open_heatmap(res.out)
    probs = np.array([hm.probs[mosaic.cell_of(k)] for k in range(len(idx))])
    scanned = np.isfinite(probs)
    # a patch the tissue mask left out counts as "no tumour found" (probability 0)
    m = binary_metrics(mosaic.labels, np.where(scanned, probs, 0.0), model.card.threshold)
    out = {**m.to_dict(), "dataset": f"{ps.name} as a mosaic slide", "patches_scanned": int(scanned.sum()),
           "tta": args.tta, "mode": res.mode, "scan_mpp": args.scan_mpp, "slide_mpp": list(res.mpp_xy), "scan_seconds": round(seconds, 2), "model": model.card.name}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
