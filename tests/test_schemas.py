"""The config and sample-sheet schemas and the sheet checks reject bad input with useful
messages."""

from __future__ import annotations

import jsonschema
import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from covidct.errors import CovidctError
from covidct.io.sheet import check_sheet, read_sheet, sites_with_role


@pytest.fixture()
def schemas(repo):
    return repo / "workflow" / "schemas"


def _config(repo):
    return yaml.safe_load((repo / "config" / "config.yaml").read_text())


def test_demo_and_paper_configs_are_valid_and_get_defaults(repo, schemas):
    for name in ("config.yaml", "paper.yaml"):
        cfg = yaml.safe_load((repo / "config" / name).read_text())
        validate(cfg, str(schemas / "config.schema.yaml"))
        assert cfg["training"]["lr"] == 0.005
        assert cfg["training"]["class_weight"] == 5
        assert cfg["mlflow"]["tracking_uri"].startswith("sqlite:///")
    paper = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    validate(paper, str(schemas / "config.schema.yaml"))
    assert paper["roi"]["size"] == [48, 240, 360]
    assert paper["evaluation"]["threshold"] == 0.8


@pytest.mark.parametrize("change, words", [
    (lambda c: c["sites"].update({"x": {"role": "testing"}}), "testing"),
    (lambda c: c["training"].update({"lr": -1}), "-1"),
    (lambda c: c.update({"roi": {"size": [48, 240]}}), "[48, 240]"),
    (lambda c: c["segmentation"].update({"method": "unet"}), "unet"),
    (lambda c: c["evaluation"].update({"threshold": 1.5}), "1.5"),
])
def test_bad_config_is_rejected_with_the_offending_value(repo, schemas, change, words):
    cfg = _config(repo)
    change(cfg)
    with pytest.raises((WorkflowError, jsonschema.ValidationError)) as err:
        validate(cfg, str(schemas / "config.schema.yaml"))
    assert words in str(err.value) + str(getattr(err.value, "args", ""))


def _sheet(tmp_path, rows):
    cols = ["patient", "site", "image", "task", "label", "age", "sex", "comorbidity",
            "stay_days", "discharged"]
    path = tmp_path / "samples.tsv"
    pd.DataFrame(rows, columns=cols).to_csv(path, sep="\t", index=False)
    return path


GOOD = ["P1", "wuhan", "/data/p1", "covid", "covid", 50, "M", 0, 12, 1]


def test_good_sheet_reads_typed_and_checks(tmp_path):
    path = _sheet(
        tmp_path, [GOOD, ["P2", "wuhan", "scans/p2", "covid", "normal", 61, "F", 1, "", ""]]
    )
    df = read_sheet(path)
    checked = check_sheet(df, {"wuhan": {"role": "train"}})
    assert list(checked["y"]) == [1, 0]
    assert pd.isna(checked.loc["P2", "stay_days"]) and checked.loc["P1", "discharged"] == 1
    # a relative image path is taken from the sheet's folder
    assert checked.loc["P2", "image"] == str(tmp_path / "scans" / "p2")
    assert checked.loc["P1", "image"] == "/data/p1"


@pytest.mark.parametrize("row, words", [
    (["P9", "wuhan", "/d", "covid", "influenza", 50, "M", 0, 12, 1],
     "column label: 'influenza' is not one of"),
    (["P9", "mars", "/d", "covid", "covid", 50, "M", 0, 12, 1], "site 'mars' has no role"),
    (["P9", "wuhan", "/d", "covid", "egfr_mutant", 50, "M", 0, 12, 1], "does not fit task 'covid'"),
    (["P1", "wuhan", "/d", "covid", "covid", 50, "M", 0, 12, 1], "used more than once: P1"),
])
def test_sheet_checks_name_the_patient_and_the_problem(tmp_path, row, words):
    path = _sheet(tmp_path, [GOOD, row])
    with pytest.raises(CovidctError) as err:
        check_sheet(read_sheet(path), {"wuhan": {"role": "train"}}, path=path)
    assert words in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("row, words", [
    (["P9", "wuhan", "/d", "covid", "covid", 250, "M", 0, 12, 1], "column age: 250"),
    (["P9", "wuhan", "/d", "covid", "covid", 50, "X", 0, 12, 1], "column sex: 'X'"),
    (["P9", "wuhan", "/d", "covid", "covid", 50, "M", 0, 12, 3], "column discharged: 3"),
    (["P 9", "wuhan", "/d", "covid", "covid", 50, "M", 0, 12, 1], "column patient: 'P 9'"),
    (["P9", "wuhan", "/d", "covid", "covid", "39y", "M", 0, 12, 1],
     "column age: '39y' is not a number"),
    (["P9", "wuhan", "/d", "covid", "covid", 50, "M", 0, "12 days", 1],
     "column stay_days: '12 days' is not a number"),
    (["P9", "wuhan", "/d", "covid", "covid", 50, "M", 0, 12, "yes"],
     "column discharged: 'yes' is not 0 or 1"),
])
def test_bad_values_name_the_file_the_row_the_patient_and_the_column(tmp_path, row, words):
    path = _sheet(tmp_path, [GOOD, row])
    with pytest.raises(CovidctError) as err:
        read_sheet(path)
    text = str(err.value)
    assert str(path) in text and "row 3 (patient P" in text and words in text


