# Prognosis (stepwise Cox on the training sites, risk groups per site) and explanations.


rule prognosis:
    input:
        train=[eval_file("finetune_covid", "predictions.csv", s) for s in TRAIN_SITES],
        validate=[eval_file("finetune_covid", "predictions.csv", s) for s in PROGNOSIS_SITES],
        sheets=site_sheets(COX_SITES),
    output:
        cox=f"{RESULTS}/prognosis/cox.json",
        table_s3=report(f"{RESULTS}/tables/table_s3.md", caption="../report/table_s3.rst",
                        category="Tables"),
        table_s3_csv=f"{RESULTS}/tables/table_s3.csv",
        km=report(expand(f"{RESULTS}/prognosis/{{site}}/km.png", site=COX_SITES),
                  caption="../report/km.rst", category="Prognosis"),
        logrank=expand(f"{RESULTS}/prognosis/{{site}}/logrank.json", site=COX_SITES),
    params:
        p=PROGNOSIS,
        validate=validate_flag,
        out_dir=lambda wc, output: Path(output.cox).parent,
        tables_dir=lambda wc, output: Path(output.table_s3).parent,
        tracking=TRACKING,
    log:
        "logs/prognosis.log",
    conda:
        "../../envs/stats.yaml"
    shell:
        "covidct prognosis --train {input.train} {params.validate} --sheet {input.sheets}"
        " --out-dir {params.out_dir} --tables-dir {params.tables_dir}"
        " --selection {params.p[selection]} --p-enter {params.p[p_enter]} --p-stay {params.p[p_stay]}"
        " --max-features {params.p[max_features]} --events-per-feature {params.p[events_per_feature]}"
        " --penalizer {params.p[penalizer]} --ridge-penalizer {params.p[ridge_penalizer]}"
        " --min-events {params.p[min_events]}"
        " {params.tracking} > {log} 2>&1"


rule explain:
    input:
        model=f"{RESULTS}/models/finetune_covid/model.keras",
        predictions=[eval_file("finetune_covid", "predictions.csv", s) for s in EVAL_SITES],
        rois=roi_paths(EVAL_SITES),
        lungs=lung_paths(EVAL_SITES),
        cts=ct_paths(EVAL_SITES),
    output:
        pca=report(f"{RESULTS}/explain/feature_pca.png", caption="../report/explain.rst",
                   category="Explanation"),
        saliency=f"{RESULTS}/explain/saliency_in_lung.csv",
    params:
        backend=TRAINING["backend"],
        n=EXPLAIN["n_per_site"],
        fraction_for=EXPLAIN["fraction_for"],
        layers=layers_flag,
        out_dir=lambda wc, output: Path(output.pca).parent,
        tracking=TRACKING,
    log:
        "logs/explain.log",
    conda:
        "../../envs/deep.yaml"
    shell:
        "KERAS_BACKEND={params.backend} covidct explain --model {input.model} --rois {input.rois}"
        " --lungs {input.lungs} --cts {input.cts} --predictions {input.predictions} --out-dir {params.out_dir}"
        " --n-per-site {params.n} --fraction-for {params.fraction_for} {params.layers} {params.tracking} > {log} 2>&1"
