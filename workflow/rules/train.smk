# Gather rules on the GPU: EGFR pretraining, COVID-19 fine-tuning, and the random-init ablation.
# Inputs are only the ROIs and sheets of each rule's own sites: adding a validation site never retrains.


rule pretrain_egfr:
    input:
        rois=store_paths(PRETRAIN_SITES, "roi.zarr"),
        sheets=site_sheets(PRETRAIN_SITES),
    output:
        model=f"{RESULTS}/models/pretrain_egfr/model.keras",
        run=f"{RESULTS}/models/pretrain_egfr/run.json",
        history=report(
            f"{RESULTS}/models/pretrain_egfr/history.csv",
            caption="../report/history.rst",
            category="Training",
        ),
    log:
        "logs/train/pretrain_egfr.log",
    conda:
        "../../envs/deep.yaml"
    threads: TRAINING["threads"]
    resources:
        gpu=1,
    params:
        backend=TRAINING["backend"],
        out=lambda wc, output: Path(output.model).parent,
        init="",
        options=train_options("pretrain_egfr", "pretrain_egfr", PRETRAIN_SITES, "egfr"),
    shell:
        TRAIN_SHELL


rule finetune_covid:
    input:
        rois=store_paths(TRAIN_SITES, "roi.zarr"),
        sheets=site_sheets(TRAIN_SITES),
        init=f"{RESULTS}/models/pretrain_egfr/model.keras",
    output:
        model=f"{RESULTS}/models/finetune_covid/model.keras",
        run=f"{RESULTS}/models/finetune_covid/run.json",
        history=report(
            f"{RESULTS}/models/finetune_covid/history.csv",
            caption="../report/history.rst",
            category="Training",
        ),
        val=f"{RESULTS}/models/finetune_covid/val_predictions.csv",
    log:
        "logs/train/finetune_covid.log",
    conda:
        "../../envs/deep.yaml"
    threads: TRAINING["threads"]
    resources:
        gpu=1,
    params:
        backend=TRAINING["backend"],
        out=lambda wc, output: Path(output.model).parent,
        init=lambda wc, input: f"--init {input.init}",
        options=train_options("finetune_covid", "finetune_covid", TRAIN_SITES, "covid"),
    shell:
        TRAIN_SHELL


rule train_random_init:
    input:
        rois=store_paths(TRAIN_SITES, "roi.zarr"),
        sheets=site_sheets(TRAIN_SITES),
    output:
        model=f"{RESULTS}/models/random_init/model.keras",
        run=f"{RESULTS}/models/random_init/run.json",
        history=f"{RESULTS}/models/random_init/history.csv",
        val=f"{RESULTS}/models/random_init/val_predictions.csv",
    log:
        "logs/train/random_init.log",
    conda:
        "../../envs/deep.yaml"
    threads: TRAINING["threads"]
    resources:
        gpu=1,
    params:
        backend=TRAINING["backend"],
        out=lambda wc, output: Path(output.model).parent,
        init="",
        options=train_options("random_init", "train_random_init", TRAIN_SITES, "covid"),
    shell:
        TRAIN_SHELL
