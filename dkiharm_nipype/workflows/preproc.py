"""Participant-level DWI preprocessing: denoising, Gibbs-ringing removal, TOPUP/Eddy, mask.

The order follows the MRtrix3/FSL recommendations for DKI (Veraart et al. 2016,
*NeuroImage* 142:394; Kellner et al. 2016, *MRM* 76:1574; Andersson & Sotiropoulos 2016,
*NeuroImage* 125:1063): noise is estimated on the raw magnitude data, before any
interpolation, then ringing is removed, then volumes are resampled once by Eddy.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.interfaces.fsl import TOPUP, Eddy
from nipype.interfaces.mrtrix3 import DWIDenoise, MRDeGibbs
from nipype.pipeline import engine as pe

from ..errors import DkiharmInputError
from ..interfaces.preproc import DWI2Mask, MeanB0, MedianOtsuMask, MPPCADenoise, TopupEddyFiles
from ..preproc.modes import MASK_METHODS, Denoiser, MaskMethod, PreprocMode, resolve_preproc
from ..utils.dwi import B0_THRESHOLD, degibbs_axes
from ..utils.env import ToolNotFoundError, missing_mrtrix
from .literate import LiterateWorkflow

LOGGER = logging.getLogger("dkiharm")

@functools.cache
def mrtrix_version() -> str:
    """MRtrix3's version (``dwidenoise -version``), or ``""`` when not found."""
    exe = shutil.which("dwidenoise")
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"==\s*\S+\s+([\w.\-]+)\s*==", out.stdout)
    return found.group(1) if found else ""


def fsl_version() -> str:
    """FSL's version (``$FSLDIR/etc/fslversion``), or ``""`` when not found."""
    path = Path(os.environ.get("FSLDIR", "/nonexistent")) / "etc" / "fslversion"
    try:
        return path.read_text().split(":")[0].strip()
    except OSError:
        return ""


def _preproc_desc(run_mrtrix: bool, run_fsl: bool, denoiser: str, topup_runs) -> str:
    """Methods text of :func:`init_dwi_preproc_wf` (the mask is described by its own wf)."""
    if not run_mrtrix:
        return (
            "\n\nThe DWI series were used as provided, without denoising or artefact "
            "correction."
        )
    mrtrix = f"MRtrix3{' ' + mrtrix_version() if mrtrix_version() else ''} [@tournier2019]"
    if denoiser == "mppca":
        how, source = (
            "by Marchenko-Pastur principal component analysis of the raw magnitude data "
            "[@veraart2016] (dkiharm's implementation: 5x5x5-voxel windows every "
            f"{MPPCADenoise().inputs.stride} voxels, overlapping reconstructions averaged)",
            "from",
        )
    else:
        how, source = (
            "with dwidenoise, a Marchenko-Pastur principal component analysis of the raw "
            "magnitude data [@veraart2016]",
            "both from",
        )
    text = (
        f"\n\nEach DWI series was first denoised {how}, then Gibbs ringing was removed with "
        f"mrdegibbs, by local sub-voxel shifts [@kellner2016], {source} {mrtrix}."
    )
    if not run_fsl:
        return text
    which = "the" if topup_runs is None else f"the {topup_runs[0]} of {topup_runs[1]}"
    topup = f"for {which} runs with reversed phase-encoding b=0 images"
    fsl = fsl_version()
    return text + (
        " Susceptibility-induced distortions were estimated with TOPUP "
        f"[@andersson2003] {topup}, and head motion and eddy-current distortions were "
        "corrected, with replacement of outlier slices, by Eddy [@andersson2016] "
        f"(FSL{' ' + fsl if fsl else ''} [@jenkinson2012]), which resamples every "
        "volume once and rotates the b-vectors."
    )


#: Methods text of each brain-mask method.
MASK_TEXT = {
    "dwi2mask": " A brain mask was estimated on the preprocessed series with MRtrix3 dwi2mask.",
    "median_otsu": " A brain mask was estimated on the mean b=0 image with dipy's median_otsu "
    "[@dipy].",
}


