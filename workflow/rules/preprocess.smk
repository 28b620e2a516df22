# Per patient (fan-out): ingest -> segment -> roi, each job owning its own stores.


rule ingest:
    input:
        image=image_input,
    output:
        ct=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr"),
    params:
        image=lambda wc: samples.loc[wc.patient, "image"],
    conda:
        "../../envs/preprocess.yaml"
    log:
        "logs/ingest/{site}/{patient}.log",
    group:
        "preprocess"
    shell:
        "covidct ingest {params.image:q} {output.ct} --patient {wildcards.patient} > {log} 2>&1"


rule segment:
    input:
        ct=f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr",
        model=lambda wc: [segmenter_model()] if config["segmentation"]["method"] == "fpn" else [],
    output:
        lung=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/lung.zarr"),
    params:
        method=config["segmentation"]["method"],
        model=lambda wc, input: f"--model {input.model[0]}" if input.model else "",
    conda:
        "../../envs/deep.yaml" if config["segmentation"]["method"] == "fpn" else "../../envs/preprocess.yaml"
    log:
        "logs/segment/{site}/{patient}.log",
    group:
        "preprocess"
    shell:
        "covidct segment {input.ct} {output.lung} --method {params.method} {params.model}"
        " --patient {wildcards.patient} > {log} 2>&1"


rule roi:
    input:
        ct=f"{RESULTS}/patients/{{site}}/{{patient}}/ct.zarr",
        lung=f"{RESULTS}/patients/{{site}}/{{patient}}/lung.zarr",
    output:
        roi=directory(f"{RESULTS}/patients/{{site}}/{{patient}}/roi.zarr"),
        qc=f"{RESULTS}/patients/{{site}}/{{patient}}/qc.png",
    params:
        size=" ".join(str(s) for s in config["roi"]["size"]),
        fallback="--allow-fallback" if config["segmentation"]["allow_fallback"] else "",
    conda:
        "../../envs/preprocess.yaml"
    log:
        "logs/roi/{site}/{patient}.log",
    group:
        "preprocess"
    shell:
        "covidct roi {input.ct} {input.lung} {output.roi} --size {params.size} --qc {output.qc}"
        " {params.fallback} --patient {wildcards.patient} --site {wildcards.site} > {log} 2>&1"


rule qc_summary:
    input:
        rois=[f"{patient_dir(r)}/roi.zarr" for r in samples.itertuples()],
    output:
        report(f"{RESULTS}/tables/qc_summary.tsv", caption="../report/qc_summary.rst",
               category="Preprocessing"),
    conda:
        "../../envs/preprocess.yaml"
    log:
        "logs/qc_summary.log",
    shell:
        "covidct qc-summary {input.rois} --out {output} > {log} 2>&1"


def segmenter_model():
    if config["segmentation"]["model"]:
        return config["segmentation"]["model"]
    return f"{RESULTS}/models/lung_fpn/model.keras"


def _segmenter_pairs():
    """(image, mask) pairs: the config's sheet, or the synthetic cohort's exact masks."""
    sheet = config["segmentation"]["train"]["sheet"]
    if sheet:
        table = pd.read_csv(sheet, sep="\t", dtype=str)
        pairs = list(zip(table["image"], table["mask"]))
    else:
        rows = samples.head(config["segmentation"]["train"]["max_patients"])
        pairs = [(r.image, f"{RESULTS}/synth/{r.site}/{r.patient}/lung_mask.nii.gz")
                 for r in rows.itertuples()]
    return pairs[: config["segmentation"]["train"]["max_patients"]]


def segmenter_pairs_input(wildcards):
    return [p for pair in _segmenter_pairs() for p in pair]


def segmenter_pairs_flag(wildcards):
    pairs = _segmenter_pairs()
    return ("--images " + " ".join(shlex.quote(i) for i, _ in pairs)
            + " --masks " + " ".join(shlex.quote(m) for _, m in pairs))


if config["segmentation"]["method"] == "fpn" and not config["segmentation"]["model"]:

    rule train_lung_segmenter:
        """The paper's DenseNet121-FPN, trained on CT / lung-mask pairs (synthetic exact masks by default)."""
        input:
            pairs=segmenter_pairs_input,
        output:
            model=f"{RESULTS}/models/lung_fpn/model.keras",
            run=f"{RESULTS}/models/lung_fpn/run.json",
        params:
            pairs=segmenter_pairs_flag,
            train=config["segmentation"]["train"],
            weights=lambda wc: (f"--imagenet-weights {config['segmentation']['train']['imagenet_weights']}"
                                if config["segmentation"]["train"]["imagenet_weights"] else ""),
        resources:
            gpu=1,
        threads: workflow.cores
        conda:
            "../../envs/deep.yaml"
        log:
            "logs/train_lung_segmenter.log",
        shell:
            "covidct train-segmenter {params.pairs} --out {RESULTS}/models/lung_fpn"
            " --epochs {params.train[epochs]} --batch-size {params.train[batch_size]}"
            " --size {params.train[size]} {params.weights} " + tracking_flags("train_lung_segmenter")
            + " > {log} 2>&1"
