from __future__ import annotations

import numpy as np
import pytest

from wsi_scan.train.metrics import binary_metrics, roc_auc, roc_curve


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == 0.75
    # a tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert roc_auc(np.array([1, 1, 0]), np.array([0.7, 0.3, 0.3])) == 0.75
    assert roc_auc(np.array([0, 1]), np.array([0.2, 0.8])) == 1.0
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.8])))


def test_metrics_at_threshold():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.5])
    m = binary_metrics(y, p, 0.5)
    # predicted positive: 0.9, 0.6, 0.7, 0.5 -> tp 2, fp 2, fn 1, tn 2
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 2, 1, 2)
    assert m.accuracy == pytest.approx(4 / 7)
    assert m.sensitivity == pytest.approx(2 / 3)
    assert m.specificity == pytest.approx(2 / 4)
    assert m.n == 7
    assert m.to_dict()["confusion_matrix"] == [[2, 2], [1, 2]]


def test_roc_curve_ends_and_area():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) + y * 0.5
    fpr, tpr = roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


def test_bootstrap_ci_brackets_auc_and_narrows_with_n():
    from wsi_scan.train.metrics import bootstrap_auc_ci, roc_auc

    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 2000):
        y = np.arange(n) % 2
        s = rng.normal(y * 1.0, 1.0)
        lo, hi = bootstrap_auc_ci(y, s, n_boot=300)
        assert lo < roc_auc(y, s) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    assert np.isnan(bootstrap_auc_ci(np.ones(5), np.arange(5.0))[0])


def test_threshold_for_specificity_exact():
    from wsi_scan.train.metrics import threshold_for_specificity

    y = np.array([0] * 10 + [1] * 3)
    s = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.3])
    assert threshold_for_specificity(y, s, 0.9) == 0.8001  # 9 of 10 negatives below
    assert threshold_for_specificity(y, s, 0.85) == 0.8001  # needs 8.5 -> 9
    assert threshold_for_specificity(y, s, 0.5) == 0.4001
    assert threshold_for_specificity(y, s, 0.0) == 0.0
