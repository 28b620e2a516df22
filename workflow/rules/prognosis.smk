# Prognosis (a Cox model fitted on the training sites, or a trained system's, risk groups per
# site) and explanations, where the site roles call for them (covidct.roles).


if PLAN.cox_fit:

    rule prognosis:
        input:
            train=[eval_file("finetune_covid", "predictions.csv", s) for s in TRAIN_SITES],
            validate=[eval_file("finetune_covid", "predictions.csv", s) for s in PROGNOSIS_SITES],
            sheets=site_sheets(COX_SITES),
        output:
            cox=f"{RESULTS}/prognosis/cox.json",
            table_s3=report(
                f"{RESULTS}/tables/table_s3.md",
                caption="../report/table_s3.rst",
                category="Tables",
            ),
            table_s3_csv=f"{RESULTS}/tables/table_s3.csv",
            km=report(
                expand(f"{RESULTS}/prognosis/{{site}}/km.png", site=COX_SITES),
                caption="../report/km.rst",
                category="Prognosis",
            ),
            logrank=expand(f"{RESULTS}/prognosis/{{site}}/logrank.json", site=COX_SITES),
        log:
            "logs/prognosis.log",
        benchmark:
            "logs/benchmark/prognosis.tsv"
        conda:
            "../../envs/stats.yaml"
        params:
            options=stage_options(P.PrognosisParams, config["prognosis"]),
            validate=validate_flag,
            out_dir=lambda wc, output: Path(output.cox).parent,
            tables_dir=lambda wc, output: Path(output.table_s3).parent,
            tracking=TRACKING,
        shell:
            "$COVIDCT prognosis --train {input.train} {params.validate} --sheet {input.sheets}"
            " --out-dir {params.out_dir} --tables-dir {params.tables_dir} {params.options}"
            " {params.tracking} > {log} 2>&1"

elif PLAN.cox_apply:

    rule prognosis:
        """The trained system's Cox model and cut-off applied to the prognosis sites."""
        input:
            cox=str(SYSTEM.cox) if SYSTEM is not None and SYSTEM.cox is not None else [],
            validate=[eval_file("finetune_covid", "predictions.csv", s) for s in COX_SITES],
            sheets=site_sheets(COX_SITES),
        output:
            km=report(
                expand(f"{RESULTS}/prognosis/{{site}}/km.png", site=COX_SITES),
                caption="../report/km.rst",
                category="Prognosis",
            ),
            logrank=expand(f"{RESULTS}/prognosis/{{site}}/logrank.json", site=COX_SITES),
        log:
            "logs/prognosis.log",
        benchmark:
            "logs/benchmark/prognosis.tsv"
        conda:
            "../../envs/stats.yaml"
        params:
            options=stage_options(P.PrognosisParams, config["prognosis"]),
            out_dir=workdir_path(f"{RESULTS}/prognosis"),
            tracking=TRACKING,
        shell:
            "$COVIDCT prognosis --cox {input.cox} --validate {input.validate} --sheet {input.sheets}"
            " --out-dir {params.out_dir} {params.options} {params.tracking} > {log} 2>&1"


if PLAN.model:

    rule explain:
        input:
            model=model_file("finetune_covid"),
            predictions=[eval_file("finetune_covid", "predictions.csv", s) for s in EVAL_SITES],
            rois=store_paths(EVAL_SITES, "roi.zarr"),
            lungs=store_paths(EVAL_SITES, "lung.zarr"),
            cts=store_paths(EVAL_SITES, "ct.zarr"),
        output:
            pca=report(
                f"{RESULTS}/explain/feature_pca.png",
                caption="../report/explain.rst",
                category="Explanation",
            ),
            saliency=f"{RESULTS}/explain/saliency_in_lung.csv",
        log:
            "logs/explain.log",
        benchmark:
            "logs/benchmark/explain.tsv"
        conda:
            deep_env()
        params:
            backend=TRAINING["backend"],
            options=stage_options(P.ExplainParams, config["explain"]),
            out_dir=lambda wc, output: Path(output.pca).parent,
            patients=patients_folder,
            tracking=TRACKING,
        shell:
            "KERAS_BACKEND={params.backend} $COVIDCT explain --model {input.model}"
            " --patients {params.patients} --predictions {input.predictions}"
            " --out-dir {params.out_dir} {params.options} {params.tracking} > {log} 2>&1"