def preproc_sidecar(
    preproc: str, denoiser: Denoiser = "dwidenoise", *, has_rpe_fmap: bool = False
) -> dict:
    """Sidecar fields of the ``desc-preproc_dwi`` series for a *resolved* mode.

    The series is not masked (the brain mask is a file of its own), so ``SkullStripped``
    is false; ``ProcessingSteps`` lists what :func:`init_dwi_preproc_wf` runs, in order.

    >>> preproc_sidecar("fsl", "mppca", has_rpe_fmap=False)["ProcessingSteps"]
    ['MP-PCA denoising (dkiharm, torch)', 'Gibbs-ringing removal (MRtrix3 mrdegibbs)', \
'motion and eddy-current correction with outlier replacement (FSL eddy, no TOPUP field)']
    >>> preproc_sidecar("none")
    {'SkullStripped': False, 'ProcessingSteps': []}
    """
    steps = []
    if preproc in ("mrtrix", "fsl"):
        steps.append(
            "MP-PCA denoising (MRtrix3 dwidenoise)"
            if denoiser == "dwidenoise"
            else "MP-PCA denoising (dkiharm, torch)"
        )
        steps.append("Gibbs-ringing removal (MRtrix3 mrdegibbs)")
    if preproc == "fsl":
        if has_rpe_fmap:
            steps.append("susceptibility field estimation (FSL topup)")
        steps.append(
            "motion and eddy-current correction with outlier replacement (FSL eddy"
            + (", with the topup field)" if has_rpe_fmap else ", no TOPUP field)")
        )
    return {"SkullStripped": False, "ProcessingSteps": steps}