def test_a_comma_separated_sheet_is_asked_about(tmp_path):
    path = tmp_path / "samples.csv"
    path.write_text("patient,site,image,task,label\nP1,wuhan,/d,covid,covid\n")
    with pytest.raises(CovidctError, match="is it tab-separated"):
        read_sheet(path)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("patient\tsite\nP1\twuhan\n")
    with pytest.raises(CovidctError, match="lacks column.*image, task, label"):
        read_sheet(path)


def test_sites_with_role_accepts_lists():
    sites = {
        "a": {"role": "train"},
        "b": {"role": ["diagnosis", "prognosis"]},
        "c": {"role": "prognosis"},
    }
    assert sites_with_role(sites, "prognosis") == ["b", "c"]
    assert sites_with_role(sites, "train") == ["a"]


def _keys(cfg, prefix=()):
    for key, value in cfg.items():
        if isinstance(value, dict) and key not in ("sites", "synthetic", "epochs", "subgroups"):
            yield from _keys(value, prefix + (key,))
        else:
            yield prefix + (key,)


def test_the_paper_config_is_complete_on_its_own(repo):
    """Every key the demo config sets is set in paper.yaml: merged over the demo (Snakemake's
    default without --replace-workflow-config), it keeps the paper's settings."""
    demo = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    missing = [".".join(k) for k in _keys(demo) if k[0] != "synthetic"
               and not _has(paper, k)]
    assert not missing, missing
    assert set(demo["sites"]) <= set(paper["sites"])      # no demo site leaks into the paper's


def _has(cfg, keys):
    for key in keys:
        if not isinstance(cfg, dict) or key not in cfg:
            return False
        cfg = cfg[key]
    return True


# the method keys config/paper.yaml sets apart from its scale (cohort, input size, hardware, length)
PAPER_SCALE = {("samples",), ("sites",), ("segmentation",), ("explain",), ("mlflow",),
               ("roi", "size"), ("roi", "min_pixels"), ("roi", "allow_fallback")}


def test_the_authors_method_at_demo_scale_is_the_paper_configs(repo):
    """config/authors.yaml sets the authors' method as config/paper.yaml has it: each value it
    sets is paper.yaml's, and every method value where paper.yaml and the demo differ is set."""
    demo = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    paper = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    authors = yaml.safe_load((repo / "config" / "authors.yaml").read_text())
    for key in _keys(authors):
        assert _get(paper, key) == _get(authors, key), ".".join(key)
    hardware = {"backend", "accelerator", "batch_size", "epochs", "mixed_precision", "workers",
                "steps_per_execution", "learning_curve", "loop", "devices"}
    method = [k for k in _keys(paper) if not any(k[:len(s)] == s for s in PAPER_SCALE)
              and not (k[0] == "training" and k[1] in hardware)]
    differ = [k for k in method if _has(demo, k) and _get(demo, k) != _get(paper, k)]
    assert differ and [k for k in differ if not _has(authors, k)] == []
    for section, values in authors.items():
        demo[section].update(values)
    validate(demo, str(repo / "workflow" / "schemas" / "config.schema.yaml"))


def _get(cfg, keys):
    for key in keys:
        cfg = cfg[key]
    return cfg
