"""Fixtures for tests/report: a synthetic results folder (see synthetic_results.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_results import Synthetic, build_results


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    """A finished experiment with every study scored."""
    return build_results(tmp_path / "results")
