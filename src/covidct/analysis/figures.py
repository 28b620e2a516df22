"""The figures of the evaluation and the prognosis: ROC, calibration, Kaplan-Meier."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidct.analysis import stats
from covidct.io.atomic import save_figure

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def format_auc(auc: float | None, ci: Sequence[float] | None) -> str:
    if auc is None:
        return "n/a"
    return f"{auc:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def roc_figure(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves; each curve: name, y, p and optionally auc, auc_ci, points {label: threshold}."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    drawn = 0
    for c in curves:
        y, p = np.asarray(c["y"]), np.asarray(c["p"])
        if y.size == 0 or y.min() == y.max():
            log.info("ROC: %s skipped (one class only)", c["name"])
            continue
        fpr, tpr, _ = roc_curve(y, p)
        auc = c.get("auc")
        label = f"{c['name']}: AUC {format_auc(auc, c.get('auc_ci'))}" if auc is not None \
            else c["name"]
        line, = ax.plot(fpr, tpr, lw=1.8, ls=c.get("ls", "-"), label=label)
        for point_label, t in (c.get("points") or {}).items():
            if t is None:
                continue
            m = stats.threshold_metrics(y, p, t)
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color(), ms=5,
                    mfc="white" if "Youden" in point_label else line.get_color())
            ax.annotate(f"{point_label} {t:.2f}", (1 - m["specificity"], m["sensitivity"]),
                        textcoords="offset points", xytext=(6, -10), fontsize=7)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "ROC undefined (one class only)", ha="center", va="center")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity",
           ylabel="sensitivity", title=title)
    ax.set_aspect("equal")
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def calibration_figure(curves: Sequence[Mapping[str, Any]], path: str | Path,
                       title: str = "Calibration") -> Path:
    """Calibration curves; each curve: name, calibration {bin_*}, optional hosmer_lemeshow."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for c in curves:
        cal = c["calibration"]
        if not cal["bin_count"]:
            continue
        hl = c.get("hosmer_lemeshow") or {}
        label = c["name"] + (f" (Hosmer-Lemeshow p={hl['p']:.3f})" if hl.get("p") is not None
                             else "")
        ax.plot(cal["bin_mean_predicted"], cal["bin_fraction_positive"], "o-", ms=4, lw=1.5,
                label=label)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="mean predicted probability",
           ylabel="observed fraction COVID-19", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def km_figure(path: Path, site: str, fitters: dict, logrank: dict, direction: str,
              note: str | None = None) -> Path:
    """KM curves of the high/low groups with numbers at risk; written atomically as PNG."""
    from lifelines.plotting import add_at_risk_counts

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colours = {"high": "tab:red", "low": "tab:blue"}
    present = [fitters[g] for g in ("high", "low") if g in fitters]
    for group in ("high", "low"):
        if group in fitters:
            fitters[group].plot_survival_function(ax=ax, ci_show=False, show_censors=True,
                                                  color=colours[group],
                                                  censor_styles={"marker": "|", "ms": 8})
    p = logrank.get("p")
    title = f"{site}: " + (f"log-rank p = {p:.3g}" if p is not None else "no log-rank test")
    ax.set_title(title)
    ax.set_xlabel("days in hospital")
    ax.set_ylabel("probability of not yet discharged")
    ax.set_ylim(0, 1.05)
    ax.text(0.99, 0.98, direction, transform=ax.transAxes, ha="right", va="top", fontsize=7)
    if note:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", wrap=True)
    if present:
        add_at_risk_counts(*present, ax=ax, rows_to_show=["At risk"])
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
