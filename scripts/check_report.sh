#!/usr/bin/env bash
# Render a folder run's report.html in headless Chromium to a PNG, to check that the page a
# pathologist opens actually shows its thumbnails and table (no server, no network).
#
#   scripts/check_report.sh [OUT_DIR [PNG]]
#
# Without OUT_DIR it first scans a small synthetic folder (good slides, a broken file, a slide
# without mpp) into a temporary OUT_DIR. Installs Debian's chromium and chromium-driver when
# missing (needs root or sudo). Exits non-zero when the page does not render.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3

if ! command -v chromium >/dev/null 2>&1; then
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium chromium-driver >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

out_dir="${1:-}"
if [ -z "$out_dir" ]; then
    out_dir="$work/out"
    "$py" - "$work/slides" <<'EOF'
import sys
from pathlib import Path
from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide
d = Path(sys.argv[1]); d.mkdir()
for i in range(3):
    write_synthetic_slide(d / f"case{i}.tif", SyntheticSlide(
        size_wh=(1600, 1200), mpp=0.5, tissue=((100, 100, 1500, 1100),), seed=i,
        tumour=((300 + 150 * i, 300, 500 + 250 * i, 500 + 100 * i),)))
write_synthetic_slide(d / "no_mpp.tif", SyntheticSlide(size_wh=(800, 600), mpp=0.5,
                      tissue=((50, 50, 750, 550),), resolution_unit=None))
(d / "broken.svs").write_text("not a slide\n")
EOF
    # exit code 8: some slides failed, as intended for the broken ones
    "$py" -m wsi_scan "$work/slides" --out "$out_dir" --quiet || [ $? -eq 8 ]
fi
png="${2:-$out_dir/report.png}"
[ -f "$out_dir/report.html" ] || { echo "check_report: no $out_dir/report.html; run a folder scan first" >&2; exit 1; }

# #sort=6 sorts by tumour area (largest first) in the page's own JS, so the check covers it too
url="file://$(cd "$out_dir" && pwd)/report.html#sort=6"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$work/profile" --window-size=1400,1100 --hide-scrollbars)
chromium "${flags[@]}" --screenshot="$png" "$url" >/dev/null 2>&1
chromium "${flags[@]}" --dump-dom "$url" 2>/dev/null > "$work/dom.html"

"$py" - "$work/dom.html" <<'EOF'
import re
import sys
dom = open(sys.argv[1], encoding="utf-8").read()
rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)[1:]
vals = [re.findall(r'data-v="([^"]*)"', r)[3] for r in rows]
n = sum(1 for v in vals if v)
nums = [float(v) for v in vals[:n] if v]
if not rows or len(nums) != n or nums != sorted(nums, reverse=True):
    sys.exit(f"check_report: rows are not sorted by tumour area (empty last) after the page's JS ran: {vals}")
print(f"check_report: {len(rows)} rows sorted by tumour area in the browser: {vals}")
EOF

# a blank page would be one colour: require a real picture
"$py" - "$png" <<'EOF'
import sys
import numpy as np
from PIL import Image
img = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
colours = len(np.unique(img.reshape(-1, 3), axis=0))
if img.shape[0] < 100 or colours < 50:
    sys.exit(f"check_report: {sys.argv[1]} looks blank ({img.shape}, {colours} colours)")
print(f"check_report: rendered {sys.argv[1]} ({img.shape[1]}x{img.shape[0]}, {colours} colours)")
EOF
