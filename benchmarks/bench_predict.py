"""Benchmark: `covidct predict` on a 512x512xN DICOM series (N = 300 by default).

    .venv/bin/python benchmarks/bench_predict.py [--slices 300] [--threads 2] [--repeats 3]

Built once and cached (default: $TMPDIR/covidct_bench_predict):
- a 512 x 512 x N DICOM series (one file a slice) of a synthetic chest phantom
  (covidct.synth.patient.make_patient with a 512 matrix, 0.7 mm pixels, 1 mm slices);
- COVID-19Net at the paper's input size 48x240x360 (covidct.model.covid19net; untrained weights:
  the time does not depend on them), saved as model.keras with its ONNX export model.onnx, as a
  trained system holds them;
- a cox.json in the format `covidct prognosis` writes (two DL features + age, sex, comorbidity).

Measured:
1. the reference: SimpleITK's bare read of the same series (ImageSeriesReader), in a fresh
   process, median of --repeats;
2. the whole command line in a fresh process, wall seconds, median of --repeats: on the ONNX
   export (the default), with `--runtime keras`, with --saliency (the export with its input
   gradient, covidct.model.onnx_gradient) and with --saliency --runtime keras;
   `--threads N` for onnxruntime, TensorFlow, SimpleITK and the segmentation's slabs; peak
   memory (ru_maxrss of the waited-for children: the command and its preprocessing fork); the
   command's own timing_s of the last run (read, segment and roi run in the forked process
   while the model loads);
3. the in-process steps one after the other in a fresh process (read, segment, roi, onnxruntime
   import, load and inference, the saliency graph's load and run, TensorFlow import, Keras load
   and inference, Keras's saliency).
For a 2-core figure on a bigger machine, pin the benchmark: `taskset -c 0,1 .venv/bin/python ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER = (48, 240, 360)


def series_of(cache: Path, slices: int) -> Path:
    return cache / f"series_{slices}"


def build(cache: Path, slices: int) -> None:
    """Write the series, the model, its export and cox.json into ``cache`` (skips what
    exists)."""
    import numpy as np

    series = series_of(cache, slices)
    model_path, cox_path = cache / "model.keras", cache / "cox.json"
    shape = (slices, 512, 512)
    if not (series / "done").exists():
        from covidct.synth.dicom import write_series
        from covidct.synth.patient import PatientSpec, dicom_header, make_patient

        t = time.perf_counter()
        spec = PatientSpec.from_row({"matrix": shape[1], "pixel_mm": 0.7, "slice_mm": 1.0,
                                     "n_slices": shape[0], "seed": 11, "label": "covid",
                                     "severity": 0.6})
        volume, _, spacing, origin = make_patient(spec)
        assert volume.shape == shape, volume.shape
        header = {**dicom_header(spec), "PixelPaddingValue": int(spec.padding_hu + 3072)}
        write_series(volume, series, spacing=spacing, origin=origin, header=header,
                     rescale_intercept=-3072.0, uid_seed=11)
        (series / "done").write_text("")
        print(f"built the {'x'.join(map(str, shape[::-1]))} series in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not model_path.exists():
        from covidct.model import covid19net

        covid19net(PAPER).save(model_path)
    if not (cache / "model.saliency.onnx").exists():
        from covidct.model.onnx_graph import export_onnx

        export_onnx(model_path)
    if not cox_path.exists():
        from covidct.analysis.scoring import DIRECTION

        rng = np.random.default_rng(0)
        cox = {"direction": DIRECTION,
               "covariates": ["feature_7", "feature_22", "age", "sex", "comorbidity"],
               "coefficients": [float(v) for v in rng.normal(0, 0.5, 5)],
               "mean": [0.0, 0.0, 55.0, 0.5, 0.3], "sd": [1.0, 1.0, 12.0, 0.5, 0.46],
               "cutoff": 0.0}
        cox_path.write_text(json.dumps(cox))


def sitk_read(series: Path) -> float:
    """The reference: SimpleITK's bare read of the series, seconds (in this fresh process)."""
    import SimpleITK as sitk

    t = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reader.Execute()
    return time.perf_counter() - t


