"""The paper's validation experiments as a sub-workflow of the group level."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..evaluation.evaluate import EXPERIMENTS
from ..evaluation.experiments import MAX_COMBINATIONS, PAPER_PS, PAPER_REPEATS
from ..interfaces.bids import DerivativesDataSink
from ..interfaces.experiments import RunExperiment
from ..registration import DEFAULT_OPEN_ENGINE

#: Per-scan lists (one entry per scan, all aligned) of the input node.
SCAN_FIELDS = (
    "subjects", "scanners", "runs", "dwi_files", "bval_files", "mask_files", "map_files",
    "label_files", "sgm_files", "csf_files",
)  # fmt: skip


def init_experiment_wf(
    *,
    experiment: str,
    engine: str = "dipy-syn",
    seed: int = 0,
    epochs: int = 100,
    samples_per_epoch: int = 200_000,
    hidden_channels: int = 150,
    device: str = "auto",
    network_input: str = "dwi",
    kernel_size: int = 3,
    reference_labels: str = "rescan",
    max_combinations: int = MAX_COMBINATIONS,
    ps: tuple[int, ...] = PAPER_PS,
    n_seeds: int = PAPER_REPEATS,
    repeats: int = PAPER_REPEATS,
    omp_nthreads: int = 1,
    staging_dir: Path | None = None,
    rel_dir: str = "evaluation",
    name: str | None = None,
) -> pe.Workflow:
    """Run one validation experiment (paper section 2.3.3) and return its table.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from dkiharm_nipype.workflows.experiments import init_experiment_wf
            wf = init_experiment_wf(experiment="seeds")

    Parameters
    ----------
    experiment : {"trainsize", "leavepout", "tissue", "seeds"}
        Training-size sweep (Fig. 6), leave-p-subjects-out (Fig. 7), leave-one-tissue-out
        (Fig. 8) or repeated trainings with ``n_seeds`` seeds.
    engine : str
        Registration engine (test scans into their reference scan, labels not given);
        ``auto``/``fnirt`` become :data:`~dkiharm_nipype.registration.DEFAULT_OPEN_ENGINE`.
    seed, epochs, samples_per_epoch, hidden_channels, device, network_input, kernel_size
        How every network is trained (as the group run's networks).
    reference_labels
        What labels the reference scanner's scans (as the group run's).
    max_combinations, ps, n_seeds, repeats
        See :func:`~dkiharm_nipype.evaluation.experiments.run_experiment`.
    omp_nthreads : int
        Threads of the experiment node.
    staging_dir, rel_dir : Path, str
        Derivatives root: if given, the table is stored as ``<rel_dir>/experiment-<name>.tsv``.
    name : str
        Workflow name (default ``<experiment>_experiment_wf``).

    Inputs
    ------
    reference
        The reference scanner (chosen at run time in the group graph).
    subjects, scanners, runs, dwi_files, bval_files, mask_files
        One entry per scan of the traveling subjects: labels and preprocessed files.
    map_files
        Per scan, the eight raw IRLLS maps (MD, AD, RD, FA, MK, AK, RK, KFA).
    label_files
        Per scan, the reference maps registered into it, or ``[]`` (optional).
    sgm_files, csf_files
        Per scan, tissue probability maps (``tissue`` only).

    Outputs
    -------
    tsv
        ``experiment-<name>.tsv`` (columns:
        :data:`~dkiharm_nipype.evaluation.evaluate.EXPERIMENTS`).

    Examples
    --------
    Connected to the lists gathered from every scan's fit in a larger workflow:
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> scans = pe.Node(niu.IdentityInterface(fields=["sub", "scanner", "run", "dwi", "bval",
    ...                                               "mask", "maps"]), name="scans")
    >>> sweep_wf = init_experiment_wf(experiment="trainsize", epochs=30, max_combinations=3)
    >>> wf.connect([(scans, sweep_wf, [
    ...     ("sub", "inputnode.subjects"), ("scanner", "inputnode.scanners"),
    ...     ("run", "inputnode.runs"), ("dwi", "inputnode.dwi_files"),
    ...     ("bval", "inputnode.bval_files"), ("mask", "inputnode.mask_files"),
    ...     ("maps", "inputnode.map_files")])])
    >>> sweep_wf.name, sorted(sweep_wf.list_node_names())
    ('trainsize_experiment_wf', ['inputnode', 'outputnode', 'run'])
    >>> sweep_wf.get_node("run").inputs.max_combinations
    3
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}: {experiment!r}.")
    if engine in ("auto", "fnirt"):  # registrations run inside the node: an open engine
        engine = DEFAULT_OPEN_ENGINE
    workflow = pe.Workflow(name=name or f"{experiment}_experiment_wf")
    fields = ["reference", *SCAN_FIELDS]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["tsv"]), name="outputnode")
    run = pe.Node(
        RunExperiment(
            experiment=experiment, engine=engine, seed=seed, epochs=epochs,
            samples_per_epoch=samples_per_epoch, hidden_channels=hidden_channels,
            device=device, network_input=network_input, kernel_size=kernel_size,
            max_combinations=max_combinations,
            reference_labels=reference_labels,
            ps=list(ps), n_seeds=n_seeds,
            repeats=repeats, num_threads=omp_nthreads,
        ),
        name="run", n_procs=omp_nthreads, mem_gb=8,
    )  # fmt: skip
    workflow.connect([
        (inputnode, run, [("reference", "reference")] + [(f, f) for f in SCAN_FIELDS]),
        (run, outputnode, [("tsv", "tsv")]),
    ])  # fmt: skip
    if staging_dir is not None:
        rel_path = f"{rel_dir}/{EXPERIMENTS[experiment][0]}"
        ds_experiment = pe.Node(
            DerivativesDataSink(base_directory=str(staging_dir), rel_path=rel_path),
            name="ds_experiment", run_without_submitting=True,
        )  # fmt: skip
        workflow.connect(run, "tsv", ds_experiment, "in_file")
    return workflow
