"""The top-level workflow: the only place that reads the run configuration."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .. import __version__
from ..config import RunConfig
from ..utils.bids import DWIScan
from .harmonize import node_name as _node_name
from .literate import LiterateWorkflow

LOGGER = logging.getLogger("dkiharm")


def init_dkiharm_wf(*, config: RunConfig, scans: list[DWIScan]):
    """Build the graph for one BIDS-App call.

    Returns ``(workflow, staging_dir)``; the workflow writes its derivatives into
    ``staging_dir`` (inside the work directory) and the caller publishes them into
    ``output_dir`` once the run has succeeded. ``workflow`` is ``None`` when there is
    nothing to run.

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), participant_label=["01"])
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="participant", work_dir=Path("/tmp/work"),
    ...                    preproc="mrtrix")
    >>> workflow, staging = init_dkiharm_wf(config=config, scans=scans)
    >>> workflow.base_dir, staging.parent
    ('/tmp/work', PosixPath('/tmp/work/derivatives_staging'))
    >>> sorted({n.split(".")[0] for n in workflow.list_node_names()})  # one per run
    ... # doctest: +NORMALIZE_WHITESPACE
    ['sub_01_ses_A_run_1_wf', 'sub_01_ses_A_run_2_wf', 'sub_01_ses_C_run_1_wf',
     'sub_01_ses_D_run_1_wf']

    Nested in a study workflow of your own, a step can read each scan's outputs:

    >>> from nipype.interfaces import utility as niu
    >>> study_wf = pe.Workflow(name="my_study")
    >>> qc = pe.Node(niu.IdentityInterface(fields=["snr"]), name="qc")
    >>> study_wf.connect(workflow, "sub_01_ses_D_run_1_wf.outputnode.snr_tsv", qc, "snr")
    >>> "qc" in study_wf.list_node_names()
    True
    """
    # one staging folder per selection, so that a run publishes only its own outputs even
    # when several runs (participant and group levels, other subjects) share the work dir
    selection = "\n".join(
        [config.analysis_level, str(config.models_dir or ""), *sorted(s.key for s in scans)]
    )
    digest = hashlib.sha1(selection.encode()).hexdigest()[:12]
    staging = config.work_dir / "derivatives_staging" / f"{config.analysis_level}-{digest}"
    if config.analysis_level == "participant":
        workflow = init_participant_wf(scans=scans, staging_dir=staging, config=config)
    else:
        workflow = init_group_wf(scans=scans, staging_dir=staging, config=config)
    if workflow is not None:
        workflow.base_dir = str(config.work_dir)
        workflow.config["execution"].update(
            {
                "crashdump_dir": str(config.output_dir / "logs" / "crash"),
                "crashfile_format": "txt",
                "remove_unnecessary_outputs": False,
                "stop_on_first_crash": config.stop_on_first_crash,
                # many short nodes per scan: poll often (Nipype's default waits 2 s)
                "poll_sleep_duration": 0.2,
            }
        )
    return workflow, staging


def _intro_desc(config: RunConfig, scans: list[DWIScan] | None) -> str:
    """The opening paragraph: software, versions and (with ``scans``) the data."""

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "(version unknown)"

    def count(n, word):
        return f"{n} {word}{'' if n == 1 else 's'}"

    text = (
        f"Results included in this manuscript come from processing performed with dkiharm "
        f"{__version__}, an implementation of the DKI harmonization method of @tong2020, "
        f"built on Nipype {version('nipype')} [@gorgolewski2011; @nipypesoftware] "
        f"and dipy {version('dipy')} [@dipy]."
    )
    if not scans:
        return text
    entity = {"ses": "session label", "session": "session label", "acq": "acquisition label"}
    how = entity.get(config.scanner_entity, f"sidecar field {config.scanner_entity}")
    text += (
        f" In total, {count(len(scans), 'diffusion-weighted (DWI) run')} of "
        f"{count(len({s.subject for s in scans}), 'participant')} acquired on "
        f"{count(len({s.scanner for s in scans}), 'scanner')} (scanners identified by the "
        f"{how}) were processed; repeated runs were kept as separate scans."
    )
    pre = [s for s in scans if getattr(s, "preprocessed", None) is not None]
    if pre:  # --derivatives: series preprocessed by another pipeline, used as provided
        pipelines = ", ".join(sorted({s.preprocessed.pipeline for s in pre}))
        text += (
            f" {len(pre)} of {len(scans)} runs had been preprocessed by {pipelines} and were "
            "used as provided, with that pipeline's brain mask: dkiharm's own preprocessing "
            "and mask estimation were skipped for them."
        )
    return text


def _top_wf(config: RunConfig, scans: list[DWIScan] | None, name: str) -> LiterateWorkflow:
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = _intro_desc(config, scans)
    return workflow


def _scan_wfs(config: RunConfig, scans: list[DWIScan], staging_dir: Path) -> dict:
    """Every scan's preprocessing, fit and sinks (:func:`.dki.init_scan_wf`), by scan key."""
    from ..preproc.modes import resolved_preproc_mode
    from ..utils.fsl import has_reversed_pe
    from .dki import init_scan_wf
    from .published import init_published_scan_wf

    # decide once (and log once) whether FSL runs, instead of once per scan
    preproc = resolved_preproc_mode(config.preproc, config.denoiser)
    topup_runs = (sum(has_reversed_pe(s.metadata, s.fmap_metadata) for s in scans), len(scans))
    return {
        scan.key: init_published_scan_wf(
            published=scan.published, name=_node_name(f"{scan.key}_wf")
        )
        if scan.published is not None  # published by a participant run: nothing recomputed
        else init_scan_wf(
            scan=scan,
            staging_dir=staging_dir,
            preproc=preproc,
            denoiser=config.denoiser,
            mask_method=config.mask_method,
            fit_method=config.fit_method,
            b_max=config.b_max,
            omp_nthreads=config.execution.omp_nthreads,
            topup_runs=topup_runs,
            snr_roi=config.snr_roi,
            device=config.device,
            name=_node_name(f"{scan.key}_wf"),
        )
        for scan in scans
    }


