"""The warm worker: the short per-patient stages without their start-up.

A workflow run on one machine starts one short process per patient and stage (synth, ingest,
segment, roi), and most of each is spent importing numpy, scipy, zarr, SimpleITK and
matplotlib. With ``COVIDCT_WORKER=1`` (what the workflow sets for local execution) ``covidct
STAGE`` hands its job to a worker process that holds those imports and forks a child per job.
The child takes the job's working directory, environment, arguments and standard streams (the
file descriptors themselves, passed over a Unix socket), runs the stage as the command line
would, and its exit status becomes the command's. A job thus keeps its own log, outputs and
exit status; when the command is killed, its child is killed with it.

Without a worker the command runs the stage itself and starts one for the next job. A worker
serves one Python, one covidct source tree and one set of thread variables (its socket's name
holds their hash), and exits after ``IDLE_S`` seconds without a job. Its own messages go to
``$TMPDIR/covidct-worker-KEY.log``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ENV = "COVIDCT_WORKER"
SERVE_ARG = "--serve-worker"        # covidct --serve-worker KEY: the worker's own command line
IDLE_S = 30.0                       # or $COVIDCT_WORKER_IDLE_S
# the stages it serves and what it imports for them before it forks
SERVED = {
    "synth": ("covidct.synth.patient", "covidct.synth.dicom"),
    "ingest": ("covidct.preprocess.ingest", "pydicom"),
    "segment": ("covidct.preprocess.segment", "covidct.preprocess.lung_threshold",
                "skimage.filters", "scipy.spatial"),
    "roi": ("covidct.preprocess.roi", "covidct.preprocess.qc", "matplotlib.pyplot"),
}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "GOTO_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MPLBACKEND")
HEADER = struct.Struct("!Q")        # request length
STATUS = struct.Struct("!iqd")      # exit status, peak memory (kB), CPU seconds


# --------------------------------------------------------------------------- identity

PACKAGE = Path(__file__).resolve().parent


def source_stamp(package: Path = PACKAGE) -> str:
    """The newest modification time and the number of the package's Python files."""
    newest, count = 0, 0
    for path in package.rglob("*.py"):
        newest = max(newest, path.stat().st_mtime_ns)
        count += 1
    return f"{newest}-{count}"


def worker_key(env=None) -> str:
    """What a worker must share with a job: the Python, the source tree, the thread variables
    (read when numpy and friends are imported) and the user."""
    env = os.environ if env is None else env
    parts = [sys.executable, str(PACKAGE), source_stamp(),
             str(os.getuid())] + [f"{v}={env.get(v, '')}" for v in THREAD_VARS]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def address(key: str) -> str:
    """The worker's socket: Linux's abstract namespace (no file, local to the machine)."""
    return f"\0covidct-worker-{key}"


def log_path(key: str) -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"covidct-worker-{key}.log"


# --------------------------------------------------------------------------- the job's side

def wanted(argv: list[str]) -> bool:
    """Whether this command line goes to a worker: a served stage, the worker switched on."""
    return (os.environ.get(ENV) == "1" and sys.platform.startswith("linux")
            and bool(argv) and argv[0] in SERVED and "-h" not in argv and "--help" not in argv)


def delegate(argv: list[str]) -> int | None:
    """Run ``covidct ARGV`` in the worker and return its exit status; None when there is no
    worker (one is then started for the next job, and the caller runs the stage itself)."""
    key = worker_key()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(key))
    except OSError:
        sock.close()
        start_worker(key)
        return None
    with sock:
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(sock, [HEADER.pack(len(payload)) + payload], [0, 1, 2])
        reply = _recv_exactly(sock, STATUS.size)
    if reply is None:
        print(f"covidct {argv[0]}: error: the worker ended before this job did "
              f"(see {log_path(key)})", file=sys.stderr)
        return 1
    status, peak_kb, cpu_s = STATUS.unpack(reply)
    print(f"covidct {argv[0]}: ran in the warm worker: CPU {cpu_s:.2f} s, peak memory "
          f"{peak_kb / 1024:.0f} MB", file=sys.stderr)
    return status


def start_worker(key: str) -> None:
    """Start a worker in the background (its own session: it outlives this command)."""
    import subprocess

    with open(log_path(key), "ab") as log:
        subprocess.Popen([sys.executable, "-m", "covidct", SERVE_ARG, key],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, close_fds=True, cwd="/")


