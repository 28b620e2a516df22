# The learning curve (training.learning_curve): pretrained and random-init fine-tuning on
# fractions of the training split, their predictions on the external sites, and the table.


for _fraction in LEARNING_CURVE:
    for _base in ("finetune_covid", "random_init"):
        _name = curve_model(_base, _fraction)

        rule:
            name:
                f"train_{_name}"
            input:
                rois=store_paths(TRAIN_SITES, "roi.zarr"),
                sheets=site_sheets(TRAIN_SITES),
                init=finetune_init_input if _base == "finetune_covid" else [],
            output:
                model=f"{MODELS}/{_name}/model.keras",
                run=f"{MODELS}/{_name}/run.json",
                val=f"{MODELS}/{_name}/val_predictions.csv",
            log:
                f"logs/train/{_name}.log",
            benchmark:
                f"logs/benchmark/train_{_name}.tsv"
            conda:
                deep_env()
            threads: TRAINING["threads"]
            resources:
                gpu=1,
            params:
                backend=TRAINING["backend"],
                out=lambda wc, output: Path(output.model).parent,
                patients=patients_folder,
                init=finetune_init_flag if _base == "finetune_covid" else "",
                options=train_options(
                    _name,
                    f"train_{_name}",
                    TRAIN_SITES,
                    "covid",
                    epochs_of=_base,
                    train_fraction=_fraction,
                ),
            shell:
                TRAIN_SHELL

        rule:
            name:
                f"predict_{_name}"
            input:
                model=f"{MODELS}/{_name}/model.keras",
                rois=lambda wc: store_paths([wc.site], "roi.zarr"),
                sheet=lambda wc: site_sheet(wc.site),
            output:
                f"{RESULTS}/learning_curve/{_name}/{{site}}/predictions.csv",
            log:
                f"logs/predict/{_name}/{{site}}.log",
            benchmark:
                f"logs/benchmark/predict_{_name}/{{site}}.tsv"
            conda:
                deep_env()
            params:
                backend=TRAINING["backend"],
                model_name=_name,
                patients=patients_folder,
            shell:
                "KERAS_BACKEND={params.backend} $COVIDCT predict-site --model {input.model}"
                " --sheet {input.sheet} --site {wildcards.site} --patients {params.patients}"
                " --out {output} --model-name {params.model_name} > {log} 2>&1"


if LEARNING_CURVE:

    rule learning_curve:
        input:
            lambda wc: [p for point in curve_points(wc) for p in point[2:]],
        output:
            table=report(
                f"{RESULTS}/tables/learning_curve.md",
                caption="../report/learning_curve.rst",
                category="Tables",
            ),
            csv=f"{RESULTS}/tables/learning_curve.csv",
            figure=report(
                f"{RESULTS}/tables/learning_curve.png",
                caption="../report/learning_curve.rst",
                category="Tables",
            ),
        log:
            "logs/learning_curve.log",
        benchmark:
            "logs/benchmark/learning_curve.tsv"
        conda:
            "../../envs/stats.yaml"
        params:
            points=lambda wc: " ".join(
                f"--point {shlex.quote(name)} {fraction} {workdir_path(pre)} {workdir_path(rnd)}"
                for name, fraction, pre, rnd in curve_points(wc)
            ),
            out_dir=lambda wc, output: Path(output.csv).parent,
            tracking=TRACKING,
        shell:
            "$COVIDCT learning-curve {params.points} --out-dir {params.out_dir}"
            " {params.tracking} > {log} 2>&1"
