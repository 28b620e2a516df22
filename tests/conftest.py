"""Shared fixtures: the real test CT, and one thread per library so tests share two cores fairly."""

from __future__ import annotations

import os
from pathlib import Path

# before numpy, SimpleITK or TensorFlow start their thread pools
for _var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
             "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402  (after the thread settings)

REPO = Path(__file__).resolve().parents[1]
FETCH = "python tests/data/fetch_covid_ct_md.py"


def real_roots() -> list[Path]:
    """Where real test CT is looked for: $COVIDCT_REAL_DATA, the copies shipped in tests/data/real,
    and ../shared/data/real beside the checkout."""
    roots = [Path(os.environ["COVIDCT_REAL_DATA"])] if os.environ.get("COVIDCT_REAL_DATA") else []
    return roots + [REPO / "tests" / "data" / "real", REPO.parent / "shared" / "data" / "real"]


class RealData:
    """``real_data / "cip_copdgene"`` (or a file below it) from the first root that has it; a set
    found nowhere skips the test, saying how to fetch it."""

    def __truediv__(self, name: str) -> Path:
        for root in real_roots():
            path = root / name
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                return path
        pytest.skip(f"real test data {name!r} not found in {', '.join(map(str, real_roots()))}; "
                    f"fetch it with: {FETCH}")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_data() -> RealData:
    return RealData()


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder: a stage's relative defaults (results/mlflow.db, ...)
    never land in the checkout."""
    monkeypatch.chdir(tmp_path)
