"""Cohorts: a failing scan is skipped and listed, participant jobs feed the group level,
preprocessed (QSIPrep-style) inputs skip dkiharm's preprocessing.

Each dataset is the tiny phantom cut down to the few scans a test needs, with
``--preproc none`` where preprocessing is not what is tested. A scan is made to fail by
zeroing its DWI: it passes the input checks, but its brain mask is empty and the fit stops.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

from dkiharm_nipype.cli.monitor import Failure, crash_reason, format_duration, write_failures
from dkiharm_nipype.dki.maps import ALL_METRICS

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]
FAST = ["--nprocs", "2", "--omp-nthreads", "1", "--preproc", "none"]
GROUP = ["--epochs", "2", "--samples-per-epoch", "2000", "--registration", "none", "--seed", "1"]


def _dataset(tiny_bids: Path, root: Path, subjects, *, broken=()) -> Path:
    """Scanners C and D, run 1, of ``subjects``; the DWIs in ``broken`` (keys) zeroed."""
    bids = root / "bids"
    drop = {f"sub-{s}" for s in ("01", "02", "03")} - {f"sub-{s}" for s in subjects}
    shutil.copytree(tiny_bids, bids, ignore=shutil.ignore_patterns("derivatives", "ses-A", *drop))
    for key in broken:
        sub, ses, _ = key.split("_")
        dwi = bids / sub / ses / "dwi" / f"{key}_dwi.nii.gz"
        img = nb.load(dwi)
        nb.Nifti1Image(np.zeros(img.shape, np.int16), img.affine).to_filename(dwi)
    return bids


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*DKIHARM, *map(str, args)], capture_output=True, text=True, timeout=900)


def _scan_files(out: Path, key: str) -> list[Path]:
    sub, ses, _ = key.split("_")
    return sorted((out / sub / ses / "dwi").glob(f"{key}_*"))


def _failures(out: Path) -> list[dict]:
    with open(out / "logs" / "failures.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _sha(paths) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in paths}  # fmt: skip


def test_console_helpers(tmp_path):
    assert [format_duration(s) for s in (4.12, 62, 3900)] == ["4.1 s", "1 min 02 s", "1 h 05 min"]
    text = "Node: a.b\nTraceback (most recent call last):\n  x\nValueError: the mask is empty\n"
    assert crash_reason(text) == "the mask is empty"
    path = write_failures([Failure("sub-01_ses-D_run-1", "fit", "bad\tmask\n", "c.txt", "")],
                          tmp_path / "failures.tsv")  # fmt: skip
    assert path.read_text().splitlines() == [
        "scan\tstep\treason\tcrash_file",
        "sub-01_ses-D_run-1\tfit\tbad mask\tc.txt",
    ]


def test_corrupt_scan_is_skipped_listed_and_fails_the_run(tiny_bids, tmp_path):
    bids = _dataset(tiny_bids, tmp_path, ["01"], broken=["sub-01_ses-D_run-1"])
    out = tmp_path / "out"
    proc = _run(bids, out, "participant", "-w", tmp_path / "work", *FAST)

    assert proc.returncode == 1, proc.stderr[-2000:]
    # the good scan is published whole (its maps, series, mask, SNR row), the bad one not at all
    good = {p.name for p in _scan_files(out, "sub-01_ses-C_run-1")}
    for param in ALL_METRICS:
        assert f"sub-01_ses-C_run-1_space-dwi_model-dki_param-{param}_dwimap.nii.gz" in good
    assert "sub-01_ses-C_run-1_space-dwi_desc-brain_mask.nii.gz" in good
    assert not _scan_files(out, "sub-01_ses-D_run-1")
    # listed once, with its step, a one-line reason and its crash file under output_dir/logs
    (row,) = _failures(out)
    assert (row["scan"], row["step"]) == ("sub-01_ses-D_run-1", "fit")
    assert "is empty" in row["reason"] and "\n" not in row["reason"]
    crash = Path(row["crash_file"])
    assert crash.parent == out / "logs" / "crash" and crash.is_file()
    # the console: progress lines, the final summary naming the failure, a one-line error
    assert re.search(
        r"\[\d+/\d+\] fit sub-01 ses-C run-1 \([\d.]+ s; [\d.]+ s elapsed", proc.stdout
    )
    assert "sub-01 ses-D run-1: fit: " in proc.stdout
    assert f"published in {out}" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "dkiharm: error: node" in proc.stderr
    log = sorted((out / "logs").glob("dkiharm-*.log"))
    assert log and "fit sub-01 ses-C run-1" in log[-1].read_text()

    # the group level leaves the failed scan out; one scanner remains: one line, no traceback
    group = _run(bids, out, "group", "-w", tmp_path / "work_group", *FAST, *GROUP)
    assert group.returncode == 1
    err = group.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "at least two scanners" in err and "after leaving out 1 failed scan" in err
    assert "left out of training and evaluation (failed): sub-01 ses-D run-1" in group.stdout
    # the good scan came from what the participant run published: no node of it ran
    assert not list((tmp_path / "work_group").glob("dkiharm_wf/sub_01_ses_C_run_1_wf"))

    # --stop-on-first-crash: today's behaviour, nothing published
    stop = tmp_path / "stop"
    proc = _run(bids, stop, "participant", "-w", tmp_path / "work", *FAST, "--stop-on-first-crash")
    assert proc.returncode == 1
    assert not [p for p in stop.rglob("*") if p.is_file() and "logs" not in p.parts]


def test_participant_jobs_then_group(tiny_bids, tmp_path):
    """Two participant jobs with their own work directories, then the group level with a
    third: no preprocessing or fit is recomputed, the published maps stay as they were; a
    scan that failed in its job is left out of training and evaluation and listed."""
    bids = _dataset(tiny_bids, tmp_path, ["01", "02"], broken=["sub-02_ses-C_run-1"])
    # sub-01's scan on D comes preprocessed (QSIPrep-style): the group level builds on it too
    qsiprep = ["--derivatives", _qsiprep_tree(bids, tmp_path)]
    out = tmp_path / "out"
    first = _run(bids, out, "participant", "--participant-label", "01", "-w", tmp_path / "w1",
                 *FAST, *qsiprep)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    second = _run(bids, out, "participant", "--participant-label", "02", "-w", tmp_path / "w2",
                  *FAST, *qsiprep)  # fmt: skip
    assert second.returncode == 1
    good = ["sub-01_ses-C_run-1", "sub-01_ses-D_run-1", "sub-02_ses-D_run-1"]
    published = _sha(p for key in good for p in _scan_files(out, key))
    for key in good:  # every scan of the jobs but the broken one is published whole
        assert {f"{key}_space-dwi_model-dki_param-{m}_dwimap.nii.gz" for m in ALL_METRICS} <= set(
            published
        )
    sidecar = json.loads(
        (out / "sub-01/ses-C/dwi/sub-01_ses-C_run-1_space-dwi_desc-preproc_dwi.json").read_text()
    )
    prov = sidecar["DkiharmProvenance"]
    assert prov["Options"]["fit_method"] == "irlls" and prov["Inputs"]["dwi"]["sha1"]

    qsi = json.loads(
        (out / "sub-01/ses-D/dwi/sub-01_ses-D_run-1_space-dwi_desc-preproc_dwi.json").read_text()
    )
    assert qsi["PreprocessedBy"] == "QSIPrep 1.0.0"

    group = _run(bids, out, "group", "-w", tmp_path / "w3", *FAST, *GROUP, *qsiprep)
    assert group.returncode == 1, group.stderr[-2000:]  # the broken scan failed again
    work = tmp_path / "w3" / "dkiharm_wf"
    scan_dirs = sorted(p.name for p in work.glob("sub_*_wf"))
    assert scan_dirs == ["sub_02_ses_C_run_1_wf"], scan_dirs  # only the retried failure
    assert _sha(p for key in good for p in _scan_files(out, key) if p.name in published) == (
        published
    )
    assert "3 of 4 scans use their published participant outputs" in group.stdout
    # harmonized maps of every good scan, a plan trained without the failed scan, a report
    for key in good:
        names = {p.name for p in _scan_files(out, key)}
        assert f"{key}_space-dwi_model-dki_param-mk_desc-harmonized_dwimap.nii.gz" in names
    plan = json.loads((out / "models" / "harmonization.json").read_text())
    assert plan["training_subjects"] == ["sub-01"] and plan["reference_scanner"] == "D"
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in group.stdout
    assert re.search(r"WM CV \(%\)\s+before\s+after", group.stdout)
    assert [r["scan"] for r in _failures(out)] == ["sub-02_ses-C_run-1"]
    assert re.search(r"training scanner C: best epoch \d of 2, validation loss", group.stdout)


def _qsiprep_tree(bids: Path, root: Path) -> Path:
    """A QSIPrep-shaped derivatives folder for sub-01 ses-D run-1 (a rescaled copy of the raw
    series, as a preprocessed series, and a box brain mask)."""
    qsiprep = root / "qsiprep"
    folder = qsiprep / "sub-01" / "ses-D" / "dwi"
    folder.mkdir(parents=True)
    (qsiprep / "dataset_description.json").write_text(json.dumps({
        "Name": "QSIPrep output", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "QSIPrep", "Version": "1.0.0"}]}))  # fmt: skip
    raw = bids / "sub-01" / "ses-D" / "dwi" / "sub-01_ses-D_run-1_dwi"
    stem = folder / "sub-01_ses-D_run-1_space-T1w_desc-preproc_dwi"
    img = nb.load(f"{raw}.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32) * 1.5
    nb.Nifti1Image(data, img.affine).to_filename(f"{stem}.nii.gz")
    for ext in (".bval", ".bvec"):
        shutil.copy(f"{raw}{ext}", f"{stem}{ext}")
    mask = np.zeros(img.shape[:3], np.uint8)
    mask[4:-4, 4:-4, 3:-3] = 1
    nb.Nifti1Image(mask, img.affine).to_filename(
        folder / "sub-01_ses-D_run-1_space-T1w_desc-brain_mask.nii.gz"
    )
    return qsiprep


def test_qsiprep_input_skips_preprocessing(tiny_bids, tmp_path):
    bids = _dataset(tiny_bids, tmp_path, ["01"])
    qsiprep = _qsiprep_tree(bids, tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run(bids, out, "participant", "--session-label", "D", "-w", work,
                "--nprocs", "2", "--omp-nthreads", "1", "--derivatives", qsiprep)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 of 1 scans come preprocessed (--derivatives)" in proc.stdout
    # no preprocessing node ran (the default --preproc would denoise and remove Gibbs rings)
    scan_dir = work / "dkiharm_wf" / "sub_01_ses_D_run_1_wf"
    assert (scan_dir / "dki_fit_wf" / "fit").is_dir()
    assert not list(scan_dir.glob("dwi_preproc_wf"))
    # the given series and mask are what was fitted and published
    given = qsiprep / "sub-01/ses-D/dwi/sub-01_ses-D_run-1_space-T1w_desc-"
    dwi = out / "sub-01/ses-D/dwi/sub-01_ses-D_run-1_space-dwi_desc-"
    for suffix in ("preproc_dwi.nii.gz", "brain_mask.nii.gz"):
        want = np.asanyarray(nb.load(f"{given}{suffix}").dataobj)
        suffix_out = suffix
        assert np.array_equal(np.asanyarray(nb.load(f"{dwi}{suffix_out}").dataobj), want)
    fa = nb.load(
        out / "sub-01/ses-D/dwi/sub-01_ses-D_run-1_space-dwi_model-dki_param-fa_dwimap.nii.gz"
    )
    mask = np.asanyarray(nb.load(f"{given}brain_mask.nii.gz").dataobj) > 0
    assert np.all(fa.get_fdata()[~mask] == 0) and np.all(np.isfinite(fa.get_fdata()[mask]))
    # the sidecar and the methods text say where the preprocessing came from
    meta = json.loads(Path(f"{dwi}preproc_dwi.json").read_text())
    assert meta["PreprocessedBy"] == "QSIPrep 1.0.0"
    assert "dkiharm's own preprocessing was skipped" in meta["Description"]
    assert meta["DkiharmProvenance"]["Inputs"]["dwi"]["path"] == f"{given}preproc_dwi.nii.gz"
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "1 of 1 runs had been preprocessed by QSIPrep 1.0.0" in citation


def test_preprocessed_inputs_that_cannot_be_matched_are_one_line_errors(tiny_bids, tmp_path):
    import pytest

    from dkiharm_nipype.errors import BIDSInputError
    from dkiharm_nipype.utils.bids import attach_preprocessed, collect_scans, load_layout

    scans = collect_scans(load_layout(tiny_bids), participant_label=["01"], session_label=["A"])
    assert [s.key for s in scans] == ["sub-01_ses-A_run-1", "sub-01_ses-A_run-2"]
    folder = tmp_path / "qsiprep" / "sub-01" / "ses-A" / "dwi"
    folder.mkdir(parents=True)
    raw = tiny_bids / "sub-01" / "ses-A" / "dwi" / "sub-01_ses-A_run-1_dwi"
    merged = folder / "sub-01_ses-A_space-T1w_desc-preproc_dwi.nii.gz"  # QSIPrep merged runs
    shutil.copy(f"{raw}.nii.gz", merged)
    with pytest.raises(BIDSInputError, match=r"matches 2 raw scans .*--separate-all-dwis"):
        attach_preprocessed(scans, [tmp_path / "qsiprep"])
    merged.unlink()
    single = folder / "sub-01_ses-A_run-2_space-T1w_desc-preproc_dwi.nii.gz"
    shutil.copy(f"{raw}.nii.gz", single)
    with pytest.raises(BIDSInputError, match=r"has no sub-01_ses-A_run-2_space-T1w_desc-preproc"):
        attach_preprocessed(scans, [tmp_path / "qsiprep"])  # no .bval beside it
    for ext in (".bval", ".bvec"):
        shutil.copy(f"{raw}{ext}", str(single).replace(".nii.gz", ext))
    with pytest.raises(
        BIDSInputError, match=r"has no sub-01_ses-A_run-2_space-T1w_desc-brain_mask"
    ):
        attach_preprocessed(scans, [tmp_path / "qsiprep"])
    img = nb.load(single)
    nb.Nifti1Image(np.ones(img.shape[:3], np.uint8), img.affine).to_filename(
        folder / "sub-01_ses-A_run-2_space-T1w_desc-brain_mask.nii.gz"
    )
    first, second = attach_preprocessed(scans, [tmp_path / "qsiprep"])
    assert first.preprocessed is None and second.preprocessed.dwi == single
    assert second.preprocessed.pipeline == f"the pipeline that wrote {tmp_path / 'qsiprep'}"
