"""Lesions, size classes, the node's call and pN: geometry checked exactly, rules by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests._support import run, write_called_store
from wsi_scan.config import LesionConfig, ScanConfig
from wsi_scan.geometry import GridGeometry
from wsi_scan.io.folder_run import output_path
from wsi_scan.lesions import (
    call_slide,
    find_lesions,
    pn_stage,
    quadratic_weighted_kappa,
    size_class,
    stage_patients,
)

MPP = (0.5, 0.5)


def grid(rows: int, cols: int, cell_l0: float = 20.0, origin=(100, 40)) -> GridGeometry:
    # 20 level-0 px of 0.5 um: 10 um cells, so diameters are easy to compute by hand
    return GridGeometry(origin, (cell_l0, cell_l0), (rows, cols), 32, 96, 0.972)


def heat(rows: int, cols: int) -> np.ndarray:
    p = np.full((rows, cols), 0.1, dtype=np.float32)
    p[:2] = np.nan  # off tissue
    return p


def test_diameter_area_and_class_exact_on_the_cell_polygon():
    g = grid(400, 400)
    p = heat(400, 400)
    p[10, 10:15] = 0.95  # a row of 5 cells: 50 x 10 um
    p[50:80, 50:80] = 0.95  # 30 x 30 cells: 300 um square
    p[150:180, 100:310] = 0.7  # 30 x 210 cells: 300 x 2100 um, seeded by one cell
    p[160, 200] = 0.99
    les = find_lesions(p, g, MPP, 0.5)
    assert [le.size_class for le in les] == ["macro", "micro", "itc"]  # largest first
    macro, micro, itc = les
    assert macro.longest_diameter_mm == pytest.approx(math.hypot(2100, 300) / 1000)
    assert micro.longest_diameter_mm == pytest.approx(math.hypot(300, 300) / 1000)
    assert itc.longest_diameter_mm == pytest.approx(math.hypot(50, 10) / 1000)
    assert micro.area_mm2 == pytest.approx(900 * 100 / 1e6) and micro.n_cells == 900
    # level-0 frame: origin (100, 40), 20 px cells
    assert itc.l0_bbox_xyxy == (100 + 10 * 20, 40 + 10 * 20, 100 + 15 * 20, 40 + 11 * 20)
    assert itc.l0_centroid_xy == (100 + 12.5 * 20, 40 + 10.5 * 20)
    assert macro.max_prob == pytest.approx(0.99) and macro.score == macro.max_prob
    assert [le.id for le in les] == [1, 2, 3]


def test_non_square_pixels_are_honoured():
    g = grid(20, 20)
    p = heat(20, 20)
    p[5, 5:15] = 0.95  # 10 cells along x
    (le,) = find_lesions(p, g, (0.5, 1.0), 0.5)
    assert le.longest_diameter_mm == pytest.approx(math.hypot(10 * 20 * 0.5, 20 * 1.0) / 1000)


def test_hysteresis_keeps_lone_weak_cells_out_and_whole_lesions_in():
    g = grid(30, 30)
    p = heat(30, 30)
    p[5, 5] = 0.6  # above the threshold, below the seed: not a lesion
    p[20:25, 20:25] = 0.6
    p[22, 22] = 0.95  # seeded: all 25 cells are the lesion
    p[10, 10] = 0.97
    p[11, 11] = 0.55  # diagonal neighbour: 8-connected, one lesion of two cells
    les = find_lesions(p, g, MPP, 0.5)
    assert sorted(le.n_cells for le in les) == [2, 25]
    assert find_lesions(p, g, MPP, 0.5, LesionConfig(seed_prob=0.5)).__len__() == 3
    p[:] = np.nan
    assert find_lesions(p, g, MPP, 0.5) == []


def test_size_class_boundaries():
    assert size_class(0.2) == "itc" and size_class(0.2001) == "micro"
    assert size_class(2.0) == "micro" and size_class(2.0001) == "macro"


def test_call_and_score():
    g = grid(30, 30)
    p = heat(30, 30)
    c = call_slide(p, g, MPP, 0.5)
    assert c.call == "negative" and c.score == pytest.approx(0.1) and c.summary()["n_lesions"] == 0
    p[10:12, 10:12] = 0.99
    c = call_slide(p, g, MPP, 0.5)
    assert c.call == "itc" and c.summary() == {
        "call": "itc",
        "score": pytest.approx(0.99),
        "n_lesions": 1,
        "largest_lesion_mm": pytest.approx(math.hypot(20, 20) / 1000),
    }


@pytest.mark.parametrize(
    ("calls", "stage"),
    [
        ([], "pN0"),
        (["negative"] * 5, "pN0"),
        (["itc", "negative"], "pN0(i+)"),
        (["itc"] * 5, "pN0(i+)"),
        (["micro", "itc"], "pN1mi"),
        (["micro"] * 4, "pN1mi"),
        (["macro", "itc", "itc", "itc", "itc"], "pN1"),
        (["macro", "micro", "micro"], "pN1"),
        (["macro", "micro", "micro", "micro"], "pN2"),
        (["macro"] * 5, "pN2"),
    ],
)
def test_pn_stage_rules(calls, stage):
    assert pn_stage(calls) == stage


def test_quadratic_weighted_kappa_by_hand():
    ref = ["pN0", "pN1", "pN2", "pN0(i+)"]
    assert quadratic_weighted_kappa(ref, ref) == 1.0
    # two categories used, one disagreement out of two: observed weighted disagreement 1/2 * w,
    # expected (marginals 1/2, 1/2 on both sides) 1/2 * w: kappa 0
    assert quadratic_weighted_kappa(["pN0", "pN2"], ["pN0", "pN0"]) == pytest.approx(0.0)
    # scikit-learn 1.9.1's cohen_kappa_score(weights="quadratic", labels=0..4) gives 0.928571 here
    a = ["pN0", "pN0", "pN1", "pN1", "pN2"]
    b = ["pN0", "pN0(i+)", "pN1", "pN2", "pN2"]
    assert quadratic_weighted_kappa(a, b) == pytest.approx(0.9285714285714286)
    assert quadratic_weighted_kappa(a, b) == pytest.approx(_kappa_reference(a, b))


def _kappa_reference(a, b):
    """Quadratic kappa written out as in Cohen (1968), independently of the implementation."""
    cats = ["pN0", "pN0(i+)", "pN1mi", "pN1", "pN2"]
    n = len(a)
    ia, ib = [cats.index(x) for x in a], [cats.index(x) for x in b]
    po = sum((x - y) ** 2 for x, y in zip(ia, ib)) / n
    pe = sum((x - y) ** 2 for x in ia for y in ib) / n**2
    return 1 - po / pe if pe else 1.0


def test_stage_patients_refuses_a_missing_slide():
    rows = stage_patients({"a.tif": "macro", "b.tif": "itc"}, {"P1": ["a.tif", "b.tif"]})
    assert rows[0]["stage"] == "pN1" and rows[0]["nodes_with_metastases"] == 1
    with pytest.raises(KeyError):
        stage_patients({"a.tif": "macro"}, {"P1": ["a.tif", "c.tif"]})


def test_scan_stores_the_call_and_the_cli_lists_lesions(make_slide, mock_model, tmp_path):
    from wsi_scan.io.heatmap import open_heatmap
    from wsi_scan.scan import scan_slide

    slide = make_slide(tumour=((1000, 700, 1500, 1200),))
    res = scan_slide(slide, tmp_path / "h.zarr", ScanConfig(), model=mock_model)
    hm = open_heatmap(res.out)
    want = call_slide(hm.probs, hm.grid, hm.mpp_xy, hm.threshold).summary()
    assert {k: hm.attrs["summary"][k] for k in want} == pytest.approx(want)
    code, out, err = run("lesions", res.out, "--json", "--seed-prob", "0.8")
    assert code == 0, err
    d = json.loads(out)
    assert (
        d["call"] in ("itc", "micro")
        and d["lesions"]
        and set(d["lesions"][0]) >= {"l0_centroid_xy", "area_mm2", "longest_diameter_mm", "max_prob", "size_class"}
    )
    # the painted square is 500 x 500 level-0 px at 0.243 um/px: ~0.12 mm, its lesion a little larger
    assert 0.10 < d["lesions"][0]["longest_diameter_mm"] < 0.30
    for name in ("l.csv", "l.geojson"):
        code, _, err = run("lesions", res.out, "--out", tmp_path / name, "--seed-prob", "0.8")
        assert code == 0, err
    gj = json.loads((tmp_path / "l.geojson").read_text())
    assert gj["features"] and gj["features"][0]["properties"]["classification"]["name"] in ("ITC", "Micro-metastasis")
    assert (tmp_path / "l.csv").read_text().startswith("lesion_id,size_class,")


def test_folder_summary_and_patient_stages(make_slide, tmp_path):
    slides = tmp_path / "slides"
    make_slide("slides/n1.tif", tumour=((1000, 700, 1500, 1200),))
    make_slide("slides/n2.tif")
    out = tmp_path / "results"
    code, _, err = run(slides, "--out", out, "--quiet")
    assert code == 0, err
    rows = json.loads((out / "summary.json").read_text())["slides"]
    assert all(r["call"] in ("negative", "itc", "micro", "macro") and r["score"] is not None for r in rows)
    assert "call" in (out / "report.html").read_text()
    (tmp_path / "patients.csv").write_text("patient,slide\nP1,n1.tif\nP1,n2.tif\nP2,./n2.tif\n")
    code, _, err = run("stage", out, "--patients", tmp_path / "patients.csv")
    # one node is one patient's: n2.tif (also as ./n2.tif) under P1 and P2 is a mix-up, refused
    assert code == 6 and "n2.tif on lines 3 and 4 (under P1 and P2)" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "stages.csv").exists()
    (tmp_path / "patients.csv").write_text("patient,slide\nP1,n1.tif\nP2,n2.tif\nP2,n1.tif\n")
    code, _, err = run("stage", out, "--patients", tmp_path / "patients.csv")
    assert code == 6 and "n1.tif on lines 2 and 4 (under P1 and P2)" in err, err
    (tmp_path / "patients.csv").write_text("patient,slide\nP1,n1.tif\nP1,n2.tif\n")
    code, stdout, err = run("stage", out, "--patients", tmp_path / "patients.csv", "--json")
    assert code == 0, err
    got = {r["patient"]: r for r in json.loads(stdout)["patients"]}
    calls = {r["slide"]: r["call"] for r in rows}
    assert got["P1"]["stage"] == pn_stage([calls["n1.tif"], calls["n2.tif"]]) and set(got) == {"P1"}
    assert (out / "stages.csv").read_text().startswith("patient,stage,")
    (tmp_path / "bad.csv").write_text("patient,slide\nP3,missing.tif\n")
    code, _, err = run("stage", out, "--patients", tmp_path / "bad.csv")
    assert code == 6 and "missing.tif" in err and len(err.strip().splitlines()) == 1


def test_stage_refuses_a_slide_named_by_its_path_and_by_its_file_name(tmp_path):
    from wsi_scan.errors import DataError
    from wsi_scan.export.lesions import stage_results

    results = tmp_path / "results"
    results.mkdir()
    slides = [("sub/a.svs", "micro"), ("b.svs", "negative"), ("x/c.svs", "macro"), ("y/c.svs", "negative")]
    (results / "summary.json").write_text(json.dumps({"slides": [{"slide": s, "status": "ok", "call": c} for s, c in slides]}))
    for s, c in slides:
        write_called_store(output_path(results, Path(s)), c)
    patients = tmp_path / "patients.csv"
    patients.write_text("patient,slide\nP1,sub/a.svs\nP1,a.svs\n")  # one node, counted twice: pN1 for pN1mi
    with pytest.raises(DataError, match=r"sub/a.svs \(P1\) and a.svs \(P1\) are the same slide sub/a.svs"):
        stage_results(results, patients)
    patients.write_text("patient,slide\nP1,a.svs\nP2,sub/a.svs\n")
    with pytest.raises(DataError, match="are the same slide"):
        stage_results(results, patients)
    # a bare name that is unique in the results is that slide; an ambiguous one names none
    patients.write_text("patient,slide\nP1,a.svs\nP1,b.svs\nP2,x/c.svs\nP2,y/c.svs\n")
    got = {r["patient"]: r for r in stage_results(results, patients)}
    assert got["P1"]["nodes"] == {"a.svs": "micro", "b.svs": "negative"} and got["P1"]["stage"] == "pN1mi"
    patients.write_text("patient,slide\nP1,c.svs\n")
    with pytest.raises(DataError, match=r"c.svs \(P1\) names 2 slides of the results"):
        stage_results(results, patients)


def test_stage_never_writes_over_the_run_it_reads_and_refuses_a_damaged_summary(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    summary = json.dumps({"slides": [{"slide": "a.svs", "status": "ok", "call": "micro"}]})
    (results / "summary.json").write_text(summary)
    (results / "summary.csv").write_text("slide,status\na.svs,ok\n")
    write_called_store(results / "a.zarr", "micro")
    patients = tmp_path / "patients.csv"
    patients.write_text("patient,slide\nP1,a.svs\n")
    for target in (results / "summary.json", results / "summary.csv", patients, tmp_path / "stages.txt"):
        code, _, err = run("stage", results, "--patients", patients, "--out", target, "--overwrite")
        assert code in (2, 4) and len(err.strip().splitlines()) == 1, err
    assert (results / "summary.json").read_text() == summary and patients.read_text() == "patient,slide\nP1,a.svs\n"
    assert not (tmp_path / "stages.txt").exists()
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 0 and (results / "stages.csv").exists(), err

    # a bare name shared with a slide that failed names no slide for sure
    (results / "summary.json").write_text(
        json.dumps(
            {"slides": [{"slide": "x/c.svs", "status": "ok", "call": "negative"}, {"slide": "y/c.svs", "status": "failed"}]}
        )
    )
    patients.write_text("patient,slide\nP1,c.svs\n")
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 6 and "c.svs (P1) names 2 slides of the results (x/c.svs, y/c.svs)" in err, err
    patients.write_text("patient,slide,slide\nP1,c.svs,x/c.svs\n")
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 6 and "the column slide appears more than once" in err, err

    patients.write_text("patient,slide\nP1,a.svs\n")
    for slides in (
        ["a.svs"],
        {"a": 1},
        None,
        [{"status": "ok", "call": "micro"}],
        [{"slide": "a.svs", "status": "ok", "call": "huge"}],
    ):
        (results / "summary.json").write_text(json.dumps({"slides": slides}))
        code, _, err = run("stage", results, "--patients", patients)
        assert code == 6 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_read_patients_refuses_a_slide_listed_twice(tmp_path):
    from wsi_scan.errors import DataError
    from wsi_scan.export.lesions import read_patients

    p = tmp_path / "patients.csv"
    # one micro node on 4 lines would be 4 "nodes with metastases"; one macro node so, pN2 for pN1
    p.write_text("patient,slide\nP1,a.svs\n\nP1,b.svs\nP1,a.svs\nP1,a.svs\n")
    with pytest.raises(
        DataError, match=r"expected each slide \(lymph node\) once, found a.svs on lines 2 and 5 \(again for P1\)"
    ):
        read_patients(p)
    p.write_text("patient,slide\nP1,dir\\a.svs\nP2,./dir/a.svs\n")  # the same file, written two ways
    with pytest.raises(DataError, match=r"found dir/a.svs on lines 2 and 3 \(under P1 and P2\)"):
        read_patients(p)
    p.write_text("patient,slide\nP1,a.svs\nP1,b.svs\nP2,dir/a.svs\n")  # another folder's a.svs is another slide
    assert read_patients(p) == {"P1": ["a.svs", "b.svs"], "P2": ["dir/a.svs"]}
    p.write_text("patient,slide\nP1," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match="not a readable CSV file"):
        read_patients(p)


def test_froc_by_hand_with_itc_excluded():
    from wsi_scan.evaluation import SlideDetections, froc

    slides = [
        # regions 1, 2 count, 3 is ITC: a detection on 3 is neither a hit nor a false positive
        SlideDetections(hits=[1, 1, 0, 3, 2], scores=[0.9, 0.95, 0.8, 0.99, 0.3], n_regions=3, itc=frozenset({3})),
        SlideDetections(hits=[0, 0], scores=[0.85, 0.2], n_regions=0),
    ]
    f = froc(slides)
    # thresholds {0.2, 0.3, 0.8, 0.85, 0.95}: 0.2 -> 3 FP, 2 TP; 0.3 -> 2, 2; 0.8 -> 2, 1;
    # 0.85 -> 1, 1; 0.95 -> 0, 1; then (0, 0). Per slide (2) and per counted region (2):
    # FP [1.5, 1, 1, .5, 0, 0], sens [1, 1, .5, .5, .5, 0]; np.interp on the reversed curve at
    # 1/4, 1/2, 1, 2, 4, 8 gives .5, .5, 1, 1, 1, 1 (the challenge code, dropping 0.2, agrees here)
    assert f.sensitivities == pytest.approx((0.5, 0.5, 1.0, 1.0, 1.0, 1.0))
    assert f.score == pytest.approx(5 / 6)


def test_froc_counts_a_region_once_and_a_missed_region_never():
    from wsi_scan.evaluation import SlideDetections, froc

    f = froc([SlideDetections(hits=[1, 1, 1], scores=[0.9, 0.8, 0.7], n_regions=2)])
    assert max(f.sensitivity) == 0.5 and max(f.fps_per_slide) == 0.0


def test_painted_lesions_of_known_size_end_to_end(make_slide, mock_model, tmp_path):
    """Squares painted on a synthetic pyramid, scanned with the mock model (probability >= 0.5 where
    a cell's centre square is at least half tumour): the lesions' diameters match the painted ones
    to within one cell's diagonal, their classes exactly, across block borders (16 cells = 2048 px)."""
    from wsi_scan.io.heatmap import open_heatmap
    from wsi_scan.lesions import find_lesions
    from wsi_scan.scan import scan_slide

    mpp = 0.243
    boxes = {  # level-0 px (x0, y0, x1, y1): an ITC, a micro-metastasis across a block border, a macro
        "itc": (600, 600, 1000, 900),  # 97 x 73 um
        "micro": (1800, 1500, 3800, 2900),  # 486 x 340 um, across x = 2048
        "macro": (4200, 400, 12800, 2800),  # 2.09 x 0.58 mm
    }
    slide = make_slide(
        size_wh=(13400, 3400), mpp=mpp, tissue=((200, 200, 13200, 3200),), tumour=tuple(boxes.values()), downsamples=(1, 4, 16)
    )
    res = scan_slide(slide, tmp_path / "h.zarr", ScanConfig(block_cells=16), model=mock_model)
    hm = open_heatmap(res.out)
    lesions = find_lesions(hm.probs, hm.grid, hm.mpp_xy, 0.5, LesionConfig(seed_prob=0.8))
    assert len(lesions) == 3
    cell_diag_mm = math.hypot(*hm.grid.l0_cell_size_xy) * mpp / 1000
    for les in lesions:
        name = les.size_class
        x0, y0, x1, y1 = boxes[name]
        true_mm = math.hypot(x1 - x0, y1 - y0) * mpp / 1000
        assert abs(les.longest_diameter_mm - true_mm) <= cell_diag_mm, (name, les.longest_diameter_mm, true_mm)
        cx, cy = les.l0_centroid_xy
        assert abs(cx - (x0 + x1) / 2) <= hm.grid.l0_cell_size_xy[0] and abs(cy - (y0 + y1) / 2) <= hm.grid.l0_cell_size_xy[1]
    assert {le.size_class for le in lesions} == {"itc", "micro", "macro"}


def test_evaluate_slides_on_an_annotated_synthetic_cohort(make_slide, mock_model, tmp_path):
    """Three nodes of one patient: a macro-size tumour annotated in ASAP XML, a micro annotated in
    QuPath GeoJSON, a negative without annotation. The mock model finds both tumours exactly."""
    from wsi_scan.batch import scan_folder

    slides = tmp_path / "slides"
    macro = (1000, 400, 10000, 2400)  # 2.2 mm x 0.49 mm at 0.243 um/px
    micro = (2000, 1000, 3600, 2200)
    make_slide("slides/patient_000_node_0.tif", size_wh=(11000, 3000), tissue=((200, 200, 10800, 2800),), tumour=(macro,))
    make_slide("slides/patient_000_node_1.tif", size_wh=(5000, 3000), tissue=((200, 200, 4800, 2800),), tumour=(micro,))
    make_slide("slides/patient_000_node_2.tif", size_wh=(5000, 3000), tissue=((200, 200, 4800, 2800),))
    res = scan_folder(slides, tmp_path / "results", ScanConfig(), model=mock_model, report=False)
    assert res.n_failed == 0
    ann = tmp_path / "ann"
    ann.mkdir()
    x0, y0, x1, y1 = macro
    coords = "".join(
        f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    )
    (ann / "patient_000_node_0.xml").write_text(
        f'<ASAP_Annotations><Annotations><Annotation Name="A1" PartOfGroup="_0" Type="Polygon"><Coordinates>{coords}'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    x0, y0, x1, y1 = micro
    (ann / "patient_000_node_1.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {"classification": {"name": "Tumor"}},
                        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                    }
                ],
            }
        )
    )
    (tmp_path / "reference.csv").write_text("patient,stage\npatient_000.zip,pN1\npatient_000_node_0.tif,macro\n")
    code, out, err = run(
        "evaluate-slides",
        tmp_path / "results",
        "--annotations",
        ann,
        "--reference",
        tmp_path / "reference.csv",
        "--json",
        "--seed-prob",
        "0.8",
    )  # the mock model peaks at 0.88
    assert code == 0, err
    ev = json.loads(out)
    assert ev["slide_auc"] == 1.0
    assert ev["froc"] == 1.0 and all(v == 1.0 for v in ev["sensitivities"].values())
    calls = {s["slide"]: (s["reference_call"], s["call"]) for s in ev["slides"]}
    assert calls == {
        "patient_000_node_0.tif": ("macro", "macro"),
        "patient_000_node_1.tif": ("micro", "micro"),
        "patient_000_node_2.tif": ("negative", "negative"),
    }
    assert ev["kappa"]["kappa"] == 1.0 and ev["kappa"]["patients"][0]["predicted"] == "pN1"
    assert (tmp_path / "results" / "evaluation.json").is_file()
    for name in ("evaluation.froc.png", "evaluation.slide_roc.png"):
        assert (tmp_path / "results" / name).stat().st_size > 5000
    # a second evaluation in the same folder draws its own figures beside its own JSON
    code, out, err = run("evaluate-slides", tmp_path / "results", "--annotations", ann, "--out", tmp_path / "results" / "b.json")
    assert code == 0, err
    assert (tmp_path / "results" / "b.froc.png").is_file() and (tmp_path / "results" / "b.slide_roc.png").is_file()
    # no annotations at all: nothing to find, so the FROC is undefined rather than 0, and not
    # drawn; the earlier evaluation's FROC of that name is removed, not left beside the new numbers
    (tmp_path / "none").mkdir()
    code, out, err = run("evaluate-slides", tmp_path / "results", "--annotations", tmp_path / "none", "--overwrite")
    assert code == 0, err
    assert out.startswith("FROC n/a (no annotated tumour region outside ITC to find); slide AUC n/a")
    ev = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert ev["froc"] is None and ev["sensitivities"] is None and ev["tumour_regions"] == 0
    assert not (tmp_path / "results" / "evaluation.froc.png").exists()
    assert not (tmp_path / "results" / "evaluation.slide_roc.png").exists()  # one class only: no ROC
    assert (tmp_path / "results" / "b.froc.png").is_file()  # another evaluation's figures are left alone


