"""predict-site, evaluate and tables through the real command line: real Keras model files, real
Zarr stores, a real MLflow SQLite backend. Values are checked against scikit-learn and against
formulas written out here, never against numbers the code produced before."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from covidct.cli import main
from covidct.io.tracking import client as tracking_client

METRIC_KEYS = {"n", "n_positive", "auc", "auc_ci", "auc_variance", "accuracy", "sensitivity",
               "specificity", "ppv", "npv", "f1", "ci", "threshold", "youden", "brier",
               "calibration_intercept", "calibration_slope", "hosmer_lemeshow", "confusion",
               "calibration", "notes"}


def make_predictions(path: Path, site: str, n: int, seed: int, *, model: str = "finetune_covid",
                     separation: float = 1.5, only_covid: bool = False) -> pd.DataFrame:
    """A predictions.csv like predict-site writes: COVID-19 vs viral/bacterial pneumonia."""
    rng = np.random.default_rng(seed)
    if only_covid:
        labels = np.array(["covid"] * n)
    else:
        labels = rng.choice(["covid", "viral", "bacterial"], size=n, p=[0.5, 0.25, 0.25])
    y = (labels == "covid").astype(int)
    logit = separation * (2 * y - 1) + rng.normal(0, 1.2, n)
    df = pd.DataFrame({"patient": [f"{site}-{i:03d}" for i in range(n)], "site": site,
                       "label": labels, "y": y, "probability": 1 / (1 + np.exp(-logit))})
    for k in range(64):
        df[f"feature_{k}"] = rng.normal(size=n)
    df["model"] = model
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def make_sheet(path: Path, predictions: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The site sheet of the predictions' patients with random ages and sexes (one age and one
    sex left empty, as a sheet may have them)."""
    rng = np.random.default_rng(seed)
    sheet = pd.DataFrame({"patient": predictions["patient"], "site": predictions["site"],
                          "image": [f"/data/{p}.nii.gz" for p in predictions["patient"]],
                          "task": "covid", "label": predictions["label"],
                          "age": rng.integers(18, 95, len(predictions)).astype(str),
                          "sex": rng.choice(["M", "F"], len(predictions))})
    sheet.loc[0, "age"] = ""
    sheet.loc[1, "sex"] = ""
    sheet.to_csv(path, sep="\t", index=False)
    return sheet


def wilson(k: int, n: int, z: float = 1.959963984540054) -> list[float]:
    """Wilson's score interval, written out:
    (k + z^2/2 +/- z sqrt(k(n-k)/n + z^2/4)) / (n + z^2)."""
    half = z * math.sqrt(k * (n - k) / n + z * z / 4)
    return [(k + z * z / 2 - half) / (n + z * z), (k + z * z / 2 + half) / (n + z * z)]


