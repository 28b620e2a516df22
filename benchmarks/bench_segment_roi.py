"""Benchmark: threshold lung segmentation + lung-ROI (48x240x360) of a 512x512x300 chest CT.

The scan is the real COPDGene case (tests/data/real/cip_copdgene/ct-64.nrrd) upsampled with
SimpleITK (linear) to 512 x 512 x 300 voxels (0.52 x 0.52 x 1.05 mm), plus mild noise so the
full-resolution border decisions see realistic texture. It is written as ct.zarr (int16, one
slice per chunk), then measured in a fresh process on ONE core (OMP/BLAS/SimpleITK threads 1).
Prints seconds per step, the total and the peak memory, and next to them a reference measured
in the same process: SimpleITK's bare read of the same volume (written beside it as an
uncompressed NRRD), so the ratio holds on a noisy machine.

    .venv/bin/python benchmarks/bench_segment_roi.py [--real-data DIR] [--keep DIR] [--repeats N]
                                                     [--lesion-fill]

``--lesion-fill`` measures the same with segmentation.threshold.lesion_fill (off by default).

Goal (issue 17): segmentation + ROI under 4 s together on one core (imports excluded; they are
printed separately) and a peak memory under 1 GB.
CPU seconds are printed next to wall seconds: on a shared machine the CPU time is the figure
that does not depend on the other jobs (the child is single-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_CORE = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


def build(real_data: Path, out: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from covidct.io import stores as zarrio

    img = sitk.DICOMOrient(sitk.ReadImage(str(real_data / "cip_copdgene" / "ct-64.nrrd")), "LPS")
    size = (512, 512, 300)
    extent = [n * s for n, s in zip(img.GetSize(), img.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    up = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(up)
    arr += np.random.default_rng(0).normal(0, 20, arr.shape).astype(np.float32)
    arr = np.clip(np.rint(arr), -1024, 3071).astype(np.int16)
    zarrio.write_image(out, arr, spacing=spacing[::-1], origin=img.GetOrigin(),
                       direction=img.GetDirection(), attrs={"patient": "bench"})
    ref_img = sitk.GetImageFromArray(arr)
    ref_img.CopyInformation(up)
    sitk.WriteImage(ref_img, str(out.with_suffix(".nrrd")), useCompression=False)


def child(work: Path, lesion_fill: bool = False) -> dict:
    def rss_mb():  # peak resident memory of this process (VmHWM; ru_maxrss survives exec)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    t = time.perf_counter()
    import numpy as np
    import SimpleITK as sitk

    from covidct.io import stores as zarrio
    from covidct.params import RoiParams, ThresholdParams
    from covidct.preprocess import roi
    from covidct.preprocess.lung_threshold import otsu_threshold, threshold_lung_mask
    from covidct.preprocess.morphology import convex_hull_2d

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    # warm the lazily imported modules (scipy.spatial, skimage.filters) outside the timing
    otsu_threshold(np.array([[[-900.0, 0.0]]]), np.ones((1, 1, 2), bool), -550, -300)
    convex_hull_2d(np.eye(4, dtype=bool))
    res = {"imports_s": time.perf_counter() - t, "rss_after_imports_MB": rss_mb()}

    def timed(name, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        res[name] = {
            "wall_s": round(time.perf_counter() - w, 3),
            "cpu_s": round(time.process_time() - c, 3),
            "peak_rss_MB": rss_mb(),
        }
        return out

    def bare_read():  # the image must outlive its array view
        image = sitk.ReadImage(str(work / "ct.nrrd"))
        return int(sitk.GetArrayViewFromImage(image).sum(dtype=np.int64))

    timed("reference_read", bare_read)
    ct = zarrio.open_image(work / "ct.zarr")
    params = ThresholdParams(lesion_fill=lesion_fill)
    mask, info = timed("segment_compute",
                       lambda: threshold_lung_mask(ct.array, ct.spacing, params))
    res["segment_steps_wall_s"] = info["timings_s"]
    timed("segment_write", lambda: zarrio.write_image(
        work / "lung.zarr", mask, spacing=ct.spacing, origin=ct.origin, direction=ct.direction,
        attrs={"method": "threshold", "body_volume_ml": info["body_volume_ml"]}))
    res["lung_volume_ml"] = info["lung_volume_ml"]
    mask = None  # free it before the ROI step (the lambda above has run)
    paper = RoiParams(size=(48, 240, 360))
    timed("roi", lambda: roi.make_roi(work / "ct.zarr", work / "lung.zarr", work / "roi.zarr",
                                      paper))
    timed("roi_with_qc", lambda: roi.make_roi(work / "ct.zarr", work / "lung.zarr",
                                              work / "roi2.zarr", paper, qc_path=work / "qc.png"))
    res["qc_png_kB"] = round((work / "qc.png").stat().st_size / 1024, 1)
    return res


def accuracy(real_data: Path, work: Path) -> str:
    """Dice of the 512x512x300 mask against the CIP references (not timed)."""
    import SimpleITK as sitk

    from covidct.io import stores as zarrio
    from covidct.preprocess.morphology import dice

    lung = zarrio.open_image(work / "lung.zarr")
    mask = lung.to_sitk()
    d = real_data / "cip_copdgene"
    lr = sitk.DICOMOrient(
        sitk.ReadImage(str(d / "10002K_INSP_STD_BWH_COPD_leftLungRightLung.nrrd")), "LPS"
    )
    lr_here = sitk.GetArrayFromImage(
        sitk.Resample(lr, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )
    whole = sitk.DICOMOrient(sitk.ReadImage(str(d / "wholeLung-64.nrrd")), "LPS")
    back = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32), whole, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    d64 = dice(sitk.GetArrayFromImage(back) >= 0.5, sitk.GetArrayFromImage(whole) > 0)
    return (f"Dice {dice(lung.read(), lr_here > 0):.4f} vs the full-res CIP left/right map on the "
            f"512x512x300 grid; {d64:.4f} vs wholeLung-64 after resampling the mask back to ct-64")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real-data", default=str(REPO / "tests" / "data" / "real"))
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh measuring processes; figures are their median (default 3)")
    ap.add_argument("--lesion-fill", action="store_true",
                    help="segment with the lesion fill (segmentation.threshold.lesion_fill)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.lesion_fill)))
        return 0
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    build(Path(args.real_data), work / "ct.zarr")
    print(f"built 512x512x300 ct.zarr from COPDGene ct-64 in {time.perf_counter() - t:.1f} s")
    env = {**os.environ, **ONE_CORE}
    runs = []
    for _ in range(args.repeats):
        fill = ["--lesion-fill"] if args.lesion_fill else []
        out = subprocess.run([sys.executable, __file__, "--child", str(work), *fill], env=env,
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = runs[-1]
    print(f"{len(runs)} fresh processes; each figure is their median [min, max]"
          f"{'; with the lesion fill' if args.lesion_fill else ''}")

    def spread(values) -> str:
        return f"{statistics.median(values):6.2f} s [{min(values):.2f}, {max(values):.2f}]"

    imports = [r["imports_s"] for r in runs]
    print(f"imports (numpy, scipy, skimage, SimpleITK, zarr) {spread(imports)} (not counted), "
          f"RSS {res['rss_after_imports_MB']:.0f} MB")
    for k in res["segment_steps_wall_s"]:
        print(f"  segment step {k:<14} wall {spread([r['segment_steps_wall_s'][k] for r in runs])}")
    for name in ("segment_compute", "segment_write", "roi", "roi_with_qc"):
        print(f"{name:<18} wall {spread([r[name]['wall_s'] for r in runs])}  "
              f"cpu {spread([r[name]['cpu_s'] for r in runs])}  "
              f"peak RSS so far {max(r[name]['peak_rss_MB'] for r in runs):.0f} MB")
    steps = ("segment_compute", "segment_write", "roi")
    total_w = [sum(r[n]["wall_s"] for n in steps) for r in runs]
    total_c = [sum(r[n]["cpu_s"] for n in steps) for r in runs]
    ref = [r["reference_read"]["cpu_s"] for r in runs]
    ratio = [c / f for c, f in zip(total_c, ref)]
    print(f"TOTAL segment + write + roi(48x240x360): wall {spread(total_w)}, "
          f"cpu {spread(total_c)} (goal < 4 s, peak < 1 GB)")
    print(f"reference: SimpleITK's bare read of the same volume (NRRD) cpu {spread(ref)}: the "
          f"total is {statistics.median(ratio):.1f} x its cpu time (median of the runs' ratios)")
    print(f"qc.png {res['qc_png_kB']} kB; lung volume {res['lung_volume_ml']:.0f} ml")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times on a "
          f"busy machine exceed cpu times)")
    print(f"accuracy of the full-resolution path: {accuracy(Path(args.real_data), work)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
