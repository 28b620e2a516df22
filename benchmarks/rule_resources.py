"""Per-rule wall time and peak memory of a finished run, from Snakemake's `benchmark:` files.

Every per-patient, training, prediction and summary rule writes logs/benchmark/<rule>.tsv, or
logs/benchmark/<rule>/<site>/... for a rule with one job per site or patient (Snakemake's
columns: s, max_rss in MB, ...). This prints, per rule, the jobs, the median and
largest wall time and the largest peak memory, the figures to size `mem_mb` and `runtime` by
(workflow/profiles/slurm/config.yaml). A job that ran in the warm worker (covidct.worker) has
its stage's CPU time and peak memory in its log (the benchmark measures the small command that
handed it over); its peak memory is taken from there:

    .venv/bin/python benchmarks/rule_resources.py            # after `snakemake --cores all`
    .venv/bin/python benchmarks/rule_resources.py --logs path/to/logs
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

WORKER_LINE = re.compile(r"ran in the warm worker: CPU ([0-9.]+) s, peak memory ([0-9.]+) MB")


def worker_peak_mb(log: Path) -> float | None:
    """The peak memory a job's log reports for its stage in the warm worker, or None."""
    if not log.is_file():
        return None
    found = WORKER_LINE.findall(log.read_text(errors="replace"))
    return float(found[-1][1]) if found else None


def rule_resources(logs: Path) -> pd.DataFrame:
    """One row per rule: jobs, median and max seconds, max peak RSS (MB)."""
    root = logs / "benchmark"
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t", na_values=["-"])
        relative = path.relative_to(root)
        rule = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        served = worker_peak_mb((logs / relative).with_suffix(".log"))
        rows += [{"rule": rule, "s": r.s, "max_rss_mb": max(r.max_rss, served or 0)}
                 for r in table.itertuples()]
    if not rows:
        raise SystemExit(f"no benchmark files under {root}: run the workflow first")
    jobs = pd.DataFrame(rows)
    summary = jobs.groupby("rule").agg(jobs=("s", "size"), median_s=("s", "median"),
                                       max_s=("s", "max"), max_rss_mb=("max_rss_mb", "max"))
    return summary.sort_values("max_s", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=Path("logs"), help="the run's logs folder")
    args = parser.parse_args()
    print(rule_resources(args.logs).round(1).to_string())


if __name__ == "__main__":
    main()
