"""Real servers and a real browser for the tests: `mlflow server` on 127.0.0.1 and Debian's
chromium in headless mode.

Without chromium a browser test is skipped, unless COVIDCT_REQUIRE_BROWSER=1 (set by .ci/run,
which installs it), where its absence fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query):
    url = f"{base}{path}?{urllib.parse.urlencode(query, doseq=True)}"
    with urllib.request.urlopen(url, timeout=20) as resp:
        return json.loads(resp.read())


def post(base: str, path: str, body: dict):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())


def _wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer within {seconds:.0f} s"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)          # the server's group: its workers stop with it
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def mlflow_server(backend_uri: str, artifact_root: Path, folder: Path, proxy: bool = False):
    """`mlflow server` over ``backend_uri`` on a free port; yields its base URL. ``proxy``: the
    server stores the artifacts it is sent (``--artifacts-destination``, the README's cluster
    set-up) instead of clients writing to ``artifact_root`` themselves."""
    port = free_port()
    log_path = folder / "mlflow_server.log"
    artifacts = (["--artifacts-destination", artifact_root.as_uri()] if proxy
                 else ["--default-artifact-root", artifact_root.as_uri()])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
             *artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for(f"{base}/health", proc, log_path)
            yield base
        finally:
            _stop(proc)


def browser() -> str:
    """The headless browser's executable (skips, or fails under COVIDCT_REQUIRE_BROWSER=1)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    message = "no chromium here (Debian: apt-get install chromium)"
    if os.environ.get("COVIDCT_REQUIRE_BROWSER") == "1":
        pytest.fail(message + ", but COVIDCT_REQUIRE_BROWSER=1")
    pytest.skip(message)


def rendered(url: str, folder: Path, wait_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran, as chromium rendered it (``--dump-dom``)."""
    profile = folder / f"chromium-profile-{free_port()}"
    proc = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
         "--dump-dom", url],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
