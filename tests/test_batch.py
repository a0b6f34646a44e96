"""Folder runs: resume, contained failures, mpp CSV, report, locks, Dask, crash safety.

Slides are tiny (1200 x 1000 px at 0.5 um/px) so a scan takes well under a second; the
subprocess tests use the bundled model because the mock model lives only in memory.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_scan.batch import SlideJob, process_slide, scan_folder
from wsi_scan.cli import main
from wsi_scan.config import ScanConfig
from wsi_scan.io.folder_run import SlideLock
from wsi_scan.io.heatmap import open_heatmap, read_attrs
from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
TISSUE = ((100, 100, 1100, 900),)


def small_slide(path: Path, i: int = 0, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = dict(size_wh=(1200, 1000), mpp=0.5, tissue=TISSUE, tumour=((300 + 60 * i, 300, 600 + 60 * i, 600),), seed=i)
    spec.update(kw)
    return write_synthetic_slide(path, SyntheticSlide(**spec))  # type: ignore[arg-type]


def mixed_folder(d: Path) -> Path:
    """Two good slides, a truncated one, a text file named .svs, a zero-byte slide, a slide
    without mpp, and files that are not slides."""
    small_slide(d / "a.tif", 0)
    small_slide(d / "b.tif", 1)
    small_slide(d / "nompp.tif", 2, resolution_unit=None)
    full = small_slide(d / "cut.tif", 3).read_bytes()
    (d / "cut.tif").write_bytes(full[: len(full) // 2])  # truncated mid-file, as by a failed copy
    (d / "text.svs").write_text("this is not a slide\n")
    (d / "zero.tif").write_bytes(b"")
    (d / ".hidden.tif").write_bytes(b"")
    (d / "copying.tif.part").write_bytes(b"")
    (d / "notes.txt").write_text("ignored")
    return d


def probs(path: Path) -> np.ndarray:
    return open_heatmap(path).probs


def mark_incomplete(store: Path) -> None:
    """Make a store look like one whose writer died before setting status "complete"."""
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    meta: dict[str, Any] = dict(g.attrs["wsi_scan"])  # type: ignore[arg-type]
    meta["status"] = "writing"
    g.attrs["wsi_scan"] = meta


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open(newline="") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


# ----------------------------------------------------------------------------- the library


def test_mixed_folder_contains_failures_and_resumes(tmp_path, mock_model):
    slides, out = mixed_folder(tmp_path / "slides"), tmp_path / "out"
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    st = {o.slide: o for o in res.outcomes}
    assert sorted(st) == ["a.tif", "b.tif", "cut.tif", "nompp.tif", "text.svs", "zero.tif"]
    assert (st["cut.tif"].status, st["cut.tif"].error_type) == ("failed", "SlideFormatError")
    assert st["a.tif"].status == st["b.tif"].status == "ok"
    assert (st["nompp.tif"].status, st["nompp.tif"].error_type) == ("failed", "MppError")
    assert "--mpp" in st["nompp.tif"].error
    assert (st["text.svs"].status, st["text.svs"].error_type) == ("failed", "SlideFormatError")
    assert (st["zero.tif"].status, st["zero.tif"].error_type) == ("failed", "SlideFormatError")
    assert (res.n_ok, res.n_failed, res.n_skipped) == (2, 4, 0)
    for name in ("a", "b"):
        assert read_attrs(out / f"{name}.zarr")["status"] == "complete"  # type: ignore[index]
    assert not (out / "text.zarr").exists() and not (out / "nompp.zarr").exists()

    rows = read_summary(out)
    a = rows["a.tif"]
    assert a["status"] == "ok" and float(a["tumour_area_mm2"]) > 0 and float(a["tissue_area_mm2"]) > 0
    assert float(a["max_prob"]) > 0.85 and 0 < float(a["mean_prob"]) < 1
    assert float(a["mpp"]) == 0.5 and a["mpp_source"]
    assert float(a["seconds_scan"]) >= 0 and float(a["cells_per_s"]) > 0
    assert rows["zero.tif"]["error_type"] == "SlideFormatError" and rows["zero.tif"]["error"]
    js = json.loads((out / "summary.json").read_text())
    assert js["counts"] == {"ok": 2, "skipped": 0, "failed": 4} and len(js["slides"]) == 6
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<script>" in page and "http" not in page.replace("http-equiv", "")
    assert "2 ok, 0 skipped, 4 failed" in (out / "wsi-scan.log").read_text()

    before = {n: probs(out / f"{n}.zarr") for n in ("a", "b")}
    mtime = (out / "a.zarr" / "zarr.json").stat().st_mtime_ns
    res2 = scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert [o.status for o in res2.outcomes] == ["skipped", "skipped", "failed", "failed", "failed", "failed"]
    assert (out / "a.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    skipped = {o.slide: o for o in res2.outcomes}["a.tif"]
    assert skipped.tumour_area_mm2 == st["a.tif"].tumour_area_mm2  # the report still shows its scores

    # the mpp file rescues the slide without mpp; matched by file name
    (tmp_path / "mpp.csv").write_text("slide,mpp\nnompp.tif,0.5\nnot-there.svs,0.25\n")
    res3 = scan_folder(slides, out, ScanConfig(), model=mock_model, mpp_csv=tmp_path / "mpp.csv")
    st3 = {o.slide: o for o in res3.outcomes}
    assert st3["nompp.tif"].status == "ok" and st3["nompp.tif"].mpp == 0.5
    assert st3["nompp.tif"].mpp_source == "user (--mpp-csv, row nompp.tif)"
    assert st3["a.tif"].status == "skipped"
    np.testing.assert_array_equal(probs(out / "a.zarr"), before["a"])


def test_stale_incomplete_and_overwrite_are_redone(tmp_path, mock_model):
    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "a.tif", 0)
    small_slide(slides / "b.tif", 1)
    scan_folder(slides, out, ScanConfig(), model=mock_model)
    ref = probs(out / "b.zarr")
    # stale: another setting that changes the numbers -> a new settings_hash
    res = scan_folder(slides, out, ScanConfig(tta=True), model=mock_model)
    assert [o.status for o in res.outcomes] == ["ok", "ok"]
    # settings that do not change the numbers keep the results
    res = scan_folder(slides, out, ScanConfig(tta=True, threads=1, block_cells=32), model=mock_model)
    assert [o.status for o in res.outcomes] == ["skipped", "skipped"]
    mark_incomplete(out / "b.zarr")
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert [o.status for o in res.outcomes] == ["ok", "ok"]
    np.testing.assert_array_equal(probs(out / "b.zarr"), ref)
    res = scan_folder(slides, out, ScanConfig(overwrite=True), model=mock_model)
    assert [o.status for o in res.outcomes] == ["ok", "ok"]
    # a slide replaced by another file under the same name
    small_slide(slides / "a.tif", 5, size_wh=(1300, 1000))
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert [o.status for o in res.outcomes] == ["ok", "skipped"]
    assert "changed size" in (out / "wsi-scan.log").read_text()


def test_recursive_layout_and_mpp_csv_by_relative_path(tmp_path, mock_model):
    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "x" / "s.tif", 0, resolution_unit=None)
    small_slide(slides / "y" / "s.tif", 1, resolution_unit=None)
    (tmp_path / "mpp.csv").write_text("slide,mpp\nx/s.tif,0.5\ns.tif,0.48\n")
    res = scan_folder(slides, out, ScanConfig(), model=mock_model, recursive=True, mpp_csv=tmp_path / "mpp.csv")
    assert [(o.slide, o.status, o.mpp) for o in res.outcomes] == [("x/s.tif", "ok", 0.5), ("y/s.tif", "ok", 0.48)]
    assert (out / "x" / "s.zarr").is_dir() and (out / "y" / "s.zarr").is_dir()


def test_outputs_that_would_clash_fail_the_second_slide(tmp_path, mock_model):
    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "s.tif", 0)
    small_slide(slides / "s.tiff", 1)
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert [(o.slide, o.status) for o in res.outcomes] == [("s.tif", "ok"), ("s.tiff", "failed")]
    assert "rename" in res.outcomes[1].error


@pytest.mark.parametrize("exc", [MemoryError("cannot allocate 9 GiB"), RuntimeError("boom"), KeyError("x")])
def test_unexpected_errors_and_memory_errors_are_contained(tmp_path, mock_model, monkeypatch, exc):
    import wsi_scan.scan as scan_mod

    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "a.tif", 0)
    small_slide(slides / "b.tif", 1)
    real = scan_mod.scan_slide

    def flaky(slide_path, *a, **kw):
        if Path(slide_path).name == "a.tif":
            raise exc
        return real(slide_path, *a, **kw)

    monkeypatch.setattr(scan_mod, "scan_slide", flaky)
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    a, b = res.outcomes
    assert (a.status, a.error_type, b.status) == ("failed", type(exc).__name__, "ok")
    if isinstance(exc, MemoryError):
        assert "out of memory" in a.error and "--block-cells" in a.error
    assert not (out / "a.zarr").exists()


def test_bad_run_arguments_are_usage_errors(tmp_path, mock_model):
    from wsi_scan.errors import UsageError

    slides = tmp_path / "slides"
    small_slide(slides / "a.tif", 0)
    (tmp_path / "bad.csv").write_text("name,um\na.tif,0.5\n")
    with pytest.raises(UsageError, match="slide,mpp"):
        scan_folder(slides, tmp_path / "out", model=mock_model, mpp_csv=tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("slide,mpp\na.tif,-1\n")
    with pytest.raises(UsageError, match="line 2: mpp must be a number of um/px from 0.05"):
        scan_folder(slides, tmp_path / "out", model=mock_model, mpp_csv=tmp_path / "bad2.csv")
    with pytest.raises(UsageError, match="not a folder"):
        scan_folder(tmp_path / "nope", tmp_path / "out", model=mock_model)
    with pytest.raises(UsageError, match="slides folder itself"):
        scan_folder(slides, slides, model=mock_model)


# ----------------------------------------------------------------------------- locks


def test_locked_slide_is_left_to_its_holder_then_resumed(tmp_path, mock_model):
    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "a.tif", 0)
    job = SlideJob(str(slides / "a.tif"), "a.tif", str(out / "a.zarr"), str(out), ScanConfig())
    held = SlideLock(out, "a.tif")
    assert held.acquire(blocking=False)
    assert SlideLock(out, "a.tif").acquire(blocking=False) is False
    o = process_slide(job, mock_model)
    assert o.status == "busy" and str(os.getpid()) in o.error and not (out / "a.zarr").exists()
    held.release()
    assert process_slide(job, mock_model).status == "ok"


# ----------------------------------------------------------------------------- the command line


def run_cli(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stderr


def test_cli_exit_codes(tmp_path):
    good = tmp_path / "good"
    small_slide(good / "a.tif", 0)
    code, err = run_cli(good, "--out", tmp_path / "o1", "--quiet")
    assert code == 0, err
    assert (tmp_path / "o1" / "a.zarr").is_dir() and (tmp_path / "o1" / "report.html").is_file()
    mixed = mixed_folder(tmp_path / "mixed")
    code, err = run_cli(mixed, "--out", tmp_path / "o2", "--quiet")
    lines = err.strip().splitlines()
    assert code == 8 and len(lines) == 1 and lines[0].startswith("wsi-scan: error: 4 of 6 slides failed"), err
    (tmp_path / "bad.csv").write_text("x,y\n")
    code, err = run_cli(good, "--out", tmp_path / "o3", "--quiet", "--mpp-csv", tmp_path / "bad.csv")
    assert code == 2 and "slide,mpp" in err and "Traceback" not in err
    code, err = run_cli(good / "a.tif", "--out", tmp_path / "x.zarr", "--workers", "2")
    assert code == 2 and "folder" in err
    code, err = run_cli(good, "--out", tmp_path / "o4", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2 and "not both" in err


# ----------------------------------------------------------------------------- processes


def cli_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "wsi_scan", *[str(a) for a in args], "--quiet", "--threads", "1"]


def env() -> dict[str, str]:
    # one torch thread per process: the tests run beside other work on few cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    slides = tmp_path / "slides"
    for i in range(4):
        small_slide(slides / f"s{i}.tif", i)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(cli_cmd(slides, "--out", ref), check=True, env=env(), cwd=tmp_path, timeout=300)

    p = subprocess.Popen(cli_cmd(slides, "--out", out), env=env(), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None and not (out / "s0.zarr").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    # whatever the kill left: a store at a final name is complete, never half-written
    for z in out.glob("*.zarr"):
        assert read_attrs(z)["status"] == "complete"  # type: ignore[index]
    # and what a kill inside the writer leaves: a temporary store, and a final store that never
    # got its "complete" status (as an older, non-atomic writer would leave it)
    shutil.copytree(ref / "s2.zarr", out / ".s2.zarr.tmp-99999-deadbeef")
    shutil.rmtree(out / "s3.zarr", ignore_errors=True)
    shutil.copytree(ref / "s3.zarr", out / "s3.zarr")
    mark_incomplete(out / "s3.zarr")

    r = subprocess.run(cli_cmd(slides, "--out", out), env=env(), cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for i in range(4):
        np.testing.assert_array_equal(probs(out / f"s{i}.zarr"), probs(ref / f"s{i}.zarr"))
        assert read_attrs(out / f"s{i}.zarr")["status"] == "complete"  # type: ignore[index]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert read_summary(out)["s3.tif"]["status"] == "ok"


@pytest.mark.slow
def test_two_concurrent_runs_share_the_work_without_corruption(tmp_path):
    slides = tmp_path / "slides"
    for i in range(4):
        small_slide(slides / f"s{i}.tif", i)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(cli_cmd(slides, "--out", ref), check=True, env=env(), cwd=tmp_path, timeout=300)
    procs = [
        subprocess.Popen(cli_cmd(slides, "--out", out), env=env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in range(4):
        np.testing.assert_array_equal(probs(out / f"s{i}.zarr"), probs(ref / f"s{i}.zarr"))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    # each slide was scanned by exactly one of the runs (the other found it done)
    log = (out / "wsi-scan.log").read_text()
    for i in range(4):
        assert log.count(f"s{i}.tif: ok") == 1, log


@pytest.mark.slow
def test_local_cluster_of_two_processes_equals_serial(tmp_path):
    from distributed import Client, LocalCluster

    slides = tmp_path / "slides"
    for i in range(3):
        small_slide(slides / f"s{i}.tif", i)
    # the serial reference runs with one OpenMP thread, as Dask's nannies start their workers:
    # torch's CPU kernels differ in the last bit between OpenMP configurations
    subprocess.run(cli_cmd(slides, "--out", tmp_path / "serial"), check=True, env=env(), cwd=tmp_path, timeout=300)
    r = subprocess.run(
        cli_cmd(slides, "--out", tmp_path / "cli", "--workers", "2"),
        env=env(),
        cwd=tmp_path,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        res = scan_folder(slides, tmp_path / "dask", ScanConfig(threads=1), scheduler_address=cluster.scheduler_address)
        with Client(cluster) as client:
            cached = client.run(lambda: len(__import__("wsi_scan.batch").batch._MODEL_CACHE))
        # each worker loaded the model once, by path, for all the slides it scanned
        assert all(n <= 1 for n in cached.values()) and sum(cached.values()) >= 1, cached
        # a slide held by another run is left for later, then done once its lock is free
        held = SlideLock(tmp_path / "busy", "s1.tif")
        assert held.acquire(blocking=False)
        threading.Timer(2.0, held.release).start()
        busy = scan_folder(slides, tmp_path / "busy", ScanConfig(threads=1), scheduler_address=cluster.scheduler_address)
        assert [o.status for o in busy.outcomes] == ["ok"] * 3
        assert "s1.tif: locked by another run" in (tmp_path / "busy" / "wsi-scan.log").read_text()
    assert [o.status for o in res.outcomes] == ["ok"] * 3
    for i in range(3):
        ref = probs(tmp_path / "serial" / f"s{i}.zarr")
        np.testing.assert_array_equal(probs(tmp_path / "dask" / f"s{i}.zarr"), ref)
        np.testing.assert_array_equal(probs(tmp_path / "cli" / f"s{i}.zarr"), ref)
    assert read_summary(tmp_path / "cli")["s1.tif"]["status"] == "ok"


def test_report_fallback_thumbnail_without_overlay_renderer(tmp_path, mock_model):
    from wsi_scan.report import heatmap_thumbnail

    slides, out = tmp_path / "slides", tmp_path / "out"
    small_slide(slides / "a.tif", 0)
    scan_folder(slides, out, ScanConfig(), model=mock_model, report=False)
    assert not (out / "report.html").exists()
    on_slide = heatmap_thumbnail(out / "a.zarr", str(slides / "a.tif"), max_px=100)
    alone = heatmap_thumbnail(out / "a.zarr", None, max_px=100)
    assert on_slide.shape == alone.shape and max(on_slide.shape[:2]) == 100 and on_slide.dtype == np.uint8


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian chromium (scripts/check_report.sh installs it)")
def test_report_renders_and_sorts_in_headless_chromium(tmp_path):
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_report.sh"), "", str(tmp_path / "report.png")],
        env={**env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sorted by tumour area" in r.stdout and (tmp_path / "report.png").stat().st_size > 10_000


def test_workers_get_the_bundled_model_a_name_means_not_a_file_of_that_name(tmp_path, monkeypatch):
    from wsi_scan.batch import _model_ref
    from wsi_scan.io.model_files import bundled_models

    monkeypatch.chdir(tmp_path)
    assert _model_ref("accurate", client=None) == str(bundled_models()["accurate"].resolve())
    assert _model_ref("./accurate", client=None) == str((tmp_path / "accurate").resolve())


def test_mpp_csv_rows_that_match_no_slide_are_said_on_the_console(tmp_path):
    """A row meant for a slide whose recorded pixel size is wrong, with the name in another case,
    left that size in use; the warning went to wsi-scan.log only (2026-12-05)."""
    good = tmp_path / "good"
    small_slide(good / "a.tif", 0)
    (tmp_path / "mpp.csv").write_text("slide,mpp\nA.TIF,0.25\n")
    code, err = run_cli(good, "--out", tmp_path / "o", "--quiet", "--mpp-csv", tmp_path / "mpp.csv")
    assert code == 0, err
    assert "wsi-scan: warning: --mpp-csv: 1 row(s) match no slide of the folder and are not used (A.TIF)" in err
    assert "1 row(s) match no slide" in (tmp_path / "o" / "wsi-scan.log").read_text()


def test_a_folder_run_refuses_one_slides_roi_or_tissue_mask(tmp_path, mock_model):
    """--roi and --tissue-mask were applied to every slide of a folder: each other slide was cut
    to the first one's region (a mask of the same aspect ratio was taken as its own), and the run
    ended with 0 (2026-12-05)."""
    from wsi_scan.batch import scan_folder
    from wsi_scan.errors import UsageError

    slides = tmp_path / "slides"
    small_slide(slides / "a.tif", 0)
    (tmp_path / "roi.geojson").write_text('{"type": "Polygon", "coordinates": [[[0, 0], [99, 0], [99, 99], [0, 0]]]}')
    for cfg, flag in (
        (ScanConfig(roi=str(tmp_path / "roi.geojson")), "--roi describes one slide"),
        (ScanConfig(tissue_mask=str(tmp_path / "m.png")), "--tissue-mask describes one slide"),
    ):
        with pytest.raises(UsageError, match=flag):
            scan_folder(slides, tmp_path / "out", cfg, model=mock_model)
    assert not (tmp_path / "out").exists()
