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
