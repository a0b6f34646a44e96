"""The run report of a folder scan: OUT_DIR/report.html, one self-contained page.

Everything is inline (CSS, a few lines of JS to sort columns, thumbnails as base64 PNG data
URIs), so the page can be mailed or opened from a share without a server or network.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import OVERLAY_ALPHA
from .io.outputs import HTML_MARK
from .lesions import CALLS

if TYPE_CHECKING:
    from .batch import SlideOutcome

log = logging.getLogger("wsi_scan.report")

THUMB_PX = 280  # longest side of a thumbnail in the report
FALLBACK_CMAP = "inferno"  # as the export overlay, so thumbnails look alike either way
#: bump when thumbnails change look: every report then renders them afresh once
THUMB_VERSION = 1
#: a previous report larger than this is not read back for its thumbnails
MAX_REUSE_BYTES = 256 << 20
_REUSE = re.compile(r'<img data-key="([0-9a-f]{64})"[^>]*? src="(data:image/png;base64,[A-Za-z0-9+/=]+)"')

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em} .meta{color:#555;margin-bottom:1em}
table{border-collapse:collapse} th,td{border-bottom:1px solid #ddd;padding:6px 10px;text-align:left;vertical-align:middle}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0} th:hover{background:#e6e6e6}
td.num{text-align:right;font-variant-numeric:tabular-nums} img{display:block;max-width:280px;border:1px solid #ccc}
code.view{font-size:12px;background:#f3f3f3;padding:2px 4px;cursor:copy;white-space:nowrap} .lesions{color:#555;font-size:12px}
.ok{color:#17702a;font-weight:600} .skipped{color:#555;font-weight:600} .failed{color:#b00020;font-weight:600}
.err{color:#b00020;max-width:28em;font-size:12px}
"""

# click a header to sort by it (first click: largest first); empty cells always last;
# the page opens sorted by score (column 4), most suspicious first; report.html#sort=N by column N
_JS = """
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],asc=th.dataset.dir==='desc';[...th.parentNode.children].forEach(h=>delete h.dataset.dir);
th.dataset.dir=asc?'asc':'desc';const v=r=>r.children[i].dataset.v;
[...b.rows].sort((x,y)=>{const a=v(x),c=v(y);if(a===''&&c==='')return 0;if(a==='')return 1;if(c==='')return -1;
const na=parseFloat(a),nc=parseFloat(c);const d=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c);return asc?d:-d;})
.forEach(r=>b.appendChild(r));}
document.querySelectorAll('th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
document.querySelectorAll('code.view').forEach(c=>c.addEventListener('click',()=>{
if(navigator.clipboard)navigator.clipboard.writeText(c.textContent).then(()=>{c.title='copied';},()=>{});}));
const m=location.hash.match(/^#sort=(\\d+)$/);const ths=document.querySelectorAll('th');
sortBy(ths[m&&ths[+m[1]]?+m[1]:4]);
"""


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _slide_background(slide_path: str, attrs: dict[str, Any], size_wh: tuple[int, int]) -> np.ndarray | None:
    """The slide under the heatmap's grid, resized to ``size_wh``; None when it cannot be read."""
    from PIL import Image

    from .io.slide import open_slide
    from .regions import read_thumbnail

    try:
        slide = open_slide(slide_path, attrs.get("slide", {}).get("backend", "auto"))
    except Exception as exc:  # noqa: BLE001 - the report still shows the heatmap alone
        log.info("report: no slide thumbnail for %s (%s: %s)", slide_path, type(exc).__name__, exc)
        return None
    try:
        if list(slide.info.level0_size_wh) != list(attrs["slide"]["level0_size_wh"]):
            raise ValueError("the file at the recorded path is not the slide the heatmap was made from")
        mpp_xy = tuple(attrs["slide"]["mpp_xy"])
        g = attrs["grid"]
        l0_w = g["shape_rc"][1] * g["l0_cell_size_xy"][0]
        l0_h = g["shape_rc"][0] * g["l0_cell_size_xy"][1]
        want_mpp = max(l0_w * mpp_xy[0], l0_h * mpp_xy[1]) / max(size_wh)
        thumb, l0_per_mask_xy = read_thumbnail(slide, mpp_xy, max(want_mpp, 1.0))
        x0, y0 = g["l0_origin_xy"]
        box = (x0 / l0_per_mask_xy[0], y0 / l0_per_mask_xy[1], (x0 + l0_w) / l0_per_mask_xy[0], (y0 + l0_h) / l0_per_mask_xy[1])
        img = Image.fromarray(thumb).transform(
            size_wh, Image.Transform.EXTENT, box, Image.Resampling.BILINEAR, fillcolor=(255, 255, 255)
        )
        return np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - the report still shows the heatmap alone
        log.info("report: no slide thumbnail for %s (%s: %s)", slide_path, type(exc).__name__, exc)
        return None
    finally:
        slide.close()


