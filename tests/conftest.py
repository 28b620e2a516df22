"""Shared fixtures. Real CT comes from ../shared/data/real beside the checkout (CI has it too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("COVIDCT_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test data not found at {REAL_DATA} (set COVIDCT_REAL_DATA)")
    return REAL_DATA
