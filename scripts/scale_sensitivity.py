"""How much does reading a slightly coarser pyramid level cost in accuracy?

A 40x Aperio slide (0.2527 um/px) has its level 1 at 1.011 um/px, 4% coarser than the model's
0.972. Reading that level and enlarging it 4% decodes 16x fewer pixels than shrinking level 0
3.9x, but the model then sees slightly softer pixels. This script measures the effect on real
labelled patches: each validation patch (already at the model's mpp) is shrunk by ``f`` with
antialiasing, as if scanned at ``f`` times the model's pixel size, then enlarged back to 96 px
with the bilinear filter the scanner uses, and the model is evaluated on the result.

    python scripts/scale_sensitivity.py ../shared/data/pcam-jpeg-sample --split valid --json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    from wsi_scan.io.datasets import PatchSet, open_patch_data
    from wsi_scan.io.model_files import load_model
    from wsi_scan.train.augment import shrink_enlarge
    from wsi_scan.train.evaluate import evaluate_patchset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--model", default=None)
    ap.add_argument("--factors", default="1.0,1.02,1.04,1.06,1.1")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    base = open_patch_data(args.data).splits[args.split]
    model = load_model(args.model)

    class Coarser(PatchSet):
        def __init__(self, f: float) -> None:
            self.f, self.labels, self.name = f, base.labels, f"{base.name} x{f:g}"

        def read(self, i: int) -> np.ndarray:
            arr = base.read(i)
            return arr if self.f == 1.0 else shrink_enlarge(arr, self.f)

    rows = []
    for f in (float(x) for x in args.factors.split(",")):
        ev = evaluate_patchset(model, Coarser(f), tta=args.tta)
        m = ev.metrics.to_dict()
        rows.append({"factor": f, "source_mpp": model.card.mpp * f, "auc": m["auc"], "accuracy": m["accuracy"], "n": m["n"]})
        if not args.json:
            print(f"x{f:<5g} source {model.card.mpp * f:.4f} um/px  AUC {m['auc']:.4f}  accuracy {m['accuracy']:.4f}", flush=True)
    if args.json:
        json.dump({"model": model.path, "tta": args.tta, "rows": rows}, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
