# Prognosis (stepwise Cox on the training sites, risk groups per prognosis site) and explanations.
PROGNOSIS = config["prognosis"]
EXPLAIN = config["explain"]


rule prognosis:
    input:
        train=expand(f"{RESULTS}/eval/{{site}}/predictions.csv", site=TRAIN_SITES),
        validate=expand(f"{RESULTS}/eval/{{site}}/predictions.csv", site=PROGNOSIS_SITES),
        sheets=site_sheets(sorted(set(TRAIN_SITES) | set(PROGNOSIS_SITES))),
    output:
        cox=f"{RESULTS}/prognosis/cox.json",
        table_s3=report(f"{RESULTS}/tables/table_s3.md", caption="../report/table_s3.rst",
                        category="Tables"),
        table_s3_csv=f"{RESULTS}/tables/table_s3.csv",
        km=report(expand(f"{RESULTS}/prognosis/{{site}}/km.png",
                         site=sorted(set(TRAIN_SITES) | set(PROGNOSIS_SITES))),
                  caption="../report/km.rst", category="Prognosis"),
        logrank=expand(f"{RESULTS}/prognosis/{{site}}/logrank.json",
                       site=sorted(set(TRAIN_SITES) | set(PROGNOSIS_SITES))),
    params:
        p=PROGNOSIS,
        validate=lambda wc, input: f"--validate {' '.join(input.validate)}" if input.validate else "",
    conda:
        "../../envs/stats.yaml"
    log:
        "logs/prognosis.log",
    shell:
        "covidct prognosis --train {input.train} {params.validate} --sheet {input.sheets}"
        " --out-dir {RESULTS}/prognosis --tables-dir {RESULTS}/tables"
        " --selection {params.p[selection]} --p-enter {params.p[p_enter]} --p-stay {params.p[p_stay]}"
        " --max-features {params.p[max_features]} --penalizer {params.p[penalizer]}"
        " --tracking-uri " + MLFLOW_URI + " --experiment " + EXPERIMENT + " > {log} 2>&1"


rule explain:
    input:
        model=f"{RESULTS}/models/finetune_covid/model.keras",
        predictions=expand(f"{RESULTS}/eval/{{site}}/predictions.csv", site=EVAL_SITES),
        rois=roi_paths(EVAL_SITES),
        lungs=[f"{patient_dir(r)}/lung.zarr" for r in patients_of(EVAL_SITES).itertuples()],
    output:
        pca=report(f"{RESULTS}/explain/feature_pca.png", caption="../report/explain.rst",
                   category="Explanation"),
        saliency=f"{RESULTS}/explain/saliency_in_lung.csv",
    params:
        backend=TRAINING["backend"],
        n=EXPLAIN["n_per_site"],
        layers=lambda wc: f"--layers {' '.join(EXPLAIN['layers'])}" if EXPLAIN["layers"] else "",
    conda:
        "../../envs/deep.yaml"
    log:
        "logs/explain.log",
    shell:
        "KERAS_BACKEND={params.backend} covidct explain --model {input.model} --rois {input.rois}"
        " --lungs {input.lungs} --predictions {input.predictions} --out-dir {RESULTS}/explain"
        " --n-per-site {params.n} {params.layers} --tracking-uri " + MLFLOW_URI
        + " --experiment " + EXPERIMENT + " > {log} 2>&1"
