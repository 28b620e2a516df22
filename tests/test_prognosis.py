"""Prognosis: Cox model, stepwise selection, risk groups, KM/log-rank, the `covidct prognosis`
stage.

Reference values come from lifelines' documentation on the real data sets it ships (Rossi
recidivism, Waltons); selection and direction are checked on seeded simulations with known truth.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from covidct.analysis import survival
from covidct.analysis.prognosis import (
    display_name,
    fit_prognosis_model,
    load_cohort,
    site_result,
)
from covidct.analysis.scoring import DIRECTION, risk_from_features
from covidct.cli import main
from covidct.io.tracking import client as tracking_client
from covidct.params import PrognosisParams, ridge_penalizer

# --------------------------------------------------------------------------- reference data

def test_cox_on_rossi_matches_lifelines_documented_coefficients():
    from lifelines.datasets import load_rossi

    rossi = load_rossi()
    covs = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
    cph = survival.fit_cox(rossi, "week", "arrest", covs)
    documented = {"fin": -0.38, "age": -0.06, "race": 0.31, "wexp": -0.15, "mar": -0.43,
                  "paro": -0.08, "prio": 0.09}
    assert {c: round(float(cph.params_[c]), 2) for c in covs} == documented
    # the no-covariate partial likelihood (used by the AIC search) agrees with lifelines' LR test
    lr = cph.log_likelihood_ratio_test().test_statistic
    assert survival.null_log_likelihood(rossi["week"], rossi["arrest"]) == pytest.approx(
        cph.log_likelihood_ - lr / 2, abs=1e-6)
    assert survival.information_criterion(rossi, "week", "arrest", covs) == pytest.approx(
        cph.AIC_partial_, abs=1e-6)


def test_logrank_on_waltons_matches_lifelines_docs():
    from lifelines.datasets import load_waltons

    w = load_waltons()
    stats, fitters = survival.km_logrank_per_group(w["T"], w["E"], w["group"] == "miR-137")
    assert stats["logrank_statistic"] == pytest.approx(122.25, abs=0.005)
    assert stats["p"] < 0.005
    assert stats["n_high"] == int((w["group"] == "miR-137").sum())
    assert stats["n_high"] + stats["n_low"] == stats["n"] == len(w)
    # miR-137 flies die much earlier: their median lifetime is the shorter one
    assert stats["median_stay_high"] < stats["median_stay_low"]
    assert set(fitters) == {"high", "low"}


def test_c_index_ci_brackets_estimate_and_is_seeded():
    from lifelines.datasets import load_rossi

    r = load_rossi()
    c, ci = survival.c_index_ci(r["week"], -r["prio"], r["arrest"], n_boot=200, seed=3)
    assert 0.55 < c < 0.70  # more prior convictions -> earlier re-arrest
    assert ci[0] < c < ci[1]
    assert survival.c_index_ci(r["week"], -r["prio"], r["arrest"], n_boot=200, seed=3)[1] == ci
    # a risk that is exactly the observed time order is perfectly concordant
    assert survival.c_index([1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1]) == 1.0


# --------------------------------------------------------------------------- selection

TRUE = {"x0", "x1", "x2"}


@pytest.fixture(scope="module")
def signal_data():
    """Exponential times with 3 true covariates (log-HR 0.8, -0.6, 0.5) among 15 noise ones."""
    rng = np.random.default_rng(0)
    n, p = 300, 18
    x = rng.normal(size=(n, p))
    beta = np.zeros(p)
    beta[:3] = [0.8, -0.6, 0.5]
    t = rng.exponential(1.0 / (0.1 * np.exp(x @ beta)))
    c = rng.exponential(20.0, size=n)
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(p)])
    df["T"] = np.minimum(t, c)
    df["E"] = (t <= c).astype(int)
    return df


# Strict levels: with 15 noise covariates the chance that one of them passes a 0.05 entry level
# is about 1 - 0.95**15 = 54%, so the exact-set check uses 0.001 (about 1.5%); for the
# information criterion the penalty with the same 1-df threshold, chi2.ppf(0.999, 1) = 10.83.
@pytest.mark.parametrize("method", [pytest.param("forward", marks=pytest.mark.slow), "backward",
                                    "stepwise", pytest.param("aic", marks=pytest.mark.slow)])
def test_selection_recovers_the_true_covariates(signal_data, method):
    cands = [f"x{i}" for i in range(18)]
    selected, trace = survival.stepwise_select(
        signal_data, "T", "E", cands, method=method, p_enter=0.001, p_stay=0.001,
        ic_penalty=float(chi2.ppf(0.999, 1)))
    assert set(selected) == TRUE
    assert trace[0].startswith(f"method={method}")
    assert len(trace) >= 2


@pytest.mark.slow
def test_aic_selection_stops_at_a_local_minimum_of_lifelines_aic(signal_data):
    cands = [f"x{i}" for i in range(18)]
    selected, _ = survival.stepwise_select(signal_data, "T", "E", cands, method="aic")
    assert TRUE <= set(selected)
    aic = survival.fit_cox(signal_data, "T", "E", selected).AIC_partial_
    for cand in cands:
        moved = [c for c in selected if c != cand] if cand in selected else selected + [cand]
        assert survival.fit_cox(signal_data, "T", "E", moved).AIC_partial_ >= aic - 1e-9


def test_forward_respects_max_features(signal_data):
    selected, _ = survival.stepwise_select(signal_data, "T", "E", [f"x{i}" for i in range(18)],
                                           method="forward", max_features=1)
    assert selected == ["x0"]  # the strongest signal enters first


def test_unknown_method_is_refused(signal_data):
    with pytest.raises(survival.SurvivalError, match="unknown selection method"):
        survival.stepwise_select(signal_data, "T", "E", ["x0"], method="lasso")


# --------------------------------------------------------------------------- direction

def simulate_cohort(seed: int, n: int, n_features: int = 8, site: str = "A") -> pd.DataFrame:
    """COVID-19 patients whose feature_3 lengthens the stay (lowers the discharge hazard)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, n_features))
    age = rng.uniform(30, 80, n).round()
    sex = rng.integers(0, 2, n)
    com = rng.integers(0, 2, n)
    rate = 0.08 * np.exp(-1.0 * f[:, 3] - 0.02 * (age - 55))
    stay = np.ceil(rng.exponential(1.0 / rate)).clip(1, None)
    cens = rng.uniform(10, 60, n).round()
    df = pd.DataFrame(f, columns=[f"feature_{i}" for i in range(n_features)])
    df.insert(0, "patient", [f"{site}{i:03d}" for i in range(n)])
    df.insert(1, "site", site)
    df["age"], df["sex"], df["comorbidity"] = age, sex.astype(float), com.astype(float)
    df["stay_days"] = np.minimum(stay, cens)
    df["discharged"] = (stay <= cens).astype(int)
    return df


