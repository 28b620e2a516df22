"""The warm worker (covidct.worker): a served stage gives what the command line gives, with
the job's own streams, exit status and working directory, and dies with its command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from covidct import worker
from covidct.io.stores import open_image

SPEC = {"patient": "w1", "label": "covid", "severity": 0.5, "seed": 5, "matrix": 64,
        "pixel_mm": 5.0, "slice_mm": 5.0, "format": "nifti"}


def covidct(args, cwd, env, log=None, **kw):
    """``python -m covidct ARGS`` as a workflow job runs it (its streams into ``log``)."""
    out = open(log, "w") if log else subprocess.PIPE
    try:
        return subprocess.run([sys.executable, "-m", "covidct", *args], cwd=cwd, env=env,
                              stdout=out, stderr=subprocess.STDOUT, text=True, **kw)
    finally:
        if log:
            out.close()


def worker_process(key):
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] and proc.info["cmdline"][-2:] == [worker.SERVE_ARG, key]:
            return proc
    return None


def stop_worker(key):
    proc = worker_process(key)
    if proc is not None:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def env():
    """The job environment with the worker on; no worker for its key before or after."""
    e = {**os.environ, worker.ENV: "1", f"{worker.ENV}_IDLE_S": "20"}
    stop_worker(worker.worker_key(e))
    yield e
    stop_worker(worker.worker_key(e))


def wait_for_worker(key, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        proc = worker_process(key)
        if proc is not None and "ready" in worker.log_path(key).read_text():
            return proc
        time.sleep(0.2)
    raise AssertionError(f"no worker {key} after {timeout} s:\n{worker.log_path(key).read_text()}")


def test_served_stages_match_the_command_line(tmp_path, env):
    """synth, ingest, segment and roi in the worker write what they write without it, into the
    job's folder, with the job's log; the first command starts the worker and runs itself."""
    key = worker.worker_key(env)
    outputs = {}
    for mode in ("direct", "served"):
        job_env = dict(env, **{worker.ENV: "1" if mode == "served" else "0"})
        d = tmp_path / mode
        d.mkdir()
        steps = [["synth", "--spec", json.dumps(SPEC), "--image", "w1/ct.nii.gz"],
                 ["ingest", "w1/ct.nii.gz", "ct.zarr", "--patient", "w1"],
                 ["segment", "ct.zarr", "lung.zarr", "--patient", "w1"],
                 ["roi", "ct.zarr", "lung.zarr", "roi.zarr", "--size", "16", "64", "96",
                  "--min-pixels", "8", "--qc", "qc.png", "--patient", "w1"]]
        if mode == "served":
            assert covidct(["ingest", "--help"], d, job_env).returncode == 0   # not served
            covidct(steps[0], d, job_env, log=d / "first.log").check_returncode()
            wait_for_worker(key)
            assert "warm worker" not in (d / "first.log").read_text()   # it ran itself
        for step in steps:
            proc = covidct(step, d, job_env, log=d / f"{step[0]}.log")
            assert proc.returncode == 0, (d / f"{step[0]}.log").read_text()
        logs = {s[0]: (d / f"{s[0]}.log").read_text() for s in steps}
        served = {s: "ran in the warm worker" in text for s, text in logs.items()}
        assert all(served.values()) == (mode == "served"), served
        assert "patient w1: lung mask" in logs["segment"]      # the stage's own log lines
        outputs[mode] = {name: open_image(d / name).read() for name in
                         ("ct.zarr", "lung.zarr", "roi.zarr")}
        outputs[mode]["qc"] = (d / "qc.png").read_bytes()
    for name, array in outputs["direct"].items():
        assert np.array_equal(array, outputs["served"][name]), name
    assert outputs["direct"]["roi.zarr"].shape == (16, 64, 96)


def test_a_failing_job_keeps_its_message_and_status(tmp_path, env):
    key = worker.worker_key(env)
    covidct(["roi", "--help"], tmp_path, env)
    covidct(["synth", "--spec", "{}"], tmp_path, env)          # starts the worker
    wait_for_worker(key)
    proc = covidct(["roi", "missing.zarr", "lung.zarr", "roi.zarr", "--patient", "p7"],
                   tmp_path, env)
    assert proc.returncode == 2
    assert "ran in the warm worker" in proc.stdout
    assert "patient p7" in proc.stdout and "missing.zarr" in proc.stdout
    assert not (tmp_path / "roi.zarr").exists()
    usage = covidct(["roi", "--no-such-option"], tmp_path, env)     # argparse's exit
    assert usage.returncode == 2 and "required: ct, lung, out" in usage.stdout


def test_a_killed_command_stops_its_child(tmp_path, env):
    """Snakemake stops a job by killing its command: the child in the worker goes too, and
    writes no output."""
    key = worker.worker_key(env)
    covidct(["synth", "--spec", "{}"], tmp_path, env)
    proc = wait_for_worker(key)
    big = dict(SPEC, matrix=512, pixel_mm=0.7, slice_mm=1.0)        # several seconds of work
    cmd = subprocess.Popen([sys.executable, "-m", "covidct", "synth", "--spec", json.dumps(big),
                            "--image", "big/ct.nii.gz"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not proc.children() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    children = proc.children()
    assert len(children) == 1
    while children[0].cwd() != str(tmp_path) and time.monotonic() - t0 < 10:
        time.sleep(0.05)                                   # it takes the job's folder
    assert children[0].cwd() == str(tmp_path)
    cmd.send_signal(signal.SIGTERM)
    cmd.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert gone and not alive
    assert not (tmp_path / "big" / "ct.nii.gz").exists()
    assert worker_process(key) is not None       # the worker itself goes on


def test_the_key_follows_the_python_the_source_and_the_threads(tmp_path):
    base = {"OMP_NUM_THREADS": "1"}
    assert worker.worker_key(base) == worker.worker_key(dict(base))
    assert worker.worker_key(base) != worker.worker_key({"OMP_NUM_THREADS": "2"})
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = worker.source_stamp(package)
    os.utime(package / "a.py", ns=(time.time_ns() + 10**9,) * 2)
    assert worker.source_stamp(package) != before
    assert worker.address("k").startswith("\0")          # abstract: no file to clean up
    assert not worker.wanted(["roi", "a", "b", "c"]) or os.environ.get(worker.ENV) == "1"
