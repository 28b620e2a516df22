# Gather rules on the GPU: EGFR pretraining, COVID-19 fine-tuning, and the random-init ablation,
# each only where the site roles call for it (covidct.roles); then the trained system's plan.
# Inputs are only the ROIs and sheets of each rule's own sites: adding a validation site never retrains.


if PLAN.pretrain:

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
        benchmark:
            "logs/benchmark/pretrain_egfr.tsv"
        conda:
            deep_env()
        threads: TRAINING["threads"]
        resources:
            gpu=1,
        params:
            backend=TRAINING["backend"],
            out=lambda wc, output: Path(output.model).parent,
            patients=patients_folder,
            init="",
            options=train_options("pretrain_egfr", "pretrain_egfr", PRETRAIN_SITES, "egfr"),
        shell:
            TRAIN_SHELL


if PLAN.finetune:

    rule finetune_covid:
        input:
            rois=store_paths(TRAIN_SITES, "roi.zarr"),
            sheets=site_sheets(TRAIN_SITES),
            init=finetune_init_input,
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
        benchmark:
            "logs/benchmark/finetune_covid.tsv"
        conda:
            deep_env()
        threads: TRAINING["threads"]
        resources:
            gpu=1,
        params:
            backend=TRAINING["backend"],
            out=lambda wc, output: Path(output.model).parent,
            patients=patients_folder,
            init=finetune_init_flag,
            options=train_options("finetune_covid", "finetune_covid", TRAIN_SITES, "covid"),
        shell:
            TRAIN_SHELL


if PLAN.ablation:

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
        benchmark:
            "logs/benchmark/train_random_init.tsv"
        # before the fine-tuned model's predictions and explain: otherwise, on a machine with
        # as many cores as training threads, it waits for the single-threaded explain to end
        priority: 1
        conda:
            deep_env()
        threads: TRAINING["threads"]
        resources:
            gpu=1,
        params:
            backend=TRAINING["backend"],
            out=lambda wc, output: Path(output.model).parent,
            patients=patients_folder,
            init="",
            options=train_options("random_init", "train_random_init", TRAIN_SITES, "covid"),
        shell:
            TRAIN_SHELL


if PLAN.finetune:

    rule trained_system:
        """The fine-tuned model's folder completed into a trained system: plan.json (its
        preprocessing, thresholds and training data), the model's ONNX export for `covidct
        predict` and, where fitted, its Cox model."""
        input:
            model=f"{MODELS}/finetune_covid/model.keras",
            run=f"{MODELS}/finetune_covid/run.json",
            train=[eval_file("finetune_covid", "predictions.csv", s) for s in TRAIN_SITES],
            cox=[f"{RESULTS}/prognosis/cox.json"] if PLAN.cox_fit else [],
            segmenter=segmenter_model_input,
        output:
            plan=f"{MODELS}/finetune_covid/plan.json",
            onnx=f"{MODELS}/finetune_covid/model.onnx",
            saliency_onnx=f"{MODELS}/finetune_covid/model.saliency.onnx",
        log:
            "logs/train/trained_system.log",
        benchmark:
            "logs/benchmark/trained_system.tsv"
        conda:
            deep_env()
        params:
            folder=lambda wc, output: Path(output.plan).parent,
            threshold=config["evaluation"]["threshold"],
            cox=lambda wc, input: f"--cox {input.cox[0]}" if input.cox else "",
            segmenter=lambda wc, input: (
                f"--segmenter {input.segmenter[0]}" if input.segmenter else ""
            ),
            tracking=TRACKING,
        shell:
            "$COVIDCT system {params.folder} --threshold {params.threshold}"
            " --youden-from {input.train} {params.cox} {params.segmenter} {params.tracking}"
            " > {log} 2>&1"
