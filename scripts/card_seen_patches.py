"""Give a model trained before seen-patch filters (wsi_scan/train/seen.py) the filter of its
training patches, computed from the data it was trained on; the weights are left unchanged.

    python scripts/card_seen_patches.py MODEL DATA... --out FILE

The data folders must be the ones the card records: each training split is checked against the
card by fingerprint (or name and count), and the number of training patches against the card's.
An ensemble's members must all have been trained on these folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_scan.io.datasets import open_patch_data  # noqa: E402
from wsi_scan.io.model_files import load_model, save_model  # noqa: E402
from wsi_scan.model.card import ModelCard  # noqa: E402
from wsi_scan.train.data import make_splits  # noqa: E402
from wsi_scan.train.evaluate import trained_on  # noqa: E402
from wsi_scan.train.loop import with_seen_patches  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    m = load_model(args.model)
    training = dict(m.card.training)
    cfg = training.get("config", {}) or training.get("ensemble", {}).get("members", [{}])[0].get("training", {}).get("config", {})
    if cfg.get("max_train"):
        sys.exit("the card's run capped its training patches (max_train): which ones cannot be recomputed here")
    datas = [open_patch_data(d) for d in args.data]
    card_wo = ModelCard.from_dict(
        {**m.card.to_dict(), "training": {**training, "data": {**training.get("data", {}), "seen_patches": []}}}
    )
    for d in datas:
        if "train" in d.splits and trained_on(card_wo, d.splits["train"]) is None:
            sys.exit(f"{d.splits['train'].name}: not a training split this card records")
    splits = make_splits(datas, float(cfg.get("val_fraction", 0.1)), int(cfg.get("seed", 0)))
    n_card = training.get("data", {}).get("train", {}).get("n")
    if n_card != len(splits.train):
        sys.exit(f"these folders give {len(splits.train)} training patches, the card says {n_card}")
    seen = with_seen_patches(splits, splits.train).description["seen_patches"]
    card = ModelCard.from_dict(
        {**m.card.to_dict(), "training": {**training, "data": {**training.get("data", {}), "seen_patches": seen}}}
    )
    save_model(args.out, m.net, card)
    check = load_model(args.out)
    assert check.card.training["data"]["seen_patches"] == seen
    print(f"wrote {args.out}: a filter of {len(splits.train)} training patches ({len(seen[0]['bits'])} characters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
