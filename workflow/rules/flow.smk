# The patient flow per site (sheet -> ingest -> segmentation -> ROI -> training use, follow-up)
# and Table 1. No store is named on the command line: the stage finds them by the layout.


rule flow:
    input:
        sheets=site_sheets(sorted(set(samples["site"]))),
        rois=store_paths(sorted(set(samples["site"])), "roi.zarr"),
        runs=flow_model_runs(),
    output:
        flow=report(f"{RESULTS}/tables/flow.md", caption="../report/flow.rst", category="Cohort"),
        flow_tsv=f"{RESULTS}/tables/flow.tsv",
        failures=f"{RESULTS}/tables/flow_failures.tsv",
        table1=report(
            f"{RESULTS}/tables/table1.md", caption="../report/table1.rst", category="Cohort"
        ),
        table1_csv=f"{RESULTS}/tables/table1.csv",
    log:
        "logs/flow.log",
    benchmark:
        "logs/benchmark/flow.tsv"
    conda:
        "../../envs/stats.yaml"
    params:
        out_dir=lambda wc, output: Path(output.flow).parent,
        models=lambda wc, input: " ".join(str(Path(r).parent) for r in input.runs),
        patients=patients_folder,
        min_follow_up_days=config["prognosis"]["min_follow_up_days"],
        logs=workdir_path("logs"),
        tracking=TRACKING,
    shell:
        "$COVIDCT flow --sheets {input.sheets} --patients {params.patients} --logs {params.logs}"
        " --models {params.models} --out-dir {params.out_dir}"
        " --min-follow-up-days {params.min_follow_up_days} {params.tracking} > {log} 2>&1"
