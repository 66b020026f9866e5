"""The top-level workflow: the only place that reads the run configuration."""

from __future__ import annotations

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
    """
    staging = config.work_dir / "derivatives_staging"
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
    name: str = "dkiharm_participant_wf",
) -> pe.Workflow:
    """Preprocess and fit DKI for every selected scan (one sub-workflow per run)."""
    from .dki import init_scan_wf
    from .preproc import resolve_preproc

    # decide once (and log once) whether FSL runs, instead of once per scan
    run_mrtrix, run_fsl = resolve_preproc(config.preproc)
    preproc = "fsl" if run_fsl else ("mrtrix" if run_mrtrix else "none")
    workflow = pe.Workflow(name=name)
    for scan in scans:
        scan_wf = init_scan_wf(
            scan=scan,
            staging_dir=staging_dir,
            preproc=preproc,
            mask_method=config.mask_method,
            fit_method=config.fit_method,
            b_max=config.b_max,
            omp_nthreads=config.execution.omp_nthreads,
            name=_node_name(f"{scan.key}_wf"),
        )
        workflow.add_nodes([scan_wf])
    return workflow


def init_group_wf(
    *, scans: list[DWIScan], staging_dir: Path, config: RunConfig, name: str = "dkiharm_group_wf"
):
    """Group level: reference choice, network training and harmonized inference.

    Not yet implemented: the participant level (preprocessing, DKI fitting, SNR) is the
    processing available in this release.
    """
    LOGGER.warning(
        "the group level (harmonization) is not implemented in this release; nothing to run"
    )
    return None