def test_evaluate_slides_refuses_what_would_replace_other_outputs_or_count_wrongly(make_slide, mock_model, tmp_path):
    import hashlib
    import shutil

    from wsi_scan.batch import scan_folder

    make_slide("slides/patient_000_node_0.tif", size_wh=(5000, 3000), tissue=((200, 200, 4800, 2800),))
    results = tmp_path / "results"
    assert scan_folder(tmp_path / "slides", results, ScanConfig(), model=mock_model, report=False).n_failed == 0
    ann = tmp_path / "ann"
    ann.mkdir()

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    # --overwrite replaces an earlier evaluation only, never a model or the run's own files
    model = tmp_path / "my-model.safetensors"
    shutil.copy(Path(__file__).parents[1] / "wsi_scan" / "model" / "fast.safetensors", model)
    before = digest(model)
    for out, code_wanted, words in (
        (model, 2, "expected a .json file name"),
        (results / "summary.json", 4, "the folder run's own summary.json"),
    ):
        code, _, err = run("evaluate-slides", results, "--annotations", ann, "--out", out, "--overwrite")
        assert code == code_wanted and words in err, err
    assert digest(model) == before and not list(tmp_path.glob("*.png"))
    (tmp_path / "other.json").write_text(json.dumps({"generator": "wsi-scan 0.1.0", "wsi_scan": {}}))
    code, _, err = run("evaluate-slides", results, "--annotations", ann, "--out", tmp_path / "other.json", "--overwrite")
    assert code == 4 and "not an evaluation" in err
    # a region wholly off the slide is in another frame, not a macro metastasis
    (ann / "patient_000_node_0.geojson").write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[30000, 30000], [50000, 30000], [50000, 50000], [30000, 30000]]],
                },
            }
        )
    )
    code, _, err = run("evaluate-slides", results, "--annotations", ann)
    assert code == 6 and "lies wholly outside its slide (5000 x 3000 px)" in err
    (ann / "patient_000_node_0.geojson").unlink()
    # a reference stage it does not know, or a patient given two stages
    for text, words in (
        ("patient,stage\npatient_000.zip,pN9\n", "has the stage 'pN9'; expected one of pN0"),
        ("patient,stage\npatient_000.zip,pN1\npatient_000.zip,pN2\n", "listed again with another stage"),
    ):
        (tmp_path / "ref.csv").write_text(text)
        code, _, err = run("evaluate-slides", results, "--annotations", ann, "--reference", tmp_path / "ref.csv", "--overwrite")
        assert code == 6 and words in err, err
    # an annotation named for no slide is said; two for one slide are refused
    (ann / "PATIENT_000_NODE_0.xml").write_text("<ASAP_Annotations/>")
    code, _, err = run("evaluate-slides", results, "--annotations", ann, "--overwrite")
    assert code == 0 and "1 annotation file(s) match no scanned slide by name (PATIENT_000_NODE_0.xml)" in err, err
    (ann / "PATIENT_000_NODE_0.xml").rename(ann / "patient_000_node_0.xml")
    (ann / "patient_000_node_0.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    code, _, err = run("evaluate-slides", results, "--annotations", ann, "--overwrite")
    assert code == 6 and "has 2 annotation files" in err, err
    # one slide's store is not a folder run
    code, _, err = run("evaluate-slides", results / "patient_000_node_0.zarr", "--annotations", ann)
    assert code == 6 and "is the heatmap store of one slide" in err, err
    # a copied folder is evaluated on its own stores, not on those its summary's paths name
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    shutil.rmtree(copy / "patient_000_node_0.zarr")
    code, _, err = run("evaluate-slides", copy, "--annotations", ann)
    assert code == 7 and str(copy / "patient_000_node_0.zarr") in err, err


def test_stage_rests_on_the_stores_not_on_the_summary(tmp_path):
    import shutil

    results = tmp_path / "results"
    results.mkdir()
    slides = [("a.svs", "negative"), ("b.svs", "micro")]
    (results / "summary.json").write_text(json.dumps({"slides": [{"slide": s, "status": "ok", "call": c} for s, c in slides]}))
    for s, c in slides:
        write_called_store(output_path(results, Path(s)), c)
    patients = tmp_path / "patients.csv"
    patients.write_text("patient,slide\nP1,a.svs\nP1,b.svs\n")
    code, out, err = run("stage", results, "--patients", patients, "--json")
    assert code == 0 and json.loads(out)["patients"][0]["stage"] == "pN1mi", err
    # the positive node's store replaced by the negative one: the summary's micro is not believed
    shutil.rmtree(results / "b.zarr")
    shutil.copytree(results / "a.zarr", results / "b.zarr")
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 6 and "slide b.svs has the call micro but its heatmap" in err and "gives negative" in err, err
    # deleted: not a negative node
    shutil.rmtree(results / "b.zarr")
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 6 and "b.zarr of slide b.svs is missing" in err, err
    # a chunk gone: the store's own check
    write_called_store(results / "b.zarr", "micro")
    next(p for p in (results / "b.zarr" / "0").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()
    code, _, err = run("stage", results, "--patients", patients)
    assert code == 7 and "damaged heatmap store" in err and len(err.strip().splitlines()) == 1, err


def test_longest_diameter_is_the_largest_distance_between_any_two_cell_corners():
    from scipy import ndimage

    from wsi_scan.lesions import lesion_labels, longest_diameter_um

    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = tuple(int(v) for v in rng.integers(1, 25, 2))
        grid = GridGeometry(
            tuple(rng.uniform(-40, 40, 2)),
            tuple(rng.uniform(3, 150, 2)),
            shape,
            32,
            96,
            0.972,  # type: ignore[arg-type]
        )
        mpp = tuple(rng.uniform(0.1, 1.0, 2))
        cells = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0, 2)) > 0.5
        rows, cols = np.nonzero(cells)
        if rows.size == 0:
            continue
        (ox, oy), (sx, sy) = grid.l0_origin_xy, grid.l0_cell_size_xy
        xs = np.concatenate([cols, cols + 1, cols, cols + 1]) * sx + ox
        ys = np.concatenate([rows, rows, rows + 1, rows + 1]) * sy + oy
        pts = np.stack([xs * mpp[0], ys * mpp[1]], axis=1)
        brute = float(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max())
        assert longest_diameter_um(rows, cols, grid, mpp) == pytest.approx(brute, rel=1e-12)  # type: ignore[arg-type]
        # shuffled cells: the per-row extremes do not depend on the order they come in
        perm = rng.permutation(rows.size)
        assert longest_diameter_um(rows[perm], cols[perm], grid, mpp) == pytest.approx(brute, rel=1e-12)  # type: ignore[arg-type]

    # a region is kept exactly when one of its cells reaches the seed
    probs = np.array([[0.6, 0.6, 0.0, 0.7], [0.0, 0.0, 0.0, 0.96], [np.nan, 0.96, 0.0, 0.0]], dtype=np.float32)
    lab = lesion_labels(probs, 0.5, LesionConfig(seed_prob=0.95))
    assert (lab[0, :2] == 0).all() and lab[0, 3] == lab[1, 3] > 0 and lab[2, 1] > 0 and lab[2, 1] != lab[0, 3]