def init_dwi_preproc_wf(
    *, preproc: PreprocMode = "auto", denoiser: Denoiser = "mppca",
    has_rpe_fmap: bool = False, topup_runs: tuple[int, int] | None = None,
    mask_method: MaskMethod = "dwi2mask", b0_threshold: float = B0_THRESHOLD,
    omp_nthreads: int = 1, mem_gb: float = 1.0, device: str = "auto",
    name: str = "dwi_preproc_wf",
) -> pe.Workflow:  # fmt: skip
    """Preprocess one DWI series for DKI fitting.

    ``auto``: ``dwidenoise`` -> ``mrdegibbs`` [-> TOPUP -> Eddy if FSL is found]; ``fsl``:
    the same, FSL required; ``mrtrix``: no FSL; ``none``: passed through. TOPUP runs only
    ``has_rpe_fmap``. A mask and mean b0 come from the final DWI (:func:`init_dwi_mask_wf`).

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from dkiharm_nipype.workflows.preproc import init_dwi_preproc_wf
            wf = init_dwi_preproc_wf(preproc="mrtrix")

    Parameters
    ----------
    preproc : {"auto", "fsl", "mrtrix", "none"}
        Which steps run (see above; :func:`resolve_preproc`), decided when it is built.
    denoiser : {"mppca", "dwidenoise"}
        The torch MP-PCA with overlapping windows (default:
        :class:`~dkiharm_nipype.interfaces.preproc.MPPCADenoise`, the estimator of MRtrix3's
        ``dwidenoise``, faster at equal threads and at least as close to the truth at
        realistic sizes; docs/preprocessing.md), or MRtrix3 ``dwidenoise``.
    has_rpe_fmap : bool
        Whether ``inputnode.fmap_epi_files`` will hold reversed-PE b0s for TOPUP.
    topup_runs : (int, int), optional
        How many of the study's runs have reversed-PE b0s, of how many (methods text).
    mask_method : {"dwi2mask", "median_otsu"}
        See :func:`init_dwi_mask_wf`.
    b0_threshold, omp_nthreads, mem_gb, name
        Largest b-value counted as b=0; threads of the multi-threaded tools; loaded size of
        the series in GB (memory estimates); workflow name.
    device : str
        Torch device of the MP-PCA denoiser: ``auto`` is decided by the node on the host that
        runs it (a GPU when there is one).

    Inputs
    ------
    dwi_file, bval_file, bvec_file, metadata
        4-D DWI series, FSL gradient table and BIDS sidecar (``SliceEncodingDirection``
        sets the Gibbs-ringing plane; the PE fields are read for TOPUP/Eddy).
    fmap_epi_files, fmap_metadata
        Reversed-PE ``epi`` fieldmaps on the DWI grid and their sidecars (may be empty).

    Outputs
    -------
    dwi_file, bval_file, bvec_file, mask_file, b0_file
        Preprocessed series and gradients (b-vectors rotated by Eddy), mask and mean b0.
    noise_file
        Noise level map (sigma) estimated by the denoiser; undefined with ``none``.

    Examples
    --------
    In front of a fit of your own:

    >>> from dkiharm_nipype.interfaces.dki import FitDKI
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fields = ["dwi_file", "bval_file", "bvec_file", "metadata"]
    >>> source = pe.Node(niu.IdentityInterface(fields=fields), name="source")
    >>> preproc_wf = init_dwi_preproc_wf(preproc="mrtrix", mask_method="median_otsu",
    ...                                  omp_nthreads=2)
    >>> preproc_wf.inputs.inputnode.fmap_epi_files = []
    >>> preproc_wf.inputs.inputnode.fmap_metadata = []
    >>> fit = pe.Node(FitDKI(), name="fit")
    >>> wf.connect([
    ...     (source, preproc_wf, [(f, f"inputnode.{f}") for f in fields]),
    ...     (preproc_wf, fit, [(f"outputnode.{f}", f) for f in ("dwi_file", "bval_file",
    ...                                                         "bvec_file", "mask_file")]),
    ... ])
    >>> sorted(preproc_wf.list_node_names())  # doctest: +NORMALIZE_WHITESPACE
    ['degibbs', 'denoise', 'inputnode', 'mask_wf.brain_mask', 'mask_wf.inputnode',
     'mask_wf.mean_b0', 'mask_wf.outputnode', 'outputnode', 'slice_axes']
    """
    if mask_method not in MASK_METHODS:
        raise DkiharmInputError(
            f"mask_method={mask_method!r} is unknown; use one of {MASK_METHODS}."
        )
    run_mrtrix, run_fsl = resolve_preproc(preproc, denoiser)
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = _preproc_desc(run_mrtrix, run_fsl, denoiser, topup_runs)
    fields = ["dwi_file", "bval_file", "bvec_file"]
    inputnode = pe.Node(
        niu.IdentityInterface(fields=[*fields, "metadata", "fmap_epi_files", "fmap_metadata"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*fields, "mask_file", "b0_file", "noise_file"]),
        name="outputnode",
    )
    mask_wf = init_dwi_mask_wf(mask_method=mask_method, b0_threshold=b0_threshold,
                               omp_nthreads=omp_nthreads, name="mask_wf")  # fmt: skip
    workflow.connect([
        (inputnode, outputnode, [("bval_file", "bval_file")]),
        (inputnode, mask_wf, [("bval_file", "inputnode.bval_file")]),
        (mask_wf, outputnode, [("outputnode.mask_file", "mask_file"),
                               ("outputnode.b0_file", "b0_file")]),
    ])  # fmt: skip
    if not run_mrtrix:  # passed through
        workflow.connect([(inputnode, outputnode, [(f, f) for f in ("dwi_file", "bvec_file")]),
                          (inputnode, mask_wf, [(f, f"inputnode.{f}") for f in ("dwi_file",
                                                                                "bvec_file")])])
        return workflow  # fmt: skip

    degibbs = _add_mrtrix_steps(workflow, denoiser=denoiser, omp_nthreads=omp_nthreads,
                                mem_gb=mem_gb, device=device)  # fmt: skip
    if not run_fsl:
        workflow.connect([
            (degibbs, outputnode, [("out_file", "dwi_file")]),
            (inputnode, outputnode, [("bvec_file", "bvec_file")]),
            (degibbs, mask_wf, [("out_file", "inputnode.dwi_file")]),
            (inputnode, mask_wf, [("bvec_file", "inputnode.bvec_file")]),
        ])  # fmt: skip
        return workflow
    _add_fsl_steps(workflow, degibbs=degibbs, mask_wf=mask_wf, use_topup=has_rpe_fmap,
                   mask_method=mask_method, b0_threshold=b0_threshold,
                   omp_nthreads=omp_nthreads, mem_gb=mem_gb)  # fmt: skip
    return workflow


