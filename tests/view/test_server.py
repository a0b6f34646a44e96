"""The viewer's server: what it serves and what it refuses (path traversal in every spelling,
links, other methods, foreign Host headers), tile geometry, bounded caches, parallel requests,
and the ``wsi-scan view`` command itself."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests._support import run
from tests.view.conftest import SIZE_WH, TUMOUR
from wsi_scan.errors import HeatmapError
from wsi_scan.io.heatmap import open_heatmap
from wsi_scan.io.synthetic import TUMOUR_RGB
from wsi_scan.io.viewer_files import find_stores, static_files
from wsi_scan.view import tiles as tiles_mod
from wsi_scan.view.server import ViewerApp, non_loopback_warning
from wsi_scan.view.tiles import ByteLRU, DeepZoom

REPO = Path(__file__).resolve().parents[2]
SECRET = "top-secret-not-to-be-served"


def raw_get(url: str, target: str, method: str = "GET", host: str | None = None) -> tuple[int, bytes]:
    """Send ``target`` exactly as written (no client-side normalisation of '..' or '%2e')."""
    hostport = url.split("//", 1)[1].rstrip("/")
    conn = http.client.HTTPConnection(hostport, timeout=30)
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or hostport)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Files a traversal would like to reach: a secret beside the store and in the parent."""
    for p in (tmp_path / "secret.txt", tmp_path.parent / "secret.txt"):
        p.write_text(SECRET)
    return tmp_path / "secret.txt"


ATTACKS = [
    "/static/../secret.txt",
    "/static/../../secret.txt",
    "/static/%2e%2e/secret.txt",
    "/static/%2e%2e%2fsecret.txt",
    "/static/..%2f..%2fsecret.txt",
    "/static/..%5c..%5csecret.txt",
    "/static/%252e%252e/secret.txt",
    "/static/....//....//secret.txt",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/openseadragon/../../../../../../etc/passwd",
    "/../../../../etc/passwd",
    "/etc/passwd",
    "//etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/secret.txt",
    "/s.zarr/zarr.json",
    "/static/viewer.js%00.png",
    "/static/viewer.js/..",
    "/tiles/0/slide/../../../../etc/passwd",
    "/tiles/0/slide/12/..%2f..%2f0_0.jpeg",
    "/api/slide/0/../../../secret.txt",
    "/api/slide/../../secret.txt",
    "/api/slide/%30",
    "/api/slide/-1",
    "/api/slide/7",
    "/tiles/7/slide/12/0_0.jpeg",
    "/tiles/0/slide/99/0_0.jpeg",
    "/tiles/0/slide/12/99_0.jpeg",
    "/tiles/0/heat/12/0_0.jpeg",
    "http://127.0.0.1/etc/passwd",
    "file:///etc/passwd",
    "/static/C:/Windows/win.ini",
    "/static/~/.ssh/id_rsa",
]


def test_traversal_and_unknown_paths_are_refused(scanned_store, planted, serve):
    _, store = scanned_store
    v = serve(store)
    for target in ATTACKS:
        status, body = raw_get(v.url, target)
        assert 400 <= status < 500, (target, status)
        assert SECRET.encode() not in body and b"root:" not in body, target
    assert raw_get(v.url, "/static/viewer.js")[0] == 200  # while the real files are there


def test_only_the_named_slide_and_own_static_files_are_served(scanned_store, serve):
    slide, store = scanned_store
    v = serve(store)
    app = v.app
    assert [e.slide_path for e in app.entries] == [str(slide.resolve())]
    assert set(app.static) >= {
        "index.html",
        "viewer.js",
        "viewer.css",
        "openseadragon/openseadragon.min.js",
        "openseadragon/LICENSE.txt",
        "openseadragon/images/zoomin_rest.png",
    }
    status, body = raw_get(v.url, "/static/openseadragon/LICENSE.txt")
    assert status == 200 and b"Redistribution and use in source and binary forms" in body
    status, body = raw_get(v.url, "/")
    assert status == 200 and b"openseadragon.min.js" in body and b"http" not in body.replace(b"http-equiv", b"")  # nothing remote


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "BREW"])
def test_read_only(method, scanned_store, serve):
    v = serve(scanned_store[1])
    status, _ = raw_get(v.url, "/api/catalog", method=method)
    assert status == 405