def test_evaluate_slides_refuses_a_damaged_summary_and_says_what_it_leaves_out(tmp_path):
    """Found by the 2026-12-05 sweep: rows that are not objects, a row without its slide or a
    'slides' that is no list were tracebacks; a row listed twice was counted twice; the slides
    that failed were left out of the figures in silence (their annotation files then said to
    'match no scanned slide by name')."""
    results = tmp_path / "results"
    results.mkdir()
    slides = [("a.svs", "micro"), ("b.svs", "negative")]
    for s, c in slides:
        write_called_store(output_path(results, Path(s)), c)
    ann = tmp_path / "ann"
    ann.mkdir()
    rows = [{"slide": s, "status": "ok", "call": c} for s, c in slides]
    for bad in (["a.svs"], [{"status": "ok"}], 5, None, [*rows, rows[0]]):
        (results / "summary.json").write_text(json.dumps({"slides": bad}))
        code, _, err = run("evaluate-slides", results, "--annotations", ann, "--overwrite")
        assert code == 6 and len(err.strip().splitlines()) == 1 and "summary.json" in err, err
    assert "a.svs is listed 2 times" in err
    (results / "summary.json").write_text(json.dumps({"slides": [*rows, {"slide": "c.svs", "status": "failed"}]}))
    (ann / "c.xml").write_text("<ASAP_Annotations/>")
    code, out, err = run("evaluate-slides", results, "--annotations", ann, "--overwrite", "--json")
    assert code == 0, err
    assert "1 slide(s) of the run have no heatmap (c.svs: failed or not scanned) and are not evaluated" in err
    assert "match no scanned slide" not in err and len(json.loads(out)["slides"]) == 2


