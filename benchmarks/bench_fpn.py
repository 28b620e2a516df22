"""Benchmark of the DenseNet121-FPN lung segmenter. Prints its figures.

(a) trains the FPN on N scans of the synthetic cohort (synth.patient.make_patient with the
    ``synthetic:`` section of config/config.yaml, exact lung masks), or loads ``--model``;
    ``--lesion-cases K`` adds K patients with the dense lesion cases (synth.cohort.
    lesion_case_rows, what the workflow adds with segmentation.train.lesion_cases);
(b) prints the Dice of its mask on the real COPDGene case (CIP ct-64.nrrd against the
    independent wholeLung-64.nrrd, both reoriented to LPS), and on the held-out lesion patients
    of tests/test_lesion_masks.py the share of lesion voxels inside the FPN's mask and its Dice
    against the exact lung mask, next to the threshold method's with its lesion fill;
(c) prints FPN inference speed (slices per second, whole predict_probability path: normalise,
    network, resize back) at 256x256 and 128x128, with one CPU thread and with all cores
    (each in a fresh process, since TensorFlow fixes its thread pools at start-up).

    .venv/bin/python benchmarks/bench_fpn.py --n 36 --epochs 3 --out /tmp/fpn_bench
    .venv/bin/python benchmarks/bench_fpn.py --n 36 --lesion-cases 12 --out /tmp/fpn_lesions
    .venv/bin/python benchmarks/bench_fpn.py --model /tmp/fpn_bench/model/model.keras --no-speed

The trained model goes under --out (default /tmp/fpn_bench), never into git.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("COVIDCT_REAL_DATA", REPO / "tests" / "data" / "real"))


def synthetic_rows(n: int, config: Path):
    """The first ``n`` patients of the synthetic cohort, taken round-robin over its sites."""
    import yaml

    from covidct.synth.cohort import cohort_table

    table = cohort_table(yaml.safe_load(config.read_text()))
    by_site = [g for _, g in table.groupby("site", sort=False)]
    rows, i = [], 0
    while len(rows) < n and any(i < len(g) for g in by_site):
        rows += [g.iloc[i] for g in by_site if i < len(g)]
        i += 1
    return rows[:n]


def held_out_lesion_patients():
    """The lesion patients of tests/test_lesion_masks.py (name -> row)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_lesion_masks import PATIENTS

    return PATIENTS


def train(args) -> Path:
    import numpy as np
    import yaml

    from covidct.model.segmenter import prepare_volume, train_segmenter
    from covidct.params import SegmenterTrainParams, TrackingParams
    from covidct.synth.cohort import lesion_case_rows
    from covidct.synth.patient import make_patient

    t0 = time.perf_counter()
    volumes = []
    extra = lesion_case_rows(args.lesion_cases, yaml.safe_load(args.config.read_text()))
    for row in synthetic_rows(args.n, args.config) + extra:
        ct, mask, spacing, _ = make_patient(row)
        volumes.append(prepare_volume(row["patient"], ct, mask, args.size, spacing,
                                      args.fov_mm))
    n_slices = sum(v.image.shape[0] for v in volumes)
    print(f"synthetic scans: {len(volumes)} ({n_slices} slices, field of view "
          f"{args.fov_mm or 'whole slice'} mm, lung fraction "
          f"{np.mean([v.mask.mean() for v in volumes]):.3f}) made in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    params = SegmenterTrainParams(epochs=args.epochs, batch_size=args.batch_size, size=args.size,
                                  slices_per_scan=args.slices_per_scan, lr=args.lr,
                                  seed=args.seed, fov_mm=args.fov_mm)
    record = train_segmenter(params, args.out / "model", volumes=volumes,
                             tracking=TrackingParams(f"sqlite:///{args.out}/mlflow.db",
                                                     "bench-fpn"))
    print(f"training: {args.epochs} epochs in {time.perf_counter() - t0:.0f} s, "
          f"selected epoch {record['selected_epoch']}, val_dice {record['val_dice']:.4f}",
          flush=True)
    import pandas as pd

    for h in pd.read_csv(args.out / "model" / record["history"]).to_dict("records"):
        print(
            f"  epoch {h['epoch']}: loss {h['loss']:.4f} "
            f"val_dice {h.get('val_dice', float('nan')):.4f}"
            f" ({h['seconds']:.0f} s)"
        )
    return args.out / "model" / "model.keras"