def init_participant_wf(
    *,
    scans: list[DWIScan],
    staging_dir: Path,
    config: RunConfig,
    name: str = "dkiharm_wf",
) -> pe.Workflow:
    """Preprocess and fit DKI for every selected scan (one sub-workflow per run).

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), participant_label=["02"],
    ...                       session_label=["C", "D"])
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="participant", work_dir=Path("work"),
    ...                    preproc="mrtrix", fit_method="wls")
    >>> participant_wf = init_participant_wf(scans=scans, staging_dir=Path("staging"),
    ...                                      config=config)
    >>> participant_wf.get_node("sub_02_ses_D_run_1_wf.dki_fit_wf.fit").inputs.method
    'wls'

    Nested in a study workflow of your own, next to other steps:

    >>> study_wf = pe.Workflow(name="my_study")
    >>> from nipype.interfaces import utility as niu
    >>> tract_stats = pe.Node(niu.IdentityInterface(fields=["mk"]), name="tract_stats")
    >>> study_wf.connect(participant_wf, "sub_02_ses_D_run_1_wf.outputnode.maps",
    ...                  tract_stats, "mk")
    >>> len(study_wf.list_node_names()) > 40
    True
    """
    workflow = _top_wf(config, scans, name)
    for scan, scan_wf in zip(scans, _scan_wfs(config, scans, staging_dir).values(), strict=True):
        workflow.add_nodes([scan_wf])
        if config.models_dir is not None:
            _add_harmonization(workflow, scan_wf, scan, staging_dir, config)
    return workflow


def model_files(models_dir: Path, scanner: str) -> tuple[Path, Path]:
    """The weights and card of ``scanner``'s network in a group run's ``models`` folder."""
    from ..errors import DkiharmInputError

    weights = models_dir / f"scanner-{scanner}_harmonizer.safetensors"
    card = models_dir / f"scanner-{scanner}_harmonizer.json"
    if not (weights.is_file() and card.is_file()):
        found = sorted(p.name for p in models_dir.glob("*_harmonizer.safetensors"))
        raise DkiharmInputError(
            f"{models_dir} has no model for scanner '{scanner}' ({weights.name} and "
            f"{card.name}); found: {', '.join(found) or 'none'}. Train it with the group level."
        )
    return weights, card


#: What the harmonization of a scan reads from the scan's workflow.
SCAN_TO_APPLY = [
    ("outputnode.dwi_file", "inputnode.dwi_file"),
    ("outputnode.bval_file", "inputnode.bval_file"),
    ("outputnode.bvec_file", "inputnode.bvec_file"),
    ("outputnode.mask_file", "inputnode.mask_file"),
    ("outputnode.maps", "inputnode.fit_files"),
]


