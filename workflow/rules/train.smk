# Gather rules on the GPU: EGFR pretraining, COVID-19 fine-tuning, and the random-init ablation.
# Inputs are only the ROIs and sheets of each rule's own sites: adding a validation site never retrains.
TRAINING = config["training"]


def train_shell(name, task, init=""):
    return (
        "KERAS_BACKEND={params.backend} covidct train --name " + name + " --task " + task
        + " --sheet {input.sheets} --rois {input.rois} --out {params.out} " + init
        + " --epochs {params.epochs} --batch-size {params.t[batch_size]} --lr {params.t[lr]}"
        " --lr-factor {params.t[lr_factor]} --lr-patience {params.t[lr_patience]}"
        " {params.class_weight} --val-fraction {params.t[val_fraction]} --seed {params.t[seed]}"
        " {params.augment} --mixed-precision {params.t[mixed_precision]}"
        " --workers {params.t[workers]} --tag rule={rule} --tag sites={params.sites} "
        + tracking_flags(name) + " > {log} 2>&1"
    )


def train_params(name, sites, class_weight=True):
    return dict(
        backend=TRAINING["backend"],
        out=f"{RESULTS}/models/{name}",
        epochs=TRAINING["epochs"][name],
        sites=",".join(sites),
        class_weight=f"--class-weight {TRAINING['class_weight']}" if class_weight else "",
        augment="--augment" if TRAINING["augment"] else "",
        t={k: TRAINING[k] for k in ("batch_size", "lr", "lr_factor", "lr_patience", "val_fraction",
                                    "seed", "mixed_precision", "workers")},
    )


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
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/deep.yaml"
    log:
        "logs/train/pretrain_egfr.log",
    shell:
        train_shell("pretrain_egfr", "egfr")


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
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/deep.yaml"
    log:
        "logs/train/finetune_covid.log",
    shell:
        train_shell("finetune_covid", "covid", init="--init {input.init}")


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
    resources:
        gpu=1,
    threads: workflow.cores
    conda:
        "../../envs/deep.yaml"
    log:
        "logs/train/random_init.log",
    shell:
        train_shell("random_init", "covid")
