"""The figures of the evaluation and the prognosis: ROC, calibration, decision curve, the forest
plot of AUC across sites, Kaplan-Meier."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidct.analysis import stats
from covidct.io.atomic import pyplot, save_figure

log = logging.getLogger(__name__)


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def format_auc(auc: float | None, ci: Sequence[float] | None) -> str:
    if auc is None:
        return "n/a"
    return f"{auc:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def roc_figure(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves; each curve: name, y, p and optionally auc, auc_ci, points {label: threshold}."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
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
    plt = pyplot()
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


def decision_curve_figure(curves: Sequence[Mapping[str, Any]], path: str | Path,
                          title: str = "Decision curve", threshold: float | None = None) -> Path:
    """Net benefit against the threshold probability: each curve (name, decision_curve) with its
    treat-all line, and treat-none (0); a dotted line at the decision ``threshold``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    ax.axhline(0.0, color="0.3", lw=1.2, label="treat none")
    top = 0.05
    for c in curves:
        dc = c["decision_curve"]
        pts = [(t, m, a) for t, m, a in zip(dc["thresholds"], dc["model"], dc["treat_all"])
               if m is not None]
        if not pts:
            continue
        t, model, treat_all = (np.array(v, dtype=float) for v in zip(*pts))
        line, = ax.plot(t, model, lw=1.8, label=f"{c['name']}: model")
        ax.plot(t, treat_all, lw=1.0, ls="--", color=line.get_color(),
                label=f"{c['name']}: treat all")
        top = max(top, float(np.max(model)), float(treat_all[0]))
    if threshold is not None:
        ax.axvline(threshold, color="0.6", lw=1, ls=":", label=f"threshold {threshold:.2f}")
    ax.set(xlim=(0.0, 1.0), ylim=(-0.05, top + 0.05), xlabel="threshold probability",
           ylabel="net benefit", title=title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def forest_figure(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], path: str | Path,
                  title: str = "AUC across sites") -> Path:
    """Forest plot: one row per site (name, auc, ci, pooled: bool, note) and the fixed- and
    random-effects pooled AUC of ``meta`` (stats.inverse_variance_meta) with Q, I^2 and tau^2."""
    plt = pyplot()
    pooled_rows = [("fixed effect", meta.get("fixed") or {}),
                   ("random effects (DerSimonian-Laird)", meta.get("random") or {})]
    height = 1.6 + 0.38 * (len(rows) + len(pooled_rows))
    fig, ax = plt.subplots(figsize=(7.2, height))
    labels = []
    y = 0
    for row in rows:
        labels.append(row["name"] + ("" if row.get("pooled") else " *"))
        if row.get("auc") is not None:
            lo, hi = row.get("ci") or (row["auc"], row["auc"])
            colour = "tab:blue" if row.get("pooled") else "0.55"
            ax.plot([lo, hi], [y, y], color=colour, lw=1.5)
            ax.plot(row["auc"], y, "s", color=colour, ms=6)
        ax.text(1.02, y, row.get("note") or "", va="center", fontsize=7,
                transform=ax.get_yaxis_transform())
        y += 1
    for name, pooled in pooled_rows:
        labels.append(f"pooled, {name}")
        if pooled.get("estimate") is not None:
            est, (lo, hi) = pooled["estimate"], pooled["ci"]
            ax.fill([lo, est, hi, est], [y, y - 0.3, y, y + 0.3], color="tab:red", alpha=0.8)
            ax.text(1.02, y, f"{est:.3f} ({lo:.3f}-{hi:.3f})", va="center", fontsize=7,
                    transform=ax.get_yaxis_transform())
        y += 1
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="0.8", lw=1, ls=":")
    lows = [r["ci"][0] for r in rows if r.get("ci")] + [
        p["ci"][0] for _, p in pooled_rows if p.get("ci")]
    ax.set(xlim=(max(0.0, min([0.5, *lows]) - 0.02), 1.01), xlabel="AUC (DeLong 95% CI)",
           title=title)
    ax.text(0.0, -0.9 / height, heterogeneity_text(meta) + "\n* not pooled (see its note)",
            transform=ax.transAxes, fontsize=7.5, va="top")
    return _save(fig, path)


def heterogeneity_text(meta: Mapping[str, Any]) -> str:
    """Cochran's Q (df, p), I^2 and tau^2 in one line, or why they are undefined."""
    if meta.get("q") is None:
        return f"heterogeneity undefined: {meta.get('k', 0)} site(s) pooled (needs 2)"
    return (f"Cochran's Q = {meta['q']:.2f} on {meta['df']} df (p = {meta['q_p']:.3g}), "
            f"I\u00b2 = {100 * meta['i_squared']:.1f}%, \u03c4\u00b2 = {meta['tau_squared']:.4g}")


def km_figure(path: Path, site: str, fitters: dict, logrank: dict, direction: str,
              note: str | None = None) -> Path:
    """KM curves of the high/low groups with numbers at risk; written atomically as PNG."""
    from lifelines.plotting import add_at_risk_counts

    plt = pyplot()
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
