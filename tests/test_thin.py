"""Thin scans (a few slices, as partial-coverage acquisitions give): every spatial step has a
defined behaviour, and a two-slice scan runs the participant level end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nb
import numpy as np
import pytest
from conftest import single_scan_copy

from dkiharm_nipype.evaluation.scores import auto_wm_roi, erode, snr_table

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


def test_erosion_is_in_plane_on_a_slab():
    slab = np.ones((9, 9, 2), bool)
    eroded = erode(slab)
    assert eroded.sum() == 7 * 7 * 2  # in-plane rim removed, both slices kept
    cube = np.ones((9, 9, 9), bool)
    assert erode(cube).sum() == 7 * 7 * 7  # 3-D erosion where the volume is thick
    fa = np.full(slab.shape, 0.6)
    md = np.full(slab.shape, 0.8e-3)
    assert auto_wm_roi(fa, md, slab).sum() == 98


def test_scans_without_snr_are_left_out_of_the_reference_choice():
    rows = [
        {"participant_id": "sub-01", "scanner": "A", "snr_db": "20"},
        {"participant_id": "sub-01", "scanner": "D", "snr_db": "n/a"},
        {"participant_id": "sub-02", "scanner": "D", "snr_db": "18"},
    ]
    text, reference = snr_table(rows)
    assert reference == "A"  # D's mean is over its one measurable scan: 18 dB
    assert "18.00" in text and "reference scanner (highest SNR): A" in text
    text, reference = snr_table([{**r, "snr_db": "n/a"} for r in rows])
    assert reference is None and "n/a" in text


@pytest.fixture
def two_slices(tiny_bids, tmp_path):
    """sub-01's reference scan of the tiny phantom, cut to its two central slices."""
    bids = tmp_path / "bids"
    dwi = single_scan_copy(tiny_bids, bids)
    for run in dwi.parent.glob("*_run-2_*"):
        run.unlink()
    img = nb.load(dwi)
    z = img.shape[2] // 2
    data = np.asanyarray(img.dataobj)[:, :, z - 1 : z + 1]
    nb.Nifti1Image(data, img.affine, img.header).to_filename(dwi)
    return bids, dwi


def test_two_slice_scan_runs_end_to_end(two_slices, tmp_path):
    bids, dwi = two_slices
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        # default --preproc; dwidenoise, whose default 5x5x5 window crashes on two slices
        # (the default MP-PCA adapts its window in preproc/denoise.py, tested in test_denoise)
        [*DKIHARM, str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2",
         "--denoiser", "dwidenoise"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    maps = {
        p.name.split("param-")[1].split("_")[0]: p for p in out.rglob("*param-*_dwimap.nii.gz")
    }
    assert {"md", "fa", "mk", "rk", "ak", "kfa"} <= set(maps)
    mask = nb.load(next(out.rglob("*desc-brain_mask.nii.gz"))).get_fdata() > 0
    md = nb.load(maps["md"]).get_fdata()
    assert md.shape[2] == 2 and mask.sum() > 100
    # tissue MD inside the brain: the fit worked on the denoised two-slice data
    assert 0.5e-3 < np.median(md[mask]) < 1.5e-3
    # dwidenoise ran with the window that fits a two-slice scan
    cmdline = next(work.rglob("denoise/command.txt")).read_text()
    assert "-extent 5,5,1" in cmdline, cmdline
    rows = list(csv.DictReader(open(next(out.rglob("*desc-snr_qc.tsv"))), delimiter="\t"))
    assert rows[0]["snr_db"] == "n/a" or float(rows[0]["snr_db"]) > 0
    sidecar = json.loads(
        maps["mk"].with_name(maps["mk"].name.replace(".nii.gz", ".json")).read_text()
    )
    assert sidecar  # the map's provenance is written for a thin scan too