def test_high_risk_means_longer_stay_and_cox_json_round_trips():
    train = simulate_cohort(1, 200)
    feats = [f"feature_{i}" for i in range(8)]
    cox, cph, risk = fit_prognosis_model(
        train, feats, PrognosisParams(selection="forward", p_enter=0.01, p_stay=0.01, min_events=10)
    )
    assert "feature_3" in cox["covariates"]
    assert cox["coefficients"][cox["covariates"].index("feature_3")] < 0  # lowers discharge
    assert cox["names"][cox["covariates"].index("feature_3")] == "DL feature-3"
    assert cox["cutoff"] == pytest.approx(float(np.median(risk)))
    assert cox["direction"] == DIRECTION
    # the stored risk is minus lifelines' log partial hazard, up to lifelines' centring constant
    lph = cph.predict_log_partial_hazard(
        (train[cox["covariates"]] - cox["mean"]) / cox["sd"]
    ).to_numpy()
    assert np.allclose(risk + lph, (risk + lph)[0], atol=1e-8)

    stats, fitters = site_result(train, cox, n_boot=100)
    assert stats["n_high"] == stats["n_low"] == 100
    assert stats["median_stay_high"] > stats["median_stay_low"]
    assert stats["p"] < 1e-4
    assert stats["c_index"] > 0.6

    # an independent validation cohort from the same model, scored with the training cut-off
    val = simulate_cohort(2, 120, site="B")
    vstats, _ = site_result(val, cox, n_boot=100)
    assert vstats["median_stay_high"] > vstats["median_stay_low"] and vstats["p"] < 0.01

    # cox.json (through JSON text) scores a patient exactly like the fitted model
    cox_rt = json.loads(json.dumps(cox))
    for i in (0, 17, 123):
        row = train.iloc[i]
        r, group = risk_from_features(
            cox_rt,
            row[feats].to_numpy(float),
            row["age"],
            "M" if row["sex"] == 1 else "F",
            row["comorbidity"],
        )
        assert r == pytest.approx(risk[i], abs=1e-9)
        assert group == ("high" if risk[i] > cox["cutoff"] else "low")


