# Per site: predictions and features of every patient, then Table 2 metrics; summary tables.
EVALUATION = config["evaluation"]
MODELS = {"finetune_covid": "", "random_init": "/random_init"}


def subgroup_flags(wildcards):
    groups = SITES[wildcards.site].get("subgroups", {}) if isinstance(SITES[wildcards.site], dict) else {}
    return " ".join(f"--subgroup {name}={','.join(labels)}" for name, labels in groups.items())


def site_role(site):
    entry = SITES[site]
    roles = entry.get("role") if isinstance(entry, dict) else entry
    return ",".join([roles] if isinstance(roles, str) else roles)


for _model, _sub in MODELS.items():

    rule:
        name:
            f"predict_{_model}"
        input:
            model=f"{RESULTS}/models/{_model}/model.keras",
            rois=lambda wc: roi_paths([wc.site]),
            sheet=lambda wc: site_sheet(wc.site),
        output:
            f"{RESULTS}/eval/{{site}}{_sub}/predictions.csv",
        params:
            backend=TRAINING["backend"],
            model_name=_model,
        conda:
            "../../envs/deep.yaml"
        log:
            f"logs/predict/{{site}}{_sub}.log",
        shell:
            "KERAS_BACKEND={params.backend} covidct predict-site --model {input.model}"
            " --sheet {input.sheet} --site {wildcards.site} --rois {input.rois} --out {output}"
            " --model-name {params.model_name} > {log} 2>&1"

    rule:
        name:
            f"evaluate_{_model}"
        input:
            predictions=f"{RESULTS}/eval/{{site}}{_sub}/predictions.csv",
            train=[f"{RESULTS}/eval/{s}{_sub}/predictions.csv" for s in TRAIN_SITES],
        output:
            metrics=f"{RESULTS}/eval/{{site}}{_sub}/metrics.json",
            roc=report(f"{RESULTS}/eval/{{site}}{_sub}/roc.png", caption="../report/roc.rst",
                       category="Diagnosis", subcategory=_model, labels={"site": "{site}", "figure": "ROC"}),
            calibration=report(f"{RESULTS}/eval/{{site}}{_sub}/calibration.png",
                               caption="../report/calibration.rst", category="Diagnosis",
                               subcategory=_model, labels={"site": "{site}", "figure": "calibration"}),
        params:
            outdir=lambda wc, output: os.path.dirname(output.metrics),
            threshold=EVALUATION["threshold"],
            ci=EVALUATION["ci"],
            n_boot=EVALUATION["n_bootstrap"],
            subgroups=subgroup_flags,
            role=lambda wc: site_role(wc.site),
            model_name=_model,
        conda:
            "../../envs/stats.yaml"
        log:
            f"logs/evaluate/{{site}}{_sub}.log",
        shell:
            "covidct evaluate {input.predictions} {params.outdir} --threshold {params.threshold}"
            " --youden-from {input.train} --ci {params.ci} --n-bootstrap {params.n_boot}"
            " {params.subgroups} --site {wildcards.site} --role {params.role}"
            " --model-name {params.model_name} --tracking-uri " + MLFLOW_URI
            + " --experiment " + EXPERIMENT + " > {log} 2>&1"


rule tables:
    input:
        metrics=expand(f"{RESULTS}/eval/{{site}}/metrics.json", site=EVAL_SITES),
        ablation=expand(f"{RESULTS}/eval/{{site}}/random_init/metrics.json", site=EVAL_SITES),
        predictions=expand(f"{RESULTS}/eval/{{site}}/predictions.csv", site=EVAL_SITES),
    output:
        table2=report(f"{RESULTS}/tables/table2.md", caption="../report/table2.rst", category="Tables"),
        table2_csv=f"{RESULTS}/tables/table2.csv",
        table_s2=report(f"{RESULTS}/tables/table_s2.md", caption="../report/table_s2.rst",
                        category="Tables"),
        table_s2_csv=f"{RESULTS}/tables/table_s2.csv",
        roc=report(f"{RESULTS}/tables/figure3a_roc.png", caption="../report/figure3.rst",
                   category="Diagnosis"),
        calibration=report(f"{RESULTS}/tables/figure3b_calibration.png",
                           caption="../report/figure3.rst", category="Diagnosis"),
    conda:
        "../../envs/stats.yaml"
    log:
        "logs/tables.log",
    shell:
        "covidct tables --metrics {input.metrics} --ablation {input.ablation}"
        " --predictions {input.predictions} --out-dir {RESULTS}/tables > {log} 2>&1"
