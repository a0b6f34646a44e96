"""How the lesion rule trades false lesions for missed ones, on mosaic slides of held-out patches.

Two slides from the slide-disjoint validation split: every negative patch edge to edge (each lesion
found there is a false positive), and every positive patch in 4 x 4 groups with glass between them
(each group, ~0.37 mm across, is one true lesion). For each seed probability (``LesionConfig``),
the false lesions on the negative slide and the share of groups a lesion overlaps.

    python scripts/lesion_eval.py ../shared/data/pcam-jpeg-sample --split valid [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from wsi_scan.config import LesionConfig, ScanConfig
from wsi_scan.io.datasets import open_patch_data
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.model_files import load_model
from wsi_scan.io.mosaic import write_mosaic
from wsi_scan.lesions import find_lesions
from wsi_scan.scan import scan_slide

SEEDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ps = open_patch_data(args.data).splits[args.split]
    model = load_model(args.model)
    neg, pos = np.flatnonzero(ps.labels == 0), np.flatnonzero(ps.labels == 1)
    pos = pos[: len(pos) // 16 * 16]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hms = {}
        for name, idx, layout in (("negatives", neg, "edge"), ("positives", pos, "groups")):
            m = write_mosaic(Path(tmp) / f"{name}.tif", ps, idx, layout=layout)
            res = scan_slide(m.path, Path(tmp) / f"{name}.zarr", ScanConfig(), model=model)
            hms[name] = (open_heatmap(res.out), m)
        hm_neg, _ = hms["negatives"]
        hm_pos, m_pos = hms["positives"]
        groups = np.arange(len(pos)) // 16
        group_cells = [[m_pos.cell_of(k) for k in np.flatnonzero(groups == g)] for g in range(groups.max() + 1)]
        thr = model.card.threshold
        for seed in SEEDS:
            cfg = LesionConfig(seed_prob=seed)
            false = find_lesions(hm_neg.probs, hm_neg.grid, hm_neg.mpp_xy, thr, cfg)
            labels = np.zeros(hm_pos.probs.shape, dtype=np.int32)
            find_lesions(hm_pos.probs, hm_pos.grid, hm_pos.mpp_xy, thr, cfg, labels=labels)
            found = np.mean([any(labels[r, c] > 0 for r, c in cells) for cells in group_cells])
            row = {
                "seed_prob": seed,
                "threshold": thr,
                "false_lesions_on_negative_slide": len(false),
                "false_lesions_over_0.2mm": sum(le.longest_diameter_mm > 0.2 for le in false),
                "negative_patches": len(neg),
                "lesions_found": round(float(found), 4),
                "true_lesions": len(group_cells),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