def _apply_wf(config: RunConfig, scan: DWIScan, staging_dir: Path, models_dir=None):
    from .harmonize import init_apply_wf

    return init_apply_wf(
        mc_samples=config.mc_samples,
        device=config.device,
        seed=config.seed,
        omp_nthreads=config.execution.omp_nthreads,
        sidecar_file=str(scan.sidecar) if scan.sidecar else None,
        source_file=str(scan.dwi),
        scanner=scan.scanner,
        staging_dir=staging_dir,
        models_dir=models_dir,
        kernel_size=config.kernel_size,
        write_linear=models_dir is None and "linear" in config.comparators,
        name=_node_name(f"harmonize_{scan.key}_wf"),
    )


def _add_harmonization(workflow, scan_wf, scan, staging_dir, config) -> None:
    """Participant level with ``--models``: harmonized maps of the scan."""
    weights, card = model_files(config.models_dir, scan.scanner)
    apply = _apply_wf(config, scan, staging_dir, models_dir=config.models_dir)
    apply.inputs.inputnode.weights_file = str(weights)
    apply.inputs.inputnode.card_file = str(card)
    workflow.connect([(scan_wf, apply, list(SCAN_TO_APPLY))])


def _fan_in(workflow, sources, *, name: str, nested: bool = False) -> pe.Node:
    """One ``Merge`` node gathering ``(workflow, field)`` outputs into one list, in order."""
    merge = pe.Node(niu.Merge(len(sources), no_flatten=nested), name=name,
                    run_without_submitting=True)  # fmt: skip
    for i, (source, field) in enumerate(sources, 1):
        workflow.connect(source, field, merge, f"in{i}")
    return merge


def plan_dict(plan, config: RunConfig, engine: str) -> dict:
    """The study design written to ``models/harmonization.json`` (reference added at run
    time)."""
    return {
        "scanners": plan.scanners,
        "traveling_subjects": [f"sub-{s}" for s in plan.traveling],
        "training_subjects": [f"sub-{s}" for s in plan.training],
        "test_subjects": [f"sub-{s}" for s in plan.testing],
        "reference_rule": (
            "--reference-scanner"
            if plan.reference
            else "highest mean white-matter SNR (b0 mean / noise SD)"
        ),
        "registration": engine,
        "reference_labels": config.reference_labels,
        "epochs": config.epochs,
        "samples_per_epoch": config.samples_per_epoch,
        "kernel_size": config.kernel_size,
        "seed": config.seed,
    }


