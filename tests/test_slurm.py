"""Execution engines: the participant level through Nipype's SLURM plugin on a real
single-node Slurm cluster, MultiProc and Linear give the same maps.

The fixture starts munged, slurmctld and slurmd (Debian's ``slurm-wlm``, installed by
``tools/install.sh --test``) with ``tools/slurm/start.sh`` in a private folder, and stops them
at the end. The maps must equal those of MultiProc and Linear runs of the same scan, and
every submitted node must appear in Slurm's job-completion log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """``SLURM_CONF`` and the state folder of a running single-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons (munged, slurmctld, slurmd) must be started as root")
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch") if not _which(exe)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bash tools/install.sh --test)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        ["bash", str(ROOT / "tools/slurm/start.sh"), str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if start.returncode != 0:
        subprocess.run(["bash", str(ROOT / "tools/slurm/stop.sh"), str(state)], timeout=60)
        pytest.skip(f"Slurm could not start here: {start.stderr.strip()}")
    yield {"conf": state / "slurm.conf", "dir": state}
    subprocess.run(["bash", str(ROOT / "tools/slurm/stop.sh"), str(state)], timeout=60)
    assert not _daemon_alive(state / "slurmctld.pid")


def _which(exe: str) -> str | None:
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin")


def _daemon_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def _participant(bids: Path, root: Path, *extra: str, env=None) -> subprocess.Popen:
    """Start the participant level on sub-01's reference scan (output in ``root/out``)."""
    root.mkdir(parents=True, exist_ok=True)
    selection = root / "filter.json"
    selection.write_text(json.dumps({"dwi": {"session": "D", "run": 1}}))
    return subprocess.Popen(
        [
            *DKIHARM,
            str(bids),
            str(root / "out"),
            "participant",
            "--participant-label",
            "01",
            "--bids-filter-file",
            str(selection),
            "-w",
            str(root / "work"),
            "--omp-nthreads",
            "1",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def test_slurm_multiproc_and_linear_give_the_same_maps(slurm, tiny_bids, tmp_path):
    # LOGNAME is unset in containers and cron jobs; Nipype's batch plugins need it
    env = {k: v for k, v in os.environ.items() if k != "LOGNAME"}
    env["SLURM_CONF"] = str(slurm["conf"])
    env["PATH"] = f"{env['PATH']}:/usr/sbin"
    plugin_args = json.dumps({"sbatch_args": "--cpus-per-task 1 --mem 1G", "max_jobs": 4})
    # both runs at once: the Slurm jobs spend most of their time waiting to be polled
    slurm_run = _participant(
        tiny_bids, tmp_path / "slurm", "--plugin", "SLURM", "--plugin-args", plugin_args, env=env
    )
    local_run = _participant(
        tiny_bids, tmp_path / "multiproc", "--plugin", "MultiProc", "--nprocs", "2"
    )
    linear_run = _participant(tiny_bids, tmp_path / "linear", "--plugin", "Linear")
    for proc in (slurm_run, local_run, linear_run):
        _finish(proc)
    via_slurm, local = tmp_path / "slurm" / "out", tmp_path / "multiproc" / "out"
    linear = tmp_path / "linear" / "out"

    # every heavy node ran as a Slurm job that completed
    log = (slurm["dir"] / "jobcomp.log").read_text().splitlines()
    jobs = dict(re.findall(r"Name=(\S+) JobState=(\S+)", "\n".join(log)))
    ran = {name.split(".")[0] for name in jobs}
    print(f"{len(jobs)} Slurm jobs:", sorted(ran))
    assert {"denoise", "degibbs", "brain_mask", "fit", "snr"} <= ran, ran
    assert set(jobs.values()) == {"COMPLETED"}, jobs
    scripts = list((tmp_path / "slurm" / "work").rglob("batch/batchscript_*.sh"))
    assert len(scripts) == len(jobs)

    # the same derivatives from the three engines, voxel for voxel
    maps = sorted(local.rglob("*.nii.gz"))
    assert len(maps) == 11
    tsv = next(local.rglob("*_desc-snr_qc.tsv"))
    for other in (via_slurm, linear):
        for path in maps:
            expected = np.asanyarray(nb.load(path).dataobj)
            got = np.asanyarray(nb.load(other / path.relative_to(local)).dataobj)
            assert np.array_equal(got, expected, equal_nan=True), (other, path.name)
        assert (other / tsv.relative_to(local)).read_text() == tsv.read_text()


def test_heavy_nodes_declare_threads_and_memory(tiny_bids, tmp_path):
    """MultiProc and the batch plugins schedule with each node's ``n_procs`` and ``mem_gb``."""
    from dkiharm_nipype.cli.parser import parse_args
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_dkiharm_wf

    selection = tmp_path / "filter.json"
    selection.write_text(json.dumps({"dwi": {"run": 1}}))
    config = parse_args(
        [str(tiny_bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work")]
        + ["--participant-label", "01", "--session-label", "C", "D", "--device", "cpu"]
        + ["--bids-filter-file", str(selection), "--nprocs", "4", "--omp-nthreads", "3"]
    )
    scans = collect_scans(
        load_layout(tiny_bids),
        participant_label=config.participant_label,
        session_label=config.session_label,
        bids_filters=config.bids_filters,
    )
    workflow, _ = init_dkiharm_wf(config=config, scans=scans)
    nodes = {}
    for node in workflow._get_all_nodes():
        nodes.setdefault(node.name, []).append(node)
    # the DWI series is 24x28x16x~28 float32 (0.3 MB): estimates floor at 0.1 GB per copy
    expected = {
        "denoise": (3, 0.3),
        "degibbs": (3, 0.2),
        "brain_mask": (3, None),
        "fit": (3, 0.3),
        "register": (3, 2),
        "train_C": (3, 4),
        "apply": (3, 2),
    }
    for name, (n_procs, mem_gb) in expected.items():
        assert name in nodes, sorted(nodes)
        for node in nodes[name]:
            assert node.n_procs == n_procs, (name, node.n_procs)
            if mem_gb is not None:
                assert node.mem_gb == pytest.approx(mem_gb), (name, node.mem_gb)
