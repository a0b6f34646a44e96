"""An annotated cohort with known lesions, built from held-out labelled patches, scored end to end.

Each "lymph node" is a mosaic slide of 24 x 24 negative patches of the slide-disjoint validation
split at 0.972 um/px, in which a block of k x k positive patches replaces the negatives (k = 0:
a negative node). A block's annotation (QuPath GeoJSON) is its square; its reference class follows
from the square's diagonal. Two patients of three nodes each, with a CAMELYON17-style reference
of their pN stages. The folder is scanned with the bundled model (or --model) and scored with
``wsi-scan evaluate-slides``. Patches are drawn with a seed per node, so negatives recur across
nodes (there are 1,489): this measures the chain, not a new sample of patients.

    python scripts/lesion_cohort.py ../shared/data/pcam-jpeg-sample --out cohort/ [--model M]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: (patient, node, k): k x k positive patches (0: none). 1 patch ~0.13 mm across (ITC), 4 -> 0.53 mm
#: and 8 -> 1.06 mm (micro), 22 -> 2.9 mm (macro), measured on the diagonal of the square
NODES = [(0, 0, 0), (0, 1, 1), (0, 2, 4), (1, 0, 0), (1, 1, 8), (1, 2, 22)]
SIDE = 24
MPP = 0.972


def write_node(path: Path, ps: object, neg: np.ndarray, pos: np.ndarray, k: int, seed: int) -> tuple[int, int] | None:
    from wsi_scan.io.synthetic import write_flat_slide

    rng = np.random.default_rng(seed)
    img = np.zeros((SIDE * 96, SIDE * 96, 3), dtype=np.uint8)
    picks = rng.choice(neg, size=SIDE * SIDE, replace=False)
    for s, idx in enumerate(picks):
        r, c = divmod(s, SIDE)
        img[r * 96 : (r + 1) * 96, c * 96 : (c + 1) * 96] = ps.read(int(idx))  # type: ignore[attr-defined]
    origin = None
    if k:
        r0 = c0 = int(rng.integers(1, SIDE - k)) if SIDE - k > 1 else 0
        for s, idx in enumerate(rng.choice(pos, size=k * k, replace=False)):
            r, c = divmod(s, k)
            img[(r0 + r) * 96 : (r0 + r + 1) * 96, (c0 + c) * 96 : (c0 + c + 1) * 96] = ps.read(int(idx))  # type: ignore[attr-defined]
        origin = (c0 * 96, r0 * 96)
    write_flat_slide(path, img, MPP)
    return origin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()

    from wsi_scan.batch import scan_folder
    from wsi_scan.config import ScanConfig
    from wsi_scan.evaluation import evaluate_cohort
    from wsi_scan.io.datasets import open_patch_data
    from wsi_scan.lesions import pn_stage, size_class

    ps = open_patch_data(args.data).splits[args.split]
    neg, pos = np.flatnonzero(ps.labels == 0), np.flatnonzero(ps.labels == 1)
    slides, ann = args.out / "slides", args.out / "annotations"
    slides.mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    ref_calls: dict[int, list[str]] = {}
    for i, (patient, node, k) in enumerate(NODES):
        name = f"patient_{patient:03d}_node_{node}"
        origin = write_node(slides / f"{name}.tif", ps, neg, pos, k, seed=i)
        call = "negative"
        if origin is not None:
            x0, y0 = origin
            x1, y1 = x0 + k * 96, y0 + k * 96
            (ann / f"{name}.geojson").write_text(
                json.dumps(
                    {
                        "type": "FeatureCollection",
                        "features": [
                            {
                                "type": "Feature",
                                "properties": {"classification": {"name": "Tumor"}},
                                "geometry": {
                                    "type": "Polygon",
                                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                                },
                            }
                        ],
                    }
                )
            )
            call = size_class(float(np.hypot(x1 - x0, y1 - y0)) * MPP / 1000)
        ref_calls.setdefault(patient, []).append(call)
    reference = args.out / "reference.csv"
    reference.write_text(
        "patient,stage\n" + "".join(f"patient_{p:03d}.zip,{pn_stage(c)}\n" for p, c in sorted(ref_calls.items()))
    )
    res = scan_folder(slides, args.out / "results", ScanConfig(), model=args.model)
    ev = evaluate_cohort(args.out / "results", ann, reference, figures=args.out / "results", figure_prefix="evaluation.")
    ev["scan"] = {"ok": res.n_ok, "skipped": res.n_skipped, "failed": res.n_failed}
    (args.out / "evaluation.json").write_text(json.dumps(ev, indent=1))
    print(json.dumps(ev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
