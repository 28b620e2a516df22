"""COVID-19Net training throughput with batches read from Zarr through RoiDataset.

Meant for a GPU machine with Keras on JAX (TensorFlow may be absent there); runs anywhere at a
small size. It writes N random float16 roi.zarr stores to a temporary folder, then for each
precision (fp32, bf16) and mode measures:

  train_on_batch   a serial loop: read a batch (RoiDataset.__getitem__), then one step;
                   "data %" = time reading / total time (what a GPU would wait for).
  fit              model.fit over a threaded RoiDataset (workers=N) with steps_per_execution;
                   "data %" = summed time inside __getitem__ (in worker threads, overlapping
                   the steps) / total time: under 100% means reading keeps up.

Examples:
  KERAS_BACKEND=jax python benchmarks/bench_train_gpu.py                      # 48x240x360
  KERAS_BACKEND=tensorflow python benchmarks/bench_train_gpu.py --size 16 64 96 --steps 3
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

import numpy as np  # noqa: E402

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[48, 240, 360], metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--stores", type=int, default=16, help="roi.zarr stores to write")
    p.add_argument("--workers", type=int, default=4, help="RoiDataset reader threads (fit)")
    p.add_argument("--steps-per-execution", type=int, default=4)
    p.add_argument("--precision", nargs="+", choices=tuple(POLICIES), default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=("train_on_batch", "fit"),
                   default=["train_on_batch", "fit"])
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (temp)")
    return p.parse_args(argv)


def write_stores(root: Path, n: int, size) -> list[Path]:
    from covidct.zarrio import write_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / "patients" / "bench" / f"B{i:03d}" / "roi.zarr"
        write_image(path, rng.normal(size=size).astype(np.float16), spacing=(1.0, 1.0, 1.0))
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


def bench_train_on_batch(keras, paths, labels, args, policy):
    from covidct.dataset import RoiDataset

    model = build(keras, args.size, policy)
    ds = RoiDataset(paths, labels, batch_size=args.batch, shuffle=True, workers=1)
    n = len(ds)
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


def bench_fit(keras, paths, labels, args, policy):
    from covidct.dataset import RoiDataset

    spe = args.steps_per_execution
    steps = max(spe, args.steps // spe * spe)
    model = build(keras, args.size, policy, steps_per_execution=spe)
    reps = -(-steps * args.batch // len(paths))            # enough patients for `steps` batches
    many = (list(paths) * reps)[:steps * args.batch]
    ys = (list(labels) * reps)[:steps * args.batch]
    warm = RoiDataset(many[:spe * args.batch], ys[:spe * args.batch], batch_size=args.batch,
                      workers=args.workers)
    model.fit(warm, epochs=1, verbose=0, shuffle=False)     # compiles the multi-step function
    ds = RoiDataset(many, ys, batch_size=args.batch, workers=args.workers, shuffle=True)
    start = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    total = time.perf_counter() - start
    return total, ds.read_seconds, steps


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    backend = keras.backend.backend()
    devices = "cpu"
    if backend == "jax":
        import jax

        devices = ", ".join(str(d) for d in jax.devices())
    elif backend == "tensorflow":
        import tensorflow as tf

        devices = ", ".join(d.name for d in tf.config.list_logical_devices()) or "cpu"
    size = tuple(args.size)
    print(f"COVID-19Net training benchmark: backend {backend} ({devices}), input "
          f"{'x'.join(map(str, size))}, batch {args.batch}, {args.steps} steps, "
          f"{args.stores} roi.zarr stores, {args.workers} reader threads")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        paths = write_stores(Path(tmp), args.stores, size)
        print(f"wrote {len(paths)} stores in {time.perf_counter() - t0:.1f} s")
        labels = np.arange(len(paths)) % 2
        rows = []
        for precision in args.precision:
            for mode in args.modes:
                try:
                    if mode == "train_on_batch":
                        total, read = bench_train_on_batch(keras, paths, labels, args,
                                                           POLICIES[precision])
                        steps = args.steps
                    else:
                        total, read, steps = bench_fit(keras, paths, labels, args,
                                                       POLICIES[precision])
                    samples = steps * args.batch
                    rows.append((precision, mode, steps, f"{samples / total:.2f}",
                                 f"{1000 * total / steps:.0f}", f"{100 * read / total:.0f}%", ""))
                except Exception as err:  # noqa: BLE001 - report and go on to the next one
                    rows.append((precision, mode, "-", "-", "-", "-",
                                 f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"))
        head = ("precision", "mode", "steps", "samples/s", "ms/step", "data %", "note")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
