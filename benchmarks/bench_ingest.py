"""Benchmark: ingest a 512x512x300 DICOM series on ONE core. Goal: under 3 s.

    .venv/bin/python benchmarks/bench_ingest.py [--slices 300]
        [--transfer-syntax explicit|rle|jpeg-lossless]
                                                [--repeats 3] [--profile]

The series (a body-like ellipse with lungs, noise and -2048 padding outside the scan circle) is
written once with covidct.synth.dicom and cached under the temp dir. Prints:
- per-step seconds of the in-process ingest (median of --repeats), from the stage's own log;
- in-process ingest seconds (median) and the whole `covidct ingest` command (start-up included)
  in a fresh process, with its peak RSS (psutil, sampled every 5 ms; getrusage's
  RUSAGE_CHILDREN would count the benchmark process itself, which the child starts as a fork of).
SimpleITK and Zarr are limited to one thread (--threads 1, the CLI default), blosc's own threads
are off under zarr 3, and OMP/BLAS threads are set to 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
):
    os.environ[var] = "1"

import numpy as np  # noqa: E402


def synthetic_volume(nz: int, ny: int = 512, nx: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    cy, cx = ny / 2, nx / 2
    body = ((y - cy) / (0.36 * ny)) ** 2 + ((x - cx) / (0.45 * nx)) ** 2 <= 1
    lungs = (((y - cy) / (0.25 * ny)) ** 2 + ((np.abs(x - cx) - 0.2 * nx) / (0.13 * nx)) ** 2) <= 1
    field = ((y - cy) ** 2 + (x - cx) ** 2) <= (0.5 * nx) ** 2
    base = np.full((ny, nx), -1000, np.float32)
    base[body] = 40
    base[lungs] = -850
    vol = np.empty((nz, ny, nx), np.int16)
    for k in range(nz):
        s = base + rng.normal(0, 20, (ny, nx)).astype(np.float32)
        s[~field] = -2048
        vol[k] = np.clip(np.rint(s), -2048, 3000)
    return vol


def cached_series(nz: int, transfer_syntax: str, bits_stored: int = 16) -> Path:
    """Stored = HU + 2048 (intercept -2048, so the -2048 padding is representable)."""
    from covidct.synth.dicom import write_series

    folder = (Path(tempfile.gettempdir())
              / f"covidct-bench-ingest-512x512x{nz}-{transfer_syntax}-b{bits_stored}")
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        write_series(synthetic_volume(nz), folder, spacing=(1.0, 0.7, 0.7),
                     origin=(-179.0, -179.0, -300.0), uid_seed=1, rescale_intercept=-2048,
                     header={"BitsStored": bits_stored, "HighBit": bits_stored - 1},
                     transfer_syntax=None if transfer_syntax == "explicit" else transfer_syntax)
        done.write_text("ok\n")
        print(f"wrote the {nz}-slice {transfer_syntax} series in {time.perf_counter() - t0:.1f} s: "
              f"{folder}")
    return folder


def peak_rss_mb(cmd: list[str]) -> float:
    """Run ``cmd``; its peak resident memory in MB, sampled every 5 ms."""
    import psutil

    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak / 1e6


class StepTimes(logging.Handler):
    """Collect the 'in X s' figure of each step line the ingest stage logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: dict[str, list[tuple[float, float]]] = {}

    def emit(self, record):
        m = re.match(r"(\w+): .* in ([0-9.]+) s \(cpu ([0-9.]+) s\)$", record.getMessage())
        if m:
            self.times.setdefault(m.group(1), []).append((float(m.group(2)), float(m.group(3))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--transfer-syntax", default="explicit",
                        choices=("explicit", "rle", "jpeg-lossless"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits-stored", type=int, default=16, choices=(12, 16),
                        help="16: GDCM reads into int32 (HU range over int16); 12, as most "
                             "scanners write: GDCM reads int16 directly")
    parser.add_argument("--clevel", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile one ingest, top 25")
    args = parser.parse_args()

    from covidct.params import IngestParams
    from covidct.preprocess import ingest as ingest_mod

    series = cached_series(args.slices, args.transfer_syntax, args.bits_stored)
    ingest_mod.set_threads(1)
    steps = StepTimes()
    logging.getLogger("covidct.preprocess.ingest").addHandler(steps)
    logging.getLogger("covidct.preprocess.ingest").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-out-"))
    try:
        seconds, cpu = [], []
        for i in range(args.repeats):
            out = work / f"ct{i}.zarr"
            t0, c0 = time.perf_counter(), time.process_time()
            ingest_mod.ingest(series, out, IngestParams(clevel=args.clevel), patient="BENCH")
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        size = sum(f.stat().st_size for f in (work / "ct0.zarr").rglob("*") if f.is_file())
        raw = args.slices * 512 * 512 * 2
        print(
            f"series: 512x512x{args.slices} {args.transfer_syntax}, BitsStored {args.bits_stored}, "
            f"{raw / 1e6:.0f} MB as int16"
        )
        for step, values in steps.times.items():
            print(f"  step {step:<6} median wall {statistics.median(v[0] for v in values):.2f} s, "
                  f"cpu {statistics.median(v[1] for v in values):.2f} s")
        print(f"ingest in-process, one core: median {statistics.median(seconds):.2f} s "
              f"(runs {', '.join(f'{s:.2f}' for s in seconds)}); store {size / 1e6:.1f} MB "
              f"(ratio {raw / size:.2f}, zstd clevel {args.clevel})")
        print(
            f"ingest CPU time (all threads of the process): median {statistics.median(cpu):.2f} s "
            f"(robust to other load on the machine; wall above is not)"
        )
        print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

        exe = Path(sys.executable).with_name("covidct")
        cmd = [str(exe), "ingest", str(series), str(work / "cli.zarr"), "--patient", "BENCH",
               "--threads", "1", "--clevel", str(args.clevel)]
        t0 = time.perf_counter()
        peak = peak_rss_mb(cmd)
        wall = time.perf_counter() - t0
        print(f"covidct ingest command, fresh process (imports included): {wall:.2f} s, "
              f"peak RSS {peak:.0f} MB")
        for what, value in (("cpu", statistics.median(cpu)), ("wall", statistics.median(seconds))):
            print(f"goal < 3 s on one core, by {what} time: {'met' if value < 3 else 'NOT met'} "
                  f"({value:.2f} s)")

        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            ingest_mod.ingest(series, work / "prof.zarr", patient="BENCH", clevel=args.clevel)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