def init_group_wf(
    *, scans: list[DWIScan], staging_dir: Path, config: RunConfig, name: str = "dkiharm_wf"
) -> pe.Workflow:
    """Group level: the pieces of :mod:`dkiharm_nipype.workflows.harmonize`, joined.

    Every scan's :func:`~.dki.init_scan_wf` (named as at the participant level, so caches
    are shared) -> ``merge_snr`` -> ``reference_wf`` -> one ``labels_<scan>_wf`` per
    training scan -> one ``train_<scanner>_wf`` per scanner -> one ``harmonize_<scan>_wf``
    per scan -> ``evaluation_wf`` (with ``comparators_wf`` and ``experiment_<name>_wf``
    when asked for). See ``docs/workflows.md`` for each piece's inputs and outputs.

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), session_label=["C", "D"])
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="group", work_dir=Path("work"), preproc="mrtrix",
    ...                    registration="none", reference_scanner="D", epochs=20,
    ...                    kernel_size=5)
    >>> group_wf = init_group_wf(scans=scans, staging_dir=Path("staging"), config=config)
    >>> sorted(n for n in group_wf.list_node_names() if n.endswith(".register"))
    ['labels_sub_02_ses_C_run_1_wf.register', 'labels_sub_02_ses_D_run_1_wf.register']
    >>> train_c = group_wf.get_node("train_C_wf.train").inputs
    >>> train_c.epochs, train_c.kernel_size
    (20, 5)

    A step of your own can follow the reference choice (the scanner name, at run time):

    >>> study_wf = pe.Workflow(name="my_study")
    >>> log_reference = pe.Node(niu.IdentityInterface(fields=["scanner"]), name="log_reference")
    >>> study_wf.connect(group_wf, "reference_wf.outputnode.reference", log_reference, "scanner")
    >>> group_wf.get_node("reference_wf.reference").inputs.override
    'D'
    """
    from ..registration import resolve_engine
    from ..study import check_voxel_sizes, plan_study
    from .harmonize import init_reference_wf
    from .outputs import init_plan_derivatives_wf

    check_voxel_sizes(scans)
    engine = resolve_engine(config.registration)
    plan = plan_study(scans, reference=config.reference_scanner,
                      train_participants=config.train_participants, seed=config.seed)  # fmt: skip
    workflow = _top_wf(config, scans, name)
    scan_wfs = _scan_wfs(config, scans, staging_dir)
    snr = [(scan_wfs[s.key], "outputnode.snr_tsv") for s in scans]
    merge_snr = _fan_in(workflow, snr, name="merge_snr")
    reference_wf = init_reference_wf(plan=plan_dict(plan, config, engine),
                                     override=config.reference_scanner,
                                     chosen=bool(config.train_participants))  # fmt: skip
    ds_plan_wf = init_plan_derivatives_wf(staging_dir=staging_dir, name="ds_plan_wf")
    workflow.connect([
        (merge_snr, reference_wf, [("out", "inputnode.snr_files")]),
        (reference_wf, ds_plan_wf, [("outputnode.plan_file", "inputnode.plan_file")]),
    ])  # fmt: skip
    training = [s for s in scans if s.subject in plan.training]
    labels = _add_labels(
        workflow,
        training=training,
        scans=scans,
        scan_wfs=scan_wfs,
        plan=plan,
        reference_wf=reference_wf,
        config=config,
        engine=engine,
    )
    models = _add_training(workflow, training=training, scan_wfs=scan_wfs, labels=labels,
                           plan=plan, config=config, staging_dir=staging_dir)  # fmt: skip
    applied = {}
    for scan in scans:
        applied[scan.key] = _apply_wf(config, scan, staging_dir)
        workflow.connect([
            (scan_wfs[scan.key], applied[scan.key], list(SCAN_TO_APPLY)),
            (models[scan.scanner], applied[scan.key], [
                ("outputnode.weights_file", "inputnode.weights_file"),
                ("outputnode.card_file", "inputnode.card_file")]),
        ])  # fmt: skip
    evaluated = [s for s in scans if s.subject in plan.testing] or scans
    evaluation = _add_evaluation(
        workflow,
        evaluated=evaluated,
        scan_wfs=scan_wfs,
        applied=applied,
        models=models,
        reference_wf=reference_wf,
        merge_snr=merge_snr,
        config=config,
        engine=engine,
        staging_dir=staging_dir,
        held_out=bool(plan.testing),
    )
    # the networks' training curves, drawn in the report
    logs = _fan_in(workflow, [(models[sc], "outputnode.log_file") for sc in sorted(models)],
                   name="training_logs")  # fmt: skip
    workflow.connect(logs, "out", evaluation, "inputnode.training_logs")
    if config.experiments:
        _add_experiments(
            workflow,
            scans=[s for s in scans if s.subject in plan.traveling],
            scan_wfs=scan_wfs,
            reference_wf=reference_wf,
            evaluation=evaluation,
            staging_dir=staging_dir,
            config=config,
            engine=engine,
        )
    if set(config.comparators) & {"combat", "rish"}:
        _add_comparators(
            workflow,
            scans=scans,
            evaluated=evaluated,
            scan_wfs=scan_wfs,
            plan=plan,
            reference_wf=reference_wf,
            evaluation=evaluation,
            config=config,
            engine=engine,
        )
    return workflow  # fmt: skip


