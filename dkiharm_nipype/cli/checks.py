"""Checks run before any workflow is built, so bad input fails fast and writes nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import DkiharmInputError
from ..utils.io import check_nifti, read_gradients

LOGGER = logging.getLogger("dkiharm")


#: Bumped when module paths change: Nipype's cached results name the modules that made them,
#: so a work directory of an older layout cannot be reused (its results fail to load).
WORK_LAYOUT = 2
WORK_STAMP = "dkiharm_work_layout.txt"


def check_work_dir(work_dir: Path) -> None:
    """Refuse a work directory whose cached results an older dkiharm wrote (module paths that
    no longer exist), with one line saying what to do; stamp a new or current one."""
    work_dir = Path(work_dir)
    stamp = work_dir / WORK_STAMP
    cached = work_dir.is_dir() and next(work_dir.rglob("result_*.pklz"), None) is not None
    found = stamp.read_text().strip() if stamp.is_file() else ("1" if cached else None)
    if found == str(WORK_LAYOUT):
        return
    if found is None:  # a new (or empty) work directory
        work_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(f"{WORK_LAYOUT}\n")
        return
    raise DkiharmInputError(
        f"-w {work_dir} holds cached results of an older dkiharm (work layout {found}, this "
        f"version uses {WORK_LAYOUT}: its modules moved), which cannot be reused; delete that "
        "folder or give a new -w."
    )


def check_output_dir(output_dir: Path) -> None:
    """Fail early if ``output_dir`` cannot be created or written."""
    output_dir = Path(output_dir)
    probe_root = output_dir
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir():
        raise DkiharmInputError(
            f"output_dir {output_dir} cannot be created because {probe_root} is a file; "
            "choose another output folder."
        )
    if not os.access(probe_root, os.W_OK | os.X_OK):
        raise DkiharmInputError(
            f"output_dir {output_dir} is not writable (no write permission on {probe_root}); "
            "choose a folder you can write to."
        )


def preflight(scans, *, b_max: float | None = None, run_fsl: bool = False) -> None:
    """Check every selected scan can be read and fitted; raise on the first problem.

    With ``run_fsl`` the sidecar fields that TOPUP/Eddy need are checked as well, so a
    missing ``PhaseEncodingDirection`` or readout time stops the run before it starts.
    """
    from ..dki.fit import validate_gradients
    from ..utils.fsl import acqparams_from_metadata, has_reversed_pe

    for number, scan in enumerate(scans, 1):
        _, data = check_nifti(scan.dwi)
        if run_fsl:
            topup = has_reversed_pe(scan.metadata, scan.fmap_metadata)
            acqparams_from_metadata(
                scan.metadata,
                shape=data.shape[:3],
                require_readout=topup,
                source=str(scan.sidecar or scan.dwi),
            )
        bvals, bvecs = read_gradients(scan.bval, scan.bvec)
        validate_gradients(
            bvals,
            bvecs,
            n_volumes=data.shape[-1],
            b_max=b_max,
            source=f"{scan.bval.name}/{scan.bvec.name}",
        )
        if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).any(axis=-1).sum())
            raise DkiharmInputError(
                f"{scan.dwi} has {bad} voxel(s) with NaN or Inf values; replace them (e.g. "
                "with 0 via 'mrcalc dwi.nii.gz -finite dwi.nii.gz 0 -if out.nii.gz') and rerun."
            )
        LOGGER.info("checked %s (%d/%d)", scan.key, number, len(scans))


def check_models(scans, models_dir: Path) -> None:
    """Every scan's scanner has a loadable model trained for its protocol."""
    import nibabel as nb

    from ..cnn.modelio import check_fingerprint, load_model, scan_fingerprint
    from ..workflows.base import model_files

    for scanner in sorted({s.scanner for s in scans}):
        weights, card_path = model_files(Path(models_dir), scanner)
        _, card = load_model(weights, card_path)  # rejects foreign or corrupted files
        for scan in (s for s in scans if s.scanner == scanner):
            img = nb.load(str(scan.dwi))
            bvals, bvecs = read_gradients(scan.bval, scan.bvec)
            te = scan.metadata.get("EchoTime")
            try:
                check_fingerprint(
                    card,
                    scan_fingerprint(
                        bvals,
                        voxel_size=img.header.get_zooms()[:3],
                        matrix=img.shape[:3],
                        echo_time=None if te is None else 1000 * float(te),
                        bvecs=bvecs,
                    ),
                )
            except DkiharmInputError as exc:
                raise type(exc)(f"{scan.dwi.name} cannot use {weights.name}: {exc}") from None


#: Submission commands each cluster plugin calls (checked before the run starts).
CLUSTER_COMMANDS = {
    "SLURM": ("sbatch", "squeue"),
    "SLURMGraph": ("sbatch",),
    "SGE": ("qsub", "qstat"),
    "SGEGraph": ("qsub",),
    "PBS": ("qsub", "qstat"),
    "PBSGraph": ("qsub",),
    "LSF": ("bsub", "bjobs"),
    "Condor": ("condor_submit", "condor_q"),
    "CondorDAGMan": ("condor_submit_dag",),
    "OAR": ("oarsub", "oarstat"),
}


def check_plugin(plugin: str) -> None:
    """A cluster plugin needs its scheduler's commands; batch plugins also read ``$LOGNAME``."""
    import getpass
    import shutil

    missing = [cmd for cmd in CLUSTER_COMMANDS.get(plugin, ()) if shutil.which(cmd) is None]
    if missing:
        raise DkiharmInputError(
            f"--plugin {plugin} needs {', '.join(missing)} on PATH, which this machine lacks; "
            "run on a submit host of the cluster or use --plugin MultiProc."
        )
    if plugin in CLUSTER_COMMANDS and not os.environ.get("LOGNAME"):
        # Nipype's batch plugins name jobs after $LOGNAME (unset in containers and cron)
        os.environ["LOGNAME"] = getpass.getuser()
