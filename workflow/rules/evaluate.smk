# Per site: the probability and 64-d feature of every patient, then the Table 2 metrics; for the
# fine-tuned model and for the random-init ablation (Table S2). Then the summary tables.


for _model in EVAL_DIRS:

    rule:
        name:
            f"predict_{_model}"
        input:
            model=model_file(_model),
            rois=lambda wc: store_paths([wc.site], "roi.zarr"),
            sheet=lambda wc: site_sheet(wc.site),
        output:
            eval_file(_model, "predictions.csv"),
        log:
            f"logs/predict/{_model}/{{site}}.log",
        benchmark:
            f"logs/benchmark/predict_{_model}/{{site}}.tsv"
        conda:
            deep_env()
        params:
            backend=TRAINING["backend"],
            model_name=_model,
            patients=patients_folder,
        shell:
            "KERAS_BACKEND={params.backend} $COVIDCT predict-site --model {input.model}"
            " --sheet {input.sheet} --site {wildcards.site} --patients {params.patients}"
            " --out {output}"
            " --model-name {params.model_name} > {log} 2>&1"

    rule:
        name:
            f"evaluate_{_model}"
        input:
            predictions=eval_file(_model, "predictions.csv"),
            train=[eval_file(_model, "predictions.csv", s) for s in TRAIN_SITES],
            sheet=lambda wc: site_sheet(wc.site),
        output:
            metrics=eval_file(_model, "metrics.json"),
            roc=report(
                eval_file(_model, "roc.png"),
                caption="../report/roc.rst",
                category="Diagnosis",
                subcategory=_model,
                labels={"site": "{site}", "figure": "ROC"},
            ),
            calibration=report(
                eval_file(_model, "calibration.png"),
                caption="../report/calibration.rst",
                category="Diagnosis",
                subcategory=_model,
                labels={"site": "{site}", "figure": "calibration"},
            ),
            decision=report(
                eval_file(_model, "decision.png"),
                caption="../report/decision.rst",
                category="Diagnosis",
                subcategory=_model,
                labels={"site": "{site}", "figure": "decision curve"},
            ),
        log:
            f"logs/evaluate/{_model}/{{site}}.log",
        benchmark:
            f"logs/benchmark/evaluate_{_model}/{{site}}.tsv"
        conda:
            "../../envs/stats.yaml"
        params:
            outdir=lambda wc, output: Path(output.metrics).parent,
            options=stage_options(P.EvaluationParams, config["evaluation"]),
            subgroups=subgroup_flags,
            youden=youden_flag,
            role=lambda wc: site_role(wc.site),
            model_name=_model,
            model_dir=workdir_path(Path(model_file(_model)).parent),
            tracking=TRACKING,
        shell:
            "$COVIDCT evaluate {input.predictions} {params.outdir} {params.options}"
            " {params.youden} {params.subgroups} --sheet {input.sheet}"
            " --site {wildcards.site} --role {params.role}"
            " --model-name {params.model_name} --model-dir {params.model_dir}"
            " {params.tracking} > {log} 2>&1"


if PLAN.model:

    rule tables:
        input:
            metrics=[eval_file("finetune_covid", "metrics.json", s) for s in EVAL_SITES],
            ablation=(
                [eval_file("random_init", "metrics.json", s) for s in EVAL_SITES]
                if PLAN.ablation
                else []
            ),
            predictions=[eval_file("finetune_covid", "predictions.csv", s) for s in EVAL_SITES],
        output:
            **tables_outputs(),
            forest=report(
                f"{RESULTS}/tables/figure_forest_auc.png",
                caption="../report/forest.rst",
                category="Diagnosis",
            ),
            heterogeneity=report(
                f"{RESULTS}/tables/table_heterogeneity.md",
                caption="../report/forest.rst",
                category="Tables",
            ),
            heterogeneity_csv=f"{RESULTS}/tables/table_heterogeneity.csv",
            subgroups=report(
                f"{RESULTS}/tables/table_subgroups.md",
                caption="../report/subgroups.rst",
                category="Tables",
            ),
            subgroups_csv=f"{RESULTS}/tables/table_subgroups.csv",
        log:
            "logs/tables.log",
        benchmark:
            "logs/benchmark/tables.tsv"
        conda:
            "../../envs/stats.yaml"
        params:
            out_dir=lambda wc, output: Path(output.table2).parent,
            options=stage_options(P.EvaluationParams, config["evaluation"]),
            ablation=lambda wc, input: (
                f"--ablation {' '.join(input.ablation)}" if input.ablation else ""
            ),
            tracking=TRACKING,
        shell:
            "$COVIDCT tables --metrics {input.metrics} {params.ablation}"
            " --out-dir {params.out_dir} {params.options} {params.tracking} > {log} 2>&1"
