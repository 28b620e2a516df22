"""The learning curve: nested class-stratified training subsets, and the paired comparison of
pretrained and random-init models on the same validation patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from covidct.analysis import stats
from covidct.cli import main
from covidct.model.classifier import stratified_split, training_subset


def test_training_subsets_are_stratified_nested_and_leave_validation_alone():
    y = np.array([1] * 30 + [0] * 70)
    train, val = stratified_split(y, 0.2, seed=3)
    quarter, half = (training_subset(y[train], f, seed=3) for f in (0.25, 0.5))
    assert np.bincount(y[train][quarter]).tolist() == [14, 6]     # round(0.25 x 56), x 24
    assert np.bincount(y[train][half]).tolist() == [28, 12]
    assert set(quarter) <= set(half)                               # the same permutation
    assert training_subset(y[train], 1.0, seed=3).tolist() == list(range(len(train)))
    assert len(training_subset(np.array([1, 0, 0, 0]), 0.1, seed=0)) == 2   # one of each class
    # the validation split does not depend on the fraction
    assert stratified_split(y, 0.2, seed=3)[1].tolist() == val.tolist()


def _predictions(path, patients, y, p):
    pd.DataFrame({"patient": patients, "site": "s", "y": y, "probability": p}).to_csv(
        path, index=False)
    return path


def test_curve_points_compare_both_models_on_the_same_patients(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    patients = [f"P{i:02d}" for i in range(40)]
    rows = []
    for fraction, signal in ((0.25, 0.3), (1.0, 1.0)):
        pre = 2.0 * signal * y + rng.normal(size=40)
        rnd = signal * y + rng.normal(size=40)
        a = _predictions(tmp_path / f"pre{fraction}.csv", patients, y, 1 / (1 + np.exp(-pre)))
        # the random-init file lists the patients in another order: matched by patient
        order = rng.permutation(40)
        b = _predictions(tmp_path / f"rnd{fraction}.csv", [patients[i] for i in order],
                         y[order], (1 / (1 + np.exp(-rnd)))[order])
        rows.append(("site B", str(fraction), str(a), str(b)))
        expected = stats.delong_roc_test(y, 1 / (1 + np.exp(-pre)), 1 / (1 + np.exp(-rnd)))
        rows[-1] = (*rows[-1], expected, roc_auc_score(y, pre), roc_auc_score(y, rnd))
    args = ["learning-curve", "--out-dir", str(tmp_path / "t"), "--tracking-uri", "none"]
    for name, fraction, a, b, *_ in rows:
        args += ["--point", name, fraction, a, b]
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "t" / "learning_curve.csv")
    assert table["fraction"].tolist() == [0.25, 1.0]
    for (_, _, _, _, expected, auc_pre, auc_rnd), row in zip(rows, table.itertuples()):
        assert row.auc_pretrained == pytest.approx(auc_pre)
        assert row.auc_random_init == pytest.approx(auc_rnd)
        assert row.difference == pytest.approx(expected["difference"])
        assert row.p == pytest.approx(expected["p"])
    assert (tmp_path / "t" / "learning_curve.png").stat().st_size > 10_000
    assert "site B" in (tmp_path / "t" / "learning_curve.md").read_text()


def test_a_point_over_different_patients_is_an_error_naming_both_files(tmp_path, capsys):
    a = _predictions(tmp_path / "a.csv", ["P1", "P2", "P3"], [0, 1, 1], [0.1, 0.8, 0.7])
    b = _predictions(tmp_path / "b.csv", ["P1", "P2", "P4"], [0, 1, 1], [0.2, 0.6, 0.9])
    assert main(["learning-curve", "--point", "internal validation", "0.5", str(a), str(b),
                 "--out-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "different patients" in err and str(a) in err and str(b) in err
    assert not (tmp_path / "t" / "learning_curve.csv").exists()
