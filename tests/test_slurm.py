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


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
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
        "train": (3, 4),
        "apply": (3, 2),
    }
    for name, (n_procs, mem_gb) in expected.items():
        assert name in nodes, sorted(nodes)
        for node in nodes[name]:
            assert node.n_procs == n_procs, (name, node.n_procs)
            if mem_gb is not None:
                assert node.mem_gb == pytest.approx(mem_gb), (name, node.mem_gb)


def _group_config(bids: Path, tmp_path: Path, *extra: str):
    """The group level of sub-01 on scanners C and D (run 1), parsed and built, not run."""
    from dkiharm_nipype.cli.parser import parse_args
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_dkiharm_wf

    selection = tmp_path / "filter.json"
    selection.write_text(json.dumps({"dwi": {"run": 1}}))
    config = parse_args(
        [str(bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work")]
        + ["--participant-label", "01", "--session-label", "C", "D", "--omp-nthreads", "2"]
        + ["--bids-filter-file", str(selection), *extra]
    )
    scans = collect_scans(
        load_layout(bids),
        participant_label=config.participant_label,
        session_label=config.session_label,
        bids_filters=config.bids_filters,
    )
    workflow, _ = init_dkiharm_wf(config=config, scans=scans)
    return config, workflow


def test_gpu_plugin_args_only_on_nodes_that_can_use_a_gpu(tiny_bids, tmp_path):
    """``--gpu-plugin-args`` reaches training and inference; CPUs/memory follow each node."""
    from dkiharm_nipype.utils.resources import apply_batch_resources

    gpu = "--gres=gpu:1 --partition=gpu"
    config, workflow = _group_config(
        tiny_bids, tmp_path, "--plugin", "SLURM", "--gpu-plugin-args", gpu, "--device", "auto"
    )
    execution = config.execution
    assert execution.gpu_plugin_args == gpu
    applied = apply_batch_resources(
        workflow, execution.plugin, execution.plugin_args, execution.gpu_plugin_args
    )
    assert len(applied) == len(list(workflow._get_all_nodes()))
    with_gpu = sorted({node.name for node, args in applied if gpu in args})
    assert with_gpu == ["apply", "train"], with_gpu
    args = {node.name: node.plugin_args["sbatch_args"] for node, _ in applied}
    # n_procs and mem_gb of test_heavy_nodes_declare_threads_and_memory, plus 0.5 GB per job
    assert args["train"] == f" --cpus-per-task=2 --mem=4608M {gpu}"
    assert args["apply"] == f" --cpus-per-task=2 --mem=2560M {gpu}"
    assert args["denoise"] == " --cpus-per-task=2 --mem=820M"
    assert args["register"] == " --cpus-per-task=2 --mem=2560M"
    assert args["snr"] == " --cpus-per-task=1 --mem=615M"
    # the user's own --cpus-per-task/--mem for every job win; MultiProc gets nothing
    _, workflow = _group_config(tiny_bids, tmp_path, "--plugin", "SLURM")
    fixed = apply_batch_resources(workflow, "SLURM", {"sbatch_args": "-c 4 --mem=8G"}, gpu)
    assert {args for _, args in fixed} == {gpu}
    assert sorted({node.name for node, _ in fixed}) == ["apply", "train"]
    assert apply_batch_resources(workflow, "MultiProc", {}, gpu) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plugin", "MultiProc"], "--gpu-plugin-args needs a batch plugin (SLURM,"),
        (["--plugin", "SLURM", "--device", "cpu"], "--device cpu keeps them on the CPU"),
    ],
)
def test_gpu_plugin_args_refused_where_no_job_could_get_a_gpu(tiny_bids, tmp_path, extra, message):
    proc = subprocess.run(
        [*DKIHARM, str(tiny_bids), str(tmp_path / "out"), "group"]
        + ["--gpu-plugin-args", "--partition=gpu", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def _mem_mb(value: str) -> float:
    return float(value[:-1]) * {"M": 1, "G": 1024}[value[-1]]


def test_group_level_under_slurm_equals_multiproc(slurm, tiny_bids, tmp_path):
    """The whole group level as Slurm jobs, each with its own CPUs, memory and partition.

    Sub-01 on scanners C and D, 2 epochs: the Slurm run (GPU-capable jobs sent to the
    cluster's ``gpu`` partition) and a MultiProc run, at the same time. Every map and
    network tensor must be bit-identical, and every text output byte-identical except the
    wall-clock fields (model cards' ``seconds``/``created``, training logs' last column).
    """

    env = {k: v for k, v in os.environ.items() if k != "LOGNAME"}
    env["SLURM_CONF"] = str(slurm["conf"])
    env["PATH"] = f"{env['PATH']}:/usr/sbin"
    selection = tmp_path / "filter.json"
    selection.write_text(json.dumps({"dwi": {"run": 1}}))
    common = ["--participant-label", "01", "--session-label", "C", "D", "--device", "auto"]
    common += ["--bids-filter-file", str(selection), "--omp-nthreads", "2", "--seed", "1"]
    common += ["--epochs", "2", "--samples-per-epoch", "2000"]
    jobcomp = slurm["dir"] / "jobcomp.log"  # shared with the module's other Slurm test
    log_start = jobcomp.stat().st_size if jobcomp.exists() else 0
    runs = {}
    for name, extra, run_env in (
        ("slurm", ["--plugin", "SLURM", "--gpu-plugin-args", "--partition=gpu"], env),
        ("multiproc", ["--plugin", "MultiProc", "--nprocs", "2"], None),
    ):
        cmd = [*DKIHARM, str(tiny_bids), str(tmp_path / name / "out"), "group"]
        cmd += ["-w", str(tmp_path / name / "work"), *common, *extra]
        runs[name] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=run_env
        )
    for proc in runs.values():
        _finish(proc, timeout=1200)

    # each job got its node's CPUs and memory (+0.5 GB), GPU-capable ones the gpu partition
    log = jobcomp.read_text()[log_start:]
    jobs = re.findall(
        r"Name=([^. ]+)\S* JobState=(\S+) Partition=(\S+) .*?Tres=cpu=(\d+),mem=([\d.]+[MG])",
        log,
    )
    print(f"{len(jobs)} Slurm jobs:", sorted(set(jobs)))
    names = {name for name, *_ in jobs}
    assert {"denoise", "fit", "register", "train", "apply", "evaluate"} <= names
    assert {state for _, state, *_ in jobs} == {"COMPLETED"}
    on_gpu = {name: part == "gpu" for name, _, part, *_ in jobs}
    assert {name for name, gpu in on_gpu.items() if gpu} == {"apply", "train"}
    assert all(on_gpu[name] == (part == "gpu") for name, _, part, *_ in jobs)
    resources = {(name, int(cpu), _mem_mb(mem)) for name, _, _, cpu, mem in jobs}
    expected = {("train", 2, 4608), ("apply", 2, 2560), ("denoise", 2, 820), ("snr", 1, 615)}
    assert expected <= resources, resources
    assert len({r for r in resources if r[0] in {n for n, *_ in expected}}) == len(expected)

    _assert_same_derivatives(tmp_path / "slurm" / "out", tmp_path / "multiproc" / "out")


def _assert_same_derivatives(via_slurm: Path, local: Path) -> None:
    """Maps and network tensors bit-identical (the evaluation's CV maps to 1e-4: one run in
    three differed there, cause not yet found), text byte-identical but for clock fields."""
    from safetensors.numpy import load_file

    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(via_slurm) for p in via_slurm.rglob("*") if p.is_file())
    maps = [f for f in files if f.name.endswith(".nii.gz")]
    assert len([f for f in maps if "desc-harmonized" in f.name]) == 16
    for rel in maps:
        expected = np.asanyarray(nb.load(local / rel).dataobj)
        got = np.asanyarray(nb.load(via_slurm / rel).dataobj)
        if rel.parts[0] == "evaluation":
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=str(rel))
        else:
            assert np.array_equal(got, expected, equal_nan=True), rel
    for rel in (f for f in files if f.suffix == ".safetensors"):
        expected, got = load_file(local / rel), load_file(via_slurm / rel)
        assert all(np.array_equal(got[k], v) for k, v in expected.items()), rel
    # logs/config.toml records each run's own options (plugin, folders)
    texts = [f for f in files if f not in maps and f.suffix != ".safetensors"]
    texts = [f for f in texts if f != Path("logs/config.toml")]
    clocked = {f for f in texts if f.parent.name == "models" and f.name.startswith("scanner-")}
    for rel in texts:
        a, b = (local / rel).read_bytes(), (via_slurm / rel).read_bytes()
        if rel in clocked:
            a, b = (_without_clock(x.decode()) for x in (a, b))
        assert a == b, rel


def _without_clock(text: str) -> str:
    """A model card or training log without its wall-clock fields."""
    if text.lstrip().startswith("{"):
        return re.sub(r'"(seconds|created|weights_sha256)": [^,\n]+', "", text)
    return "\n".join("\t".join(row.split("\t")[:3]) for row in text.splitlines())
