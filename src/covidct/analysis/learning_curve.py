"""``covidct learning-curve``: Table S2's comparison at several training-set sizes.

Each point is one set of validation patients (the internal validation split, which every
fraction shares, or an external site) at one training fraction: the AUC of the EGFR-pretrained
and of the random-init model on the same patients, and their paired DeLong difference. Written
as learning_curve.csv/.md and learning_curve.png (AUC against the training fraction).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from covidct.analysis import stats
from covidct.errors import CovidctError
from covidct.io.atomic import save_figure, write_csv, write_text
from covidct.params import TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

COLUMNS = ("validation", "fraction", "n", "n_positive", "auc_pretrained", "auc_pretrained_ci",
           "auc_random_init", "auc_random_init_ci", "difference", "difference_ci", "p")


def _scores(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"patient": str})
    missing = [c for c in ("patient", "y", "probability") if c not in table.columns]
    if missing:
        raise CovidctError(f"predictions lack column(s) {', '.join(missing)}", path=path)
    return table[["patient", "y", "probability"]]


def curve_point(name: str, fraction: float, pretrained: Path, random_init: Path) -> dict:
    """One row of the learning curve: both models' AUC on the same patients and the paired
    DeLong test of their difference (None where a class has fewer than two patients)."""
    a, b = _scores(pretrained), _scores(random_init)
    both = a.merge(b, on="patient", suffixes=("_pre", "_rnd"))
    if len(both) != len(a) or len(both) != len(b) or (both["y_pre"] != both["y_rnd"]).any():
        raise CovidctError(f"{name} at fraction {fraction:g}: the two models' predictions cover "
                           "different patients", path=f"{pretrained}, {random_init}")
    y = both["y_pre"].to_numpy()
    row = {"validation": name, "fraction": float(fraction), "n": len(both),
           "n_positive": int(y.sum())}
    for key, column in (("pretrained", "probability_pre"), ("random_init", "probability_rnd")):
        auc, low, high = stats.auc_ci_delong(y, both[column].to_numpy())
        row[f"auc_{key}"] = auc
        row[f"auc_{key}_ci"] = None if low is None else [low, high]
    m, n = stats.class_counts(y)
    if m >= 2 and n >= 2:
        test = stats.delong_roc_test(y, both["probability_pre"], both["probability_rnd"])
        row.update(difference=test["difference"], difference_ci=test["ci"], p=test["p"])
    else:
        row.update(difference=None, difference_ci=None, p=None)
    return row


def _ci(value) -> str:
    return "n/a" if value is None else f"{value[0]:.3f} to {value[1]:.3f}"


def _auc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def to_table(rows: list[dict]) -> pd.DataFrame:
    """The printable table: one row per validation set and fraction."""
    out = []
    for r in rows:
        out.append({
            "Validation": r["validation"], "Training fraction": f"{r['fraction']:g}",
            "n (COVID-19)": f"{r['n']} ({r['n_positive']})",
            "AUC pretrained (95% CI)": f"{_auc(r['auc_pretrained'])} "
                                       f"({_ci(r['auc_pretrained_ci'])})",
            "AUC random init (95% CI)": f"{_auc(r['auc_random_init'])} "
                                        f"({_ci(r['auc_random_init_ci'])})",
            "Difference (95% CI), p": "n/a (a class has < 2 patients)"
            if r["difference"] is None else
            f"{r['difference']:+.3f} ({_ci(r['difference_ci'])}), p={r['p']:.3g}"})
    return pd.DataFrame(out)


def curve_figure(rows: list[dict], path: Path) -> Path:
    """AUC against the training fraction, pretrained and random init, one panel per
    validation set, with the DeLong 95% CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows)
    names = list(dict.fromkeys(frame["validation"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        part = frame[frame["validation"] == name].sort_values("fraction")
        for key, label, marker in (("pretrained", "EGFR-pretrained", "o"),
                                   ("random_init", "random init", "s")):
            ok = part[f"auc_{key}"].notna()
            x, yv = part.loc[ok, "fraction"], part.loc[ok, f"auc_{key}"]
            ci = part.loc[ok, f"auc_{key}_ci"]
            err = [[v - c[0] if c else 0 for v, c in zip(yv, ci)],
                   [c[1] - v if c else 0 for v, c in zip(yv, ci)]]
            ax.errorbar(x, yv, yerr=err, marker=marker, capsize=3, label=label)
        ax.set(title=name, xlabel="fraction of the training patients", ylabel="AUC",
               ylim=(0.0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def add_arguments(parser) -> None:
    parser.add_argument("--point", nargs=4, action="append", required=True,
                        metavar=("NAME", "FRACTION", "PRETRAINED_CSV", "RANDOM_INIT_CSV"),
                        help="one validation set at one training fraction (repeat)")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="folder for learning_curve.csv/.md/.png")
    add_options(parser, TrackingParams)


def run(args) -> int:
    from covidct.analysis.tables import to_markdown

    rows = [curve_point(name, float(fraction), Path(pre), Path(rnd))
            for name, fraction, pre, rnd in args.point]
    rows.sort(key=lambda r: (r["validation"], r["fraction"]))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "learning_curve.csv", pd.DataFrame(rows, columns=list(COLUMNS)))
    write_text(out / "learning_curve.md", to_markdown(
        to_table(rows), index=False,
        caption="Learning curve of the pretraining: EGFR-pretrained vs random-init fine-tuning "
                "at several fractions of the training patients, on the same validation "
                "patients; differences pretrained minus random init with the paired DeLong "
                "95% CI."))
    curve_figure(rows, out / "learning_curve.png")
    from covidct.io.tracking import log_files

    log_files(from_args(TrackingParams, args), "learning_curve", "learning_curve",
              [out / n for n in ("learning_curve.md", "learning_curve.csv",
                                 "learning_curve.png")])
    for r in rows:
        log.info("%s, fraction %g: AUC pretrained %s, random init %s", r["validation"],
                 r["fraction"], _auc(r["auc_pretrained"]), _auc(r["auc_random_init"]))
    return 0
