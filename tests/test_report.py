"""report.html (issue 14): the viewer command per slide and for the cohort, the call with its
lesions, and thumbnails reused from the previous report while nothing they show changed."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import pytest

from tests.test_batch import small_slide
from wsi_scan import report as report_mod
from wsi_scan.batch import scan_folder
from wsi_scan.config import ScanConfig


@pytest.fixture
def run_dir(tmp_path, mock_model):
    slides, out = tmp_path / "slides dir", tmp_path / "out"
    for i in range(2):
        small_slide(slides / f"s{i}.tif", i)
    res = scan_folder(slides, out, ScanConfig(), model=mock_model, report=False)
    return res


@pytest.fixture
def renders(monkeypatch):
    calls: list[str] = []
    real = report_mod.thumbnail_data_uri

    def counted(heatmap_path, slide_path, max_px=report_mod.THUMB_PX):
        calls.append(str(heatmap_path))
        return real(heatmap_path, slide_path, max_px)

    monkeypatch.setattr(report_mod, "thumbnail_data_uri", counted)
    return calls


def imgs(page: str) -> list[str]:
    return re.findall(r'<img data-key="[0-9a-f]{64}"[^>]*? src="([^"]+)"', page)


def test_report_links_each_slide_and_the_cohort_to_the_viewer(run_dir):
    out = run_dir.out_dir
    outcomes = list(run_dir.outcomes)
    outcomes[1] = dataclasses.replace(outcomes[1], call="micro", n_lesions=2, largest_lesion_mm=0.5)
    page = report_mod.write_report(out, outcomes, {"out_dir": str(out)}).read_text()
    for o in outcomes:
        assert f"wsi-scan view {shlex.quote(o.out)}" in page.replace("&#x27;", "'")
    assert f"wsi-scan view {shlex.quote(str(out))}" in page.replace("&#x27;", "'")  # the whole cohort
    assert 'micro<div class="lesions">2 lesions, largest 0.50 mm</div>' in page
    assert page.count('class="lesions"') == 1  # a slide without lesions shows its call alone


def test_thumbnails_are_rendered_only_when_what_they_show_changed(run_dir, renders):
    out = run_dir.out_dir
    outcomes = list(run_dir.outcomes)
    meta = {"out_dir": str(out)}
    first = report_mod.write_report(out, outcomes, meta).read_text()
    assert len(renders) == 2 and len(imgs(first)) == 2
    second = report_mod.write_report(out, outcomes, meta).read_text()
    assert len(renders) == 2  # nothing rendered again
    assert imgs(second) == imgs(first)
    # the slide file changed (modification time): its thumbnail only is rendered again
    st = os.stat(outcomes[0].path)
    os.utime(outcomes[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report_mod.write_report(out, outcomes, meta)
    assert renders[2:] == [outcomes[0].out]
    # a report that is not wsi-scan's is never read back
    (out / "report.html").write_text(first.replace("wsi-scan", "someone else"))
    report_mod.write_report(out, outcomes, meta)
    assert len(renders) == 5


def test_rerun_of_a_folder_renders_no_thumbnail_again(tmp_path, mock_model, renders):
    slides, out = tmp_path / "slides", tmp_path / "out"
    for i in range(2):
        small_slide(slides / f"s{i}.tif", i)
    scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert len(renders) == 2
    res = scan_folder(slides, out, ScanConfig(), model=mock_model)
    assert res.n_skipped == 2 and len(renders) == 2