def heatmap_thumbnail(heatmap_path: str | Path, slide_path: str | None = None, max_px: int = THUMB_PX) -> np.ndarray:
    """RGB thumbnail: tumour probability (turbo colour map) over the slide, or over grey tissue.

    Kept separate so the export module's overlay renderer can replace it in one place.
    """
    from matplotlib import colormaps
    from PIL import Image

    from .io.heatmap import open_heatmap

    hm = open_heatmap(heatmap_path)
    rows, cols = hm.probs.shape
    s = max_px / max(rows, cols, 1)
    size_wh = (max(1, round(cols * s)), max(1, round(rows * s)))
    finite = np.isfinite(hm.probs)
    rgba = colormaps[FALLBACK_CMAP](np.where(finite, hm.probs, 0.0))
    heat = (rgba[..., :3] * 255).astype(np.uint8)
    heat_img = np.asarray(Image.fromarray(heat).resize(size_wh, Image.Resampling.NEAREST)).astype(np.float32)
    mask = np.asarray(Image.fromarray(finite.astype(np.uint8) * 255).resize(size_wh, Image.Resampling.NEAREST)) > 0
    bg = _slide_background(slide_path, hm.attrs, size_wh) if slide_path else None
    if bg is None:
        bg = np.full((size_wh[1], size_wh[0], 3), 255, np.uint8)
        bg[mask] = 200
    out = bg.astype(np.float32)
    out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * heat_img[mask]
    return np.clip(out, 0, 255).astype(np.uint8)


def thumbnail_data_uri(heatmap_path: str | Path, slide_path: str | None, max_px: int = THUMB_PX) -> str:
    """The overlay of the export module (slide, heatmap, colour bar) as a data URI; our own
    simpler thumbnail where that renderer is unavailable or cannot read the slide."""
    import tempfile

    try:
        from .export.overlay import render_overlay

        with tempfile.TemporaryDirectory(prefix="wsi-scan-report-") as td:
            png = render_overlay(heatmap_path, Path(td) / "overlay.png", slide=slide_path, max_size=max_px)
            return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    except Exception as exc:  # noqa: BLE001 - fall back, the report must still show the heatmap
        log.info(
            "report: overlay renderer failed for %s (%s: %s); using the plain thumbnail", heatmap_path, type(exc).__name__, exc
        )
    return _png_data_uri(heatmap_thumbnail(heatmap_path, slide_path, max_px))