def _add_labels(workflow, *, training, scans, scan_wfs, plan, reference_wf, config, engine):
    """One ``labels_<scan>_wf`` per training scan, fed by the subject's first runs."""
    from ..study import first_runs, rescan_partner
    from .harmonize import init_training_labels_wf

    firsts = first_runs(scans)
    own = [("outputnode.fa_file", "inputnode.own_fa"), ("outputnode.maps", "inputnode.own_maps"),
           ("outputnode.mask_file", "inputnode.own_mask")]  # fmt: skip
    labels = {}
    for scan in training:
        tag = _node_name(scan.key)
        labels_wf = labels[scan.key] = init_training_labels_wf(
            scanner=scan.scanner, scanners=list(plan.scanners), engine=engine,
            reference_labels=config.reference_labels,
            omp_nthreads=config.execution.omp_nthreads, seed=config.seed,
            name=f"labels_{tag}_wf",
        )  # fmt: skip
        cands = [scan_wfs[firsts[scan.subject, sc].key] for sc in plan.scanners]
        for field, target in (("fa_file", "cand_fa"), ("maps", "cand_maps"),
                              ("mask_file", "cand_masks")):  # fmt: skip
            merge = _fan_in(workflow, [(c, f"outputnode.{field}") for c in cands],
                            name=f"{target}_{tag}", nested=field == "maps")  # fmt: skip
            workflow.connect(merge, "out", labels_wf, f"inputnode.{target}")
        workflow.connect([
            (reference_wf, labels_wf, [("outputnode.reference", "inputnode.reference")]),
            (scan_wfs[scan.key], labels_wf, list(own)),
        ])  # fmt: skip
        partner = rescan_partner(scan, scans) if config.reference_labels == "rescan" else None
        if partner is not None:  # used only if this scan's scanner turns out the reference
            partner_fields = [(a, b.replace(".own_", ".partner_")) for a, b in own]
            workflow.connect([(scan_wfs[partner.key], labels_wf, partner_fields)])
    return labels


#: Each training input: its short name, where it comes from and which output.
_TRAINING_SOURCES = {
    "dwi_files": ("dwi", "scan", "dwi_file"),
    "bval_files": ("bval", "scan", "bval_file"),
    "bvec_files": ("bvec", "scan", "bvec_file"),
    "mask_files": ("mask", "scan", "mask_file"),
    "label_files": ("labels", "labels", "registered_maps"),
    "label_mask_files": ("support", "labels", "support_mask"),
    "fit_files": ("fit", "scan", "maps"),
}


def _add_training(workflow, *, training, scan_wfs, labels, plan, config, staging_dir):
    """One ``train_<scanner>_wf`` per scanner, on the scanner's training scans."""
    from .harmonize import init_training_wf

    models = {}
    for scanner in plan.scanners:
        own = [s for s in training if s.scanner == scanner]
        models[scanner] = init_training_wf(
            scanner=scanner, subject_ids=[s.key for s in own],
            sidecar_files=[str(s.sidecar) for s in own] if all(s.sidecar for s in own) else None,
            epochs=config.epochs, samples_per_epoch=config.samples_per_epoch,
            network_input=config.network_input, kernel_size=config.kernel_size,
            device=config.device, seed=config.seed, omp_nthreads=config.execution.omp_nthreads,
            staging_dir=staging_dir, name=f"train_{_node_name(scanner)}_wf",
        )  # fmt: skip
        # every scan's own fit: the linear baseline (model selection) and the dwi+fit input
        for field, (short, source, output) in _TRAINING_SOURCES.items():
            wfs = scan_wfs if source == "scan" else labels
            merge = _fan_in(workflow, [(wfs[s.key], f"outputnode.{output}") for s in own],
                            name=f"train_{short}_{_node_name(scanner)}",
                            nested=short in ("labels", "fit"))  # fmt: skip
            workflow.connect(merge, "out", models[scanner], f"inputnode.{field}")
    return models


#: What the evaluation reads per evaluated scan: its field, the source, which output, nested.
_EVALUATION_SOURCES = {
    "before": ("scan", "maps", True),
    "dl": ("apply", "maps", True),
    "linear": ("apply", "linear", True),
    "masks": ("scan", "mask_file", False),
    "dwis": ("scan", "dwi_file", False),  # dwis, bvals, bvecs: the half-split noise floor
    "bvals": ("scan", "bval_file", False),
    "bvecs": ("scan", "bvec_file", False),
}