def _add_mrtrix_steps(workflow, *, denoiser, omp_nthreads, mem_gb, device="auto") -> pe.Node:
    """Denoising then Gibbs-ringing removal, in ``workflow`` itself; returns ``degibbs``."""
    inputnode, outputnode = workflow.get_node("inputnode"), workflow.get_node("outputnode")
    # Denoising first: the Marchenko-Pastur noise model holds only for raw magnitude data.
    denoise = pe.Node(
        DWIDenoise(nthreads=omp_nthreads)
        if denoiser == "dwidenoise"
        else MPPCADenoise(nthreads=omp_nthreads, device=device),
        name="denoise",
        n_procs=omp_nthreads,
        mem_gb=3 * mem_gb,
    )
    degibbs = pe.Node(
        MRDeGibbs(nthreads=omp_nthreads), name="degibbs", n_procs=omp_nthreads, mem_gb=2 * mem_gb
    )
    slice_axes = pe.Node(
        niu.Function(function=degibbs_axes, input_names=["metadata"], output_names=["axes"]),
        name="slice_axes",
    )
    workflow.connect([
        (inputnode, denoise, [("dwi_file", "in_file")]),
        (inputnode, slice_axes, [("metadata", "metadata")]),
        (slice_axes, degibbs, [("axes", "axes")]),
        (denoise, degibbs, [("out_file", "in_file")]),
        (denoise, outputnode, [("noise", "noise_file")]),
    ])  # fmt: skip
    return degibbs


def _add_fsl_steps(
    workflow, *, degibbs, mask_wf, use_topup, mask_method, b0_threshold, omp_nthreads, mem_gb
) -> None:
    """TOPUP (if ``use_topup``) and Eddy after ``degibbs``, in ``workflow`` itself."""
    if not use_topup:
        LOGGER.info(
            "No reversed-PE 'epi' fieldmap: running Eddy without TOPUP "
            "(motion and eddy currents corrected, susceptibility distortion not)."
        )
    inputnode, outputnode = workflow.get_node("inputnode"), workflow.get_node("outputnode")
    fsl_files = pe.Node(
        TopupEddyFiles(use_topup=use_topup, b0_threshold=b0_threshold), name="fsl_files"
    )
    # Eddy needs a mask before correction; it is made on the distorted series, which is
    # generous enough for Eddy's estimation, and remade on Eddy's output below.
    eddy_mask_wf = init_dwi_mask_wf(mask_method=mask_method, b0_threshold=b0_threshold,
                                    omp_nthreads=omp_nthreads, name="eddy_mask_wf")  # fmt: skip
    eddy = pe.Node(
        # DKI protocols are shelled by design; eddy's own shell check is fragile with the
        # few directions per shell of clinical protocols.
        Eddy(num_threads=omp_nthreads, repol=True, is_shelled=True, output_type="NIFTI_GZ"),
        name="eddy",
        n_procs=omp_nthreads,
        mem_gb=4 * mem_gb,
    )
    # fmt: off
    workflow.connect([
        (inputnode, fsl_files, [
            ("dwi_file", "source_file"),
            ("bval_file", "in_bval"),
            ("metadata", "metadata"),
        ]),
        (degibbs, fsl_files, [("out_file", "in_file")]),
        (degibbs, eddy_mask_wf, [("out_file", "inputnode.dwi_file")]),
        (inputnode, eddy_mask_wf, [
            ("bval_file", "inputnode.bval_file"),
            ("bvec_file", "inputnode.bvec_file"),
        ]),
        (degibbs, eddy, [("out_file", "in_file")]),
        (inputnode, eddy, [("bval_file", "in_bval"), ("bvec_file", "in_bvec")]),
        (fsl_files, eddy, [("acqparams", "in_acqp"), ("index", "in_index")]),
        (eddy_mask_wf, eddy, [("outputnode.mask_file", "in_mask")]),
        (eddy, outputnode, [
            ("out_corrected", "dwi_file"),
            ("out_rotated_bvecs", "bvec_file"),
        ]),
        (eddy, mask_wf, [
            ("out_corrected", "inputnode.dwi_file"),
            ("out_rotated_bvecs", "inputnode.bvec_file"),
        ]),
    ])
    # fmt: on
    if use_topup:
        topup = pe.Node(TOPUP(output_type="NIFTI_GZ"), name="topup", mem_gb=2 * mem_gb)
        # fmt: off
        workflow.connect([
            (inputnode, fsl_files, [
                ("fmap_epi_files", "fmap_files"),
                ("fmap_metadata", "fmap_metadata"),
            ]),
            (fsl_files, topup, [
                ("imain", "in_file"),
                ("acqparams", "encoding_file"),
                ("config", "config"),
            ]),
            (topup, eddy, [
                ("out_fieldcoef", "in_topup_fieldcoef"),
                ("out_movpar", "in_topup_movpar"),
            ]),
        ])
        # fmt: on


