"""The top-level workflow: the only place that reads the run configuration."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from nipype.pipeline import engine as pe

from ..config import RunConfig
from ..utils.bids import DWIScan

LOGGER = logging.getLogger("dkiharm")


def _node_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", text)


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
                "crashdump_dir": str(config.work_dir / "crash"),
                "crashfile_format": "txt",
                "remove_unnecessary_outputs": False,
                "stop_on_first_crash": True,
                # many short nodes per scan: poll often (Nipype's default waits 2 s)
                "poll_sleep_duration": 0.2,
            }
        )
    return workflow, staging


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
    from ..preproc.modes import resolved_preproc_mode
    from .dki import init_scan_wf

    # decide once (and log once) whether FSL runs, instead of once per scan
    preproc = resolved_preproc_mode(config.preproc, config.denoiser)
    workflow = pe.Workflow(name=name)
    for scan in scans:
        scan_wf = init_scan_wf(
            scan=scan,
            staging_dir=staging_dir,
            preproc=preproc,
            denoiser=config.denoiser,
            mask_method=config.mask_method,
            fit_method=config.fit_method,
            b_max=config.b_max,
            snr_roi=config.snr_roi,
            omp_nthreads=config.execution.omp_nthreads,
            name=_node_name(f"{scan.key}_wf"),
        )
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


def _add_harmonization(workflow, scan_wf, scan, staging_dir, config) -> None:
    """Participant level with ``--models``: harmonized maps of the scan."""
    from .harmonize import init_apply_wf

    weights, card = model_files(config.models_dir, scan.scanner)
    apply = init_apply_wf(
        scan=scan,
        staging_dir=staging_dir,
        config=config,
        name=_node_name(f"harmonize_{scan.key}_wf"),
    )
    apply.inputs.inputnode.weights_file = str(weights)
    apply.inputs.inputnode.card_file = str(card)
    workflow.connect(
        [
            (
                scan_wf,
                apply,
                [
                    ("outputnode.dwi_file", "inputnode.dwi_file"),
                    ("outputnode.bval_file", "inputnode.bval_file"),
                    ("outputnode.bvec_file", "inputnode.bvec_file"),
                    ("outputnode.mask_file", "inputnode.mask_file"),
                    ("outputnode.maps", "inputnode.fit_files"),
                ],
            )
        ]
    )


def init_group_wf(
    *, scans: list[DWIScan], staging_dir: Path, config: RunConfig, name: str = "dkiharm_wf"
) -> pe.Workflow:
    """Group level: see :func:`dkiharm_nipype.workflows.harmonize.init_group_wf`.

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), session_label=["C", "D"])
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="group", work_dir=Path("work"), preproc="mrtrix",
    ...                    registration="none", reference_scanner="D")
    >>> group_wf = init_group_wf(scans=scans, staging_dir=Path("staging"), config=config)
    >>> sorted(n for n in group_wf.list_node_names() if n.endswith(".register"))
    ['labels_sub_02_ses_C_run_1_wf.register', 'labels_sub_02_ses_D_run_1_wf.register']

    A step of your own can follow the reference choice (the scanner name, at run time):

    >>> from nipype.interfaces import utility as niu
    >>> study_wf = pe.Workflow(name="my_study")
    >>> log_reference = pe.Node(niu.IdentityInterface(fields=["scanner"]), name="log_reference")
    >>> study_wf.connect(group_wf, "reference.reference", log_reference, "scanner")
    >>> group_wf.get_node("reference").inputs.override
    'D'
    """
    from .harmonize import init_group_wf as init_harmonization_wf

    return init_harmonization_wf(scans=scans, staging_dir=staging_dir, config=config, name=name)
