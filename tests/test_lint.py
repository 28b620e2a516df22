"""The code is ruff-clean (pyproject.toml's rules) and the workflow snakefmt-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=repo, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=120)


def test_ruff_is_clean(repo):
    proc = _run(repo, "ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_snakefmt_is_clean(repo):
    proc = _run(repo, "snakefmt", "--check", "Snakefile", "workflow")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