def test_foreign_host_header_is_refused_on_loopback(scanned_store, serve):
    """A page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) gets nothing."""
    v = serve(scanned_store[1])
    assert raw_get(v.url, "/api/catalog", host="evil.example:80")[0] == 421
    assert raw_get(v.url, "/api/catalog", host=f"localhost:{v.port}")[0] == 200


def test_links_in_a_results_folder_are_not_followed(results_folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (results_folder / "case0.zarr").rename(outside / "case0.zarr")
    (results_folder / "linked.zarr").symlink_to(outside / "case0.zarr")
    (results_folder / "sub").symlink_to(outside)
    names = [p.name for p in find_stores(results_folder)]
    assert names == ["case1.zarr", "case2.zarr"]
    app = ViewerApp(results_folder)
    assert [e.name for e in app.entries] == ["case1", "case2"]


def test_a_damaged_store_is_listed_as_damaged_not_with_its_stored_call(results_folder):
    chunk = next(p for p in (results_folder / "case1.zarr" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    app = ViewerApp(results_folder)
    assert [e.name for e in app.entries] == ["case0", "case2"]
    row = next(r for r in app.catalog()["slides"] if r["slide"] == "case1")
    assert row["id"] is None and row["status"] == "damaged" and row["call"] == "" and "damaged heatmap store" in row["error"]
    with pytest.raises(HeatmapError, match="damaged heatmap store"):
        ViewerApp(results_folder / "case1.zarr")  # one store: refused at start


def test_the_list_gives_the_call_of_the_cells_not_of_an_edited_summary(results_folder, caplog):
    from wsi_scan.io.heatmap import open_heatmap, write_heatmap

    store = results_folder / "case2.zarr"
    hm = open_heatmap(store)
    attrs = {k: v for k, v in hm.attrs.items() if k not in ("status", "data_sha256")}
    attrs["summary"] = {**attrs["summary"], "call": "negative", "n_lesions": 0, "max_prob": 0.1, "tumour_area_mm2": 0.0}
    write_heatmap(store, hm.probs, hm.tissue, hm.grid, hm.mpp_xy, attrs, overwrite=True)
    with caplog.at_level("WARNING", logger="wsi_scan.view"):
        app = ViewerApp(results_folder)
    row = next(r for r in app.catalog()["slides"] if r["slide"] == "case2")
    finite = hm.probs[np.isfinite(hm.probs)]
    cell_um2 = hm.grid.l0_cell_size_xy[0] * hm.mpp_xy[0] * hm.grid.l0_cell_size_xy[1] * hm.mpp_xy[1]
    assert row["call"] == "micro" and row["n_lesions"] == 1
    assert row["max_prob"] == pytest.approx(float(finite.max()))
    assert row["tumour_area_mm2"] == pytest.approx(int((finite >= hm.threshold).sum()) * cell_um2 / 1e6)
    assert row["tissue_area_mm2"] == pytest.approx(int(hm.tissue.sum()) * cell_um2 / 1e6)
    assert "case2: its attrs give the call negative, its cells micro" in caplog.text
    with app.using(row["id"]) as op:  # the opened slide agrees with its row
        assert json.loads(op.meta)["call"] == "micro"


def test_static_files_skip_links(tmp_path, monkeypatch):
    import importlib

    pkg = tmp_path / "fakepkg"
    (pkg / "static").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "static" / "index.html").write_text("<html>")
    (pkg / "static" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text(SECRET)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr("wsi_scan.io.viewer_files.STATIC_PACKAGE", "fakepkg")
    assert static_files() == {"index.html": b"<html>"}


def png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_tiles_follow_the_level0_frame(painted_store):
    app = ViewerApp(painted_store)
    hm = open_heatmap(painted_store)
    dz = DeepZoom(SIZE_WH, 256)
    assert dz.max_level == 12 and dz.level_size(12) == SIZE_WH and dz.level_size(11) == (1500, 1200)
    assert dz.level_size(0) == (1, 1)
    # heatmap tile: every opaque pixel has the colour of the cell under its centre, checked
    # against the heatmap's own l0_to_cell (not the tiler's vectorised mapping)
    for level, col, row in ((12, 4, 3), (11, 2, 1), (9, 0, 0)):
        body = app.handle(f"/tiles/0/heat/{level}/{col}_{row}.png?t=0").body
        rgba = png(body)
        d = dz.downsample(level)
        rng = np.random.default_rng(level)
        for _ in range(200):
            y, x = (int(v) for v in rng.integers(0, rgba.shape[:2]))
            l0x, l0y = (col * 256 + x + 0.5) * d, (row * 256 + y + 0.5) * d
            try:
                r, c = hm.l0_to_cell(l0x, l0y)
            except IndexError:
                assert rgba[y, x, 3] == 0
                continue
            p = hm.probs[r, c]
            if not np.isfinite(p):
                assert rgba[y, x, 3] == 0
            else:
                assert rgba[y, x, 3] == 255
                assert tuple(rgba[y, x, :3]) == tuple(app.lut[int(np.rint(p * 255))])
    # threshold: cells below it are transparent
    hi = png(app.handle("/tiles/0/heat/12/4_3.png?t=0.6").body)
    assert (hi[..., 3] > 0).sum() < (png(app.handle("/tiles/0/heat/12/4_3.png?t=0").body)[..., 3] > 0).sum()
    # slide tile at full resolution: the painted tumour square where level 0 has it
    tx0, ty0, tx1, ty1 = TUMOUR[0]
    col, row = ((tx0 + tx1) // 2) // 256, ((ty0 + ty1) // 2) // 256
    rgb = np.asarray(Image.open(io.BytesIO(app.handle(f"/tiles/0/slide/12/{col}_{row}.jpeg").body)).convert("RGB"))
    y, x = (ty0 + ty1) // 2 - row * 256, (tx0 + tx1) // 2 - col * 256
    assert np.abs(rgb[y, x].astype(int) - TUMOUR_RGB).max() <= 12
    # every level serves, edge tiles are cut to the image, the coarsest come from the overview
    for level in range(dz.max_level + 1):
        nc, nr = dz.tile_count(level)
        img = Image.open(io.BytesIO(app.handle(f"/tiles/0/slide/{level}/{nc - 1}_{nr - 1}.jpeg").body))
        (_, _), (w, h) = dz.tile_box(level, nc - 1, nr - 1)
        assert img.size == (w, h)
    assert app.handle("/tiles/0/heat/12/0_0.png?t=2").status == 400
    assert app.handle("/tiles/0/heat/12/0_0.png?t=nan").status == 400


def test_probability_endpoint(painted_store):
    app = ViewerApp(painted_store)
    hm = open_heatmap(painted_store)
    x, y = 1000.0, 1200.0
    got = json.loads(app.handle(f"/api/slide/0/prob?x={x}&y={y}").body)
    r, c = hm.l0_to_cell(x, y)
    assert got["cell_rc"] == [r, c] and got["prob"] == pytest.approx(float(hm.probs[r, c]))
    off = json.loads(app.handle("/api/slide/0/prob?x=-5&y=10").body)
    assert off["cell_rc"] is None and off["prob"] is None
    assert app.handle("/api/slide/0/prob?x=inf&y=1").status == 400
    assert app.handle("/api/slide/0/prob?x=a&y=1").status == 400


def test_caches_are_bounded(results_folder):
    from wsi_scan.config import ViewConfig

    app = ViewerApp(results_folder, ViewConfig(max_open_slides=1, tile_cache_mib=1))
    for i in range(3):
        assert app.handle(f"/api/slide/{i}").status == 200
        for level in (10, 11, 12):
            assert app.handle(f"/tiles/{i}/slide/{level}/0_0.jpeg").status == 200
            assert app.handle(f"/tiles/{i}/heat/{level}/1_1.png?t=0.1").status == 200
        assert app.n_open == 1
        assert app.tiles.nbytes <= 1 << 20
        assert {k[0] for k in app.tiles._d} == {i}  # tiles of closed slides are dropped with them
    lru = ByteLRU(100)
    for k in range(10):
        lru.put(k, bytes(30))
    assert lru.nbytes <= 100 and len(lru) == 3 and lru.get(9) is not None and lru.get(0) is None
    lru.put("big", bytes(101))  # larger than the whole cache: not kept
    assert lru.get("big") is None


def test_evicted_slide_is_closed_only_once_idle(results_folder):
    from wsi_scan.config import ViewConfig

    app = ViewerApp(results_folder, ViewConfig(max_open_slides=1))
    closes: list[str] = []
    with app.using(0) as op0:
        real_close = op0.close
        op0.close = lambda: (closes.append("0"), real_close())[1]  # type: ignore[method-assign]
        with app.using(1):
            assert op0.evicted and closes == []  # still in use by the outer request
        assert closes == []
    assert closes == ["0"]


def test_tile_requests_are_served_in_parallel(scanned_store, serve, monkeypatch):
    """Two tile requests must be inside the renderer at the same time: with a barrier of two in
    the renderer, a server that handles one request at a time would break it (its timeout is
    a guard against a hang, not a measurement)."""
    barrier = threading.Barrier(2, timeout=30)
    real = tiles_mod.SlideTiles.tile_rgb

    def slow(self: Any, *a: Any) -> np.ndarray:
        barrier.wait()
        return real(self, *a)

    monkeypatch.setattr(tiles_mod.SlideTiles, "tile_rgb", slow)
    v = serve(scanned_store[1])
    assert raw_get(v.url, "/api/slide/0")[0] == 200
    results: list[int] = []
    ts = [threading.Thread(target=lambda c=c: results.append(raw_get(v.url, f"/tiles/0/slide/12/{c}_0.jpeg")[0])) for c in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert results == [200, 200] and not barrier.broken


def wait_for_waiters(lru: ByteLRU, n: int) -> None:
    """Until ``n`` threads wait on the value being made (a fixed sleep is a race on a loaded machine)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        making = list(lru._making.values())
        if making and len(making[0][0]._cond._waiters) >= n:  # type: ignore[attr-defined]
            return
        time.sleep(0.01)
    raise AssertionError(f"{n} waiters expected")


def test_one_cold_tile_asked_for_by_many_is_rendered_once(scanned_store, monkeypatch):
    """A burst of requests for the same tile (many tabs, a viewer's retries) waits for one
    render instead of each rendering it."""
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = tiles_mod.SlideTiles.tile_rgb

    def slow(self: Any, *a: Any) -> np.ndarray:
        calls.append(1)
        started.set()
        assert release.wait(30)
        return real(self, *a)

    monkeypatch.setattr(tiles_mod.SlideTiles, "tile_rgb", slow)
    app = ViewerApp(scanned_store[1])
    statuses: list[int] = []
    ts = [threading.Thread(target=lambda: statuses.append(app.handle("/tiles/0/slide/12/0_0.jpeg").status)) for _ in range(20)]
    for t in ts:
        t.start()
    assert started.wait(30)
    wait_for_waiters(app.tiles, 19)
    release.set()
    for t in ts:
        t.join(60)
    assert statuses == [200] * 20 and len(calls) == 1


def test_a_waiter_makes_the_value_when_the_maker_fails():
    lru = ByteLRU(1000)
    inside, go = threading.Event(), threading.Event()

    def failing() -> bytes:
        inside.set()
        assert go.wait(30)
        raise OSError("slide read failed")

    errors: list[BaseException] = []

    def first() -> None:
        try:
            lru.get_or_make("k", failing)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    got: list[bytes] = []
    w = threading.Thread(target=lambda: got.append(lru.get_or_make("k", lambda: b"ok")))
    w.start()
    wait_for_waiters(lru, 1)
    go.set()
    t.join(30)
    w.join(30)
    assert len(errors) == 1 and got == [b"ok"] and lru.get("k") == b"ok"
    # a value that may not be kept (its slide was closed meanwhile) is returned, not cached
    assert lru.get_or_make("n", lambda: b"x", keep=lambda: False) == b"x" and lru.get("n") is None


def test_waiters_get_the_value_even_when_the_cache_cannot_keep_it():
    lru = ByteLRU(0)  # tile_cache_mib 0: nothing is kept
    inside, go = threading.Event(), threading.Event()
    made: list[int] = []

    def slow() -> bytes:
        made.append(1)
        inside.set()
        assert go.wait(30)
        return b"tile"

    got: list[bytes] = []
    first = threading.Thread(target=lambda: got.append(lru.get_or_make("k", slow)))
    first.start()
    assert inside.wait(30)
    waiters = [threading.Thread(target=lambda: got.append(lru.get_or_make("k", slow))) for _ in range(5)]
    for t in waiters:
        t.start()
    wait_for_waiters(lru, 5)
    go.set()
    for t in [first, *waiters]:
        t.join(30)
    assert got == [b"tile"] * 6 and len(made) == 1 and len(lru) == 0


def test_connections_beyond_the_limit_are_answered_busy_not_given_a_thread(scanned_store, serve):
    import socket

    v = serve(scanned_store[1], max_connections=2)
    host, port = v.httpd.server_address[:2]
    idle = [socket.create_connection((host, port), timeout=30) for _ in range(2)]  # open, silent
    try:
        deadline = time.monotonic() + 30
        while v.httpd.slots._value > 0 and time.monotonic() < deadline:  # both accepted
            time.sleep(0.01)
        threads_before = threading.active_count()
        status, body = raw_get(v.url, "/api/catalog")
        assert status == 503 and b"too many open connections" in body
        assert threading.active_count() == threads_before
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while v.httpd.slots._value < 2 and time.monotonic() < deadline:  # their threads end with them
        time.sleep(0.01)
    assert raw_get(v.url, "/api/catalog")[0] == 200


def test_ctrl_c_just_after_a_connection_thread_starts_stops_the_server(monkeypatch):
    """Ctrl-C landing after a connection's thread started but before process_request returned:
    both threads released the connection's slot, the second release raised ValueError, and
    socketserver logged it as a failed connection and served on: the KeyboardInterrupt was lost
    and `wsi-scan view` did not stop (seen 2026-12-05 in the test of --host 0.0.0.0)."""
    import socket
    from http.server import BaseHTTPRequestHandler

    import wsi_scan.view.server as server_mod

    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def handle(self) -> None:
            done.set()

    class InterruptedStart(threading.Thread):
        def start(self) -> None:
            super().start()
            self.join(30)  # the connection served and its slot given back, then Ctrl-C
            raise KeyboardInterrupt

    httpd = server_mod._Server(("127.0.0.1", 0), Handler, max_connections=2)
    try:
        client = socket.create_connection(httpd.server_address[:2], timeout=30)
        request, address = httpd.get_request()
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(server_mod.threading, "Thread", InterruptedStart)  # the module's: undone at once
            httpd.process_request(request, address)
        assert done.is_set()
        assert httpd.slots._value == 2  # given back once, not twice (a BoundedSemaphore raises then)
        client.close()
    finally:
        httpd.server_close()


def test_slide_that_is_not_the_heatmaps_is_not_shown(scanned_store, tmp_path):
    """The heatmap names its slide; a different file at that path is refused (heatmap alone)."""
    from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide

    slide, store = scanned_store
    slide.unlink()
    write_synthetic_slide(slide, SyntheticSlide(size_wh=(1000, 800), mpp=0.243, tissue=((0, 0, 1000, 800),)))
    app = ViewerApp(store)
    meta = json.loads(app.handle("/api/slide/0").body)
    assert not meta["slide_available"] and "not the slide the heatmap was made from" in meta["slide_error"]
    assert app.handle("/tiles/0/slide/12/0_0.jpeg").status == 404
    assert app.handle("/tiles/0/heat/12/0_0.png").status == 200


def test_non_loopback_warning():
    assert non_loopback_warning("127.0.0.1") is None and non_loopback_warning("::1") is None
    assert non_loopback_warning("localhost") is None
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        w = non_loopback_warning(host)
        assert w is not None and "not a loopback address" in w


def test_cli_errors_are_one_line(tmp_path):
    code, _, err = run("view", tmp_path / "nope.zarr", "--no-browser")
    assert code == 7 and err.startswith("wsi-scan: error:") and len(err.strip().splitlines()) == 1
    (tmp_path / "f.txt").write_text("x")
    code, _, err = run("view", tmp_path / "f.txt", "--no-browser")
    assert code == 2 and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run("view", tmp_path / "empty", "--no-browser")
    assert code == 7 and "no heatmap store" in err
    code, _, err = run("view", tmp_path / "empty", "--port", "70000")
    assert code == 2 and "--port" in err


def _start_cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_scan", "view", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_cli_serves_until_interrupted(scanned_store):
    _, store = scanned_store
    proc = _start_cli(str(store), "--no-browser")
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        status, body = raw_get(url, "/api/catalog")
        assert status == 200 and json.loads(body)["slides"][0]["slide"] == "s"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err


def test_cli_stops_on_sigint_even_when_started_with_it_ignored(scanned_store):
    # a process started in the background by a non-interactive shell (CI, nohup ... &) inherits
    # SIGINT ignored; the viewer must still stop on it, and on SIGTERM
    _, store = scanned_store
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsi_scan", "view", str(store), "--no-browser"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert raw_get(url, "/api/catalog")[0] == 200
        finally:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in err, err


def test_cli_warns_on_a_non_loopback_address(scanned_store):
    _, store = scanned_store
    proc = _start_cli(str(store), "--no-browser", "--host", "0.0.0.0")
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert raw_get(url, "/api/catalog")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "wsi-scan: warning: --host 0.0.0.0 is not a loopback address" in err


def test_import_stays_light():
    code = "import sys, wsi_scan, wsi_scan.cli, wsi_scan.view; print([m for m in ('http.server', 'wsi_scan.view.server') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_zoomed_out_heatmap_keeps_the_highest_cell(scanned_store, tmp_path):
    """Where a tile pixel covers several cells it shows their highest probability, so a lone
    suspicious cell does not vanish from the overview; checked against a brute-force maximum."""
    from tests.view.conftest import odd_grid, paint_store

    _, src = scanned_store
    lone = (9, 13)

    def low(rows: int, cols: int) -> np.ndarray:
        p = np.full((rows, cols), 0.1, np.float32)
        p[lone] = 0.97
        return p

    store = paint_store(src, tmp_path / "lone.zarr", low, grid=odd_grid())
    app = ViewerApp(store)
    hm = open_heatmap(store)
    (ox, oy), (s, _) = hm.grid.l0_origin_xy, hm.grid.l0_cell_size_xy
    for level in (4, 3, 2):  # 256, 512 and 1024 level-0 px per pixel: 2-8 cells per pixel side
        d = 2 ** (12 - level)
        rgba = png(app.handle(f"/tiles/0/heat/{level}/0_0.png?t=0").body)
        h, w = rgba.shape[:2]
        for y in range(h):
            for x in range(w):
                # cells whose top-left corner lies in this pixel
                cs = [c for c in range(hm.grid.shape_rc[1]) if x * d <= ox + c * s < (x + 1) * d]
                rs = [r for r in range(hm.grid.shape_rc[0]) if y * d <= oy + r * s < (y + 1) * d]
                vals = hm.probs[np.ix_(rs, cs)] if rs and cs else np.array([])
                if vals.size == 0 or not np.isfinite(vals).any():
                    assert rgba[y, x, 3] == 0, (level, x, y)
                else:
                    assert rgba[y, x, 3] == 255
                    assert tuple(rgba[y, x, :3]) == tuple(app.lut[int(np.rint(np.nanmax(vals) * 255))]), (level, x, y)
        assert (rgba[..., :3] == app.lut[int(np.rint(0.97 * 255))]).all(axis=-1).sum() >= 1


def test_every_static_file_is_package_data():
    """A wheel carries the page and OpenSeadragon: each file of the static folder matches one of
    pyproject's package-data patterns (a file in a new subfolder would otherwise be left out)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["wsi_scan.view"]
    root = REPO / "wsi_scan" / "view"
    files = [p.relative_to(root).as_posix() for p in (root / "static").rglob("*") if p.is_file()]
    assert "static/openseadragon/openseadragon.min.js" in files and "static/openseadragon/LICENSE.txt" in files
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns), f
    assert set(static_files()) == {f.removeprefix("static/") for f in files}


def test_a_copied_results_folder_lists_each_slide_once_from_its_own_stores(results_folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(results_folder, copy)
    shutil.rmtree(results_folder)  # the summary's own paths now name nothing
    app = ViewerApp(copy)
    names = [r["slide"] for r in app.catalog()["slides"]]
    assert sorted(names) == sorted(set(names)) and len(names) == 4  # three stores and the failed file
    assert all(str(e.store).startswith(str(copy)) for e in app.entries) and len(app.entries) == 3


def test_a_client_gone_mid_response_is_not_a_traceback(capsys):
    from wsi_scan.view.server import _Server

    for exc in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"), TimeoutError()):
        try:
            raise exc
        except OSError:
            _Server.handle_error(None, None, ("127.0.0.1", 1))  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""
