"""Output paths: what may be replaced, and what killed writers leave."""

from __future__ import annotations

import os
import subprocess
import sys

from wsi_scan.io.outputs import remove_stale_temps


def test_the_temporary_files_of_killed_writers_are_removed_and_no_other(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = tmp_path / f".p.h5.tmp-{int(dead.stdout)}-9c7e314c"
    mine = tmp_path / f".p.h5.tmp-{os.getpid()}-0123abcd"
    alive = tmp_path / ".p.h5.tmp-1-0123abcd"  # pid 1 is always running
    user = tmp_path / ".p.h5.tmp-notes"
    other = tmp_path / f".q.h5.tmp-{int(dead.stdout)}-9c7e314c"
    for p in (gone, mine, alive, user, other):
        p.write_text("x")
    assert remove_stale_temps(tmp_path / "p.h5") == [gone]
    assert {p.name for p in tmp_path.iterdir()} == {mine.name, alive.name, user.name, other.name}


def test_the_temporary_store_of_a_killed_scan_is_removed_by_the_next_write(tmp_path):
    import numpy as np

    from wsi_scan.geometry import GridGeometry
    from wsi_scan.io.heatmap import write_heatmap

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    left = tmp_path / f".h.zarr.tmp-{int(dead.stdout)}-9c7e314c"
    (left / "0").mkdir(parents=True)
    (left / "0" / "zarr.json").write_text("{}")
    link = tmp_path / f".h.zarr.tmp-{int(dead.stdout)}-0123abcd"
    link.symlink_to(tmp_path / "elsewhere")  # a link is never followed or removed
    g = GridGeometry((0, 0), (128.0, 128.0), (3, 4), 32, 96, 0.972)
    write_heatmap(tmp_path / "h.zarr", np.full((3, 4), 0.5), np.ones((3, 4), bool), g, (0.25, 0.25), {"slide": {"name": "s"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["h.zarr", link.name])


def test_an_output_set_that_fails_part_way_leaves_none_of_its_files(tmp_path):
    import json

    import pytest

    from wsi_scan.errors import OutputWriteError
    from wsi_scan.io.outputs import output_set

    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    user = tmp_path / "user.json"
    user.write_text("{}")  # a user's file of a set's name is never removed (not wsi-scan's)
    with (
        pytest.raises(
            OutputWriteError, match=r"disk full \(the evaluation's files written before it were removed: a.json, b.json\)"
        ),
        output_set([a, b, c, user], "evaluation"),
    ):
        for p in (a, b):
            p.write_text(json.dumps({"generator": "wsi-scan test"}))
        raise OutputWriteError("cannot write c.json: disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.json"]
    with pytest.raises(KeyboardInterrupt), output_set([a], "evaluation"):  # interrupted: removed too, not reworded
        a.write_text(json.dumps({"generator": "wsi-scan test"}))
        raise KeyboardInterrupt
    assert not a.exists()
    with output_set([a], "evaluation"):
        a.write_text(json.dumps({"generator": "wsi-scan test"}))
    assert a.exists()


def test_an_output_name_too_long_for_its_hidden_files_is_refused_before_any_work(tmp_path):
    """A 245-byte --out was accepted, scanned, then the file system's "File name too long" for
    its hidden .NAME.partial.npz escaped as a traceback (2026-12-05)."""
    import pytest

    from wsi_scan.errors import UsageError
    from wsi_scan.io.outputs import MAX_OUT_NAME_BYTES, prepare_parent

    prepare_parent(tmp_path / ("é" * (MAX_OUT_NAME_BYTES // 2 - 3) + ".zarr"))  # 199 bytes: fits
    with pytest.raises(UsageError, match=r"its name is 245 bytes long.*at most 200 bytes"):
        prepare_parent(tmp_path / ("L" * 240 + ".zarr"))
    with pytest.raises(UsageError, match="its name is 201 bytes long"):
        prepare_parent(tmp_path / ("é" * 98 + ".zarr"))  # 103 characters, counted in bytes, as the file system does
    assert not list(tmp_path.iterdir())