def thumbnail_key(heatmap_path: str | Path, slide_path: str | None, max_px: int = THUMB_PX) -> str | None:
    """What a thumbnail depends on: the heatmap's data digest and settings, the slide file (path,
    size, modification time), the size and the renderer's version; None when it cannot be known
    (then the thumbnail is always rendered)."""
    import hashlib

    from .io.heatmap import read_attrs
    from .io.slide import file_identity

    attrs = read_attrs(heatmap_path)
    if not attrs or not attrs.get("data_sha256") or attrs.get("status") != "complete":
        return None
    try:
        slide_id = file_identity(slide_path) if slide_path else "no slide"
    except OSError:
        slide_id = "slide missing"
    parts = [
        str(THUMB_VERSION),
        str(OVERLAY_ALPHA),  # a changed opacity re-renders
        str(max_px),
        str(attrs["data_sha256"]),
        str(attrs.get("settings_hash", "")),
        slide_id,
        str(attrs.get("slide", {}).get("level0_size_wh")),
    ]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def previous_thumbnails(path: Path) -> dict[str, str]:
    """Thumbnails of an earlier report.html by their key, for reuse when nothing they show changed."""
    from .io.outputs import written_by_wsi_scan

    try:
        if not written_by_wsi_scan(path) or path.stat().st_size > MAX_REUSE_BYTES:
            return {}
        return dict(_REUSE.findall(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return {}


def viewer_command(heatmap_path: str | Path) -> str:
    """The command that opens a heatmap (or a results folder) in ``wsi-scan view``."""
    return f"wsi-scan view {shlex.quote(str(heatmap_path))}"


def _fmt(v: float | None, digits: int) -> tuple[str, str]:
    """(shown text, sort value)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "", ""
    return f"{v:.{digits}f}", repr(float(v))


def write_report(out_dir: Path, outcomes: Sequence[SlideOutcome], meta: dict[str, Any]) -> Path:
    """Write OUT_DIR/report.html; slides without a heatmap get a row without thumbnail.

    Thumbnails of an earlier report in OUT_DIR are reused when their key (``thumbnail_key``: the
    heatmap's data and settings, the slide file, the size) is unchanged, so a rerun over a large
    cohort renders only the slides that changed.
    """
    rows = []
    reuse = previous_thumbnails(out_dir / "report.html")
    rendered = reused = 0
    for o in outcomes:
        img = ""
        view = ""
        if o.status in ("ok", "skipped"):
            try:
                key = thumbnail_key(o.out, o.path)
                uri = reuse.get(key) if key else None
                if uri is None:
                    uri = thumbnail_data_uri(o.out, o.path)
                    rendered += 1
                else:
                    reused += 1
                img = f'<img data-key="{key or ""}" alt="{html.escape(o.slide)}" src="{uri}">'
            except Exception as exc:  # noqa: BLE001 - a broken thumbnail must not lose the report
                log.warning("report: no thumbnail for %s (%s: %s)", o.slide, type(exc).__name__, exc)
            tip = "run this to open the slide and its heatmap in the browser; click to copy"
            view = f'<code class="view" title="{tip}">{html.escape(viewer_command(o.out))}</code>'
        call = html.escape(o.call)
        if o.n_lesions:
            largest = f", largest {o.largest_lesion_mm:.2f} mm" if o.largest_lesion_mm is not None else ""
            call += f'<div class="lesions">{o.n_lesions} lesion{"s" if o.n_lesions != 1 else ""}{largest}</div>'
        cells = [
            ("", img, ""),
            ("", html.escape(o.slide), o.slide),
            ("", f'<span class="{o.status}">{o.status}</span>', o.status),
            ("", call, str(CALLS.index(o.call)) if o.call in CALLS else ""),
            ("num", *_fmt(o.score, 3)),
            ("num", *_fmt(o.largest_lesion_mm, 2)),
            ("num", *_fmt(o.tumour_area_mm2, 3)),
            ("num", *_fmt(o.max_prob, 3)),
            ("num", *_fmt(o.mean_prob, 3)),
            ("num", *_fmt(o.tissue_area_mm2, 2)),
            ("num", *_fmt(o.mpp, 4)),
            ("", html.escape(o.mpp_source), o.mpp_source),
            ("num", *_fmt(o.timings_s.get("total"), 1)),
            ("err", html.escape(f"{o.error_type}: {o.error}" if o.error_type else ""), o.error_type),
            ("", view, o.out if view else ""),
        ]
        tds = "".join(f'<td class="{c}" data-v="{html.escape(v, quote=True)}">{t}</td>' for c, t, v in cells)
        rows.append(f"<tr>{tds}</tr>")
    heads = [
        "heatmap",
        "slide",
        "status",
        "call",
        "score",
        "largest lesion (mm)",
        "tumour area (mm²)",
        "max prob",
        "mean prob",
        "tissue (mm²)",
        "µm/px",
        "µm/px source",
        "seconds",
        "error",
        "viewer",
    ]
    counts = meta.get("counts", {})
    model = meta.get("model", {})
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{HTML_MARK}<title>wsi-scan report</title>
<style>{_CSS}</style></head><body>
<h1>wsi-scan report</h1>
<div class="meta">{html.escape(str(meta.get("slides_dir", "")))} &rarr; {html.escape(str(meta.get("out_dir", "")))}<br>
{counts.get("ok", 0)} scanned, {counts.get("skipped", 0)} already done, {counts.get("failed", 0)} failed &middot;
model {html.escape(str(model.get("name", "")))} (sha256 {html.escape(str(model.get("sha256", ""))[:12])}),
tumour = probability &ge; {model.get("threshold", "")}
&middot; click a column header to sort<br>
the whole cohort in the viewer (slides at full resolution with their heatmaps and lesions):
<code class="view" title="click to copy">{html.escape(viewer_command(meta.get("out_dir") or out_dir))}</code></div>
<table><thead><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""
    from .io.outputs import atomic_write

    log.info("report: %d thumbnails rendered, %d reused from the previous report", rendered, reused)
    path = out_dir / "report.html"
    with atomic_write(path, "run report") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
