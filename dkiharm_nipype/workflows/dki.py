"""Participant level: DKI fitting of one preprocessed scan, and the per-scan workflow."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dki.maps import ALL_METRICS
from ..errors import DkiharmInputError
from ..interfaces.dki import FitDKI
from ..interfaces.scores import ComputeSNR
from ..preproc.modes import resolved_preproc_mode
from ..utils.bids import DWIScan
from ..utils.fsl import has_reversed_pe
from .literate import LiterateWorkflow
from .outputs import init_scan_derivatives_wf
from .preproc import init_dwi_preproc_wf, preproc_sidecar
from .published import init_preprocessed_dwi_wf


def _preprocessed_meta(scan: DWIScan) -> dict:
    """Sidecar fields of a series that another pipeline preprocessed (``--derivatives``)."""
    pre = scan.preprocessed
    if pre is None:
        return {}
    return {
        "Description": f"DWI series preprocessed by {pre.pipeline}, used as provided: "
        "dkiharm's own preprocessing was skipped",
        "PreprocessedBy": pre.pipeline,
        "PreprocessedSource": str(pre.dwi),
        "SkullStripped": False,
        "ProcessingSteps": [f"preprocessed by {pre.pipeline} (used as provided)"],
    }

#: How each ``fit_method`` is named in the methods text.
FIT_TEXT = {
    "irlls": "iteratively reweighted linear least squares (IRLLS) with outlier rejection "
    "[@collier2015], the robust estimator the method uses for its labels [@tong2020]",
    "wls": "weighted linear least squares [@veraart2013]",
    "ols": "ordinary linear least squares",
}


def _fit_desc(fit_method: str, b_max: float | None, constraints: bool) -> str:
    from ..dki.provenance import constraints_sentence, fit_options

    shells = f"volumes with b ≤ {b_max:g} s/mm²" if b_max is not None else "all volumes"
    # the values the fit uses and the map sidecars state (one source: dki/provenance.py)
    used = fit_options(method=fit_method, b_max=b_max, constraints=constraints)
    projection = (
        f", followed by a projection onto physically plausible values "
        f"({constraints_sentence(used)})"
        if constraints
        else ""
    )
    return (
        "\n\nThe diffusion and kurtosis tensors of the DKI signal model [@jensen2005] were "
        f"estimated voxelwise from {shells} by {FIT_TEXT[fit_method]}{projection}. "
        "Mean, axial and radial diffusivity (MD, AD, RD), fractional "
        "anisotropy (FA), and mean, axial and radial kurtosis (MK, AK, RK) [@tabesh2011] and "
        "the kurtosis fractional anisotropy (KFA) [@glenn2015] were computed with the "
        "definitions of dipy [@dipy]. The SNR of each scan was measured as the mean b=0 signal "
        "in white matter divided by the noise standard deviation there (the denoising step's "
        "noise map, or the spread across b=0 frames without denoising), in decibels."
    )


def _snr_fields(info):
    """Nipype Function: the SNR row's identifiers from the scan's ``snr_info`` dict."""
    return info["participant_id"], info["session"], info["run"], info["scanner"]


def init_dki_fit_wf(
    *,
    fit_method: str = "irlls",
    b_max: float | None = None,
    omp_nthreads: int = 1,
    mem_gb: float = 1.0,
    name: str = "dki_fit_wf",
) -> pe.Workflow:
    """Fit DKI to a preprocessed DWI series and measure the scan's SNR.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from dkiharm_nipype.workflows.dki import init_dki_fit_wf
            wf = init_dki_fit_wf()

    Parameters
    ----------
    fit_method : {"irlls", "wls", "ols"}
        DKI estimator (see :func:`dkiharm_nipype.dki.fit.fit_dki`).
    b_max : float or None
        Use only volumes with b <= ``b_max`` s/mm^2.
    omp_nthreads : int
        Threads of the fit.
    mem_gb : float
        Size of the loaded DWI series, for the scheduler's memory estimate.
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file, bval_file, bvec_file
        Preprocessed series and gradient table.
    mask_file
        Brain mask.
    raw_dwi_file, raw_bval_file
        Unprocessed series whose b0 frames give the SNR signal.
    noise_file
        Noise map (``dwidenoise -noise``) for the SNR, optional.
    snr_info
        Dict with participant_id, session, run and scanner for the SNR row.

    Outputs
    -------
    md_file, ad_file, rd_file, fa_file, mk_file, ak_file, rk_file, kfa_file
        The eight DKI maps, each with its JSON sidecar beside it.
    outlier_fraction_file
        Share of volumes rejected per voxel by IRLLS.
    snr_tsv
        One-row SNR table of the scan.

    Examples
    --------
    After your own preprocessing (the SNR is measured on the raw series):

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> preproc = pe.Node(niu.IdentityInterface(fields=["raw", "dwi", "bval", "bvec", "mask"]),
    ...                   name="preproc")
    >>> fit_wf = init_dki_fit_wf(fit_method="wls", b_max=2000.0)
    >>> fit_wf.inputs.inputnode.snr_info = {"participant_id": "sub-01", "session": "A",
    ...                                     "run": "1", "scanner": "A"}
    >>> wf.connect([(preproc, fit_wf, [
    ...     ("dwi", "inputnode.dwi_file"), ("bval", "inputnode.bval_file"),
    ...     ("bvec", "inputnode.bvec_file"), ("mask", "inputnode.mask_file"),
    ...     ("raw", "inputnode.raw_dwi_file"), ("bval", "inputnode.raw_bval_file")])])
    >>> sorted(fit_wf.list_node_names())
    ['fit', 'inputnode', 'outputnode', 'snr', 'snr_fields']
    >>> fit_wf.get_node("fit").inputs.method, fit_wf.get_node("fit").inputs.b_max
    ('wls', 2000.0)
    """
    workflow = LiterateWorkflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["dwi_file", "bval_file", "bvec_file", "mask_file", "raw_dwi_file",
                    "raw_bval_file", "noise_file", "snr_info"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[*(f"{m}_file" for m in ALL_METRICS), "outlier_fraction_file", "snr_tsv"]
        ),
        name="outputnode",
    )

    fit = pe.Node(
        FitDKI(method=fit_method, n_threads=omp_nthreads),
        name="fit",
        n_procs=omp_nthreads,
        mem_gb=mem_gb * 3,
    )
    if b_max is not None:
        fit.inputs.b_max = b_max
    snr = pe.Node(ComputeSNR(), name="snr", mem_gb=mem_gb)
    workflow.__desc__ = _fit_desc(fit_method, b_max, fit.inputs.constraints)

    snr_fields = pe.Node(
        niu.Function(
            function=_snr_fields, output_names=["participant_id", "session", "run", "scanner"]
        ),
        name="snr_fields",
    )

    workflow.connect([
        (inputnode, fit, [(f, f) for f in ("dwi_file", "bval_file", "bvec_file", "mask_file")]),
        (inputnode, snr, [("raw_dwi_file", "dwi_file"), ("raw_bval_file", "bval_file"),
                          ("mask_file", "brain_mask"), ("noise_file", "noise_file")]),
        (inputnode, snr_fields, [("snr_info", "info")]),
        (snr_fields, snr, [(f, f) for f in ("participant_id", "session", "run", "scanner")]),
        (fit, snr, [("fa_file", "fa_file"), ("md_file", "md_file")]),
        (fit, outputnode, [(f"{m}_file", f"{m}_file") for m in ALL_METRICS]
         + [("outlier_fraction_file", "outlier_fraction_file")]),
        (snr, outputnode, [("out_tsv", "snr_tsv")]),
    ])  # fmt: skip
    return workflow


def init_scan_wf(
    *,
    scan: DWIScan,
    staging_dir: Path,
    preproc: str = "auto",
    denoiser: str = "mppca",
    mask_method: str = "dwi2mask",
    fit_method: str = "irlls",
    b_max: float | None = None,
    omp_nthreads: int = 1,
    topup_runs: tuple[int, int] | None = None,
    device: str = "auto",
    snr_roi: str | None = None,
    name: str = "scan_wf",
) -> pe.Workflow:
    """Preprocess, fit and store one DWI run (participant level).

    Its ``outputnode`` (``dwi_file``, ``bval_file``, ``bvec_file``, ``mask_file``, ``maps``
    — the eight maps in :data:`~dkiharm_nipype.dki.maps.ALL_METRICS` order —,
    ``fa_file``, ``snr_tsv``) feeds the group level; the derivatives are stored by
    :func:`~dkiharm_nipype.workflows.outputs.init_scan_derivatives_wf` (``ds_scan_wf``).

    Parameters
    ----------
    scan : DWIScan
        The run, with its gradient table, sidecar and reversed-PE fieldmaps.
    staging_dir : Path
        Derivatives root the sinks write into (published once the run succeeds).
    preproc, denoiser, mask_method, topup_runs
        See :func:`~dkiharm_nipype.workflows.preproc.init_dwi_preproc_wf`.
    fit_method, b_max, omp_nthreads
        See :func:`init_dki_fit_wf`.
    snr_roi : str, optional
        White-matter ROI of the SNR on the DWI grid (``{subject}``/``{session}``/``{run}`` expand).

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scan = collect_scans(load_layout(bids_dir), participant_label=["01"],
    ...                      session_label=["D"])[0]
    >>> scan_wf = init_scan_wf(scan=scan, staging_dir=Path("derivatives"), preproc="mrtrix",
    ...                        fit_method="irlls", name="scan_wf")
    >>> scan_wf.inputs.inputnode.dwi_file == str(scan.dwi)
    True
    >>> sorted(n.split(".")[1] for n in scan_wf.list_node_names() if ".ds_" in n)
    ... # doctest: +NORMALIZE_WHITESPACE
    ['ds_ad', 'ds_ak', 'ds_bval', 'ds_bvec', 'ds_dwi', 'ds_fa', 'ds_kfa', 'ds_mask', 'ds_md',
     'ds_mk', 'ds_outlierfraction', 'ds_rd', 'ds_rk', 'ds_snr']

    Its outputs feed steps of your own, in a larger workflow:

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> tbss = pe.Node(niu.IdentityInterface(fields=["fa", "mask"]), name="tbss")
    >>> wf.connect([(scan_wf, tbss, [("outputnode.fa_file", "fa"),
    ...                              ("outputnode.mask_file", "mask")])])
    >>> len(wf.list_node_names()) > 30
    True
    """
    shape = nb.load(str(scan.dwi)).shape  # float32 size: MultiProc's memory estimate
    mem_gb = max(0.1, 4 * float(np.prod(shape)) / 1024**3)
    workflow = LiterateWorkflow(name=name)
    workflow.__fold__ = "scan"
    raw = ["dwi_file", "bval_file", "bvec_file"]
    inputnode = pe.Node(
        niu.IdentityInterface(fields=[*raw, "metadata", "fmap_epi_files", "fmap_metadata",
                                      "snr_info"]),
        name="inputnode",
    )  # fmt: skip
    given = scan.preprocessed or scan  # --derivatives: that series enters, SNR included
    inputnode.inputs.trait_set(
        dwi_file=str(given.dwi), bval_file=str(given.bval), bvec_file=str(given.bvec),
        metadata=scan.metadata, fmap_epi_files=[str(f) for f in scan.fmap_epi],
        fmap_metadata=list(scan.fmap_metadata),
        snr_info={"participant_id": f"sub-{scan.subject}", "session": scan.session or "",
                  "scanner": scan.scanner, "run": "" if scan.run is None else str(scan.run)},
    )  # fmt: skip
    preprocessed = [*raw, "mask_file"]
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*preprocessed, "maps", "fa_file", "snr_tsv"]),
        name="outputnode",
    )
    merge_maps = pe.Node(
        niu.Merge(len(ALL_METRICS)), name="merge_maps", run_without_submitting=True
    )
    if scan.preprocessed is not None:  # preprocessed elsewhere (--derivatives): used as is
        preproc_wf = init_preprocessed_dwi_wf(preprocessed=scan.preprocessed)
    else:
        preproc_wf = init_dwi_preproc_wf(
            preproc=preproc,
            denoiser=denoiser,
            has_rpe_fmap=has_reversed_pe(scan.metadata, scan.fmap_metadata),
            topup_runs=topup_runs,
            mask_method=mask_method,
            omp_nthreads=omp_nthreads,
            mem_gb=mem_gb,
            device=device,
        )
    fit_wf = init_dki_fit_wf(fit_method=fit_method, b_max=b_max, omp_nthreads=omp_nthreads,
                             mem_gb=mem_gb)  # fmt: skip
    if snr_roi:
        fit_wf.get_node("snr").inputs.roi_file = snr_roi_path(snr_roi, scan)
    _fit_denoising_window(preproc_wf, shape[:3])
    ds_scan_wf = init_scan_derivatives_wf(source_file=str(scan.dwi), staging_dir=staging_dir,
                                          dwi_meta=_dwi_sidecar(scan, preproc, denoiser),
                                          name="ds_scan_wf")  # fmt: skip
    fitted = [f"{m}_file" for m in ALL_METRICS] + ["outlier_fraction_file", "snr_tsv"]
    workflow.connect([
        (inputnode, preproc_wf, [(f, f"inputnode.{f}") for f in (
            *raw, "metadata", "fmap_epi_files", "fmap_metadata")]),
        (inputnode, fit_wf, [("dwi_file", "inputnode.raw_dwi_file"),
                             ("bval_file", "inputnode.raw_bval_file"),
                             ("snr_info", "inputnode.snr_info")]),
        (preproc_wf, fit_wf, [(f"outputnode.{f}", f"inputnode.{f}")
                              for f in (*preprocessed, "noise_file")]),
        (preproc_wf, ds_scan_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in preprocessed]),
        (fit_wf, ds_scan_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fitted]),
        (preproc_wf, outputnode, [(f"outputnode.{f}", f) for f in preprocessed]),
        (fit_wf, merge_maps, [(f"outputnode.{m}_file", f"in{i}")
                              for i, m in enumerate(ALL_METRICS, 1)]),
        (merge_maps, outputnode, [("out", "maps")]),
        (fit_wf, outputnode, [("outputnode.fa_file", "fa_file"),
                              ("outputnode.snr_tsv", "snr_tsv")]),
    ])  # fmt: skip
    return workflow


def snr_roi_path(pattern: str, scan: DWIScan) -> str:
    """``--snr-roi`` for one scan: ``{subject}``, ``{session}``, ``{run}`` replaced; the file
    must exist (one line naming it otherwise)."""
    path = Path(
        pattern.format(subject=scan.subject, session=scan.session or "", run=scan.run or "")
    ).expanduser()
    if not path.is_file():
        raise DkiharmInputError(
            f"--snr-roi {pattern} gives {path} for {scan.dwi.name}, which does not exist; give "
            "a white-matter mask on each scan's DWI grid ({subject}/{session}/{run} expand)."
        )
    return str(path.absolute())


def _fit_denoising_window(preproc_wf: pe.Workflow, shape) -> None:
    """A scan thinner than ``dwidenoise``'s 5-voxel window gets the window that fits (e.g.
    ``-extent 5,5,1`` for two slices; MRtrix3 3.0.3 crashes with the default cube there).
    Other scans keep the default command line. The MP-PCA denoiser adapts by itself."""
    from nipype.interfaces.mrtrix3 import DWIDenoise

    from ..preproc.denoise import window_extent

    denoise = preproc_wf.get_node("denoise")
    if denoise is not None and isinstance(denoise.interface, DWIDenoise) and min(shape) < 5:
        denoise.inputs.extent = window_extent(shape)


def _dwi_sidecar(scan: DWIScan, preproc: str, denoiser: str) -> dict:
    """The raw sidecar's acquisition fields, then what was done to the series."""
    rpe = has_reversed_pe(scan.metadata, scan.fmap_metadata)
    done = preproc_sidecar(resolved_preproc_mode(preproc, denoiser), denoiser, has_rpe_fmap=rpe)
    return {**scan.metadata, **done, **_preprocessed_meta(scan)}