def init_dwi_mask_wf(
    *,
    mask_method: MaskMethod = "dwi2mask",
    b0_threshold: float = B0_THRESHOLD,
    omp_nthreads: int = 1,
    name: str = "dwi_mask_wf",
) -> pe.Workflow:
    """Brain mask and mean b0 of a DWI series.

    Parameters
    ----------
    mask_method : {"dwi2mask", "median_otsu"}
        MRtrix3 ``dwi2mask`` (uses every volume) or DIPY ``median_otsu`` on the mean b0.
    b0_threshold : float
        Largest b-value (s/mm^2) counted as b=0.
    omp_nthreads : int
        Threads for ``dwi2mask``.
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file, bval_file, bvec_file
        DWI series and its gradient table (FSL format).

    Outputs
    -------
    mask_file
        Binary brain mask.
    b0_file
        Mean of the b=0 volumes.

    Examples
    --------
    Built and run on a small synthetic series:

    >>> import os, tempfile
    >>> import nibabel as nb, numpy as np
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> zz, yy, xx = np.mgrid[:16, :16, :16]
    >>> ball = ((xx - 8) ** 2 + (yy - 8) ** 2 + (zz - 8) ** 2 < 25).astype("f4")
    >>> dwi = np.stack([100 * ball + 1, 100 * ball + 1, 40 * ball + 1], -1)
    >>> nb.Nifti1Image(dwi, np.eye(4)).to_filename("dwi.nii.gz")
    >>> np.savetxt("dwi.bval", [[0, 0, 1000]])
    >>> np.savetxt("dwi.bvec", [[0, 0, 1], [0, 0, 0], [0, 0, 0]])
    >>> mask_wf = init_dwi_mask_wf(mask_method="median_otsu")
    >>> wf = pe.Workflow(name="my_pipeline", base_dir=os.getcwd())
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec"]), name="source")
    >>> source.inputs.dwi = os.path.abspath("dwi.nii.gz")
    >>> source.inputs.bval = os.path.abspath("dwi.bval")
    >>> source.inputs.bvec = os.path.abspath("dwi.bvec")
    >>> wf.connect([(source, mask_wf, [("dwi", "inputnode.dwi_file"),
    ...                                ("bval", "inputnode.bval_file"),
    ...                                ("bvec", "inputnode.bvec_file")])])
    >>> result = wf.run()
    >>> node = next(n for n in result.nodes() if n.name == "brain_mask")
    >>> mask = nb.load(node.result.outputs.out_file).get_fdata() > 0
    >>> int(mask.sum()), int((mask & (ball > 0)).sum()), int(ball.sum())  # inside the ball
    (341, 341, 485)
    >>> os.chdir(cwd)
    """
    if mask_method not in MASK_METHODS:
        raise DkiharmInputError(
            f"mask_method={mask_method!r} is unknown; use one of {MASK_METHODS}."
        )
    if mask_method == "dwi2mask" and missing_mrtrix(("dwi2mask",)):
        raise ToolNotFoundError(
            "mask_method='dwi2mask' needs MRtrix3's dwi2mask on PATH; install MRtrix3 or use "
            "mask_method='median_otsu'."
        )

    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = MASK_TEXT[mask_method]
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file"]), name="inputnode"
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["mask_file", "b0_file"]), name="outputnode")
    mean_b0 = pe.Node(MeanB0(b0_threshold=b0_threshold), name="mean_b0")

    # fmt: off
    workflow.connect([
        (inputnode, mean_b0, [("dwi_file", "in_file"), ("bval_file", "in_bval")]),
        (mean_b0, outputnode, [("out_file", "b0_file")]),
    ])
    # fmt: on
    if mask_method == "median_otsu":
        brain_mask = pe.Node(MedianOtsuMask(), name="brain_mask")
        # fmt: off
        workflow.connect([
            (mean_b0, brain_mask, [("out_file", "in_file")]),
            (brain_mask, outputnode, [("out_file", "mask_file")]),
        ])
        # fmt: on
        return workflow

    brain_mask = pe.Node(
        DWI2Mask(out_file="brainmask.nii.gz", nthreads=omp_nthreads),
        name="brain_mask",
        n_procs=omp_nthreads,
    )
    # fmt: off
    workflow.connect([
        (inputnode, brain_mask, [
            ("dwi_file", "in_file"),
            ("bvec_file", "in_bvec"),
            ("bval_file", "in_bval"),
        ]),
        (brain_mask, outputnode, [("out_file", "mask_file")]),
    ])
    # fmt: on
    return workflow
