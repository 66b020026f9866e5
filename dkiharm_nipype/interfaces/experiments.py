"""Nipype interface over :mod:`dkiharm_nipype.evaluation.experiments` (the validation
experiments)."""

from __future__ import annotations

import logging
import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..config import NETWORK_INPUTS, REFERENCE_LABELS
from ..dki.maps import ALL_METRICS
from ..evaluation.evaluate import EVAL_PARAMS, EXPERIMENTS
from ..evaluation.experiments import (
    MAX_COMBINATIONS,
    PAPER_PS,
    PAPER_REPEATS,
    TISSUE_THRESHOLD,
    ExperimentInputError,
    ExperimentScan,
    TrainingOptions,
    run_experiment,
)
from ..registration import ENGINES
from ..utils.env import resolve_device, torch_threads

LOGGER = logging.getLogger("nipype.interface")

_PER_SCAN = ("subjects", "scanners", "runs", "dwi_files", "bval_files", "mask_files", "map_files")
_OPTIONAL_PER_SCAN = ("label_files", "sgm_files", "csf_files")


class _RunExperimentInputSpec(BaseInterfaceInputSpec):
    experiment = traits.Enum(*EXPERIMENTS, mandatory=True, desc="which experiment to run")
    reference = traits.Str(mandatory=True, desc="the reference scanner")
    subjects = traits.List(traits.Str(), mandatory=True, desc="subject label of each scan")
    scanners = traits.List(traits.Str(), mandatory=True, desc="scanner of each scan")
    runs = traits.List(traits.Str(), mandatory=True, desc="run label of each scan")
    dwi_files = traits.List(File(exists=True), mandatory=True, desc="preprocessed DWIs")
    bval_files = traits.List(File(exists=True), mandatory=True, desc="b-values of dwi_files")
    mask_files = traits.List(File(exists=True), mandatory=True, desc="brain masks")
    map_files = traits.List(
        traits.List(File(exists=True), minlen=8, maxlen=8),
        mandatory=True,
        desc="each scan's raw IRLLS maps, in the order " + ", ".join(ALL_METRICS),
    )
    label_files = traits.List(
        traits.List(File(exists=True), maxlen=8),
        desc="per scan, the reference maps registered into it (order as map_files), or an "
        "empty list: registered here with `engine` (reference-scanner scans: their own fit)",
    )
    sgm_files = traits.List(File(exists=True), desc="subcortical-GM probability maps per scan")
    csf_files = traits.List(File(exists=True), desc="CSF probability maps per scan")
    params = traits.List(
        traits.Str(), value=list(EVAL_PARAMS), usedefault=True, desc="scored parameters"
    )
    engine = traits.Enum(
        "dipy-syn", *[e for e in ENGINES if e not in ("dipy-syn", "fnirt", "auto")],
        usedefault=True, desc="within-subject registration engine ('none': already aligned)",
    )  # fmt: skip
    reference_labels = traits.Enum(
        *REFERENCE_LABELS, usedefault=True,
        desc="labels of reference-scanner scans: the subject's other run there (rescan) or "
        "their own fit (fit)",
    )  # fmt: skip
    seed = traits.Int(0, usedefault=True, desc="seed of the trainings and sampled splits")
    epochs = traits.Int(100, usedefault=True, desc="maximum epochs per network")
    samples_per_epoch = traits.Int(
        200_000, usedefault=True, desc="voxels drawn per epoch (0: all training voxels)"
    )
    hidden_channels = traits.Int(150, usedefault=True, desc="width of the networks")
    device = traits.Str(
        "auto",
        usedefault=True,
        desc="torch device: auto (a GPU if the host running the node has one), cpu, cuda, "
        "cuda:N",
    )
    network_input = traits.Enum(
        *NETWORK_INPUTS, usedefault=True, desc="network input, as TrainHarmonizer's"
    )
    kernel_size = traits.Int(
        3, usedefault=True, desc="first convolution's edge, as TrainHarmonizer's"
    )
    max_combinations = traits.Int(
        MAX_COMBINATIONS, usedefault=True, desc="most training sets per size or p (0: all)"
    )
    ps = traits.List(traits.Int(), value=list(PAPER_PS), usedefault=True, desc="leave-p-out p")
    test_subjects = traits.List(traits.Str(), desc="trainsize: held-out subjects")
    train_subjects = traits.List(traits.Str(), desc="tissue, seeds: training subjects")
    n_seeds = traits.Int(PAPER_REPEATS, usedefault=True, desc="seeds: number of trainings")
    repeats = traits.Int(PAPER_REPEATS, usedefault=True, desc="tissue: trainings per condition")
    tissue_threshold = traits.Float(
        TISSUE_THRESHOLD, usedefault=True, desc="tissue probability that makes a voxel SGM/CSF"
    )
    num_threads = traits.Int(1, usedefault=True, desc="registration and torch CPU threads")


