"""``wsi-scan view``: a read-only local web server for slides, their heatmaps and a cohort.

Standard library only (``http.server.ThreadingHTTPServer``): one thread per browser connection,
so the browser's parallel tile requests are served in parallel (decoding, resampling and
encoding release the GIL). ``docs/viewer.md`` says why no web framework.

What can be requested is fixed when the server starts: the viewer's own static files (read into
memory from the package), the heatmap stores it was given (by index), the slide each of them
names in its attrs, and tiles computed from those. No part of a URL is ever joined to a file
system path, so ``..``, absolute paths, links and percent-encoded names cannot reach a file.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..config import LesionConfig, ViewConfig
from ..errors import HeatmapError, UsageError, WsiScanError
from .tiles import ByteLRU, DeepZoom, HeatTiles, SlideTiles, colour_lut, encode_jpeg, encode_png

log = logging.getLogger("wsi_scan.view")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TILE = re.compile(r"/tiles/(\d{1,6})/(slide|heat)/(\d{1,2})/(\d{1,7})_(\d{1,7})\.(jpeg|png)")
_META = re.compile(r"/api/slide/(\d{1,6})")
_PROB = re.compile(r"/api/slide/(\d{1,6})/prob")
_STATIC = re.compile(r"/static/([A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*)")


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    cache: str = "no-cache"


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8"))


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class Entry:
    """One heatmap store the server was given, and the slide its attrs name."""

    id: int
    name: str
    store: Path
    attrs: dict[str, Any]
    row: dict[str, Any]
    summary: dict[str, Any]  # computed from the store's cells at start (_computed_summary), not its attrs'

    @property
    def slide_path(self) -> str:
        return str(self.attrs.get("slide", {}).get("path") or "")

    def table_row(self) -> dict[str, Any]:
        s = self.summary
        sl = self.attrs.get("slide", {}) or {}
        r = self.row
        return {
            "id": self.id,
            "slide": self.name,
            "status": r.get("status") or self.attrs.get("status", ""),
            "call": s["call"],
            "score": _finite(s["score"]),
            "n_lesions": s["n_lesions"],
            "largest_lesion_mm": _finite(s.get("largest_lesion_mm")),
            "tumour_area_mm2": _finite(s.get("tumour_area_mm2")),
            "max_prob": _finite(s.get("max_prob")),
            "mean_prob": _finite(s.get("mean_prob")),
            "tissue_area_mm2": _finite(s["tissue_area_mm2"]),
            "mpp": _finite((sl.get("mpp_xy") or [None])[0]),
            "mpp_source": sl.get("mpp_source", ""),
            "seconds": _finite(r.get("seconds_total")),
            "error": "",
        }


def _computed_summary(hm: Any) -> dict[str, Any]:
    """The list's numbers from the heatmap's cells, as the scan computed them for its attrs: an
    edited summary block (the store's data intact, so no reader check refuses it) would otherwise
    list a call that the opened slide contradicts."""
    from ..lesions import call_slide
    from ..scan import HeatmapSummary

    tissue_cells = int(hm.tissue.sum())
    nums = HeatmapSummary.of(hm.probs, tissue_cells, hm.grid.l0_cell_size_xy, hm.mpp_xy, hm.threshold)
    return {
        **call_slide(hm.probs, hm.grid, hm.mpp_xy, hm.threshold).summary(),
        "tumour_area_mm2": nums.tumour_area_mm2,
        "max_prob": nums.max_prob,
        "mean_prob": nums.mean_prob,
        "tissue_area_mm2": nums.tissue_area_mm2,
    }


def _failed_row(r: dict[str, Any]) -> dict[str, Any]:
    """A summary.json row without a heatmap to open (a slide that failed): shown, not openable."""
    err = f"{r.get('error_type') or ''}: {r.get('error') or ''}".strip(": ")
    return {
        "id": None,
        "slide": str(r.get("slide") or ""),
        "status": str(r.get("status") or ""),
        "call": "",
        "score": None,
        "n_lesions": None,
        "largest_lesion_mm": None,
        "tumour_area_mm2": None,
        "max_prob": None,
        "mean_prob": None,
        "tissue_area_mm2": None,
        "mpp": _finite(r.get("mpp")),
        "mpp_source": str(r.get("mpp_source") or ""),
        "seconds": _finite(r.get("seconds_total")),
        "error": err[:300],
    }


@dataclass
class Opened:
    """An entry in use: its heatmap, its slide's tiles (or why there are none) and its metadata."""

    entry: Entry
    dz: DeepZoom
    heat: HeatTiles
    slide: SlideTiles | None
    slide_error: str
    meta: bytes
    users: int = 0
    evicted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        if self.slide is not None:
            self.slide.slide.close()


def _rings(geom: Any, ndigits: int = 1) -> list[list[list[float]]]:
    """Exterior and interior rings of a (multi)polygon as [[x, y], ...] in level-0 px."""
    polys = list(getattr(geom, "geoms", [geom]))
    out = []
    for p in polys:
        if p.is_empty or p.geom_type != "Polygon":
            continue
        for ring in [p.exterior, *p.interiors]:
            out.append([[round(x, ndigits), round(y, ndigits)] for x, y in ring.coords])
    return out


class ViewerApp:
    """The viewer's routes as a plain function of a request path (tested without sockets)."""

    def __init__(self, path: str | Path, cfg: ViewConfig = ViewConfig()) -> None:
        from ..io.heatmap import open_heatmap, read_attrs
        from ..io.viewer_files import static_files, viewer_sources

        self.cfg = cfg
        self.kind, stores, rows = viewer_sources(path)
        root = Path(path)
        self.entries: list[Entry] = []
        damaged: list[dict[str, Any]] = []
        for store in stores:
            attrs = read_attrs(store)
            if attrs is None:
                continue
            name = str(store.relative_to(root)) if self.kind == "folder" else store.name
            name = name[:-5] if name.endswith(".zarr") else name
            try:
                # checked now, not when opened: the list would show a damaged store's stored call
                summary = _computed_summary(open_heatmap(store))
            except HeatmapError as exc:
                if self.kind == "store":
                    raise
                damaged.append(_failed_row({"slide": name, "status": "damaged", "error": str(exc)}))
                rows.pop(os.path.realpath(store), None)
                continue
            stored = (attrs.get("summary") or {}).get("call")
            if stored is not None and stored != summary["call"]:
                log.warning(
                    "view: %s: its attrs give the call %s, its cells %s; listed with the cells' call",
                    name,
                    stored,
                    summary["call"],
                )
            self.entries.append(Entry(len(self.entries), name, store, attrs, rows.get(os.path.realpath(store), {}), summary))
        if not self.entries:
            raise HeatmapError(f"{path}: no readable heatmap store; rerun the scan")
        shown = {os.path.realpath(e.store) for e in self.entries}
        self.failed_rows = damaged + [_failed_row(r) for k, r in sorted(rows.items()) if k not in shown]
        self.title = root.name or str(root)
        self.static = static_files()
        self.lut = colour_lut(cfg.cmap)
        self.tiles = ByteLRU(cfg.tile_cache_mib << 20)
        self._open: OrderedDict[int, Opened] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {e.id: threading.Lock() for e in self.entries}
        self._work = threading.BoundedSemaphore(cfg.threads)

    # -- opening entries -------------------------------------------------------------------

    def _load(self, entry: Entry) -> Opened:
        from ..export.geojson import region_polygons
        from ..io.heatmap import open_heatmap
        from ..io.slide import open_slide
        from ..lesions import find_lesions

        hm = open_heatmap(entry.store)
        size_wh = tuple(int(v) for v in hm.attrs["slide"]["level0_size_wh"])
        dz = DeepZoom((size_wh[0], size_wh[1]), self.cfg.tile_px)
        slide_tiles, slide_error = None, ""
        try:
            slide = open_slide(entry.slide_path, hm.attrs["slide"].get("backend", "auto"))
            if tuple(slide.info.level0_size_wh) != size_wh:
                slide.close()
                raise UsageError(
                    f"{entry.slide_path} is {slide.info.level0_size_wh[0]} x {slide.info.level0_size_wh[1]} px, "
                    f"the heatmap's slide was {size_wh[0]} x {size_wh[1]} px: not the slide the heatmap was made from"
                )
            slide_tiles = SlideTiles(slide, dz, self.cfg.thumbnail_px)
        except WsiScanError as exc:
            slide_error = str(exc)
            log.warning("view: %s: no slide layer (%s)", entry.name, slide_error)
        labels = np.zeros(hm.probs.shape, dtype=np.int32)
        lesions = find_lesions(hm.probs, hm.grid, hm.mpp_xy, hm.threshold, LesionConfig(), labels=labels)
        les_out = []
        for les in lesions:
            rings = []
            for geom, _, _ in region_polygons(labels == les.id, hm):
                rings += _rings(geom)
            les_out.append(
                {
                    "id": les.id,
                    "size_class": les.size_class,
                    "diameter_mm": les.longest_diameter_mm,
                    "area_mm2": les.area_mm2,
                    "max_prob": les.max_prob,
                    "mean_prob": les.mean_prob,
                    "l0_centroid_xy": list(les.l0_centroid_xy),
                    "l0_bbox_xyxy": list(les.l0_bbox_xyxy),
                    "rings": rings,
                }
            )
        tissue = []
        for geom, _, _ in region_polygons(hm.tissue, hm):
            tissue += _rings(geom)
        g = hm.grid
        finite = hm.probs[np.isfinite(hm.probs)]
        meta = {
            "id": entry.id,
            "name": entry.name,
            "store": entry.store.name,
            "slide_path": entry.slide_path,
            "slide_available": slide_tiles is not None,
            "slide_error": slide_error,
            "width": size_wh[0],
            "height": size_wh[1],
            "tile_px": dz.tile_px,
            "max_level": dz.max_level,
            "mpp_xy": list(hm.mpp_xy),
            "threshold": hm.threshold,
            "grid": {
                "l0_origin_xy": list(g.l0_origin_xy),
                "l0_cell_size_xy": list(g.l0_cell_size_xy),
                "shape_rc": list(g.shape_rc),
            },
            "call": "negative" if not lesions else lesions[0].size_class,
            "score": float(finite.max()) if finite.size else None,
            "cmap": self.cfg.cmap,
            "lut": self.lut.tolist(),
            "tissue": tissue,
            "lesions": les_out,
            "version": str(hm.attrs.get("data_sha256", ""))[:12],
        }
        return Opened(
            entry,
            dz,
            HeatTiles(hm, dz, self.lut),
            slide_tiles,
            slide_error,
            json.dumps(meta, allow_nan=False, separators=(",", ":")).encode("utf-8"),
        )

    @contextmanager
    def using(self, eid: int) -> Iterator[Opened]:
        """An entry opened (at most ``max_open_slides`` stay open; the least recent is closed once idle)."""
        if not 0 <= eid < len(self.entries):
            raise KeyError(eid)
        with self._opening[eid]:
            with self._lock:
                op = self._open.get(eid)
                if op is not None:
                    self._open.move_to_end(eid)
                    op.users += 1
            if op is None:
                op = self._load(self.entries[eid])
                evict = []
                with self._lock:
                    op.users += 1
                    self._open[eid] = op
                    while len(self._open) > self.cfg.max_open_slides:
                        _, old = self._open.popitem(last=False)
                        old.evicted = True
                        evict.append(old)
                for old in evict:
                    gone = old.entry.id
                    self.tiles.drop(lambda k: bool(k[0] == gone))  # noqa: B023 - used at once
                    self._release(old, 0)
        try:
            yield op
        finally:
            self._release(op, 1)

    def _release(self, op: Opened, n: int) -> None:
        with self._lock:
            op.users -= n
            done = op.evicted and op.users == 0
        if done:
            op.close()

    @property
    def n_open(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            ops = list(self._open.values())
            self._open.clear()
        for op in ops:
            op.close()

    # -- routes ----------------------------------------------------------------------------

    def catalog(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "slides": [e.table_row() for e in self.entries] + self.failed_rows}

    def handle(self, raw: str) -> Response:
        """The response to a GET of ``raw`` (path and query as sent)."""
        parts = urlsplit(raw)
        path = parts.path
        if path in ("/", "/index.html"):
            return Response(200, self.static["index.html"], CONTENT_TYPES[".html"])
        if path == "/favicon.ico":
            return Response(204, b"", "image/x-icon", "max-age=3600")
        if path == "/api/catalog":
            return _json(self.catalog())
        m = _STATIC.fullmatch(path)
        if m:
            name = m.group(1)
            body = self.static.get(name)
            if body is None or ".." in name.split("/"):
                return _error(404, "no such file")
            return Response(200, body, CONTENT_TYPES.get(os.path.splitext(name)[1], "application/octet-stream"), "max-age=3600")
        try:
            m = _TILE.fullmatch(path)
            if m:
                return self._tile(
                    int(m.group(1)),
                    m.group(2),
                    int(m.group(3)),
                    int(m.group(4)),
                    int(m.group(5)),
                    m.group(6),
                    parse_qs(parts.query),
                )
            m = _META.fullmatch(path)
            if m:
                with self.using(int(m.group(1))) as op:
                    return Response(200, op.meta)
            m = _PROB.fullmatch(path)
            if m:
                return self._prob(int(m.group(1)), parse_qs(parts.query))
        except KeyError:
            return _error(404, "no such slide")
        except WsiScanError as exc:
            return _error(409, " ".join(str(exc).split()))
        return _error(404, "not found")

    def _tile(self, eid: int, layer: str, dzl: int, col: int, row: int, ext: str, query: dict[str, list[str]]) -> Response:
        if (layer == "slide") != (ext == "jpeg"):
            return _error(404, "not found")
        t = 0.0
        if layer == "heat":
            try:
                t = float(query.get("t", ["0"])[0])
            except ValueError:
                return _error(400, "t must be a number in [0, 1]")
            if not 0.0 <= t <= 1.0:
                return _error(400, "t must be a number in [0, 1]")
            t = round(t, 3)
        key = (eid, layer, dzl, col, row, t)
        body = self.tiles.get(key)
        if body is None:
            with self.using(eid) as op:
                if not op.dz.valid(dzl, col, row):
                    return _error(404, "no such tile")
                if layer == "slide" and op.slide is None:
                    return _error(404, f"no slide layer: {op.slide_error}")

                def render() -> bytes:
                    with self._work:
                        if layer == "slide":
                            assert op.slide is not None
                            return encode_jpeg(op.slide.tile_rgb(dzl, col, row), self.cfg.jpeg_quality)
                        return encode_png(op.heat.tile_rgba(dzl, col, row, t))

                body = self.tiles.get_or_make(key, render, keep=lambda: not op.evicted)
        return Response(200, body, "image/jpeg" if layer == "slide" else "image/png", "private, max-age=600")

    def _prob(self, eid: int, query: dict[str, list[str]]) -> Response:
        try:
            x, y = float(query["x"][0]), float(query["y"][0])
        except (KeyError, ValueError, IndexError):
            return _error(400, "x and y (level-0 px) are required numbers")
        if not (math.isfinite(x) and math.isfinite(y)):
            return _error(400, "x and y must be finite")
        with self.using(eid) as op:
            hm = op.heat.hm
            r, c = hm.grid.l0_to_cell(x, y)
            rows, cols = hm.grid.shape_rc
            inside = 0 <= r < rows and 0 <= c < cols
            p = _finite(hm.probs[r, c]) if inside else None
            return _json(
                {
                    "l0_xy": [x, y],
                    "cell_rc": [r, c] if inside else None,
                    "prob": p,
                    "tissue": bool(hm.tissue[r, c]) if inside else False,
                }
            )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the browser reuses its few connections for many tiles
    # headers and body leave in separate writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers (40 ms on Linux) on every keep-alive response
    disable_nagle_algorithm = True
    server_version = "wsi-scan-view"
    sys_version = ""
    # a connection silent this long is closed: each holds a thread, and a client that opens
    # many and never finishes a request would otherwise keep them all
    timeout = 60
    app: ViewerApp
    allowed_hosts: frozenset[str]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("view: %s %s", self.address_string(), format % args)

    def _send(self, resp: Response, head: bool = False) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Cache-Control", resp.cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if not head:
            self.wfile.write(resp.body)

    def _respond(self, head: bool) -> None:
        host = (self.headers.get("Host") or "").lower()
        if self.allowed_hosts and host not in self.allowed_hosts:
            # DNS rebinding: a web page may not reach a loopback server through a name of its own
            self._send(_error(421, "unexpected Host header"), head)
            return
        try:
            resp = self.app.handle(self.path)
        except Exception as exc:  # noqa: BLE001 - one broken tile must not stop the server
            log.warning("view: %s failed (%s: %s)", self.path[:200], type(exc).__name__, exc)
            resp = _error(500, f"{type(exc).__name__}")
        self._send(resp, head)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(True)

    def _refuse(self) -> None:
        self._send(_error(405, "read-only: only GET and HEAD"))

    def __getattr__(self, name: str) -> Any:
        # every method but GET and HEAD (POST, TRACE, PROPFIND, made-up ones): http.server would
        # answer one without a do_ handler with 501 and an HTML page
        if name.startswith("do_"):
            return self._refuse
        raise AttributeError(name)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 48\r\n\r\nbusy: too many open connections; try again soon\n"
)


class _Slot:
    """One connection's hold on the server's semaphore, given back at most once: the accepting
    thread and the connection's own thread may both try (Ctrl-C between the thread's start and
    ``process_request``'s return), and a second release raised ValueError, which socketserver
    took for a failed connection, swallowing the KeyboardInterrupt: the server did not stop."""

    def __init__(self, sem: threading.BoundedSemaphore) -> None:
        self._sem = sem
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._sem.release()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: Any, handler: Any, max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per connection, up to ``max_connections``; a connection beyond them is
        answered 503 and closed at once rather than given a thread of its own."""
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)  # a client that does not read must not stall the accept loop
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        slot = _Slot(self.slots)
        try:
            threading.Thread(
                target=self._serve_connection, args=(request, client_address, slot), daemon=self.daemon_threads
            ).start()
        except BaseException:
            # a thread that could not start, or Ctrl-C arriving just after it did: either way the
            # slot is given back once, so the KeyboardInterrupt goes on to stop the server
            slot.release()
            raise

    def _serve_connection(self, request: Any, client_address: Any, slot: _Slot) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            slot.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-response (a browser cancels tiles while panning) or times
        out is routine: socketserver's default prints a traceback for each."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        log.warning("view: a connection from %s failed (%s: %s)", client_address, type(exc).__name__, exc)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Viewer:
    """A running viewer: ``Viewer(path).start()``; ``url``; ``stop()``."""

    def __init__(self, path: str | Path, cfg: ViewConfig = ViewConfig()) -> None:
        self.app = ViewerApp(path, cfg)
        handler: type[_Handler] = type("Handler", (_Handler,), {"app": self.app, "allowed_hosts": frozenset()})
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        server_cls = type("Server", (_Server,), {"address_family": family})
        try:
            self.httpd = server_cls((cfg.host, cfg.port), handler, cfg.max_connections)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}); choose another --host or --port"
            ) from None
        self.host = cfg.host
        self.port = int(self.httpd.server_address[1])
        if is_loopback(cfg.host):
            handler.allowed_hosts = frozenset(f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", cfg.host))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}/"

    def start(self) -> Viewer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="wsi-scan-view", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.close()

    def __enter__(self) -> Viewer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def non_loopback_warning(host: str) -> str | None:
    if is_loopback(host):
        return None
    return (
        f"--host {host} is not a loopback address: anyone who can reach this machine on the network can view "
        "these slides and heatmaps (no password, no encryption); use --host 127.0.0.1 unless that is intended"
    )