def test_scoring_a_cox_json_imports_neither_pandas_nor_lifelines():
    """``covidct predict --cox`` scores one patient with the numpy-only scoring module."""
    import subprocess
    import sys

    probe = ("import sys\nfrom covidct.analysis.scoring import risk_from_features\n"
             "cox = {'covariates': ['age', 'feature_1'], 'mean': [60.0, 0.0], 'sd': [10.0, 2.0],"
             " 'coefficients': [0.5, -1.0], 'cutoff': 0.0}\n"
             "print(risk_from_features(cox, [0.0, 4.0], 70, 'F', 0), "
             "sorted(m for m in ('pandas', 'lifelines', 'scipy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    # risk = -(0.5 * (70 - 60) / 10 + (-1.0) * (4 - 0) / 2) = -(0.5 - 2) = 1.5 > 0: high
    assert out == "(1.5, 'high') []"


@pytest.mark.slow
def test_events_per_feature_caps_the_model_size():
    """30 patients, 64 candidate features of which one carries the signal: AIC alone keeps
    entering chance features; one feature per 10 discharges keeps the model small, and the
    cap is recorded in cox.json."""
    train = simulate_cohort(4, 30, n_features=64)
    feats = [f"feature_{i}" for i in range(64)]
    n_events = int(train["discharged"].sum())
    free, _, _ = fit_prognosis_model(
        train,
        feats,
        PrognosisParams(selection="aic", max_features=10, events_per_feature=0, min_events=4),
    )
    capped, _, _ = fit_prognosis_model(
        train,
        feats,
        PrognosisParams(selection="aic", max_features=10, events_per_feature=10, min_events=4),
    )
    assert len(free["covariates"]) > n_events // 10
    assert len(capped["covariates"]) == n_events // 10
    assert capped["covariates"] == free["covariates"][: n_events // 10]  # the same first steps
    assert capped["selection"]["max_features"] == n_events // 10
    assert capped["selection"]["events_per_feature"] == 10.0
    assert free["selection"]["max_features"] == 10


def test_nothing_selected_falls_back_to_best_univariate():
    rng = np.random.default_rng(5)
    train = simulate_cohort(3, 80)
    train["feature_3"] = rng.normal(size=len(train))  # remove the signal
    feats = [f"feature_{i}" for i in range(8)]
    cox, _, _ = fit_prognosis_model(
        train, feats, PrognosisParams(selection="forward", p_enter=1e-9)
    )
    assert len(cox["covariates"]) == 1
    assert cox["selection"]["fallback_to_best_univariate"] is True
    assert any("falling back" in n for n in cox["notes"])
    data = survival.standardise(train, feats + ["age", "sex", "comorbidity"])[0]
    data[["stay_days", "discharged"]] = train[["stay_days", "discharged"]]
    best, _ = survival.best_univariate(
        data, "stay_days", "discharged", feats + ["age", "sex", "comorbidity"]
    )
    assert cox["covariates"] == [best]


@pytest.mark.slow
def test_ridge_penalizer_cv_penalises_noise_more_than_signal(signal_data):
    """Cross-validation keeps the penalty light where the covariates carry a strong signal and
    heavy where the outcome has been shuffled away from them."""
    cands = [f"x{i}" for i in range(18)]
    best, scores = survival.ridge_penalizer_cv(signal_data, "T", "E", cands, seed=1)
    assert list(scores) == list(survival.RIDGE_GRID) and scores[best] == max(scores.values())
    assert best <= 1.0
    noise = signal_data.copy()
    noise[["T", "E"]] = noise[["T", "E"]].sample(frac=1.0, random_state=2).to_numpy()
    best_noise, scores_noise = survival.ridge_penalizer_cv(noise, "T", "E", cands, seed=1)
    assert best_noise >= 10.0
    assert scores_noise[best_noise] < scores[best]  # and it predicts held-out data worse
    assert survival.ridge_penalizer_cv(noise, "T", "E", cands, seed=1)[0] == best_noise  # seeded
    with pytest.raises(survival.SurvivalError, match="too few"):
        survival.ridge_penalizer_cv(signal_data.iloc[:6], "T", "E", cands)


def spread_signal_cohort(seed: int, n: int, n_features: int = 64, n_carriers: int = 16):
    """Like a DL feature vector: a latent severity spread weakly over 16 of 64 features."""
    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n)
    df = simulate_cohort(seed, n, n_features=n_features)
    df[[f"feature_{i}" for i in range(n_carriers)]] += 0.6 * severity[:, None]
    stay = np.ceil(rng.exponential(1.0 / (0.08 * np.exp(-0.8 * severity)))).clip(1, None)
    cens = rng.uniform(20, 60, n).round()
    df["stay_days"], df["discharged"] = np.minimum(stay, cens), (stay <= cens).astype(int)
    return df


@pytest.mark.slow
def test_ridge_keeps_every_candidate_and_transfers_better_than_stepwise():
    """40 training patients, 67 candidates: stepwise picks a few that partly fit noise; one
    ridge model on all of them ranks a new site's 300 patients better (training seeds 0-4:
    validation C 0.61-0.69 against 0.57-0.66, higher on every seed; this is seed 2)."""
    from lifelines import CoxPHFitter

    train, other = spread_signal_cohort(2, 40), spread_signal_cohort(102, 300)
    feats = [f"feature_{i}" for i in range(64)]
    step, _, _ = fit_prognosis_model(
        train, feats, PrognosisParams(selection="stepwise", min_events=4)
    )
    ridge, _, risk = fit_prognosis_model(
        train, feats, PrognosisParams(selection="ridge", min_events=4, seed=0)
    )
    candidates = feats + ["age", "sex", "comorbidity"]
    assert ridge["covariates"] == candidates and len(step["covariates"]) <= 3
    pen = ridge["selection"]["penalizer"]
    assert pen in survival.RIDGE_GRID and ridge["selection"]["ridge_cv"]["grid"] == list(
        survival.RIDGE_GRID
    )
    assert "ridge: all 67 candidates" in ridge["selection"]["trace"][0]
    # the stored model is lifelines' ridge fit on the training-standardised covariates
    z = survival.standardise(train, candidates)[0].assign(
        T=train["stay_days"], E=train["discharged"]
    )
    ref = CoxPHFitter(penalizer=pen).fit(z, "T", "E")
    np.testing.assert_allclose(
        ridge["coefficients"], ref.params_[candidates].to_numpy(), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        risk, -ref.predict_log_partial_hazard(z[candidates]).to_numpy(), atol=1e-6
    )
    c_step = site_result(other, step, n_boot=20)[0]["c_index"]
    c_ridge = site_result(other, ridge, n_boot=20)[0]["c_index"]
    assert c_ridge > c_step and c_ridge > 0.65
    fixed, _, _ = fit_prognosis_model(
        train, feats, PrognosisParams(selection="ridge", ridge_penalizer=2.5, min_events=4)
    )
    assert fixed["selection"]["penalizer"] == 2.5 and fixed["selection"]["ridge_cv"] is None


def test_ridge_penalizer_argument():
    assert ridge_penalizer("auto") == "auto" and ridge_penalizer("AUTO") == "auto"
    assert ridge_penalizer("0.3") == 0.3
    for bad in ("0", "-1", "nan", "big"):
        with pytest.raises(Exception, match="positive number"):
            ridge_penalizer(bad)


def test_display_names():
    assert display_name("feature_22") == "DL feature-22"
    assert display_name("age") == "age"


# --------------------------------------------------------------------------- the stage


def write_inputs(tmp_path, sites: dict[str, pd.DataFrame], no_follow_up: set[str] = frozenset()):
    """predictions.csv per site (with non-COVID patients too) and one sample sheet."""
    sheet_rows, paths = [], {}
    for site, df in sites.items():
        df = df.copy()
        rng = np.random.default_rng(len(site))
        others = df.iloc[:10].copy()
        others["patient"] = [f"{site}N{i:02d}" for i in range(10)]
        pred = pd.concat([df.assign(y=1, label="covid"), others.assign(y=0, label="viral")])
        pred["probability"] = rng.uniform(size=len(pred))
        feats = [c for c in df.columns if c.startswith("feature_")]
        path = tmp_path / "eval" / site / "predictions.csv"
        path.parent.mkdir(parents=True)
        pred[["patient", "site", "label", "y", "probability", *feats]].to_csv(path, index=False)
        paths[site] = path
        for r in pred.itertuples():
            follow = site not in no_follow_up and r.y == 1
            sheet_rows.append({"patient": r.patient, "site": site, "image": f"img/{r.patient}",
                               "task": "covid", "label": r.label, "age": int(r.age),
                               "sex": "M" if r.sex == 1 else "F",
                               "comorbidity": int(r.comorbidity),
                               "stay_days": int(r.stay_days) if follow else "",
                               "discharged": int(r.discharged) if follow else ""})
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(sheet_rows).to_csv(sheet, sep="\t", index=False)
    return paths, sheet


def test_prognosis_stage_end_to_end(tmp_path):
    paths, sheet = write_inputs(tmp_path, {"A": simulate_cohort(1, 200),
                                           "B": simulate_cohort(2, 120, site="B"),
                                           "C": simulate_cohort(4, 30, site="C")},
                                no_follow_up={"C"})
    out, tables = tmp_path / "prognosis", tmp_path / "tables"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["prognosis", "--train", str(paths["A"]), "--validate", str(paths["B"]),
               str(paths["C"]), "--sheet", str(sheet), "--out-dir", str(out), "--tables-dir",
               str(tables), "--selection", "stepwise", "--n-boot", "100", "--tracking-uri", uri])
    assert rc == 0
    cox = json.loads((out / "cox.json").read_text())
    assert "feature_3" in cox["covariates"] and cox["direction"] == DIRECTION
    assert cox["training"]["n"] == 200 and cox["training"]["sites"] == ["A"]

    a = json.loads((out / "A" / "logrank.json").read_text())
    b = json.loads((out / "B" / "logrank.json").read_text())
    c = json.loads((out / "C" / "logrank.json").read_text())
    for s in (a, b):
        assert s["median_stay_high"] > s["median_stay_low"] and s["p"] < 0.01
        assert s["c_index_ci"][0] < s["c_index"] < s["c_index_ci"][1]
        assert s["cutoff"] == cox["cutoff"] and s["direction"] == DIRECTION
    assert (a["n"], a["n_high"], a["n_low"]) == (200, 100, 100)  # non-COVID patients left out
    assert b["n"] == 120 and b["n_high"] + b["n_low"] == 120
    assert c["n"] == 0 and c["p"] is None and any("skipped" in n for n in c["notes"])
    for site in "ABC":
        png = (out / site / "km.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    t3 = pd.read_csv(tables / "table_s3.csv")
    assert list(t3["feature"]) == cox["names"]
    row = t3[t3["feature"] == "DL feature-3"].iloc[0]
    assert row["hr"] < 1 and row["hr_low"] < row["hr"] < row["hr_high"] and row["p"] < 0.001
    md = (tables / "table_s3.md").read_text()
    assert "| DL feature-3 |" in md and DIRECTION in md


    runs = tracking_client(uri).search_runs(
        [tracking_client(uri).get_experiment_by_name("covidct").experiment_id])
    by_site = {r.data.tags["covidct.site"]: r for r in runs}
    assert set(by_site) == {"A", "B", "C"}
    assert by_site["B"].data.metrics["p"] == pytest.approx(b["p"])
    assert by_site["A"].data.params["direction"] == DIRECTION


def test_prognosis_stage_ridge(tmp_path):
    """--selection ridge through the command line: every candidate in cox.json, Table S3 by
    coefficient size, the penalizer in MLflow; and a bad --ridge-penalizer is refused."""

    paths, sheet = write_inputs(tmp_path, {"A": simulate_cohort(1, 120),
                                           "B": simulate_cohort(2, 80, site="B")})
    out, tables = tmp_path / "prognosis", tmp_path / "tables"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["prognosis", "--train", str(paths["A"]), "--validate", str(paths["B"]), "--sheet",
            str(sheet), "--out-dir", str(out), "--tables-dir", str(tables), "--selection",
            "ridge", "--n-boot", "50", "--tracking-uri", uri]
    assert main(args + ["--ridge-penalizer", "0.5"]) == 0
    cox = json.loads((out / "cox.json").read_text())
    assert cox["covariates"] == [f"feature_{i}" for i in range(8)] + ["age", "sex", "comorbidity"]
    assert cox["selection"]["method"] == "ridge" and cox["selection"]["penalizer"] == 0.5
    b = json.loads((out / "B" / "logrank.json").read_text())
    assert b["p"] < 0.01 and b["median_stay_high"] > b["median_stay_low"]
    md = (tables / "table_s3.md").read_text().splitlines()
    assert md[0] == "# Table S3. Prognostic covariates of the ridge Cox model"
    assert md[4].startswith("| DL feature-3 |")      # the one true signal has the largest coef
    assert len([line for line in md if line.startswith("| ")]) == 1 + 11
    client = tracking_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("covidct").experiment_id])
    assert {r.data.params["penalizer"] for r in runs} == {"0.5"}
    assert {r.data.params["selection"] for r in runs} == {"ridge"}
    with pytest.raises(SystemExit):
        main(args + ["--ridge-penalizer", "0"])


