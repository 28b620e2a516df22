# Gather rules on the GPU: EGFR pretraining, COVID-19 fine-tuning, and the random-init ablation.
# Inputs are only the ROIs and sheets of each rule's own sites: adding a validation site never retrains.


rule pretrain_egfr:
    input:
        rois=roi_paths(PRETRAIN_SITES),
        sheets=site_sheets(PRETRAIN_SITES),
    output:
        model=f"{RESULTS}/models/pretrain_egfr/model.keras",
        run=f"{RESULTS}/models/pretrain_egfr/run.json",
        history=report(f"{RESULTS}/models/pretrain_egfr/history.csv",
                       caption="../report/history.rst", category="Training"),
    params:
        **train_params("pretrain_egfr", PRETRAIN_SITES, class_weight=False),
        task="egfr",
        init="",
    resources:
        gpu=1,
    threads: TRAINING["threads"]
    log:
        "logs/train/pretrain_egfr.log",
    conda:
        "../../envs/deep.yaml"
    shell:
        TRAIN_SHELL


rule finetune_covid:
    input:
        rois=roi_paths(TRAIN_SITES),
        sheets=site_sheets(TRAIN_SITES),
        init=f"{RESULTS}/models/pretrain_egfr/model.keras",
    output:
        model=f"{RESULTS}/models/finetune_covid/model.keras",
        run=f"{RESULTS}/models/finetune_covid/run.json",
        history=report(f"{RESULTS}/models/finetune_covid/history.csv",
                       caption="../report/history.rst", category="Training"),
        val=f"{RESULTS}/models/finetune_covid/val_predictions.csv",
    params:
        **train_params("finetune_covid", TRAIN_SITES),
        task="covid",
        init=lambda wc, input: f"--init {input.init}",
    resources:
        gpu=1,
    threads: TRAINING["threads"]
    log:
        "logs/train/finetune_covid.log",
    conda:
        "../../envs/deep.yaml"
    shell:
        TRAIN_SHELL


rule train_random_init:
    input:
        rois=roi_paths(TRAIN_SITES),
        sheets=site_sheets(TRAIN_SITES),
    output:
        model=f"{RESULTS}/models/random_init/model.keras",
        run=f"{RESULTS}/models/random_init/run.json",
        history=f"{RESULTS}/models/random_init/history.csv",
        val=f"{RESULTS}/models/random_init/val_predictions.csv",
    params:
        **train_params("random_init", TRAIN_SITES),
        task="covid",
        init="",
    resources:
        gpu=1,
    threads: TRAINING["threads"]
    log:
        "logs/train/random_init.log",
    conda:
        "../../envs/deep.yaml"
    shell:
        TRAIN_SHELL
