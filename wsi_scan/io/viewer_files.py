"""What the viewer (``view/``) reads from disk besides slides and heatmaps: the heatmap stores of
a results folder, its summary.json, and the viewer's own static files shipped in the package.

Nothing here maps a URL to a path: the server looks names up in what these functions return at
start-up, so a request can only ever reach a file listed here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import HeatmapError, UsageError
from .outputs import is_heatmap_store

STATIC_PACKAGE = "wsi_scan.view"
STATIC_DIR = "static"
MAX_STATIC_BYTES = 16 << 20  # the whole static folder is held in memory: a sanity bound


def find_stores(folder: Path) -> list[Path]:
    """Heatmap stores under a results folder, sorted; symlinks are not followed (a link in a
    results folder could otherwise pull any store, or any folder, into what is served)."""
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(folder, followlinks=False):
        keep = []
        for d in sorted(dirnames):
            p = Path(dirpath) / d
            if d.startswith(".") or p.is_symlink():
                continue  # hidden (temporary stores being written) or a link: never served
            if d.endswith(".zarr") and is_heatmap_store(p):
                found.append(p)
            else:
                keep.append(d)
        dirnames[:] = keep  # do not descend into stores
    return sorted(found)


def read_summary_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """A folder run's summary.json rows by the resolved path of their heatmap store ({} without one)."""
    p = folder / "summary.json"
    if p.is_symlink() or not p.is_file():
        return {}
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    rows = obj.get("slides") if isinstance(obj, dict) else None
    out: dict[str, dict[str, Any]] = {}
    from .folder_run import output_path

    for r in rows if isinstance(rows, list) else []:
        # where this folder keeps the slide's store: the row's own "out" is relative to where the
        # scan ran, so in a moved or copied folder it names another store (or none)
        if isinstance(r, dict) and isinstance(r.get("slide"), str) and r["slide"]:
            out[os.path.realpath(output_path(folder, Path(r["slide"])))] = r
    return out


def viewer_sources(path: str | Path) -> tuple[str, list[Path], dict[str, dict[str, Any]]]:
    """("store" or "folder", heatmap stores, summary rows) of what ``wsi-scan view PATH`` was given."""
    p = Path(path)
    if not p.exists():
        raise HeatmapError(f"{p} does not exist; expected a heatmap store (.zarr) or a results folder of a folder scan")
    if is_heatmap_store(p):
        return "store", [p], {}
    if not p.is_dir():
        raise UsageError(f"{p} is a file; expected a heatmap store (.zarr) or a results folder of a folder scan")
    stores = find_stores(p)
    if not stores:
        raise HeatmapError(
            f"{p}: no heatmap store in this folder; expected a heatmap store (.zarr) or a results folder written by a folder scan"
        )
    return "folder", stores, read_summary_rows(p)


def static_files() -> dict[str, bytes]:
    """The viewer's static files by their name relative to the static folder ("viewer.js",
    "openseadragon/openseadragon.min.js"...), read once: regular files only, links skipped."""
    from importlib import resources

    root = resources.files(STATIC_PACKAGE) / STATIC_DIR
    files: dict[str, bytes] = {}
    total = 0

    def walk(node: Any, prefix: str) -> None:
        nonlocal total
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.name.startswith("."):
                continue
            if isinstance(child, Path) and child.is_symlink():
                continue
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif child.is_file():
                data = child.read_bytes()
                total += len(data)
                if total > MAX_STATIC_BYTES:
                    raise UsageError("the viewer's static folder is larger than expected; reinstall wsi-scan")
                files[name] = data

    walk(root, "")
    return files