def _add_evaluation(workflow, *, evaluated, scan_wfs, applied, models, reference_wf, merge_snr,
                    config, engine, staging_dir, held_out):  # fmt: skip
    """``evaluation_wf`` on the evaluated scans' maps before and after harmonization (and
    the linear baseline's), with the networks' cards and the series for the noise floor."""
    from .evaluation import init_evaluation_wf

    evaluation = init_evaluation_wf(
        scans=evaluated, staging_dir=staging_dir, bids_dir=config.bids_dir, engine=engine,
        seed=config.seed, omp_nthreads=config.execution.omp_nthreads, wm_mask=config.wm_mask,
        roi_atlas=config.roi_atlas, roi_table=config.roi_table, held_out=held_out,
        fit_method=config.fit_method, b_max=config.b_max,
    )  # fmt: skip
    for key, (source, output, nested) in _EVALUATION_SOURCES.items():
        wfs = scan_wfs if source == "scan" else applied
        merge = _fan_in(workflow, [(wfs[s.key], f"outputnode.{output}") for s in evaluated],
                        name=f"eval_{key}", nested=nested)  # fmt: skip
        workflow.connect(merge, "out", evaluation, f"inputnode.{key}")
    cards = _fan_in(workflow, [(m, "outputnode.card_file") for m in models.values()],
                    name="eval_cards")  # fmt: skip
    workflow.connect(cards, "out", evaluation, "inputnode.cards")
    workflow.connect([
        (reference_wf, evaluation, [("outputnode.reference", "inputnode.reference")]),
        (merge_snr, evaluation, [("out", "inputnode.snr_files")]),
    ])  # fmt: skip
    return evaluation


#: What the comparators and experiments read from every scan's workflow.
_SCAN_LISTS = {"dwis": "dwi_file", "bvals": "bval_file", "bvecs": "bvec_file",
               "masks": "mask_file", "maps": "maps"}  # fmt: skip


def _add_comparators(workflow, *, scans, evaluated, scan_wfs, plan, reference_wf, evaluation,
                     config, engine):  # fmt: skip
    """``comparators_wf`` (``--comparators``): ComBat / RISH maps for the evaluation."""
    from .evaluation import init_comparators_wf

    comparators_wf = init_comparators_wf(
        methods=[m for m in config.comparators if m in ("combat", "rish")], scans=scans,
        evaluated=evaluated,
        training=list(plan.training), bids_dir=config.bids_dir, fit_method=config.fit_method,
        engine=engine, omp_nthreads=config.execution.omp_nthreads,
    )  # fmt: skip
    for key, output in _SCAN_LISTS.items():
        merge = _fan_in(workflow, [(scan_wfs[s.key], f"outputnode.{output}") for s in scans],
                        name=f"all_{key}", nested=key == "maps")  # fmt: skip
        workflow.connect(merge, "out", comparators_wf, f"inputnode.{key}")
    workflow.connect([
        (reference_wf, comparators_wf, [("outputnode.reference", "inputnode.reference")]),
        (comparators_wf, evaluation, [("outputnode.combat", "inputnode.combat"),
                                      ("outputnode.rish", "inputnode.rish")]),
    ])  # fmt: skip


def _add_experiments(workflow, *, scans, scan_wfs, reference_wf, evaluation, staging_dir,
                     config, engine) -> None:  # fmt: skip
    """The ``--experiment`` runs on the traveling subjects; their tables feed the report."""
    from ..evaluation.experiments import find_tissue_files
    from ..study import StudyDesignError
    from .experiments import init_experiment_wf

    outputs = {"dwi_files": "dwi_file", "bval_files": "bval_file", "mask_files": "mask_file",
               "map_files": "maps"}  # fmt: skip
    merges = {
        key: _fan_in(workflow, [(scan_wfs[s.key], f"outputnode.{output}") for s in scans],
                     name=f"exp_{key}", nested=key == "map_files")
        for key, output in outputs.items()
    }  # fmt: skip
    tables = pe.Node(
        niu.Merge(len(config.experiments)), name="exp_tables", run_without_submitting=True
    )
    for j, name in enumerate(config.experiments, 1):
        exp_wf = init_experiment_wf(
            experiment=name, engine=engine, seed=config.seed, epochs=config.epochs,
            samples_per_epoch=config.samples_per_epoch, device=config.device,
            network_input=config.network_input, kernel_size=config.kernel_size,
            reference_labels=config.reference_labels,
            omp_nthreads=config.execution.omp_nthreads, staging_dir=staging_dir,
            rel_dir="evaluation", name=f"experiment_{name}_wf",
        )  # fmt: skip
        exp_wf.inputs.inputnode.subjects = [s.subject for s in scans]
        exp_wf.inputs.inputnode.scanners = [s.scanner for s in scans]
        exp_wf.inputs.inputnode.runs = [str(s.run) if s.run is not None else "1" for s in scans]
        if name == "tissue" and config.tissue_maps:  # else each scan's own segmentation
            source = config.tissue_maps
            tissues = [find_tissue_files(source, s.subject, s.session, s.run) for s in scans]
            lacking = [s for s, t in zip(scans, tissues, strict=True) if not t]
            if lacking:
                raise StudyDesignError(
                    f"--tissue-maps {source} has no SGM (or GM) and CSF probability map of "
                    f"{lacking[0].dwi.name} ({len(lacking)} scan(s) lack them); give one "
                    "*_label-SGM|GM|CSF_probseg.nii.gz per scan, in its DWI space."
                )
            exp_wf.inputs.inputnode.sgm_files = [str(t["SGM"]) for t in tissues]
            exp_wf.inputs.inputnode.csf_files = [str(t["CSF"]) for t in tissues]
        workflow.connect(
            [(merges[k], exp_wf, [("out", f"inputnode.{k}")]) for k in merges]
            + [
                (reference_wf, exp_wf, [("outputnode.reference", "inputnode.reference")]),
                (exp_wf, tables, [("outputnode.tsv", f"in{j}")]),
            ]
        )
    workflow.connect(tables, "out", evaluation, "inputnode.experiment_tsvs")