def copdgene_dice(model: Path) -> None:
    import SimpleITK as sitk

    from covidct.preprocess import lung_fpn
    from covidct.preprocess.morphology import dice

    folder = REAL / "cip_copdgene"
    ct_img = sitk.DICOMOrient(sitk.ReadImage(str(folder / "ct-64.nrrd")), "LPS")
    ref_img = sitk.DICOMOrient(sitk.ReadImage(str(folder / "wholeLung-64.nrrd")), "LPS")
    ct = sitk.GetArrayFromImage(ct_img)
    ref = sitk.GetArrayFromImage(ref_img) > 0
    t0 = time.perf_counter()
    spacing_yx = tuple(ct_img.GetSpacing()[::-1])[1:]
    prob = lung_fpn.predict_probability(ct, lung_fpn.load_model(model), batch_size=16,
                                        spacing_yx=spacing_yx)
    raw = prob >= lung_fpn.THRESHOLD
    mask = lung_fpn.postprocess_mask(raw)
    dt = time.perf_counter() - t0
    print(f"COPDGene ct-64 ({'x'.join(map(str, ct.shape))} z,y,x): Dice {dice(mask, ref):.4f} "
          f"(before post-processing {dice(raw, ref):.4f}); lung {mask.sum()} vs reference "
          f"{ref.sum()} voxels; {dt:.1f} s", flush=True)


def lesion_inclusion(model: Path) -> None:
    """Lesion share inside the mask and Dice against the exact lung mask, FPN and threshold."""
    from dataclasses import replace

    from covidct.params import ThresholdParams
    from covidct.preprocess import lung_fpn
    from covidct.preprocess.lung_threshold import threshold_lung_mask
    from covidct.preprocess.morphology import dice
    from covidct.synth.patient import make_patient

    net = lung_fpn.load_model(model)
    fill = replace(ThresholdParams(), lesion_fill=True)
    for name, row in held_out_lesion_patients().items():
        ct, lung, spacing, _, truth = make_patient(row, truth=True)
        lesion, lung = truth["lesion_mask"] > 0, lung > 0
        prob = lung_fpn.predict_probability(ct, net, batch_size=16, spacing_yx=spacing[1:])
        fpn = lung_fpn.postprocess_mask(prob >= lung_fpn.THRESHOLD) > 0
        thr = threshold_lung_mask(ct, spacing, fill)[0] > 0
        print(f"lesion patient {name:19s} lesion inside the mask: FPN {fpn[lesion].mean():.3f}, "
              f"threshold+fill {thr[lesion].mean():.3f}; Dice vs exact lung: FPN "
              f"{dice(fpn, lung):.4f}, threshold+fill {dice(thr, lung):.4f}", flush=True)


def speed_child(size: int, threads: int, n_slices: int, batch_size: int) -> None:
    """Runs in a fresh process: slices/s of predict_probability at ``size``."""
    import numpy as np

    from covidct.model.fpn import build_fpn
    from covidct.model.trainer import set_threads
    from covidct.preprocess.lung_fpn import predict_probability

    set_threads(threads)
    model = build_fpn(size)
    rng = np.random.default_rng(0)
    ct = rng.normal(-500, 300, (n_slices, 256, 256)).astype(np.int16)   # a 256x256 CT
    spacing_yx = (1.4, 1.4)                        # 256 x 1.4 mm: about the default field
    predict_probability(ct[:batch_size * 2], model, batch_size=batch_size, compiled=True,
                        spacing_yx=spacing_yx)
    t0 = time.perf_counter()
    predict_probability(ct, model, batch_size=batch_size, compiled=True, spacing_yx=spacing_yx)
    dt = time.perf_counter() - t0
    print(json.dumps({"size": size, "threads": threads, "slices": n_slices,
                      "slices_per_s": n_slices / dt}))


def speed(args) -> None:
    cores = os.cpu_count() or 1
    for size in (256, 128):
        for threads in (1, cores):
            cmd = [sys.executable, __file__, "--speed-child", str(size), str(threads),
                   "--speed-slices", str(args.speed_slices)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                print(f"speed {size}x{size}, {threads} thread(s): failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(lines[-1])
            print(f"FPN inference {size}x{size}, {threads} thread(s) of {cores}: "
                  f"{r['slices_per_s']:.1f} slices/s ({r['slices']} slices, batch 16)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=36, help="synthetic scans to train on (%(default)s)")
    p.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    p.add_argument("--lesion-cases", type=int, default=0,
                   help="dense lesion-case patients added to the training scans (%(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--slices-per-scan", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fov-mm", type=float, default=None,
                   help="in-plane field of view of the network input (default: the segmenter "
                        "training's; 0 = whole slices)")
    p.add_argument("--threads", type=int, default=2,
                   help="TensorFlow CPU threads for training and the Dice (%(default)s; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/fpn_bench"))
    p.add_argument("--model", type=Path, default=None, help="use this model instead of training")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    p.add_argument("--speed-slices", type=int, default=64)
    p.add_argument("--speed-child", type=int, nargs=2, metavar=("SIZE", "THREADS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.speed_child:
        speed_child(args.speed_child[0], args.speed_child[1], args.speed_slices, 16)
        return
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from covidct.model.trainer import set_threads
    from covidct.params import SegmenterTrainParams

    if args.fov_mm is None:
        args.fov_mm = SegmenterTrainParams.fov_mm
    set_threads(args.threads)
    model = args.model or train(args)
    copdgene_dice(model)
    lesion_inclusion(model)
    if not args.no_speed:
        speed(args)


if __name__ == "__main__":
    main()