def test_stage_of_a_store_or_a_file_names_what_it_takes(tmp_path):
    """`stage RESULTS/a.zarr` said "--out .../a.zarr/stages.csv lies inside the heatmap store" and
    `stage patients.csv` "--out .../patients.csv/stages.csv: cannot be examined", though no --out
    was given (2026-12-05)."""
    store = write_called_store(tmp_path / "a.zarr", "micro")
    patients = tmp_path / "patients.csv"
    patients.write_text("patient,slide\nP1,a.svs\n")
    for results, words in ((store, "is the heatmap store of one slide; stage takes"), (patients, "is a file; stage takes")):
        code, _, err = run("stage", results, "--patients", patients)
        assert code == 6 and words in err and "stages.csv" not in err and len(err.strip().splitlines()) == 1, err
    assert patients.read_text() == "patient,slide\nP1,a.svs\n"


def test_evaluate_slides_refuses_two_slides_of_one_file_name(tmp_path):
    """x/n.svs and y/n.svs of a recursive run both took the annotation n.geojson: the negative
    node counted as a missed micro-metastasis, the FROC 0.5 for 1.0, in silence (2026-12-05)."""
    results = tmp_path / "results"
    results.mkdir()
    slides = [("x/n.svs", "micro"), ("y/n.svs", "negative")]
    for s, c in slides:
        write_called_store(output_path(results, Path(s)), c)
    (results / "summary.json").write_text(json.dumps({"slides": [{"slide": s, "status": "ok", "call": c} for s, c in slides]}))
    ann = tmp_path / "ann"
    ann.mkdir()
    code, _, err = run("evaluate-slides", results, "--annotations", ann)
    assert code == 6 and "slides x/n.svs, y/n.svs share the file name n.svs" in err, err
    assert not (results / "evaluation.json").exists()


def test_evaluate_slides_never_writes_among_the_annotations(tmp_path):
    """--out ann/evaluation.json wrote the evaluation and its figures into the annotations folder,
    where an evaluation named after a slide (ann/NAME.json) was then read as its annotation
    (2026-12-05)."""
    results = tmp_path / "results"
    results.mkdir()
    write_called_store(results / "a.zarr", "micro")
    (results / "summary.json").write_text(json.dumps({"slides": [{"slide": "a.svs", "status": "ok", "call": "micro"}]}))
    ann = tmp_path / "ann"
    ann.mkdir()
    for name in ("evaluation.json", "a.json"):
        code, _, err = run("evaluate-slides", results, "--annotations", ann, "--out", ann / name)
        assert code == 4 and "lies inside the data folder" in err, err
    assert not list(ann.iterdir())
