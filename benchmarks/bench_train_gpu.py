"""COVID-19Net training throughput with batches read from Zarr through RoiDataset.

Meant for a GPU machine with Keras on JAX (TensorFlow may be absent there); runs anywhere at a
small size. It writes N random float16 roi.zarr stores to a temporary folder, then for each
precision (fp32, bf16) and mode measures:

  train_on_batch   a serial loop: read a batch (RoiDataset.__getitem__), then one step;
                   "data %" = time reading / total time (what a GPU would wait for).
  fit              model.fit over a threaded RoiDataset (workers=N) with steps_per_execution;
                   "data %" = summed time inside __getitem__ (in worker threads, overlapping
                   the steps) / total time: under 100% means reading keeps up.
  fit_cached       the same with every volume decoded into memory first (RoiDataset's cache),
                   so the difference to "fit" is what reading Zarr costs.
  jax_loop         the training rules' loop on JAX (covidct.model.jax_loop): --steps-per-execution
                   steps compiled into one call, the state donated and kept on the device, the
                   next batches read and sent while the device computes.
  read             no model: RoiDataset batches through a pool of `workers` threads, as fit
                   reads them; samples/s is what reading alone can deliver.

For train_on_batch, "compute samples/s" leaves the reading out (samples / time in steps).
--batch and --steps-per-execution take several values; every combination is measured, each
row printed as soon as it is done.

In the same run, the independent reference (--reference, ../shared/bench/gpu_reference.py:
plain PyTorch on data already on the device, with and without torch.compile) trains the same
network at the first batch size, and the last lines give each mode's best samples/s as a ratio
to it, so the ratio holds on a shared machine (--no-reference skips it).

Examples:
  KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py                      # 48x240x360
  KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py --precision bf16 --modes fit \
      --batch 4 8 16 --steps-per-execution 4 8
  KERAS_BACKEND=tensorflow python benchmarks/bench_train_gpu.py --size 16 64 96 --steps 3
  KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py --precision bf16 --batch 8 \
      --modes fit jax_loop --steps-per-execution 4 8                 # the figures in the README
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}
MODES = ("read", "train_on_batch", "fit", "fit_cached", "jax_loop")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "gpu_reference.py"
HEAD = ("precision", "mode", "batch", "spe", "steps", "samples/s", "ms/step", "data %",
        "compute samples/s", "note")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[48, 240, 360], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--stores", type=int, default=16, help="roi.zarr stores to write")
    p.add_argument("--workers", type=int, default=4, help="RoiDataset reader threads (fit)")
    p.add_argument("--steps-per-execution", type=int, nargs="+", default=[4])
    p.add_argument("--precision", nargs="+", choices=tuple(POLICIES), default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=MODES,
                   default=["train_on_batch", "fit", "jax_loop"])
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (temp)")
    p.add_argument("--reference", type=Path, default=REFERENCE,
                   help="the independent PyTorch reference benchmark (gpu_reference.py)")
    p.add_argument("--no-reference", action="store_true", help="do not run the reference")
    p.add_argument("--chunk-depth", type=int, default=None,
                   help="slices per Zarr chunk (default: the whole ROI, as the roi stage writes)")
    return p.parse_args(argv)


def write_stores(root: Path, n: int, size, chunk_depth=None) -> list[Path]:
    from covidct.io.stores import write_image

    rng = np.random.default_rng(0)
    # the roi stage writes each ROI as one chunk (make_roi); --chunk-depth varies it
    chunks = tuple(size) if chunk_depth is None else (chunk_depth,) + tuple(size[1:])
    paths = []
    for i in range(n):
        path = root / "patients" / "bench" / f"B{i:03d}" / "roi.zarr"
        write_image(path, rng.normal(size=size).astype(np.float16), spacing=(1.0, 1.0, 1.0),
                    chunks=chunks)
        paths.append(path)
    return paths


def build(keras, size, policy, steps_per_execution=1):
    from covidct.model import covid19net

    keras.backend.clear_session()
    keras.mixed_precision.set_dtype_policy(policy)
    model = covid19net(size)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.005),
                  loss="binary_crossentropy", steps_per_execution=steps_per_execution)
    return model


def repeat_to(paths, labels, n: int) -> tuple[list, list]:
    """The stores (and labels) repeated to ``n`` patients: enough for the timed batches."""
    reps = -(-n // len(paths))
    return (list(paths) * reps)[:n], (list(labels) * reps)[:n]


def bench_read(paths, labels, args, batch):
    from concurrent.futures import ThreadPoolExecutor

    from covidct.model.dataset import RoiDataset

    steps = args.steps
    ds = RoiDataset(*repeat_to(paths, labels, steps * batch), batch_size=batch, shuffle=True)
    with ThreadPoolExecutor(args.workers) as pool:
        start = time.perf_counter()
        for _ in pool.map(ds.__getitem__, range(len(ds))):
            pass
        total = time.perf_counter() - start
    return total, ds.read_seconds, steps


def bench_train_on_batch(keras, paths, labels, args, policy, batch):
    from covidct.model.dataset import RoiDataset

    model = build(keras, args.size, policy)
    ds = RoiDataset(paths, labels, batch_size=batch, shuffle=True, workers=1)
    n = len(ds)
    if len(paths) % batch:                                 # only full batches (one shape)
        n = len(paths) // batch
    for i in range(args.warmup):
        x, y = ds[i % n]
        float(np.asarray(model.train_on_batch(x, y)))
    read = 0.0
    start = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        x, y = ds[i % n]
        read += time.perf_counter() - t0
        float(np.asarray(model.train_on_batch(x, y)))      # forces the step to finish
    total = time.perf_counter() - start
    return total, read


def bench_fit(keras, paths, labels, args, policy, batch, spe, cached=False):
    from covidct.model.dataset import RoiDataset

    steps = max(spe, args.steps // spe * spe)
    model = build(keras, args.size, policy, steps_per_execution=spe)
    many, ys = repeat_to(paths, labels, steps * batch)
    warm = RoiDataset(many[:spe * batch], ys[:spe * batch], batch_size=batch,
                      workers=args.workers)
    model.fit(warm, epochs=1, verbose=0, shuffle=False)     # compiles the multi-step function
    ds = RoiDataset(many, ys, batch_size=batch, workers=args.workers, shuffle=True,
                    cache=len(many) if cached else 0)
    if cached:                                  # decode every volume into the cache first
        for i in range(len(many)):
            ds.read(i)
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    total = time.perf_counter() - start
    return total, ds.read_seconds, steps


def bench_jax_loop(keras, paths, labels, args, policy, batch, spe):
    from covidct.model.dataset import RoiDataset
    from covidct.model.jax_loop import JaxLoop

    steps = max(spe, args.steps // spe * spe)
    model = build(keras, args.size, policy)
    many, ys = repeat_to(paths, labels, steps * batch)
    loop = JaxLoop(model, spe)
    warm = RoiDataset(many[:spe * batch], ys[:spe * batch], batch_size=batch,
                      workers=args.workers)
    loop.fit(warm, epochs=1)                    # compiles the multi-step call
    ds = RoiDataset(many, ys, batch_size=batch, workers=args.workers, shuffle=True)
    start = time.perf_counter()
    loop.fit(ds, epochs=1)                      # ends with the state back on the host
    total = time.perf_counter() - start
    return total, ds.read_seconds, steps


def reference_rows(args, precision: str, batch: int) -> list[dict]:
    """The reference's JSON lines: plain PyTorch, then through torch.compile."""
    import json
    import subprocess

    rows = []
    for compiled in (False, True):
        env = dict(os.environ, COMPILE="1") if compiled else \
            {k: v for k, v in os.environ.items() if k != "COMPILE"}
        cmd = [sys.executable, str(args.reference), "torch", precision, str(batch),
               *map(str, args.size), str(args.steps)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
            row = json.loads(line)
            if not out.stdout.strip():
                row = {"ok": False, "error": out.stderr.strip().splitlines()[-1][:120]}
        except Exception as err:
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"[:120]}
        rows.append({**row, "compile": compiled})
    return rows


def device_description(keras) -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        kinds = ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
        return f"jax {jax.__version__} ({kinds})"
    if backend == "tensorflow":
        import tensorflow as tf

        names = ", ".join(d.name for d in tf.config.list_logical_devices()) or "cpu"
        return f"tensorflow {tf.__version__} ({names})"
    return backend


def print_row(row, widths):
    print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip(), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    size = tuple(args.size)
    print(f"COVID-19Net training benchmark: keras {keras.__version__}, "
          f"{device_description(keras)}, input {'x'.join(map(str, size))}, {args.steps} steps, "
          f"{args.stores} roi.zarr stores, {args.workers} reader threads", flush=True)
    widths = [max(len(h), 9) for h in HEAD]
    widths[HEAD.index("mode")] = max(map(len, MODES))
    widths[-1] = 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        paths = write_stores(Path(tmp), args.stores, size, args.chunk_depth)
        from covidct.io.stores import open_image

        chunks = open_image(paths[0]).array.chunks
        print(f"wrote {len(paths)} stores (chunks {chunks}) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        labels = np.arange(len(paths)) % 2
        print_row(HEAD, widths)
        best: dict[tuple[str, str], float] = {}
        for precision in args.precision:
            for batch in args.batch:
                for mode in args.modes:
                    spes = args.steps_per_execution if mode in ("fit", "fit_cached",
                                                                "jax_loop") else [1]
                    for spe in spes:
                        row = run_one(keras, paths, labels, args, precision, mode, batch, spe)
                        print_row(row, widths)
                        if row[5] != "-" and mode != "read":
                            key = (precision, mode)
                            best[key] = max(best.get(key, 0.0), float(row[5]))
    if not args.no_reference:
        print_reference(args, best)
    return 0


def print_reference(args, best: dict) -> None:
    """The reference at the first batch size, then each mode's best as a ratio to it."""
    batch = args.batch[0]
    for precision in args.precision:
        rows = reference_rows(args, precision, batch)
        for row in rows:
            name = "torch.compile" if row["compile"] else "torch"
            if row.get("ok"):
                print(f"reference {name} {precision} batch {batch}: {row['samples_per_s']} "
                      f"samples/s (warm-up {row['warmup_s']} s, data on the device)", flush=True)
            else:
                print(f"reference {name} {precision}: failed ({row.get('error')})", flush=True)
        plain = next((r["samples_per_s"] for r in rows if r.get("ok") and not r["compile"]),
                     None)
        for (p, mode), value in sorted(best.items()):
            if p == precision and plain:
                print(f"ratio {precision} {mode} (best) / torch: {value / plain:.2f}", flush=True)


def run_one(keras, paths, labels, args, precision, mode, batch, spe):
    policy = POLICIES[precision]
    t0 = time.perf_counter()
    try:
        compute = ""
        if mode == "read":
            total, read, steps = bench_read(paths, labels, args, batch)
        elif mode == "train_on_batch":
            total, read = bench_train_on_batch(keras, paths, labels, args, policy, batch)
            steps = args.steps
            compute = f"{steps * batch / (total - read):.2f}"
        elif mode == "jax_loop":
            total, read, steps = bench_jax_loop(keras, paths, labels, args, policy, batch, spe)
        else:
            total, read, steps = bench_fit(keras, paths, labels, args, policy, batch, spe,
                                           cached=mode == "fit_cached")
        samples = steps * batch
        note = f"{time.perf_counter() - t0:.0f} s with compilation"
        return (precision, mode, batch, spe, steps, f"{samples / total:.2f}",
                f"{1000 * total / steps:.0f}", f"{100 * read / total:.0f}%", compute, note)
    except Exception as err:
        return (precision, mode, batch, spe, "-", "-", "-", "-", "-",
                f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")


if __name__ == "__main__":
    sys.exit(main())
