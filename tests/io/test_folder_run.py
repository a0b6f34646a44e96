"""The files of a folder run: slide listing, the mpp CSV, locks, debris, summaries."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_scan.errors import UsageError
from wsi_scan.io.folder_run import SlideLock, clean_debris, list_slides, read_mpp_csv, write_summary

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- listing


def test_listing_sorted_hidden_and_temp_ignored_recursive(tmp_path):
    d = tmp_path / "slides"
    for name in (
        "b.svs",
        "A.tif",
        "a.ndpi",
        ".hidden.svs",
        "~lock.svs",
        "x.tif.part",
        "readme.txt",
        "sub/c.tif",
        ".git/d.tif",
        "sub/deeper/e.SVS",
        "sub/.f.tmp-1.tif",
    ):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"x")
    (d / "out" / "g.tif").parent.mkdir(parents=True)
    (d / "out" / "g.tif").write_bytes(b"x")
    rel = [p.relative_to(d).as_posix() for p in list_slides(d, exclude=d / "out")]
    assert rel == ["A.tif", "a.ndpi", "b.svs"]
    rel = [p.relative_to(d).as_posix() for p in list_slides(d, recursive=True, exclude=d / "out")]
    assert rel == ["A.tif", "a.ndpi", "b.svs", "sub/c.tif", "sub/deeper/e.SVS"]

    # a pipe or a dangling link with a slide's name is listed, to fail by name; a folder is not
    os.mkfifo(d / "pipe.tif")
    (d / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    (d / "folder.tif").mkdir()
    rel = [p.relative_to(d).as_posix() for p in list_slides(d, exclude=d / "out")]
    assert rel == ["A.tif", "a.ndpi", "b.svs", "gone.svs", "pipe.tif"]


# ----------------------------------------------------------------------------- the mpp CSV


def test_mpp_csv_header_bom_blank_rows_and_windows_paths(tmp_path):
    p = tmp_path / "mpp.csv"
    # spreadsheet exports: a byte-order mark, capitals and spaces in the header, blank rows
    p.write_text("\ufeff Slide , MPP \nsub\\a.tif, 0.25\n,\nb.svs,0.5\n", encoding="utf-8")
    assert read_mpp_csv(p) == {"sub/a.tif": 0.25, "b.svs": 0.5}
    p.write_text("slide,mpp\na.tif,0.25\na.tif,0.25\n", encoding="utf-8")
    assert read_mpp_csv(p) == {"a.tif": 0.25}  # a repeated row that agrees is harmless


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name,um\na.tif,0.5\n", "expected columns slide,mpp, found name,um"),
        ("", "found no header"),
        ("slide,mpp\na.tif,0\n", "line 2: mpp must be a number of um/px from 0.05 to 50"),
        ("slide,mpp\na.tif,0.5\nb.tif,nan\n", "line 3: mpp must be a number"),
        ("slide,mpp\na.tif,1e9\n", "line 2: mpp must be a number of um/px from 0.05 to 50"),
        ("slide,mpp\na.tif,0.5\nb.tif,0.5\na.tif,0.25\n", r"a.tif is given two pixel sizes, 0.5 \(line 2\) and 0.25 \(line 4\)"),
    ],
)
def test_bad_mpp_csv_is_a_usage_error(tmp_path, text, match):
    p = tmp_path / "mpp.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=match):
        read_mpp_csv(p)


def test_mpp_csv_that_is_missing_or_binary_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_mpp_csv(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UsageError, match="not a readable text file"):
        read_mpp_csv(tmp_path / "bin.csv")


# ----------------------------------------------------------------------------- locks and debris


def test_lock_of_a_killed_process_is_free(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from pathlib import Path; from wsi_scan.io.folder_run import SlideLock; "
        f"l = SlideLock(Path({str(out)!r}), 'a.tif'); assert l.acquire(False); print('held', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        assert SlideLock(out, "a.tif").acquire(blocking=False) is False
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        lock = SlideLock(out, "a.tif")
        assert lock.acquire(blocking=False)  # the kernel dropped the dead holder's lock
        lock.release()
    finally:
        if p.poll() is None:
            p.kill()


def test_locks_of_similar_names_are_distinct_and_release_removes_the_file(tmp_path):
    a, b = SlideLock(tmp_path, "a/b.tif"), SlideLock(tmp_path, "a__b.tif")
    assert a.path != b.path
    assert a.acquire(blocking=False) and b.acquire(blocking=False)
    assert a.path.read_text().split()[0].isdigit()
    a.release()
    b.release()
    assert not a.path.exists() and not b.path.exists()


def test_clean_debris_removes_only_temporary_stores_of_that_output(tmp_path):
    out = tmp_path / "s.zarr"
    (tmp_path / ".s.zarr.tmp-1-ab").mkdir()
    (tmp_path / ".s.zarr.old-2-cd").write_bytes(b"x")
    keep = [tmp_path / ".t.zarr.tmp-1-ab", tmp_path / ".s.zarr.partial.npz", out]
    keep[0].mkdir()
    keep[1].write_bytes(b"x")
    out.mkdir()
    removed = clean_debris(out)
    assert sorted(p.name for p in removed) == [".s.zarr.old-2-cd", ".s.zarr.tmp-1-ab"]
    assert all(p.exists() for p in keep) and not any(p.exists() for p in removed)


# ----------------------------------------------------------------------------- summaries


def test_summary_files_write_none_as_empty_and_carry_the_mark(tmp_path):
    rows = [{"slide": "a.tif", "status": "ok", "max_prob": 0.5}, {"slide": "b.tif", "status": "failed", "max_prob": None}]
    csv_path, json_path = write_summary(tmp_path, ["slide", "status", "max_prob"], rows, {"counts": {"ok": 1}})
    with csv_path.open(newline="") as fh:
        assert list(csv.DictReader(fh)) == [
            {"slide": "a.tif", "status": "ok", "max_prob": "0.5"},
            {"slide": "b.tif", "status": "failed", "max_prob": ""},
        ]
    js = json.loads(json_path.read_text())
    assert js == {"generator": "wsi-scan", "counts": {"ok": 1}, "slides": rows}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_slide_deep_in_long_folder_names_gets_a_lock(tmp_path):
    """The lock's name joined the relative path's folders: two folder names of 130 bytes made it
    too long for the file system, and the slide failed with "check that OUT_DIR is writable"
    (2026-12-05)."""
    rel = "d" * 130 + "/" + "e" * 130 + "/s.tif"
    lock = SlideLock(tmp_path, rel)
    assert lock.acquire(False)
    assert len(lock.path.name.encode()) <= 255 and lock.path.name.startswith("d" * 100)
    other = SlideLock(tmp_path, "d" * 130 + "/" + "e" * 130 + "/t.tif")  # cut alike, told apart by the hash
    assert other.path != lock.path and other.acquire(False)
    other.release()
    lock.release()