def init_description_wf(*, config: RunConfig, scans: list[DWIScan] | None = None):
    """The workflow whose visit gives the methods text of a call with ``config``.

    With ``scans``, the graph the call runs (:func:`init_dkiharm_wf`). Without, one of each
    piece that graph would hold, built with the same options (nothing is connected), so
    that the text of a set of options can be read without a dataset.

    >>> config = RunConfig(bids_dir=Path("bids"), output_dir=Path("out"),
    ...                    analysis_level="group", work_dir=Path("work"), preproc="mrtrix",
    ...                    registration="dipy-syn", epochs=7)
    >>> described = init_description_wf(config=config)
    >>> "at most 7 epochs" in described.visit_desc()
    True

    Its pieces are the factories' own workflows, reusable as they are:

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi"]), name="source")
    >>> wf.connect(source, "dwi", described.get_node("dwi_preproc_wf"), "inputnode.dwi_file")
    >>> "dwi_preproc_wf.denoise" in described.list_node_names()
    True
    """
    if scans:
        return init_dkiharm_wf(config=config, scans=scans)[0]
    from ..preproc.modes import resolved_preproc_mode
    from ..registration import resolve_engine
    from .dki import init_dki_fit_wf
    from .evaluation import init_comparators_wf, init_evaluation_wf
    from .harmonize import (
        init_apply_wf,
        init_reference_wf,
        init_training_labels_wf,
        init_training_wf,
    )
    from .preproc import init_dwi_preproc_wf

    workflow = _top_wf(config, None, "dkiharm_wf")
    pieces = [
        init_dwi_preproc_wf(preproc=resolved_preproc_mode(config.preproc, config.denoiser),
                            denoiser=config.denoiser, mask_method=config.mask_method),
        init_dki_fit_wf(fit_method=config.fit_method, b_max=config.b_max),
    ]  # fmt: skip
    if config.analysis_level == "group":
        engine = resolve_engine(config.registration)
        training = [f"sub-{p}" for p in config.train_participants]
        plan = {"training_subjects": training, "traveling_subjects": [], "seed": config.seed}
        pieces += [
            init_reference_wf(plan=plan, override=config.reference_scanner,
                              chosen=bool(training)),
            init_training_labels_wf(scanner="", scanners=[], engine=engine,
                                    reference_labels=config.reference_labels),
            init_training_wf(scanner="", subject_ids=[], epochs=config.epochs,
                             samples_per_epoch=config.samples_per_epoch,
                             network_input=config.network_input,
                             kernel_size=config.kernel_size, device=config.device,
                             seed=config.seed),
            init_apply_wf(mc_samples=config.mc_samples),
        ]  # fmt: skip
        pieces.append(init_evaluation_wf(scans=[], staging_dir=Path("staging"),
                                         bids_dir=config.bids_dir, engine=engine))
        compared = [m for m in config.comparators if m in ("combat", "rish")]
        if compared:
            pieces.append(init_comparators_wf(methods=compared, scans=[],
                                              evaluated=[], training=[],
                                              bids_dir=config.bids_dir))  # fmt: skip
    elif config.models_dir is not None:
        pieces.append(init_apply_wf(mc_samples=config.mc_samples, models_dir=config.models_dir,
                                    kernel_size=config.kernel_size))  # fmt: skip
    workflow.add_nodes(pieces)
    return workflow