def steps(cache: Path, slices: int, threads: int) -> dict:
    """The in-process steps, each timed, in this (fresh) process."""
    from covidct.inference.scan import set_predict_threads
    from covidct.model.saved import load_feature_model
    from covidct.params import RoiParams
    from covidct.preprocess.ingest import load_ct
    from covidct.preprocess.roi import lung_in_roi, roi_from_arrays
    from covidct.preprocess.segment import lung_mask

    set_predict_threads(threads)
    out = {}
    t = time.perf_counter()
    loaded = load_ct(series_of(cache, slices))
    ct, spacing = loaded.array, loaded.spacing
    out["read"] = time.perf_counter() - t
    t = time.perf_counter()
    mask, seg = lung_mask(ct, spacing)
    out["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    roi16, attrs = roi_from_arrays(ct, mask, spacing, RoiParams(size=PAPER),
                                   body_ml=seg["body_volume_ml"])
    out["roi"] = time.perf_counter() - t
    import numpy as np

    x = roi16.astype(np.float32)[None, ..., None]
    t = time.perf_counter()
    import onnxruntime  # noqa: F401

    from covidct.model.onnx_graph import OnnxFeatureModel

    out["onnxruntime_import"] = time.perf_counter() - t
    t = time.perf_counter()
    exported = OnnxFeatureModel(cache / "model.onnx", threads)
    out["onnx_load"] = time.perf_counter() - t
    for key in ("onnx_inference_first", "onnx_inference_second"):
        t = time.perf_counter()
        exported(x)
        out[key] = time.perf_counter() - t
    t = time.perf_counter()
    with_gradient = OnnxFeatureModel(cache / "model.saliency.onnx", threads)
    out["onnx_saliency_load"] = time.perf_counter() - t
    for key in ("onnx_saliency_first", "onnx_saliency_second"):
        t = time.perf_counter()
        with_gradient.with_saliency(x[0, ..., 0])
        out[key] = time.perf_counter() - t
    del with_gradient
    t = time.perf_counter()
    import keras  # noqa: F401

    out["tensorflow_import"] = time.perf_counter() - t
    t = time.perf_counter()
    feature_model, model = load_feature_model(cache / "model.keras")
    out["model_load"] = time.perf_counter() - t
    for key in ("inference_first", "inference_second"):
        t = time.perf_counter()
        p, f = feature_model([x], training=False)
        np.asarray(p)
        out[key] = time.perf_counter() - t
    from covidct.explain.figures import plot_saliency
    from covidct.explain.saliency import saliency

    t = time.perf_counter()
    sal = saliency(model, roi16.astype(np.float32))
    out["keras_saliency_gradient"] = time.perf_counter() - t
    t = time.perf_counter()
    plot_saliency(cache / "steps_saliency.png", roi16.astype(np.float32), sal, "bench",
                  lung_mask_roi=lung_in_roi(mask, attrs["bbox"], PAPER).astype(bool))
    out["saliency_png"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_cli(cache: Path, slices: int, threads: int, *extra: str) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "covidct", "predict", str(series_of(cache, slices)),
           "--model", str(cache / "model.keras"), "--cox", str(cache / "cox.json"),
           "--age", "61", "--sex", "M", "--comorbidity", "1", "--threads", str(threads),
           *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"covidct predict failed:\n{proc.stderr}")
    return wall, cpu, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "covidct_bench_predict")
    parser.add_argument("--mode", choices=("all", "build", "steps", "read"), default="all",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.mode == "build":
        build(args.cache, args.slices)
        return
    if args.mode == "steps":
        print(json.dumps(steps(args.cache, args.slices, args.threads)))
        return
    if args.mode == "read":
        print(json.dumps(sitk_read(series_of(args.cache, args.slices))))
        return

    own = ["--cache", str(args.cache), "--slices", str(args.slices), "--threads",
           str(args.threads)]
    # building imports TensorFlow: in a child, so this process stays small for ru_maxrss
    subprocess.run([sys.executable, __file__, "--mode", "build", *own], check=True)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"covidct predict on a 512x512x{args.slices} DICOM series ({args.slices} files), "
          f"model input {'x'.join(map(str, PAPER))}, --threads {args.threads}, "
          f"{cores} cores available")
    reads = [float(subprocess.run([sys.executable, __file__, "--mode", "read", *own],
                                  capture_output=True, text=True, check=True).stdout)
             for _ in range(args.repeats)]
    reference = statistics.median(reads)
    print(f"reference, SimpleITK's bare read of the series: median {reference:.2f} s "
          f"(runs {', '.join(f'{r:.2f}' for r in reads)})")
    # the ONNX runs first: the peak RSS so far is then theirs
    modes = {"onnx (default)    ": (),
             "with --saliency   ": ("--saliency", str(args.cache / "saliency.png")),
             "--runtime keras   ": ("--runtime", "keras"),
             "--saliency, keras ": ("--saliency", str(args.cache / "saliency_keras.png"),
                                    "--runtime", "keras")}
    for label, extra in modes.items():
        walls, cpus, last = [], [], None
        for _ in range(args.repeats):
            wall, cpu, last = run_cli(args.cache, args.slices, args.threads, *extra)
            walls.append(wall)
            cpus.append(cpu)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"CLI {label}: median {statistics.median(walls):.2f} s wall "
            f"({statistics.median(walls) / reference:.1f} x the bare read) "
            f"(runs {', '.join(f'{w:.2f}' for w in walls)}), "
            f"median CPU {statistics.median(cpus):.2f} s "
            f"(user + system, all its processes); peak RSS so far {peak:.0f} MB"
        )
        print("   its timing_s: " + ", ".join(f"{k} {v:.2f}" for k, v in last["timing_s"].items()))
    proc = subprocess.run([sys.executable, __file__, "--mode", "steps", *own],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    print("in-process steps, one after the other (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "peak_rss_mb")
          + f"; peak RSS {s['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
