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


def single_scan_copy(tiny_bids: Path, bids: Path) -> Path:
    """A copy of the tiny phantom at ``bids`` reduced to sub-01's reference scanner (ses-D);
    returns its run-1 DWI."""
    import shutil

    shutil.copytree(tiny_bids, bids, ignore=shutil.ignore_patterns("derivatives"))
    for sub in bids.glob("sub-*"):
        if sub.name != "sub-01":
            shutil.rmtree(sub)
    for ses in (bids / "sub-01").glob("ses-*"):
        if ses.name != "ses-D":
            shutil.rmtree(ses)
    return next((bids / "sub-01" / "ses-D" / "dwi").glob("*_run-1_dwi.nii.gz"))


def install_fake_fsl(root: Path, monkeypatch, scripts: dict[str, str]) -> Path:
    """An ``$FSLDIR`` at ``root`` whose ``bin`` holds stand-in Python scripts for FSL tools.

    ``scripts`` maps a tool name to the body of its script (a Python program receiving the
    tool's arguments in ``sys.argv``). ``FSLDIR``, ``FSLOUTPUTTYPE`` and ``PATH`` are set.
    """
    import stat
    import sys

    (root / "bin").mkdir(parents=True, exist_ok=True)
    for tool, body in scripts.items():
        script = root / "bin" / tool
        script.write_text(f"#!{sys.executable}\n{body}")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FSLDIR", str(root))
    monkeypatch.setenv("FSLOUTPUTTYPE", "NIFTI_GZ")
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return root


def hide_tools(monkeypatch, tools) -> None:
    """Hide an FSL installation: unset ``$FSLDIR`` and drop folders holding ``tools``."""
    monkeypatch.delenv("FSLDIR", raising=False)
    keep = [
        folder
        for folder in os.environ["PATH"].split(os.pathsep)
        if not any((Path(folder) / tool).exists() for tool in tools)
    ]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (the container image build) run only when asked: ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
