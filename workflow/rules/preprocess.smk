# Per patient (fan-out): ingest -> segment -> roi, each job owning its own stores.
# On a cluster the group `preprocess` bundles many patients into one job (workflow/profiles/slurm).


rule ingest:
    input:
        image=image_input,
    output:
        ct=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr"),
    log:
        "logs/ingest/{site}/{patient}.log",
    benchmark:
        "logs/benchmark/ingest/{site}/{patient}.tsv"
    group:
        "preprocess"
    conda:
        "../../envs/preprocess.yaml"
    params:
        image=lambda wc: workdir_path(samples.loc[wc.patient, "image"]),
        options=stage_options(P.IngestParams, config["ingest"]),
    shell:
        "$COVIDCT ingest {params.image:q} {output.ct} --patient {wildcards.patient}"
        " {params.options} > {log} 2>&1"


rule segment:
    input:
        ct=f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr",
        model=segmenter_model_input,
    output:
        lung=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/lung.zarr"),
    log:
        "logs/segment/{site}/{patient}.log",
    benchmark:
        "logs/benchmark/segment/{site}/{patient}.tsv"
    group:
        "preprocess"
    conda:
        segment_env()
    params:
        method=SEGMENTATION["method"],
        model=lambda wc, input: f"--model {input.model[0]}" if input.model else "",
        options=stage_options(P.ThresholdParams, SEGMENTATION["threshold"]),
    shell:
        "$COVIDCT segment {input.ct} {output.lung} --method {params.method} {params.model}"
        " {params.options} --patient {wildcards.patient} > {log} 2>&1"


rule roi:
    input:
        ct=f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr",
        lung=f"{RESULTS}/patients/{{site}}/{{patient}}/lung.zarr",
    output:
        roi=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/roi.zarr"),
        qc=f"{RESULTS}/patients/{{site}}/{{patient}}/qc.png",
    log:
        "logs/roi/{site}/{patient}.log",
    benchmark:
        "logs/benchmark/roi/{site}/{patient}.tsv"
    group:
        "preprocess"
    conda:
        "../../envs/preprocess.yaml"
    params:
        options=stage_options(P.RoiParams, config["roi"]),
    shell:
        "$COVIDCT roi {input.ct} {input.lung} {output.roi} --qc {output.qc} {params.options}"
        " --patient {wildcards.patient} --site {wildcards.site} > {log} 2>&1"


rule qc_summary:
    input:
        rois=[f"{patient_dir(r)}/roi.zarr" for r in samples.itertuples()],
        sheets=site_sheets(list(dict.fromkeys(samples["site"]))),
    output:
        report(
            f"{RESULTS}/tables/qc_summary.tsv",
            caption="../report/qc_summary.rst",
            category="Preprocessing",
        ),
    log:
        "logs/qc_summary.log",
    benchmark:
        "logs/benchmark/qc_summary.tsv"
    conda:
        "../../envs/preprocess.yaml"
    params:
        patients=patients_folder,
    shell:
        "$COVIDCT qc-summary --sheets {input.sheets} --patients {params.patients}"
        " --out {output} > {log} 2>&1"


if SEGMENTATION["method"] == "fpn" and not SEGMENTATION["model"]:

    rule train_lung_segmenter:
        """The paper's DenseNet121-FPN, trained on CT / lung-mask pairs (synthetic exact masks by default)."""
        input:
            pairs=segmenter_pairs_input,
        output:
            model=f"{RESULTS}/models/lung_fpn/model.keras",
            run=f"{RESULTS}/models/lung_fpn/run.json",
        log:
            "logs/train/lung_fpn.log",
        benchmark:
            "logs/benchmark/train_lung_segmenter.tsv"
        conda:
            deep_env()
        threads: TRAINING["threads"]
        resources:
            gpu=1,
        params:
            pairs=segmenter_pairs_flag,
            out=lambda wc, output: Path(output.model).parent,
            options=stage_options(P.SegmenterTrainParams, SEGMENTATION["train"]),
            weights=segmenter_weights_flag,
            backend=TRAINING["backend"],
            tracking=TRACKING,
        shell:
            "KERAS_BACKEND={params.backend} $COVIDCT train-segmenter {params.pairs} --out {params.out}"
            " {params.options} {params.weights} --threads {threads} {params.tracking}"
            " > {log} 2>&1"