def strict_json(path: Path) -> dict:
    """metrics.json read refusing NaN and Infinity (not JSON)."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def png_shape(path: Path) -> tuple:
    return imread(path).shape


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_cli_metrics_against_sklearn(tmp_path, caplog):
    train = make_predictions(tmp_path / "train" / "predictions.csv", "Wuhan", 150, seed=1)
    val = make_predictions(tmp_path / "val" / "predictions.csv", "Anhui", 120, seed=2)
    out = tmp_path / "eval" / "Anhui"
    rc = main(["evaluate", str(tmp_path / "val" / "predictions.csv"), str(out),
               "--threshold", "0.6", "--youden-from", str(tmp_path / "train" / "predictions.csv"),
               "--subgroup", "viral=covid,viral", "empty=fungal", "--role", "diagnosis"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"metrics.json", "roc.png", "calibration.png",
                                               "decision.png"}
    assert png_shape(out / "roc.png")[2] in (3, 4) and png_shape(out / "calibration.png")[0] > 100
    assert png_shape(out / "decision.png")[0] > 100
    m = strict_json(out / "metrics.json")
    assert METRIC_KEYS <= set(m) and "subgroups" in set(m)
    assert m["site"] == "Anhui" and m["model"] == "finetune_covid" and m["role"] == "diagnosis"

    y, p = val["y"].to_numpy(), val["probability"].to_numpy()
    pred = (p >= 0.6).astype(int)
    assert m["n"] == 120 and m["n_positive"] == int(y.sum())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["auc_ci"][0] < m["auc"] < m["auc_ci"][1] and m["auc_ci"][1] - m["auc_ci"][0] < 0.25
    assert m["threshold"] == 0.6
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    # Wilson intervals of each rate, from its own numerator and denominator
    for rate, k, n in (("accuracy", tp + tn, 120), ("sensitivity", tp, tp + fn),
                       ("specificity", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        assert m["ci"][rate] == pytest.approx(wilson(k, n), abs=1e-12), rate
        assert m["ci"][rate][0] < m[rate] < m["ci"][rate][1]
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    logit = np.log(p / (1 - p))
    sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit[:, None], y)
    assert m["calibration_slope"] == pytest.approx(float(sk.coef_[0, 0]), abs=1e-5)
    # calibration-in-the-large: the intercept solves sum(y - expit(a + logit p)) = 0
    a = m["calibration_intercept"]
    assert abs(np.sum(y - 1 / (1 + np.exp(-(a + logit))))) < 1e-6
    # decision curve: net benefit TP/n - FP/n * pt/(1 - pt) at every threshold probability
    dc = m["decision_curve"]
    assert len(dc["thresholds"]) == 99
    for t, model, treat_all in zip(dc["thresholds"], dc["model"], dc["treat_all"]):
        called = p >= t
        tp_t, fp_t = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
        assert model == pytest.approx(tp_t / 120 - fp_t / 120 * t / (1 - t))
        assert treat_all == pytest.approx(y.mean() - (1 - y.mean()) * t / (1 - t))
    assert dc["at_threshold"]["model"] == pytest.approx(tp / 120 - fp / 120 * 0.6 / 0.4)
    assert sum(m["calibration"]["bin_count"]) == 120 and len(m["calibration"]["bin_count"]) == 10
    hl = m["hosmer_lemeshow"]
    assert hl["statistic"] > 0 and 0 <= hl["p"] <= 1 and hl["df"] == 8

    # Youden threshold: the best J on the TRAINING predictions (exhaustive search with sklearn),
    # then applied to this site
    ty, tp_ = train["y"].to_numpy(), train["probability"].to_numpy()
    yd = m["youden"]
    tpred = (tp_ >= yd["threshold"]).astype(int)
    j = recall_score(ty, tpred) + recall_score(ty, tpred, pos_label=0) - 1
    best = max(recall_score(ty, (tp_ >= t).astype(int)) +
               recall_score(ty, (tp_ >= t).astype(int), pos_label=0) - 1 for t in np.unique(tp_))
    assert j == pytest.approx(best)
    vpred = (p >= yd["threshold"]).astype(int)
    assert yd["sensitivity"] == pytest.approx(recall_score(y, vpred))
    assert yd["specificity"] == pytest.approx(recall_score(y, vpred, pos_label=0))
    assert "predictions.csv" in yd["source"]

    # subgroup: COVID-19 vs viral pneumonia only
    sel = val["label"].isin(["covid", "viral"]).to_numpy()
    sub = m["subgroups"]["viral"]
    assert METRIC_KEYS <= set(sub)
    assert sub["n"] == int(sel.sum()) and sub["labels"] == ["covid", "viral"]
    assert sub["auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]), abs=1e-12)
    assert sub["specificity"] == pytest.approx(recall_score(y[sel], pred[sel], pos_label=0))
    # empty subgroup: no crash, everything null, a note naming the labels
    empty = m["subgroups"]["empty"]
    assert empty["n"] == 0 and empty["auc"] is None and empty["accuracy"] is None
    assert any("fungal" in note for note in empty["notes"])


def test_evaluate_bootstrap_ci_near_delong(tmp_path):
    make_predictions(tmp_path / "p.csv", "Henan", 200, seed=5, separation=0.8)
    main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "d")])
    main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "b"), "--ci", "bootstrap",
          "--n-bootstrap", "1000", "--seed", "3"])
    d = json.loads((tmp_path / "d" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["ci_method"] == "bootstrap" and b["n_bootstrap"] == 1000
    assert b["auc"] == pytest.approx(d["auc"], abs=1e-12) and 0.7 < d["auc"] < 0.95
    assert b["auc_ci"] == pytest.approx(d["auc_ci"], abs=0.03)
    assert "optimistic" in d["youden"]["source"]            # no --youden-from: chosen on itself


def test_evaluate_one_class_site(tmp_path):
    df = make_predictions(tmp_path / "p.csv", "Beijing", 40, seed=3, only_covid=True)
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "p.csv"), str(out), "--threshold", "0.5",
                 "--subgroup", "viral=covid,viral"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["auc"] is None and m["auc_ci"] is None and m["specificity"] is None
    assert "only COVID-19 patients: AUC and specificity undefined" in m["notes"]
    frac = float((df["probability"] >= 0.5).mean())
    assert m["sensitivity"] == pytest.approx(frac) and m["accuracy"] == pytest.approx(frac)
    assert m["confusion"]["tn"] == 0 and m["confusion"]["fp"] == 0
    assert m["youden"]["threshold"] is None
    assert m["subgroups"]["viral"]["auc"] is None and m["subgroups"]["viral"]["n"] == 40
    assert (out / "roc.png").is_file() and (out / "calibration.png").is_file()
    # the new statistics: defined ones computed, the rest null with a note, never NaN
    m = strict_json(out / "metrics.json")
    assert m["ci"]["specificity"] is None and m["auc_variance"] is None
    tp = m["confusion"]["tp"]
    assert m["ci"]["sensitivity"] == pytest.approx(wilson(tp, 40))
    assert m["ppv"] == 1.0 and m["npv"] == 0.0
    assert m["calibration_slope"] is None and m["calibration_intercept"] is None
    assert any("calibration intercept and slope undefined" in note for note in m["notes"])
    assert m["brier"] == pytest.approx(float(np.mean((df["probability"] - 1) ** 2)))
    assert m["decision_curve"]["treat_all"][49] == pytest.approx(1.0)    # prevalence 1, pt 0.5
    assert (out / "decision.png").is_file()


def test_evaluate_sex_and_age_subgroups_from_the_site_sheet(tmp_path, capsys):
    df = make_predictions(tmp_path / "p.csv", "Anhui", 150, seed=11)
    sheet = make_sheet(tmp_path / "anhui.tsv", df, seed=12)
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "p.csv"), str(out), "--sheet",
                 str(tmp_path / "anhui.tsv"), "--tracking-uri", "none"]) == 0
    m = strict_json(out / "metrics.json")
    demo = m["subgroups_demographic"]
    assert list(demo) == ["sex", "age"]
    assert list(demo["sex"]) == ["F", "M", "unknown"]
    assert list(demo["age"]) == ["<50", "50-64", ">=65", "unknown"]   # the default bands 50 65
    y, p = df["y"].to_numpy(), df["probability"].to_numpy()
    age = pd.to_numeric(sheet["age"], errors="coerce").to_numpy()
    masks = {("sex", "F"): (sheet["sex"] == "F").to_numpy(),
             ("sex", "M"): (sheet["sex"] == "M").to_numpy(),
             ("sex", "unknown"): (sheet["sex"] == "").to_numpy(),
             ("age", "<50"): age < 50, ("age", "50-64"): (age >= 50) & (age <= 64),
             ("age", ">=65"): age >= 65, ("age", "unknown"): np.isnan(age)}
    for (factor, name), sel in masks.items():
        sub = demo[factor][name]
        assert sub["n"] == int(sel.sum()) and sub["n_positive"] == int(y[sel].sum()), name
        if 0 < y[sel].sum() < sel.sum():
            assert sub["auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]), abs=1e-12)
        assert sub["sensitivity"] == pytest.approx(recall_score(y[sel], p[sel] >= 0.5))
        assert "decision_curve" not in sub
    assert sum(demo["sex"][k]["n"] for k in demo["sex"]) == 150
    assert sum(demo["age"][k]["n"] for k in demo["age"]) == 150
    assert demo["sex"]["unknown"]["n"] == 1 and demo["age"]["unknown"]["n"] == 1
    assert demo["age"]["50-64"]["age_range"] == [50, 65] and demo["sex"]["F"]["sex"] == "female"
    assert demo["sex"]["unknown"]["auc"] is None                     # one patient: one class

    # other bands; no bands at all
    assert main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "o2"), "--sheet",
                 str(tmp_path / "anhui.tsv"), "--age-bands", "40", "60", "80",
                 "--tracking-uri", "none"]) == 0
    bands = strict_json(tmp_path / "o2" / "metrics.json")["subgroups_demographic"]["age"]
    assert list(bands) == ["<40", "40-59", "60-79", ">=80", "unknown"]
    assert bands[">=80"]["n"] == int((age >= 80).sum())
    assert main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "o3"), "--sheet",
                 str(tmp_path / "anhui.tsv"), "--age-bands", "--tracking-uri", "none"]) == 0
    assert list(strict_json(tmp_path / "o3" / "metrics.json")["subgroups_demographic"]) == ["sex"]
    # without --sheet there are none
    assert main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "o4"),
                 "--tracking-uri", "none"]) == 0
    assert strict_json(tmp_path / "o4" / "metrics.json")["subgroups_demographic"] == {}

    # a patient the sheet lacks: one clear line naming the patient and the sheet
    sheet.iloc[5:].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "o5"), "--sheet",
                 str(tmp_path / "short.tsv"), "--tracking-uri", "none"]) == 2
    err = capsys.readouterr().err
    assert "Anhui-000" in err and "short.tsv" in err and "not in the site sheet" in err


def test_evaluate_bad_input_names_patient_and_file(tmp_path, capsys):
    df = make_predictions(tmp_path / "p.csv", "Anhui", 10, seed=4)
    df.loc[3, "probability"] = np.nan
    df.to_csv(tmp_path / "p.csv", index=False)
    assert main(["evaluate", str(tmp_path / "p.csv"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "patient Anhui-003" in err and "p.csv" in err and "not in [0, 1]" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_mlflow_run(tmp_path):

    make_predictions(tmp_path / "p.csv", "Heilongjiang", 80, seed=6)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "p.csv"), str(out), "--tracking-uri", uri,
                 "--role", "diagnosis", "--threshold", "0.8",
                 "--subgroup", "viral=covid,viral"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    client = tracking_client(uri)
    exp = client.get_experiment_by_name("covidct")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.data.tags["covidct.site"] == "Heilongjiang"
    assert r.data.tags["covidct.role"] == "diagnosis"
    assert r.data.tags["covidct.model"] == "finetune_covid"
    assert r.data.metrics["auc"] == pytest.approx(m["auc"])
    assert r.data.metrics["auc_ci_low"] == pytest.approx(m["auc_ci"][0])
    assert r.data.metrics["specificity"] == pytest.approx(m["specificity"])
    assert r.data.metrics["viral/auc"] == pytest.approx(m["subgroups"]["viral"]["auc"])
    assert r.data.metrics["brier"] == pytest.approx(m["brier"])
    assert r.data.metrics["calibration_slope"] == pytest.approx(m["calibration_slope"])
    assert r.data.metrics["sensitivity_ci_low"] == pytest.approx(m["ci"]["sensitivity"][0])
    assert r.data.metrics["npv_ci_high"] == pytest.approx(m["ci"]["npv"][1])
    assert r.data.metrics["net_benefit"] == pytest.approx(m["decision_curve"]["at_threshold"]
                                                          ["model"])
    assert r.data.params["threshold"] == "0.8"
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"metrics.json", "roc.png", "calibration.png", "decision.png"} <= arts
    # its patients are the run's evaluation dataset
    (dataset,) = client.get_run(r.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "Heilongjiang sheet"
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "evaluation"


# ----------------------------------------------------------------------------- tables
def test_tables_fill_every_cell(tmp_path):
    ev = tmp_path / "eval"
    sites = {"Wuhan": 7, "Anhui": 8}
    for site, seed in sites.items():
        make_predictions(ev / site / "predictions.csv", site, 100, seed=seed, separation=1.6)
        make_predictions(ev / site / "random_init" / "predictions.csv", site, 100, seed=seed,
                         model="random_init", separation=0.6)
    # random-init probabilities for the SAME patients and labels: keep patients/labels, new scores
    for site, seed in sites.items():
        pre = pd.read_csv(ev / site / "predictions.csv")
        rnd = pd.read_csv(ev / site / "random_init" / "predictions.csv")
        rnd[["patient", "label", "y"]] = pre[["patient", "label", "y"]]
        rng = np.random.default_rng(seed + 100)
        rnd["probability"] = 1 / (1 + np.exp(-(0.5 * (2 * rnd["y"] - 1) + rng.normal(0, 1.2, 100))))
        rnd.to_csv(ev / site / "random_init" / "predictions.csv", index=False)
    make_predictions(ev / "Henan" / "predictions.csv", "Henan", 90, seed=10, separation=0.7)
    make_predictions(ev / "Beijing" / "predictions.csv", "Beijing", 30, seed=9, only_covid=True)
    anhui = pd.read_csv(ev / "Anhui" / "predictions.csv", dtype={"patient": str})
    make_sheet(tmp_path / "anhui.tsv", anhui, seed=13)
    roles = {"Wuhan": "train", "Anhui": "diagnosis", "Henan": "diagnosis", "Beijing": "prognosis"}
    metrics, ablation = [], []
    for site, role in roles.items():
        sheet = ["--sheet", str(tmp_path / "anhui.tsv")] if site == "Anhui" else []
        assert main(["evaluate", str(ev / site / "predictions.csv"), str(ev / site), "--role",
                     role, "--subgroup", "viral=covid,viral", "--threshold", "0.55", *sheet,
                     "--tracking-uri", "none"]) == 0
        metrics.append(str(ev / site / "metrics.json"))
    for site in sites:
        assert main(["evaluate", str(ev / site / "random_init" / "predictions.csv"),
                     str(ev / site / "random_init"), "--tracking-uri", "none"]) == 0
        ablation.append(str(ev / site / "random_init" / "metrics.json"))
    out = tmp_path / "tables"
    assert main(["tables", "--metrics", *metrics, "--ablation", *ablation,
                 "--out-dir", str(out), "--threshold", "0.55", "--tracking-uri", "none"]) == 0
    assert {"table2.csv", "table2.md", "table_s2.csv", "table_s2.md", "figure3a_roc.png",
            "figure3b_calibration.png", "figure_forest_auc.png", "table_heterogeneity.csv",
            "table_heterogeneity.md", "table_subgroups.csv", "table_subgroups.md"} <= {
        p.name for p in out.iterdir()}

    t2 = pd.read_csv(out / "table2.csv", index_col=0, dtype=str, keep_default_na=False)
    assert list(t2.columns) == ["Wuhan", "Wuhan viral", "Anhui", "Anhui viral", "Henan",
                                "Henan viral", "Beijing", "Beijing viral",
                                "Pooled external sites"]
    for row in ("n", "AUC (95% CI)", "Accuracy (%, 95% CI)", "Sensitivity (%, 95% CI)",
                "Specificity (%, 95% CI)", "PPV (%, 95% CI)", "NPV (%, 95% CI)", "F1-score (%)",
                "Brier score", "Calibration intercept", "Calibration slope"):
        assert row in t2.index
    assert (t2 != "").all().all() and not t2.isna().any().any()
    assert not t2.apply(lambda col: col.str.contains("nan", case=False)).any().any()
    wuhan = json.loads((ev / "Wuhan" / "metrics.json").read_text())
    assert t2.loc["AUC (95% CI)", "Wuhan"] == (f"{wuhan['auc']:.2f} ({wuhan['auc_ci'][0]:.2f}-"
                                               f"{wuhan['auc_ci'][1]:.2f})")
    lo, hi = wuhan["ci"]["sensitivity"]
    assert t2.loc["Sensitivity (%, 95% CI)", "Wuhan"] == (
        f"{100 * wuhan['sensitivity']:.2f} ({100 * lo:.2f}-{100 * hi:.2f})")
    assert t2.loc["Calibration slope", "Wuhan"] == f"{wuhan['calibration_slope']:.2f}"
    assert t2.loc["Brier score", "Wuhan"] == f"{wuhan['brier']:.3f}"
    assert t2.loc["n", "Wuhan viral"] == str(wuhan["subgroups"]["viral"]["n"])
    assert t2.loc["AUC (95% CI)", "Beijing"] == "n/a (one class)"
    assert t2.loc["Specificity (%, 95% CI)", "Beijing"] == "n/a (one class)"
    assert t2.loc["Calibration slope", "Beijing"] == "n/a (one class)"
    assert t2.loc["Sensitivity (%, 95% CI)", "Beijing"] != "n/a (one class)"
    md = (out / "table2.md").read_text()
    assert "| metric | Wuhan |" in md and "n/a (one class)" in md and "Wilson" in md

    # the pooled column: the external sites' patients together (never the training site)
    pooled = pd.concat([pd.read_csv(ev / s / "predictions.csv") for s in ("Anhui", "Henan",
                                                                          "Beijing")])
    y, p = pooled["y"].to_numpy(), pooled["probability"].to_numpy()
    assert t2.loc["n", "Pooled external sites"] == str(len(pooled)) == "220"
    assert t2.loc["AUC (95% CI)", "Pooled external sites"].startswith(
        f"{roc_auc_score(y, p):.2f} (")
    assert t2.loc["Specificity (%, 95% CI)", "Pooled external sites"].startswith(
        f"{100 * recall_score(y, p >= 0.55, pos_label=0):.2f} (")
    assert t2.loc["Brier score", "Pooled external sites"] == f"{brier_score_loss(y, p):.3f}"

    # heterogeneity of the external sites' AUCs: Anhui and Henan (Beijing has one class),
    # inverse-variance weights 1/v, Q = sum w (auc - pooled)^2, I^2 = max(0, (Q - 1) / Q)
    het = dict(pd.read_csv(out / "table_heterogeneity.csv", dtype=str).itertuples(index=False))
    a, h = (json.loads((ev / s / "metrics.json").read_text()) for s in ("Anhui", "Henan"))
    w = np.array([1 / a["auc_variance"], 1 / h["auc_variance"]])
    aucs = np.array([a["auc"], h["auc"]])
    fixed = float((w * aucs).sum() / w.sum())
    q = float((w * (aucs - fixed) ** 2).sum())
    assert het["Sites pooled"] == "Anhui, Henan" and het["k"] == "2" and het["df"] == "1"
    left_out = het["Sites not pooled"]
    assert "Wuhan (training site" in left_out and "Beijing (one class only" in left_out
    assert het["Cochran's Q"] == f"{q:.3f}"
    assert het["I^2 (%)"] == f"{100 * max(0.0, (q - 1) / q):.1f}"
    assert het["Pooled AUC, fixed effect, inverse variance (95% CI)"].startswith(f"{fixed:.3f} (")
    assert png_shape(out / "figure_forest_auc.png")[0] > 100

    # sex and age subgroups: the one site evaluated with its sheet
    sub = pd.read_csv(out / "table_subgroups.csv", dtype=str, keep_default_na=False)
    assert set(sub["Site"]) == {"Anhui"}
    assert list(sub["Subgroup"]) == ["sex female", "sex male", "sex unknown", "age <50",
                                     "age 50-64", "age >=65", "age unknown"]
    assert sum(int(v) for v in sub["n"][:3]) == 100 and sum(int(v) for v in sub["n"][3:]) == 100

    s2 = pd.read_csv(out / "table_s2.csv", dtype=str, keep_default_na=False)
    assert (s2 != "").all().all()
    assert len(s2) == 6                                      # 2 random-init, 2 pretrained, 2 diffs
    for site in sites:
        pre = json.loads((ev / site / "metrics.json").read_text())
        rnd = json.loads((ev / site / "random_init" / "metrics.json").read_text())
        diff = s2[(s2["Method"].str.startswith("Difference")) & (s2["Dataset"] == site)].iloc[0]
        assert diff["AUC (95% CI)"].startswith(f"{pre['auc'] - rnd['auc']:+.3f} (")
        assert "paired DeLong" in diff["AUC (95% CI)"]
        assert diff["Accuracy (%)"] == f"{100 * (pre['accuracy'] - rnd['accuracy']):+.2f}"
        rnd_row = s2[(s2["Method"].str.startswith("Random")) & (s2["Dataset"] == site)].iloc[0]
        assert rnd_row["AUC (95% CI)"].startswith(f"{rnd['auc']:.2f} (")
    assert png_shape(out / "figure3a_roc.png")[0] > 100


# ----------------------------------------------------------------------------- predict-site
def test_predict_site_tiny_model(tmp_path, capsys):
    import keras

    from covidct.io.stores import write_image

    inp = keras.Input((4, 8, 12, 1))
    x = keras.layers.Conv3D(3, 3, padding="same", activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling3D()(x)
    feat = keras.layers.Dense(64, name="dl_feature")(x)
    outp = keras.layers.Dense(1, activation="sigmoid")(feat)
    model = keras.Model(inp, outp)
    model_path = tmp_path / "models" / "finetune_covid" / "model.keras"
    model_path.parent.mkdir(parents=True)
    model.save(model_path)

    rng = np.random.default_rng(0)
    labels = {"P1": "covid", "P2": "viral", "P3": "covid"}
    rois, arrays = [], {}
    for pid in labels:
        arr = rng.normal(size=(4, 8, 12)).astype(np.float16)
        arrays[pid] = arr
        rois.append(str(write_image(tmp_path / "patients" / "Anhui" / pid / "roi.zarr", arr,
                                    spacing=(5.0, 1.0, 1.0))))
    sheet = tmp_path / "samples.tsv"
    rows = ["patient\tsite\timage\ttask\tlabel"]
    rows += [f"{pid}\tAnhui\t/data/{pid}.nii.gz\tcovid\t{lab}" for pid, lab in labels.items()]
    rows += ["Q9\tBeijing\t/data/Q9.nii.gz\tcovid\tcovid"]
    sheet.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval" / "Anhui" / "predictions.csv"
    assert main(["predict-site", "--model", str(model_path), "--sheet", str(sheet),
                 "--site", "Anhui", "--rois", *rois, "--out", str(out), "--batch-size", "2"]) == 0

    df = pd.read_csv(out)
    assert list(df.columns) == (["patient", "site", "label", "y", "probability"]
                                + [f"feature_{i}" for i in range(64)] + ["model"])
    assert list(df["patient"]) == ["P1", "P2", "P3"]
    assert list(df["y"]) == [1, 0, 1] and list(df["label"]) == ["covid", "viral", "covid"]
    assert (df["site"] == "Anhui").all() and (df["model"] == "finetune_covid").all()
    # probabilities and features equal the saved model's own outputs on the float16 ROI
    batch = np.stack([arrays[p].astype(np.float32) for p in labels])[..., None]
    expect_p = model.predict(batch, verbose=0)[:, 0]
    expect_f = keras.Model(model.input, model.get_layer("dl_feature").output).predict(batch,
                                                                                        verbose=0)
    np.testing.assert_allclose(df["probability"], expect_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df[[f"feature_{i}" for i in range(64)]].to_numpy(), expect_f,
                               rtol=1e-5, atol=1e-5)
    assert len(set(np.round(df["probability"], 6))) == 3

    # a store of a patient the sheet puts at another site: one clear line, no output
    other = write_image(tmp_path / "patients" / "Anhui" / "Q9" / "roi.zarr",
                        arrays["P1"], spacing=(5.0, 1.0, 1.0))
    out2 = tmp_path / "eval2" / "predictions.csv"
    assert main(["predict-site", "--model", str(model_path), "--sheet", str(sheet), "--site",
                 "Anhui", "--rois", rois[0], str(other), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "patient Q9" in err and "roi.zarr" in err and "Beijing" in err
    assert not out2.exists()
    # a store whose shape does not fit the model input
    bad = write_image(tmp_path / "patients" / "Anhui" / "P2" / "roi.zarr",
                      np.zeros((4, 8, 10), np.float16), spacing=(5.0, 1.0, 1.0))
    assert main(["predict-site", "--model", str(model_path), "--sheet", str(sheet), "--site",
                 "Anhui", "--rois", str(bad), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "patient P2" in err and "does not fit the model input" in err
