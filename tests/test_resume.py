"""Resuming: a run killed with SIGKILL finishes when restarted on the same work directory.

The restarted run must reuse the nodes that had finished (their result files untouched,
Nipype logs them as cached) and write derivatives identical, voxel for voxel, to those of
an uninterrupted run. A node that fails leaves a crash file and one line on stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


def _command(bids: Path, root: Path, selection: dict) -> list[str]:
    filters = root / "filter.json"
    root.mkdir(parents=True, exist_ok=True)
    filters.write_text(json.dumps({"dwi": selection}))
    return [
        *DKIHARM,
        str(bids),
        str(root / "out"),
        "participant",
        "--participant-label",
        "01",
        "--bids-filter-file",
        str(filters),
        "-w",
        str(root / "work"),
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
        "-v",  # Nipype logs cached nodes at INFO
    ]


def _finished_nodes(work: Path) -> dict[str, int]:
    """Node name (``dkiharm_wf.x.y``) -> mtime of its result file, for finished nodes."""
    return {
        ".".join(p.parent.relative_to(work).parts): p.stat().st_mtime_ns
        for p in work.glob("dkiharm_wf/**/result_*.pklz")
    }


def _derivatives(out: Path) -> list[Path]:
    """Files of ``out`` except the methods text in ``logs/`` (written before the run)."""
    files = out.rglob("*") if out.exists() else []
    return sorted(p for p in files if p.is_file() and p.relative_to(out).parts[0] != "logs")


def test_sigkill_then_rerun_resumes_and_matches(tiny_bids, tmp_path):
    selection = {"session": "D", "run": 1}
    reference_cmd = _command(tiny_bids, tmp_path / "uninterrupted", selection)
    cmd = _command(tiny_bids, tmp_path / "killed", selection)
    work, out = tmp_path / "killed" / "work", tmp_path / "killed" / "out"

    # the uninterrupted run goes alongside the one that gets killed
    reference = subprocess.Popen(
        reference_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    victim = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while len(_finished_nodes(work)) < 5:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no node finished within 300 s"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the CLI, its forkserver, workers and tools
    assert victim.wait(timeout=60) == -signal.SIGKILL
    time.sleep(0.5)
    finished = _finished_nodes(work)
    print(f"killed after {len(finished)} finished node(s): {sorted(finished)}")
    assert "dkiharm_wf.sub_01_ses_D_run_1_wf.dki_fit_wf.fit" not in finished
    assert not _derivatives(out), "a killed run published derivatives"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    # finished nodes were reused, not rerun
    log = rerun.stdout + rerun.stderr
    cached = set(re.findall(r"Cached \(([\w.]+)\)", log))
    assert set(finished) <= cached, set(finished) - cached
    after = _finished_nodes(work)
    assert all(after[node] == mtime for node, mtime in finished.items())
    assert len(after) > len(finished)

    # and the derivatives equal those of the uninterrupted run
    expected = _derivatives(tmp_path / "uninterrupted" / "out")
    assert [p.relative_to(tmp_path / "uninterrupted" / "out") for p in expected] == [
        p.relative_to(out) for p in _derivatives(out)
    ]
    maps = [p for p in expected if p.name.endswith(".nii.gz")]
    assert len(maps) == 11
    for path in maps:
        want = np.asanyarray(nb.load(path).dataobj)
        got = np.asanyarray(
            nb.load(out / path.relative_to(tmp_path / "uninterrupted" / "out")).dataobj
        )
        assert np.array_equal(got, want, equal_nan=True), path.name


def test_failing_node_leaves_crash_file_and_one_line(tiny_bids, tmp_path):
    """An all-zero DWI passes the preflight checks but gives the fit an empty brain mask."""
    bids = tmp_path / "bids"
    dwi = bids / "sub-01" / "ses-D" / "dwi" / "sub-01_ses-D_run-1_dwi.nii.gz"
    shutil.copytree(tiny_bids, bids, ignore=shutil.ignore_patterns("derivatives", "sub-0[23]"))
    img = nb.load(dwi)
    nb.Nifti1Image(np.zeros(img.shape, np.int16), img.affine).to_filename(dwi)
    cmd = _command(bids, tmp_path, {"session": "D", "run": 1})

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    line = re.fullmatch(r"dkiharm: error: node ([\w.]+) failed: (.+) \(crash file: (\S+)\)", err)
    assert line, err
    node, cause, crash = line.groups()
    assert node == "dkiharm_wf.sub_01_ses_D_run_1_wf.dki_fit_wf.fit"
    assert "mask" in cause and "is empty" in cause and "sub-01_ses-D_run-1_dwi" in cause
    crash = Path(crash)
    assert crash.parent == tmp_path / "out" / "logs" / "crash" and crash.is_file()
    text = crash.read_text()
    assert "fit" in text and "is empty" in text
    assert not _derivatives(tmp_path / "out")


def test_work_dir_of_an_older_layout_is_refused_in_one_line(tmp_path):
    """Cached results name the modules that made them: after modules moved, an old work
    directory cannot be reused (they fail to load mid-run), so it is refused up front."""
    from dkiharm_nipype.cli.checks import WORK_LAYOUT, WORK_STAMP, check_work_dir
    from dkiharm_nipype.errors import DkiharmInputError

    new = tmp_path / "new"
    check_work_dir(new)  # a new one is stamped
    assert (new / WORK_STAMP).read_text().strip() == str(WORK_LAYOUT)
    (new / "wf" / "node").mkdir(parents=True)
    (new / "wf" / "node" / "result_node.pklz").touch()
    check_work_dir(new)  # and reused
    old = tmp_path / "old"
    (old / "wf" / "snr").mkdir(parents=True)
    (old / "wf" / "snr" / "result_snr.pklz").touch()  # written before the stamp existed
    with pytest.raises(DkiharmInputError, match=r"older dkiharm \(work layout 1") as err:
        check_work_dir(old)
    assert "delete that folder or give a new -w" in str(err.value)
    assert "\n" not in str(err.value)
