"""Are the heatmaps of two versions of wsi-scan bit-identical? (issue 16: refactoring changes no number)

Scans a fixed set of slides with the bundled model and records each store's ``data_sha256`` (the
sha256 of its probability and tissue arrays, which every store carries) and settings hash;
``--check`` scans again and compares. Run the recording with the old version on the path:

    git worktree add --detach /tmp/old <old commit>
    PYTHONPATH=/tmp/old python scripts/same_heatmaps.py --record /tmp/before.json
    python scripts/same_heatmaps.py --check /tmp/before.json

The slides: synthetic pyramids written by ``wsi_scan.io.synthetic`` (JPEG tiles with texture,
tissue and tumour; at the model's 0.972 um/px and as a 40x scan, in every pyramid layout the
installed version can write), scanned dense and in patch mode, and the shared real slides when
``../shared/data/slides`` holds them. Both versions read the same pyramid level (``read_level``
is set to "exact" where the version has the option, the only policy older versions had).
Exit status 1 when any heatmap differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SHARED_SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"
REAL = {"cmu-1-small-region.svs": None, "tcga-cr-7395-01a-01-ts1.svs": 0.5}  # name: --mpp (None: the file's)


def cases() -> list[tuple[str, dict[str, Any], str]]:
    """(name, SyntheticSlide fields, mode)."""
    from wsi_scan.io import synthetic

    boxes = {"tissue": ((300, 300, 3900, 2700), (4300, 500, 5700, 4100)), "tumour": ((1200, 900, 2100, 1700),)}
    out = [
        ("native-0.972", {"size_wh": (6000, 4400), "mpp": 0.972, **boxes}, "dense"),
        ("native-0.972", {"size_wh": (6000, 4400), "mpp": 0.972, **boxes}, "patch"),
    ]
    x2 = {k: tuple(tuple(2 * v for v in b) for b in bs) for k, bs in boxes.items()}
    for layout in getattr(synthetic, "PYRAMID_LAYOUTS", ("pages",)):
        out.append(
            (f"40x-{layout}", {"size_wh": (12000, 8800), "mpp": 0.25, "downsamples": (1, 4, 16), "layout": layout, **x2}, "dense")
        )
    return out


def scan_all(tmp: Path, only: str | None = None) -> dict[str, dict[str, Any]]:
    from wsi_scan.config import ScanConfig
    from wsi_scan.io.heatmap import open_heatmap
    from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide
    from wsi_scan.scan import scan_slide

    fields = {f.name for f in dataclasses.fields(SyntheticSlide)}
    scan_fields = {f.name for f in dataclasses.fields(ScanConfig)}
    base: dict[str, Any] = {"read_level": "exact"} if "read_level" in scan_fields else {}
    mpp_key = "mpp_override" if "mpp_override" in scan_fields else "mpp"  # its name before issue 16
    jobs: list[tuple[str, Path, dict[str, Any]]] = []
    for name, spec, mode in cases():
        path = tmp / f"{name}.tif"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSlide(**{k: v for k, v in spec.items() if k in fields}))
        # patch mode's numbers depend on the windows per pass (float rounding): fixed here, since
        # the default per device has changed between versions (32 on the CPU since issue 17)
        jobs.append((f"{name}/{mode}", path, {**base, "mode": mode, **({"batch_size": 32} if mode == "patch" else {})}))
    for slide, mpp in REAL.items():
        if (SHARED_SLIDES / slide).is_file():
            jobs.append((f"{slide}/dense", SHARED_SLIDES / slide, {**base, mpp_key: mpp}))
    rows: dict[str, dict[str, Any]] = {}
    for key, path, kw in jobs:
        if only and only not in key:
            continue
        res = scan_slide(path, tmp / f"{key.replace('/', '-')}.zarr", ScanConfig(**kw, overwrite=True))
        attrs = open_heatmap(res.out).attrs
        rows[key] = {
            "data_sha256": attrs["data_sha256"],
            "tissue_cells": attrs["tissue"]["tissue_cells"],
            "read_level": attrs["grid"].get("read_level"),
            "settings_hash": attrs["settings_hash"],
        }
        print(json.dumps({key: rows[key]}), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", type=Path, help="write the digests of this version here")
    g.add_argument("--check", type=Path, help="compare this version's digests with a recording")
    ap.add_argument("--only", default=None, help="only the cases whose name contains this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = scan_all(Path(tmp), args.only)
    if args.record:
        args.record.write_text(json.dumps(rows, indent=1))
        return 0
    ref = json.loads(args.check.read_text())
    bad = 0
    for key in sorted(set(ref) | set(rows)):
        if args.only and args.only not in key:
            continue
        a, b = ref.get(key), rows.get(key)
        if a is None or b is None:
            print(f"{key}: only in {'the recording' if b is None else 'this version'}")
            continue
        same = a["data_sha256"] == b["data_sha256"]
        bad += not same
        print(f"{key}: {'identical' if same else 'DIFFERENT'} ({b['tissue_cells']} tissue cells, level {b['read_level']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