def test_prognosis_stage_errors_name_patient_and_file(tmp_path, capsys):
    paths, sheet = write_inputs(tmp_path, {"A": simulate_cohort(1, 30)})
    rows = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    # too few events: only 3 discharges in the training set
    few = rows.copy()
    covid = few["label"] == "covid"
    few.loc[covid, "discharged"] = ["1"] * 3 + ["0"] * (int(covid.sum()) - 3)
    few.to_csv(sheet, sep="\t", index=False)
    args = ["prognosis", "--train", str(paths["A"]), "--sheet", str(sheet), "--out-dir",
            str(tmp_path / "p"), "--tables-dir", str(tmp_path / "t"), "--tracking-uri", "none"]
    assert main(args) == 2
    assert "too few events in the training set: 3 discharged" in capsys.readouterr().err
    assert not (tmp_path / "p" / "cox.json").exists()
    # a bad value names the patient and the sheet
    bad = rows.copy()
    bad.loc[bad["patient"] == "A005", "sex"] = "X"
    bad.to_csv(sheet, sep="\t", index=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "patient A005" in err and str(sheet) in err and "column sex" in err and "'X'" in err
    # a missing DL feature names the patient and the predictions file
    rows.to_csv(sheet, sep="\t", index=False)
    pred = pd.read_csv(paths["A"])
    good = pred.copy()
    pred.loc[pred["patient"] == "A002", "feature_4"] = np.nan
    pred.to_csv(paths["A"], index=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "patient A002" in err and str(paths["A"]) in err and "not finite" in err
    # a patient of the predictions missing from the sheet
    good.to_csv(paths["A"], index=False)
    rows[rows["patient"] != "A007"].to_csv(sheet, sep="\t", index=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "patient A007" in err and "not in the sample sheet" in err


def test_load_cohort_keeps_covid_with_follow_up(tmp_path):
    paths, sheet = write_inputs(tmp_path, {"A": simulate_cohort(1, 40),
                                           "B": simulate_cohort(2, 20, site="B")},
                                no_follow_up={"B"})
    cohort, feats, sites, notes, short = load_cohort([paths["A"]], [paths["B"]], sheet,
                                                     min_follow_up_days=3)
    assert sites == ["A", "B"] and feats == [f"feature_{i}" for i in range(8)]
    sim = simulate_cohort(1, 40)
    assert len(cohort) == int((sim["stay_days"] >= 3).sum())
    assert short == {"A": int((sim["stay_days"] < 3).sum()), "B": 0} and short["A"] > 0
    assert set(cohort["site"]) == {"A"} and set(cohort["sex"]) <= {0.0, 1.0}
    assert any("20 of 20" in n for n in notes["B"])
    assert not math.isnan(cohort["age"].sum())


def test_min_follow_up_days_leaves_out_short_stays_and_reports_them(tmp_path):
    """The paper's cohort: COVID-19 patients with at least 5 days of follow-up. A patient
    with a 4-day stay is left out, one with exactly 5 days kept; cox.json, logrank.json and
    the notes count the exclusions per site."""
    train, valid = simulate_cohort(1, 120), simulate_cohort(2, 60, site="B")
    train.loc[:4, "stay_days"] = [4, 4, 4, 5, 5]
    valid.loc[:1, "stay_days"] = [1, 5]
    paths, sheet = write_inputs(tmp_path, {"A": train, "B": valid})
    out, tables = tmp_path / "prognosis", tmp_path / "tables"
    args = ["prognosis", "--train", str(paths["A"]), "--validate", str(paths["B"]), "--sheet",
            str(sheet), "--out-dir", str(out), "--tables-dir", str(tables), "--selection",
            "ridge", "--ridge-penalizer", "1", "--n-boot", "20", "--tracking-uri", "none"]
    assert main(args + ["--min-follow-up-days", "5"]) == 0
    short_a, short_b = int((train["stay_days"] < 5).sum()), int((valid["stay_days"] < 5).sum())
    assert short_a >= 3 and short_b >= 1
    cox = json.loads((out / "cox.json").read_text())
    assert cox["follow_up"] == {"min_follow_up_days": 5.0,
                                "excluded_short_follow_up": {"A": short_a, "B": short_b},
                                "n_excluded_short_follow_up": short_a + short_b}
    assert cox["training"]["n"] == 120 - short_a
    b = json.loads((out / "B" / "logrank.json").read_text())
    assert b["n"] == 60 - short_b and b["excluded_short_follow_up"] == short_b
    assert any(f"{short_b} with stay_days < 5" in n for n in b["notes"])
    # the demo's default keeps every stay
    assert main(args) == 0
    cox = json.loads((out / "cox.json").read_text())
    assert cox["training"]["n"] == 120 and cox["follow_up"]["n_excluded_short_follow_up"] == 0
