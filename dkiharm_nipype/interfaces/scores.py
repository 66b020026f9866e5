"""Nipype interfaces over :mod:`dkiharm_nipype.evaluation.scores`."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from ..errors import DkiharmInputError
from ..evaluation.scores import auto_wm_roi, snr_in_roi
from ..utils.dwi import B0_THRESHOLD
from ..utils.io import load_mask, read_bvals

LOGGER = logging.getLogger("dkiharm.snr")

SNR_COLUMNS = (
    "participant_id",
    "session",
    "run",
    "scanner",
    "snr",
    "snr_db",
    "signal_mean",
    "noise_sd",
    "roi_voxels",
    "n_b0",
    "roi",
    "noise_method",
)


class _ComputeSNRInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(
        exists=True, mandatory=True, desc="raw (not denoised) DWI whose b0 frames give the signal"
    )
    bval_file = File(exists=True, mandatory=True, desc="b-values of dwi_file")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask in DWI space")
    fa_file = File(exists=True, desc="FA map, for the automatic white-matter ROI")
    md_file = File(exists=True, desc="MD map (mm^2/s), for the automatic white-matter ROI")
    roi_file = File(exists=True, desc="white-matter ROI mask to use instead of the automatic one")
    noise_file = File(exists=True, desc="noise standard-deviation map (e.g. dwidenoise -noise)")
    participant_id = traits.Str("", usedefault=True, desc="written to the TSV row")
    session = traits.Str("", usedefault=True, desc="written to the TSV row")
    run = traits.Str("", usedefault=True, desc="written to the TSV row")
    scanner = traits.Str("", usedefault=True, desc="written to the TSV row")


class _ComputeSNROutputSpec(TraitedSpec):
    out_tsv = File(desc="one-row TSV with the SNR measurement")
    snr_db = traits.Float(desc="SNR in decibels (20 log10)")


class ComputeSNR(SimpleInterface):
    """SNR of one scan in a white-matter ROI (the paper's Table 3 measure).

    Examples
    --------
    >>> ComputeSNR(participant_id="sub-01", scanner="D").inputs.scanner
    'D'

    On a scan whose b=0 signal is 100 in a white-matter ROI with a noise map of 5 (SNR 20,
    i.e. 26 dB):

    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> dwi = np.concatenate([np.full((4, 4, 4, 2), 100.0), np.full((4, 4, 4, 2), 30.0)], -1)
    >>> for name, data in [("sub-01_dwi.nii.gz", dwi), ("mask.nii.gz", np.ones((4, 4, 4))),
    ...                    ("noise.nii.gz", np.full((4, 4, 4), 5.0))]:
    ...     nb.Nifti1Image(data.astype("f4"), np.eye(4)).to_filename(name)
    >>> np.savetxt("sub-01_dwi.bval", [[0, 0, 1000, 2000]])
    >>> res = ComputeSNR(dwi_file="sub-01_dwi.nii.gz", bval_file="sub-01_dwi.bval",
    ...                  brain_mask="mask.nii.gz", roi_file="mask.nii.gz",
    ...                  noise_file="noise.nii.gz").run()
    >>> round(res.outputs.snr_db, 2)
    26.02

    In an existing pipeline, after the fit that gives the FA and MD of the automatic ROI:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fit = pe.Node(niu.IdentityInterface(fields=["fa_file", "md_file"]), name="fit")
    >>> snr = pe.Node(ComputeSNR(scanner="D"), name="snr")
    >>> wf.connect(fit, "fa_file", snr, "fa_file")
    >>> wf.connect(fit, "md_file", snr, "md_file")
    >>> sorted(k for k in wf.inputs.snr.get() if k.endswith("_file"))
    ['bval_file', 'dwi_file', 'noise_file', 'roi_file']
    >>> os.chdir(cwd)
    """

    input_spec = _ComputeSNRInputSpec
    output_spec = _ComputeSNROutputSpec

    def _run_interface(self, runtime):
        dwi = np.asanyarray(nb.load(self.inputs.dwi_file).dataobj, dtype=np.float32)
        bvals = read_bvals(self.inputs.bval_file)
        mask = load_mask(self.inputs.brain_mask)
        if isdefined(self.inputs.roi_file):
            roi = load_mask(self.inputs.roi_file)
            roi_name = Path(self.inputs.roi_file).name
        elif isdefined(self.inputs.fa_file) and isdefined(self.inputs.md_file):
            fa = np.asanyarray(nb.load(self.inputs.fa_file).dataobj)
            md = np.asanyarray(nb.load(self.inputs.md_file).dataobj)
            roi = auto_wm_roi(fa, md, mask)
            roi_name = "auto (FA>=0.45, MD<=1.1e-3, eroded brain)"
        else:
            raise ValueError("ComputeSNR needs roi_file, or fa_file and md_file")
        noise = None
        if isdefined(self.inputs.noise_file):
            noise = np.asanyarray(nb.load(self.inputs.noise_file).dataobj, dtype=np.float32)
        if roi.shape != mask.shape:
            raise DkiharmInputError(
                f"SNR ROI {roi_name} has {roi.shape} voxels, the DWI "
                f"{Path(self.inputs.dwi_file).name} {mask.shape}; give a ROI on the DWI's grid."
            )
        if roi.any():
            result = snr_in_roi(dwi, bvals, roi, noise_map=noise)
        else:  # reported and left out of the reference choice, not fatal
            LOGGER.warning(
                "%s: no white-matter voxel in the SNR ROI (%s); its SNR is n/a and the "
                "reference scanner is chosen from the scans that have one (--snr-roi FILE "
                "gives a ROI)",
                Path(self.inputs.dwi_file).name,
                roi_name,
            )
            n_b0 = int((bvals <= B0_THRESHOLD).sum())
            nan = float("nan")
            result = {"snr_db": nan, "snr": nan, "roi_voxels": 0, "n_b0": n_b0,
                      "noise_method": "n/a"}  # fmt: skip
        row = {
            "participant_id": self.inputs.participant_id,
            "session": self.inputs.session,
            "run": self.inputs.run,
            "scanner": self.inputs.scanner,
            "roi": roi_name,
            **result,
        }
        out = fname_presuffix(
            self.inputs.dwi_file, suffix="_snr.tsv", newpath=runtime.cwd, use_ext=False
        )
        out = out.replace(".nii", "")
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=SNR_COLUMNS, delimiter="\t", extrasaction="ignore"
            )
            writer.writeheader()
            writer.writerow({k: _cell(v) for k, v in row.items()})
        self._results["out_tsv"] = out
        self._results["snr_db"] = result["snr_db"]
        return runtime


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if np.isfinite(value) else "n/a"
    return value