def _recv_exactly(sock, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# --------------------------------------------------------------------------- the worker's side

@dataclass
class Job:
    """A forked child and the connection of the command it runs for."""

    pid: int
    conn: socket.socket
    stopping_since: float | None = None       # when its command went away (SIGTERM sent)


def serve(key: str, run, idle_s: float | None = None) -> int:
    """Accept jobs on ``key``'s socket until ``idle_s`` pass without one; ``run(argv)`` is the
    command line's entry (it returns the exit status)."""
    if idle_s is None:
        idle_s = float(os.environ.get(f"{ENV}_IDLE_S", IDLE_S))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address(key))
    except OSError:             # another worker for this key won the race
        return 0
    listener.listen(64)
    os.chdir("/")               # the first job's folder may go; each child takes its own
    _say(f"worker {key} pid {os.getpid()}: importing for {sorted(SERVED)}")
    preload()
    _say(f"worker {key}: ready")
    jobs: dict[int, Job] = {}                  # pidfd -> job
    last = time.monotonic()
    while True:
        now = time.monotonic()
        for job in jobs.values():              # a child that ignored SIGTERM for 2 s
            if job.stopping_since is not None and now - job.stopping_since > 2.0:
                _signal_group(job.pid, signal.SIGKILL)
        listening = {job.conn.fileno(): fd for fd, job in jobs.items()
                     if job.stopping_since is None}
        timeout = (1.0 if jobs else max(0.0, idle_s - (now - last)))
        ready, _, _ = select.select([listener.fileno(), *jobs, *listening], [], [], timeout)
        if not ready and not jobs and time.monotonic() - last >= idle_s:
            _say(f"worker {key}: idle for {idle_s:g} s, exiting")
            return 0
        for fd in ready:
            if fd == listener.fileno():
                conn, _ = listener.accept()
                started = _start_job(conn, listener, jobs, run)
                if started is None:
                    conn.close()
                else:
                    jobs[started[0]] = Job(started[1], conn)
            elif fd in jobs:                   # a child ended: its status to its command
                _finish(fd, jobs.pop(fd))
                last = time.monotonic()
            elif fd in listening:              # its command went away (killed): stop the child
                job = jobs[listening[fd]]
                if job.conn.recv(1) == b"":
                    _say(f"worker {key}: the command of child {job.pid} ended; stopping it")
                    job.stopping_since = time.monotonic()
                    _signal_group(job.pid, signal.SIGTERM)


def _finish(pidfd: int, job: Job) -> None:
    """Reap a child and send its exit status, peak memory and CPU time to its command."""
    _, wait_status, usage = os.wait4(job.pid, 0)
    os.close(pidfd)
    code = os.waitstatus_to_exitcode(wait_status)
    code = 128 - code if code < 0 else code          # killed by signal N: 128 + N, as a shell
    try:
        job.conn.sendall(STATUS.pack(code, usage.ru_maxrss, usage.ru_utime + usage.ru_stime))
    except OSError:
        pass
    job.conn.close()


def preload() -> None:
    """Import what the served stages need (imports only: no thread may run when it forks)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    importlib.import_module("ctypes")
    for modules in SERVED.values():
        for name in modules:
            importlib.import_module(name)


def _start_job(conn, listener, jobs, run):
    """Receive one job and fork its child: ``(pidfd, pid)``, or None for a bad request."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise ValueError("a request from another user")
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        if len(fds) != 3 or len(msg) < HEADER.size:
            raise ValueError("a request without its header or standard streams")
        (length,) = HEADER.unpack(msg[:HEADER.size])
        body = msg[HEADER.size:]
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ValueError("a truncated request")
            body += chunk
        request = json.loads(body)
    except (OSError, ValueError) as err:
        _say(f"bad request: {err}")
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        others = [listener.fileno(), conn.fileno(), *jobs,
                  *(job.conn.fileno() for job in jobs.values())]
        os._exit(_child(request, fds, others, run))
    for fd in fds:
        os.close(fd)
    return os.pidfd_open(pid), pid


def _child(request: dict, fds: list[int], others: list[int], run) -> int:
    """In the forked child: become the job (its streams, directory, environment) and run it."""
    try:
        os.setpgid(0, 0)                 # its own group: killed with what it starts
        _die_with_parent()
        for fd in others:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["covidct", *request["argv"]]
        status = run(request["argv"])
    except SystemExit as exc:            # argparse's usage errors, sys.exit in a stage
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:                # the job's own traceback, as Python prints it
        traceback.print_exc()
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    return int(status or 0)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """Linux's PR_SET_PDEATHSIG: SIGTERM to this child when the worker ends."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=sys.stderr, flush=True)
