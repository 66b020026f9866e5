"""Bad input at the participant level: one-line errors, non-zero exit, no derivatives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from conftest import single_scan_copy

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


@pytest.fixture
def one_scan(tiny_bids, tmp_path):
    """A copy of the tiny phantom reduced to sub-01's reference scan (ses-D, run 1)."""
    bids = tmp_path / "bids"
    dwi = single_scan_copy(tiny_bids, bids)
    return bids, dwi


def _run(bids: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *DKIHARM,
            str(bids),
            str(out),
            "participant",
            "-w",
            str(tmp_path / "work"),
            "--nprocs",
            "2",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return proc, out


def _assert_clean_failure(proc, out: Path, *fragments: str):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dkiharm: error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists() or not list(out.rglob("sub-*")), "partial derivatives written"


def _sibling(dwi: Path, ext: str) -> Path:
    return dwi.with_name(dwi.name.replace(".nii.gz", ext))


def test_single_shell(one_scan, tmp_path):
    bids, dwi = one_scan
    bval = _sibling(dwi, ".bval")
    b = np.loadtxt(bval)
    np.savetxt(bval, np.where(b > 50, 1000, 0)[None], fmt="%d")
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, "at least two non-zero b-value shells", bval.name)


def test_counts_disagree(one_scan, tmp_path):
    bids, dwi = one_scan
    bval = _sibling(dwi, ".bval")
    np.savetxt(bval, np.loadtxt(bval)[None, :-1], fmt="%d")
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, bval.name, "same volumes")


def test_zero_bvector_on_weighted_volume(one_scan, tmp_path):
    bids, dwi = one_scan
    bvec = _sibling(dwi, ".bvec")
    vecs = np.loadtxt(bvec)
    b = np.loadtxt(_sibling(dwi, ".bval"))
    vecs[:, np.flatnonzero(b > 50)[3]] = 0
    np.savetxt(bvec, vecs, fmt="%.6f")
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, "zero b-vector", bvec.name)


def test_bvalues_in_wrong_units(one_scan, tmp_path):
    bids, dwi = one_scan
    bval = _sibling(dwi, ".bval")
    np.savetxt(bval, np.loadtxt(bval)[None] / 1000, fmt="%.3f")
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, "ms/µm²", "multiply by 1000")


def test_three_d_image(one_scan, tmp_path):
    bids, dwi = one_scan
    img = nb.load(dwi)
    nb.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine).to_filename(dwi)
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, str(dwi), "4-D")


def test_nan_voxels(one_scan, tmp_path):
    bids, dwi = one_scan
    img = nb.load(dwi)
    data = img.get_fdata(dtype=np.float32)
    data[5, 5, 5, :] = np.nan
    nb.Nifti1Image(data, img.affine).to_filename(dwi)
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, str(dwi), "NaN")


def test_truncated_gzip(one_scan, tmp_path):
    bids, dwi = one_scan
    raw = dwi.read_bytes()
    dwi.write_bytes(raw[: len(raw) // 2])
    proc, out = _run(bids, tmp_path)
    _assert_clean_failure(proc, out, str(dwi), "truncated")


def test_empty_brain_mask_fails_in_the_fit_node(one_scan, tmp_path):
    bids, dwi = one_scan
    img = nb.load(dwi)
    nb.Nifti1Image(np.zeros(img.shape, np.int16), img.affine).to_filename(dwi)
    proc, out = _run(bids, tmp_path, "--preproc", "none")
    _assert_clean_failure(proc, out, "node", ".fit failed", "mask", "is empty", dwi.name)


def test_missing_topup_sidecar_field(one_scan, tmp_path):
    """With FSL present (stand-in executables), a sidecar lacking the readout time stops."""
    bids, dwi = one_scan
    fsl = tmp_path / "fsl"
    (fsl / "bin").mkdir(parents=True)
    for tool in ("topup", "eddy", "applytopup", "fslmerge", "fslroi"):
        exe = fsl / "bin" / tool
        exe.write_text("#!/bin/sh\nexit 1\n")
        exe.chmod(0o755)
    sidecar = _sibling(dwi, ".json")
    meta = json.loads(sidecar.read_text())
    for key in ("TotalReadoutTime", "EffectiveEchoSpacing"):
        meta.pop(key, None)
    sidecar.write_text(json.dumps(meta))
    env = {
        **os.environ,
        "FSLDIR": str(fsl),
        "FSLOUTPUTTYPE": "NIFTI_GZ",
        "PATH": f"{fsl / 'bin'}:{os.environ['PATH']}",
    }
    proc, out = _run(bids, tmp_path, "--preproc", "fsl", env=env)
    _assert_clean_failure(proc, out, sidecar.name, "TotalReadoutTime")


def test_fsl_requested_but_missing(one_scan, tmp_path):
    bids, _ = one_scan
    env = {k: v for k, v in os.environ.items() if k != "FSLDIR"}
    proc, out = _run(bids, tmp_path, "--preproc", "fsl", env=env)
    _assert_clean_failure(proc, out, "install FSL", "--preproc mrtrix")


def test_unwritable_output_dir(one_scan, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        proc = subprocess.run(
            [*DKIHARM, str(one_scan[0]), str(blocker / "out"), "participant"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        _assert_clean_failure(proc, blocker / "out", "cannot be created", "blocker")
    else:  # pragma: no cover - CI runs as root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = subprocess.run(
            [*DKIHARM, str(one_scan[0]), str(locked / "out"), "participant"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        _assert_clean_failure(proc, locked / "out", "not writable")
