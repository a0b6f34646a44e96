"""Tile latency and memory of ``wsi-scan view`` on a large synthetic slide (issue 14).

    python scripts/view_latency.py [--size 100000x80000] [--viewports 300] [--clients 6] [--json out.json]

Writes (once, into --cache) a pyramidal JPEG TIFF of the given size at 0.25 um/px (levels 1, 4,
16, 64; three tissue sections, tumour foci) and a heatmap store for it with a probability per
cell, starts ``wsi-scan view`` on the store as a separate process, and plays a browsing session
against it: viewports of 1600 x 1000 screen px at random places and Deep Zoom levels, zooming in
and out like a user, every slide and heatmap tile each viewport needs requested by ``--clients``
concurrent connections (a browser opens about six). Then:

- latency per tile as the client sees it (request sent to last byte), slide and heatmap apart,
  all requests and only first requests of each URL (the server's tile cache cold);
- one client alone (no queueing behind the others) for the pure per-tile cost;
- the server process's resident memory (RSS) sampled every 0.2 s: peak and end.

Results go to stdout and to ``--json``; docs/viewer.md records a run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIEW_W, VIEW_H = 1600, 1000  # a browser window's viewer, CSS px
TILE = 256


def slide_spec(size_wh: tuple[int, int]) -> Any:
    from wsi_scan.io.synthetic import SyntheticSlide

    w, h = size_wh
    sections = ((0.05, 0.08, 0.50, 0.48), (0.55, 0.10, 0.925, 0.34), (0.30, 0.60, 0.675, 0.76))
    tissue = tuple((int(a * w), int(b * h), int(c * w), int(d * h)) for a, b, c, d in sections)
    foci = ((0.12, 0.15, 0.02), (0.40, 0.30, 0.03), (0.70, 0.20, 0.015), (0.45, 0.68, 0.025))
    tumour = tuple((int(x * w), int(y * h), int(x * w + s * w), int(y * h + s * w)) for x, y, s in foci)
    return SyntheticSlide(
        size_wh=size_wh, mpp=0.25, downsamples=(1, 4, 16, 64), tile_px=256, quality=90, tissue=tissue, tumour=tumour
    )


def ensure_data(cache: Path, size_wh: tuple[int, int]) -> Path:
    """The slide and its heatmap store (written once)."""
    import numpy as np

    from wsi_scan.geometry import plan_grid
    from wsi_scan.io.heatmap import write_heatmap
    from wsi_scan.io.synthetic import write_synthetic_slide

    cache.mkdir(parents=True, exist_ok=True)
    spec = slide_spec(size_wh)
    slide = cache / f"view-bench-{size_wh[0]}x{size_wh[1]}.tif"
    store = cache / f"view-bench-{size_wh[0]}x{size_wh[1]}.zarr"
    if not slide.exists():
        t = time.perf_counter()
        write_synthetic_slide(slide.with_suffix(".tmp.tif"), spec)
        slide.with_suffix(".tmp.tif").rename(slide)
        print(f"slide written in {time.perf_counter() - t:.0f} s: {slide} ({slide.stat().st_size / 1e9:.2f} GB)")
    if not store.exists():
        grid = plan_grid((0, 0, *size_wh), (0.25, 0.25), 0.972, 32, 96)
        rows, cols = grid.shape_rc
        cy = (np.arange(rows) + 0.5) * grid.l0_cell_size_xy[1]
        cx = (np.arange(cols) + 0.5) * grid.l0_cell_size_xy[0]
        tissue = np.zeros((rows, cols), bool)
        for x0, y0, x1, y1 in spec.tissue:
            tissue |= ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
        rng = np.random.default_rng(0)
        probs = rng.random((rows, cols), dtype=np.float32) * 0.3
        for x0, y0, x1, y1 in spec.tumour:
            probs[((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]] = 0.97
        probs = np.where(tissue, probs, np.nan).astype(np.float32)
        attrs = {
            "format_version": 1,
            "slide": {
                "path": str(slide.resolve()),
                "name": slide.name,
                "level0_size_wh": list(size_wh),
                "l0_bounds_xywh": [0, 0, *size_wh],
                "mpp_xy": [0.25, 0.25],
                "mpp_source": "synthetic",
                "backend": "auto",
            },
            "grid": {
                "l0_origin_xy": list(grid.l0_origin_xy),
                "l0_cell_size_xy": list(grid.l0_cell_size_xy),
                "shape_rc": [rows, cols],
                "patch_px": 96,
                "cell_px": 32,
                "target_mpp": 0.972,
            },
            "model": {"threshold": 0.5, "name": "synthetic"},
            "summary": {},
            "tissue": {},
        }
        write_heatmap(store, probs, tissue, grid, (0.25, 0.25), attrs)
        print(f"heatmap written: {store} ({rows} x {cols} cells)")
    return store


def dz_levels(size_wh: tuple[int, int]) -> int:
    return math.ceil(math.log2(max(size_wh)))


def viewport_tiles(size_wh: tuple[int, int], level: int, cx: float, cy: float) -> list[tuple[int, int]]:
    """Tiles of Deep Zoom ``level`` a VIEW_W x VIEW_H viewport centred on level-0 (cx, cy) needs."""
    ds = 2 ** (dz_levels(size_wh) - level)
    lw, lh = math.ceil(size_wh[0] / ds), math.ceil(size_wh[1] / ds)
    x0, y0 = cx / ds - VIEW_W / 2, cy / ds - VIEW_H / 2
    c0, c1 = max(0, int(x0 // TILE)), min(math.ceil(lw / TILE) - 1, int((x0 + VIEW_W) // TILE))
    r0, r1 = max(0, int(y0 // TILE)), min(math.ceil(lh / TILE) - 1, int((y0 + VIEW_H) // TILE))
    return [(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def session(size_wh: tuple[int, int], n_viewports: int, seed: int) -> list[list[str]]:
    """URLs per viewport of a user who looks around, zooms in on places and back out."""
    rng = random.Random(seed)
    top = dz_levels(size_wh)
    first = max(0, top - math.ceil(math.log2(max(size_wh[0] / VIEW_W, size_wh[1] / VIEW_H))))
    level, cx, cy = first, size_wh[0] / 2, size_wh[1] / 2
    out = []
    for _ in range(n_viewports):
        move = rng.random()
        if move < 0.35 and level < top:
            level += 1
        elif move < 0.55 and level > first:
            level -= 1
        ds = 2 ** (top - level)
        cx = min(max(cx + rng.uniform(-1, 1) * VIEW_W * ds * 0.6, 0), size_wh[0])
        cy = min(max(cy + rng.uniform(-1, 1) * VIEW_H * ds * 0.6, 0), size_wh[1])
        if rng.random() < 0.05:  # jump elsewhere, as from the lesion list
            cx, cy, level = rng.uniform(0, size_wh[0]), rng.uniform(0, size_wh[1]), rng.randint(top - 3, top)
        urls = []
        # what the browser loads: the level it shows plus the coarser one it draws first
        for lv in (max(first, level - 1), level):
            for c, r in viewport_tiles(size_wh, lv, cx, cy):
                urls.append(f"/tiles/0/slide/{lv}/{c}_{r}.jpeg")
                urls.append(f"/tiles/0/heat/{lv}/{c}_{r}.png?t=0.00")
        out.append(urls)
    return out


class Client(threading.Thread):
    """One keep-alive connection taking URLs from a shared list."""

    def __init__(self, hostport: str, jobs: list[str], lock: threading.Lock, results: list[tuple[str, float, int]]) -> None:
        super().__init__(daemon=True)
        self.hostport, self.jobs, self.lock, self.results = hostport, jobs, lock, results

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.hostport, timeout=120)
        while True:
            with self.lock:
                if not self.jobs:
                    break
                url = self.jobs.pop()
            t = time.perf_counter()
            conn.request("GET", url)
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t
            with self.lock:
                self.results.append((url, dt, resp.status if body is not None else 0))
        conn.close()


def play(hostport: str, viewports: list[list[str]], clients: int) -> list[tuple[str, float, int]]:
    results: list[tuple[str, float, int]] = []
    lock = threading.Lock()
    for urls in viewports:
        jobs = list(reversed(urls))
        threads = [Client(hostport, jobs, lock, results) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {
        "n": len(v),
        "median_ms": 1e3 * statistics.median(v),
        "p95_ms": 1e3 * v[min(len(v) - 1, int(0.95 * len(v)))],
        "max_ms": 1e3 * v[-1],
    }


def summarise(results: list[tuple[str, float, int]]) -> dict[str, Any]:
    seen: set[str] = set()
    first: list[tuple[str, float]] = []
    for url, dt, _ in results:
        if url not in seen:
            seen.add(url)
            first.append((url, dt))
    out: dict[str, Any] = {"errors": sum(1 for *_, s in results if s != 200)}
    for layer in ("slide", "heat"):
        out[layer] = {
            "all": stats([dt for u, dt, _ in results if f"/{layer}/" in u]),
            "first_request": stats([dt for u, dt in first if f"/{layer}/" in u]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="100000x80000")
    ap.add_argument("--viewports", type=int, default=300)
    ap.add_argument("--single", type=int, default=40, help="viewports played by one client alone")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "wsi-scan" / "view-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    store = ensure_data(args.cache, (w, h))
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_scan", "view", str(store), "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    hostport = url.split("//", 1)[1].rstrip("/")
    ps = psutil.Process(proc.pid)
    rss: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                rss.append(ps.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(hostport, timeout=120)
        conn.request("GET", "/api/slide/0")
        meta_resp = conn.getresponse()
        meta_resp.read()
        open_s = time.perf_counter() - t0
        single = summarise(play(hostport, session((w, h), args.single, seed=1), 1))
        t1 = time.perf_counter()
        many_results = play(hostport, session((w, h), args.viewports, seed=2), args.clients)
        many_s = time.perf_counter() - t1
        many = summarise(many_results)
    finally:
        stop.set()
        sampler.join()
        end_rss = ps.memory_info().rss / 2**20 if proc.poll() is None else float("nan")
        proc.terminate()
        proc.wait(30)
    report = {
        "size_wh": [w, h],
        "cpus": os.cpu_count(),
        "open_slide_s": open_s,
        "single_client": single,
        "concurrent": {
            "clients": args.clients,
            "viewports": args.viewports,
            "tiles": len(many_results),
            "seconds": many_s,
            "tiles_per_s": len(many_results) / many_s,
            **many,
        },
        "rss_mb": {"peak": max(rss), "end": end_rss, "samples": len(rss), "every_10_s": [round(v, 1) for v in rss[::50]]},
        "tile_cache_mib": 128,
        "seconds_total": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
