"""The ``covidct`` command: one subcommand per pipeline stage.

Only the module of the chosen stage is imported, so ``covidct ingest --help`` never pulls in
TensorFlow or MLflow. A stage module provides ``add_arguments(parser)`` and ``run(args)`` (or
``add_arguments_<stage>``/``run_<stage>`` when it holds two stages); ``run`` raises
:class:`CovidctError` for bad input, printed as one line naming the patient and the file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from covidct import __version__, worker
from covidct.errors import CovidctError

# stage name -> (module, one-line description). Order is the order of the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "cohort": ("covidct.synth.cohort", "write the synthetic cohort's sample sheet"),
    "synth": ("covidct.synth.patient", "write one synthetic chest CT (DICOM or NIfTI) of the demo "
                                       "cohort"),
    "ingest": ("covidct.preprocess.ingest", "read a DICOM folder or NIfTI/MHA/NRRD file into "
                                            "ct.zarr (HU, int16)"),
    "segment": ("covidct.preprocess.segment", "lung mask from ct.zarr into lung.zarr (threshold "
                                              "or fpn)"),
    "train-segmenter": ("covidct.model.segmenter", "train the DenseNet121-FPN lung segmenter"),
    "roi": ("covidct.preprocess.roi", "lung-ROI crop, non-lung suppression and resize into "
                                      "roi.zarr"),
    "qc-summary": ("covidct.preprocess.qc", "gather per-patient ROI attributes into a cohort QC "
                                            "table"),
    "train": ("covidct.model.classifier", "train COVID-19Net (EGFR pretraining, COVID fine-tuning, "
                                          "random init)"),
    "system": ("covidct.inference.system", "complete a trained model's folder into a trained "
                                           "system (plan.json, cox.json)"),
    "import-weights": ("covidct.model.authors", "the authors' published COVID-19Net weights "
                                                "(Keras 2 HDF5) into a trained system, or their "
                                                "lung segmenter into a lung FPN"),
    "predict-site": ("covidct.inference.site", "COVID-19 probability and 64-d feature for every "
                                               "patient of a site"),
    "evaluate": ("covidct.analysis.evaluate", "diagnostic metrics, ROC and calibration for one "
                                              "site"),
    "flow": ("covidct.analysis.flow", "patient flow per site (sheet to ROI, training use, "
                                      "follow-up) and Table 1"),
    "tables": ("covidct.analysis.tables", "Table 2, Table S2 and combined figures from the "
                                          "per-site metrics"),
    "learning-curve": ("covidct.analysis.learning_curve", "pretrained vs random init at "
                                                          "several training-set sizes"),
    "prognosis": ("covidct.analysis.prognosis", "Cox model, risk groups and Kaplan-Meier per "
                                                "site"),
    "explain": ("covidct.explain.stage", "saliency maps, filter patterns and feature PCA"),
    "predict": ("covidct.inference.scan", "run one scan through the trained system; JSON on "
                                          "stdout"),
}


def _module_for(stage: str):
    module = importlib.import_module(STAGES[stage][0])
    attr = stage.replace("-", "_")
    # A module holding several stages exposes add_arguments_<stage>/run_<stage>.
    add = getattr(module, f"add_arguments_{attr}", None) or module.add_arguments
    run = getattr(module, f"run_{attr}", None) or module.run
    return add, run


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidct",
        description="Fully automatic chest-CT pipeline for COVID-19 diagnosis and prognosis.",
        epilog="stages:\n" + "\n".join(f"  {name:<16} {text}" for name, (_, text) in STAGES.items())
        + "\n\nRun 'covidct STAGE --help' for a stage's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"covidct {__version__}")
    parser.add_argument("stage", choices=sorted(STAGES), metavar="STAGE", help="the stage to run")
    return parser


def main(argv: list[str] | None = None, delegate: bool = True) -> int:
    """Run ``covidct ARGV``; a served stage goes to the warm worker (:mod:`covidct.worker`)
    when ``COVIDCT_WORKER=1`` and ``delegate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")     # TensorFlow's C++ start-up chatter
    if argv[:1] == [worker.SERVE_ARG] and len(argv) == 2:
        return worker.serve(argv[1], lambda job: main(job, delegate=False))
    if delegate and worker.wanted(argv):
        status = worker.delegate(argv)
        if status is not None:
            return status
    if not argv or argv[0] not in STAGES:
        _top_parser().parse_args(argv)  # prints help, version or the usage error and exits
        return 2
    stage, rest = argv[0], argv[1:]
    add_arguments, run = _module_for(stage)
    parser = argparse.ArgumentParser(prog=f"covidct {stage}", description=STAGES[stage][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)
    try:
        status = run(args)
    except CovidctError as err:
        err.with_context(step=stage, patient=getattr(args, "patient", None))
        print(f"covidct {stage}: error: {err}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