class _RunExperimentOutputSpec(TraitedSpec):
    tsv = File(exists=True, desc="the experiment's table (experiment-<name>.tsv)")


class RunExperiment(SimpleInterface):
    """Retrain, harmonize and score for one validation experiment (paper section 2.3.3).

    Every list input has one entry per scan (all scans of the traveling subjects); see
    :func:`~dkiharm_nipype.evaluation.experiments.run_experiment`. One progress line per
    training is logged, e.g. ``sweep 3/12: scanner A, train sub-01+sub-02, test sub-05 (...)``.

    Examples
    --------
    >>> run = RunExperiment(experiment="seeds", reference="D", n_seeds=5)
    >>> run.inputs.ps, run.inputs.engine
    ([3, 1], 'dipy-syn')

    In an existing pipeline, after the per-scan fits were gathered into lists:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fits = pe.Node(niu.IdentityInterface(fields=["subjects", "scanners", "runs", "dwis",
    ...                                              "bvals", "masks", "maps"]), name="fits")
    >>> sweep = pe.Node(RunExperiment(experiment="trainsize", reference="D", epochs=30),
    ...                 name="sweep")
    >>> wf.connect([(fits, sweep, [("subjects", "subjects"), ("scanners", "scanners"),
    ...                            ("runs", "runs"), ("dwis", "dwi_files"),
    ...                            ("bvals", "bval_files"), ("masks", "mask_files"),
    ...                            ("maps", "map_files")])])
    >>> sweep.inputs.max_combinations
    10
    """

    input_spec = _RunExperimentInputSpec
    output_spec = _RunExperimentOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        n = len(inputs.subjects)
        given = {k: getattr(inputs, k) for k in (*_PER_SCAN, *_OPTIONAL_PER_SCAN)}
        given = {k: v for k, v in given.items() if isdefined(v) and (v or k in _PER_SCAN)}
        for key, values in given.items():
            if len(values) != n:
                raise ExperimentInputError(
                    f"RunExperiment got {len(values)} {key} for {n} scans; give one per scan."
                )
        scans = []
        for i in range(n):
            labels = given.get("label_files", [[]] * n)[i]
            if labels and len(labels) != len(ALL_METRICS):
                raise ExperimentInputError(
                    f"Scan {i + 1} has {len(labels)} label files; give the eight maps "
                    f"({', '.join(ALL_METRICS)}) or none."
                )
            tissues = {t: given[k][i] for t, k in (("SGM", "sgm_files"), ("CSF", "csf_files"))
                       if k in given}  # fmt: skip
            scans.append(
                ExperimentScan(
                    subject=inputs.subjects[i], scanner=inputs.scanners[i],
                    dwi=inputs.dwi_files[i], bval=inputs.bval_files[i],
                    mask=inputs.mask_files[i],
                    maps=dict(zip(ALL_METRICS, inputs.map_files[i], strict=True)),
                    labels=dict(zip(ALL_METRICS, labels, strict=bool(labels))),
                    run=inputs.runs[i], tissues=tissues,
                )
            )  # fmt: skip

        def _opt(trait):
            value = getattr(inputs, trait)
            return list(value) if isdefined(value) and value else None

        fname = EXPERIMENTS[inputs.experiment][0]
        out_file = os.path.join(runtime.cwd, fname)
        with torch_threads(inputs.num_threads):  # the threads declared as n_procs
            run_experiment(
                inputs.experiment,
                scans,
                reference=inputs.reference,
                out_file=out_file,
                params=inputs.params,
                engine=inputs.engine,
                reference_labels=inputs.reference_labels,
                options=TrainingOptions(
                    epochs=inputs.epochs,
                    samples_per_epoch=inputs.samples_per_epoch or None,
                    hidden_channels=inputs.hidden_channels,
                    device=resolve_device(inputs.device),
                    network_input=inputs.network_input,
                    kernel_size=inputs.kernel_size,
                ),
                seed=inputs.seed,
                max_combinations=inputs.max_combinations or None,
                ps=inputs.ps,
                test_subjects=_opt("test_subjects"),
                train_subjects=_opt("train_subjects"),
                n_seeds=inputs.n_seeds,
                repeats=inputs.repeats,
                tissue_threshold=inputs.tissue_threshold,
                n_threads=inputs.num_threads,
                log=lambda line: LOGGER.info("RunExperiment %s", line),
            )
        self._results["tsv"] = out_file
        return runtime
