"""Shared fixtures: small phantoms generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MRTRIX_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_bids(tmp_path_factory) -> Path:
    """The ``tiny`` traveling-subject phantom (BIDS raw + truth derivatives), seed 0."""
    from dkiharm_nipype.phantom import generate

    out = tmp_path_factory.mktemp("phantom") / "tiny"
    generate(out, preset="tiny", seed=0)
    return out
