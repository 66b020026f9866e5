"""Participant level: DKI fitting of one preprocessed scan, and the per-scan workflow."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dki.maps import ALL_METRICS
from ..errors import DkiharmInputError
from ..interfaces.bids import DerivativesDataSink
from ..interfaces.dki import FitDKI
from ..interfaces.scores import ComputeSNR
from ..preproc.modes import resolved_preproc_mode
from ..utils.bids import DWIScan
from ..utils.fsl import has_reversed_pe
from .preproc import init_dwi_preproc_wf, preproc_sidecar


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
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "dwi_file",
                "bval_file",
                "bvec_file",
                "mask_file",
                "raw_dwi_file",
                "raw_bval_file",
                "noise_file",
                "snr_info",
            ]
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

    def _snr_fields(info):
        return info["participant_id"], info["session"], info["run"], info["scanner"]

    snr_fields = pe.Node(
        niu.Function(
            function=_snr_fields, output_names=["participant_id", "session", "run", "scanner"]
        ),
        name="snr_fields",
    )

    workflow.connect(
        [
            (
                inputnode,
                fit,
                [
                    ("dwi_file", "dwi_file"),
                    ("bval_file", "bval_file"),
                    ("bvec_file", "bvec_file"),
                    ("mask_file", "mask_file"),
                ],
            ),
            (
                inputnode,
                snr,
                [
                    ("raw_dwi_file", "dwi_file"),
                    ("raw_bval_file", "bval_file"),
                    ("mask_file", "brain_mask"),
                    ("noise_file", "noise_file"),
                ],
            ),
            (inputnode, snr_fields, [("snr_info", "info")]),
            (
                snr_fields,
                snr,
                [
                    ("participant_id", "participant_id"),
                    ("session", "session"),
                    ("run", "run"),
                    ("scanner", "scanner"),
                ],
            ),
            (fit, snr, [("fa_file", "fa_file"), ("md_file", "md_file")]),
            (
                fit,
                outputnode,
                [
                    *((f"{m}_file", f"{m}_file") for m in ALL_METRICS),
                    ("outlier_fraction_file", "outlier_fraction_file"),
                ],
            ),
            (snr, outputnode, [("out_tsv", "snr_tsv")]),
        ]
    )
    return workflow


def init_scan_wf(
    *,
    scan: DWIScan,
    staging_dir: Path,
    preproc: str = "auto",
    denoiser: str = "dwidenoise",
    mask_method: str = "dwi2mask",
    fit_method: str = "irlls",
    b_max: float | None = None,
    omp_nthreads: int = 1,
    snr_roi: str | None = None,
    name: str = "scan_wf",
) -> pe.Workflow:
    """Preprocess, fit and store one DWI run (participant level).

    Its ``outputnode`` (``dwi_file``, ``bval_file``, ``bvec_file``, ``mask_file``, ``maps``
    — the eight maps in :data:`~dkiharm_nipype.dki.maps.ALL_METRICS` order —,
    ``fa_file``, ``snr_tsv``) feeds the group level.

    Parameters
    ----------
    scan : DWIScan
        The run, with its gradient table, sidecar and reversed-PE fieldmaps.
    staging_dir : Path
        Derivatives root the sinks write into (published once the run succeeds).
    preproc, denoiser, mask_method
        See :func:`~dkiharm_nipype.workflows.preproc.init_dwi_preproc_wf`.
    fit_method, b_max, omp_nthreads
        See :func:`init_dki_fit_wf`.
    snr_roi : str, optional
        White-matter ROI for the SNR on the scan's DWI grid; ``{subject}``, ``{session}`` and
        ``{run}`` are replaced by the scan's labels (default: the automatic ROI).

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
    >>> sorted(n for n in scan_wf.list_node_names() if n.startswith("ds_"))
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
    # float32 size of the series: the memory estimate that lets MultiProc schedule scans
    mem_gb = max(0.1, 4 * float(np.prod(nb.load(str(scan.dwi)).shape)) / 1024**3)

    workflow = pe.Workflow(name=name)
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "dwi_file",
                "bval_file",
                "bvec_file",
                "mask_file",
                "maps",
                "fa_file",
                "snr_tsv",
            ]
        ),
        name="outputnode",
    )
    merge_maps = pe.Node(
        niu.Merge(len(ALL_METRICS)), name="merge_maps", run_without_submitting=True
    )
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "dwi_file",
                "bval_file",
                "bvec_file",
                "metadata",
                "fmap_epi_files",
                "fmap_metadata",
                "snr_info",
            ]
        ),
        name="inputnode",
    )
    inputnode.inputs.dwi_file = str(scan.dwi)
    inputnode.inputs.bval_file = str(scan.bval)
    inputnode.inputs.bvec_file = str(scan.bvec)
    inputnode.inputs.metadata = scan.metadata
    inputnode.inputs.fmap_epi_files = [str(f) for f in scan.fmap_epi]
    inputnode.inputs.fmap_metadata = list(scan.fmap_metadata)
    inputnode.inputs.snr_info = {
        "participant_id": f"sub-{scan.subject}",
        "session": scan.session or "",
        "scanner": scan.scanner,
        "run": "" if scan.run is None else str(scan.run),
    }

    preproc_wf = init_dwi_preproc_wf(
        preproc=preproc,
        denoiser=denoiser,
        has_rpe_fmap=has_reversed_pe(scan.metadata, scan.fmap_metadata),
        mask_method=mask_method,
        omp_nthreads=omp_nthreads,
        mem_gb=mem_gb,
    )
    fit_wf = init_dki_fit_wf(
        fit_method=fit_method, b_max=b_max, omp_nthreads=omp_nthreads, mem_gb=mem_gb
    )
    if snr_roi:
        fit_wf.get_node("snr").inputs.roi_file = snr_roi_path(snr_roi, scan)
    _fit_denoising_window(preproc_wf, nb.load(str(scan.dwi)).shape[:3])

    source = str(scan.dwi)
    sink_args = {"base_directory": str(staging_dir), "source_file": source}
    ds_maps = {
        metric: pe.Node(
            DerivativesDataSink(**sink_args, space="dwi", model="dki", param=metric),
            name=f"ds_{metric}",
            run_without_submitting=True,
        )
        for metric in (*ALL_METRICS, "outlierfraction")
    }
    # the raw sidecar's acquisition fields, then what was done to the series
    preproc_meta = {
        **scan.metadata,
        **preproc_sidecar(
            resolved_preproc_mode(preproc, denoiser),
            denoiser,
            has_rpe_fmap=has_reversed_pe(scan.metadata, scan.fmap_metadata),
        ),
    }
    ds_dwi = pe.Node(
        DerivativesDataSink(
            **sink_args, space="dwi", desc="preproc", suffix="dwi", meta_dict=preproc_meta
        ),
        name="ds_dwi",
        run_without_submitting=True,
    )
    ds_bval = pe.Node(
        DerivativesDataSink(
            **sink_args, space="dwi", desc="preproc", suffix="dwi", extension=".bval"
        ),
        name="ds_bval",
        run_without_submitting=True,
    )
    ds_bvec = pe.Node(
        DerivativesDataSink(
            **sink_args, space="dwi", desc="preproc", suffix="dwi", extension=".bvec"
        ),
        name="ds_bvec",
        run_without_submitting=True,
    )
    ds_mask = pe.Node(
        DerivativesDataSink(
            **sink_args, space="dwi", desc="brain", suffix="mask", meta_dict={"Type": "Brain"}
        ),
        name="ds_mask",
        run_without_submitting=True,
    )
    ds_snr = pe.Node(
        DerivativesDataSink(**sink_args, desc="snr", suffix="qc", extension=".tsv"),
        name="ds_snr",
        run_without_submitting=True,
    )

    workflow.connect(
        [
            (
                inputnode,
                preproc_wf,
                [
                    ("dwi_file", "inputnode.dwi_file"),
                    ("bval_file", "inputnode.bval_file"),
                    ("bvec_file", "inputnode.bvec_file"),
                    ("metadata", "inputnode.metadata"),
                    ("fmap_epi_files", "inputnode.fmap_epi_files"),
                    ("fmap_metadata", "inputnode.fmap_metadata"),
                ],
            ),
            (
                inputnode,
                fit_wf,
                [
                    ("dwi_file", "inputnode.raw_dwi_file"),
                    ("bval_file", "inputnode.raw_bval_file"),
                    ("snr_info", "inputnode.snr_info"),
                ],
            ),
            (
                preproc_wf,
                fit_wf,
                [
                    ("outputnode.dwi_file", "inputnode.dwi_file"),
                    ("outputnode.bval_file", "inputnode.bval_file"),
                    ("outputnode.bvec_file", "inputnode.bvec_file"),
                    ("outputnode.mask_file", "inputnode.mask_file"),
                    ("outputnode.noise_file", "inputnode.noise_file"),
                ],
            ),
            (preproc_wf, ds_dwi, [("outputnode.dwi_file", "in_file")]),
            (preproc_wf, ds_bval, [("outputnode.bval_file", "in_file")]),
            (preproc_wf, ds_bvec, [("outputnode.bvec_file", "in_file")]),
            (preproc_wf, ds_mask, [("outputnode.mask_file", "in_file")]),
            (fit_wf, ds_snr, [("outputnode.snr_tsv", "in_file")]),
            (
                preproc_wf,
                outputnode,
                [
                    ("outputnode.dwi_file", "dwi_file"),
                    ("outputnode.bval_file", "bval_file"),
                    ("outputnode.bvec_file", "bvec_file"),
                    ("outputnode.mask_file", "mask_file"),
                ],
            ),
            (
                fit_wf,
                merge_maps,
                [(f"outputnode.{m}_file", f"in{i}") for i, m in enumerate(ALL_METRICS, 1)],
            ),
            (merge_maps, outputnode, [("out", "maps")]),
            (
                fit_wf,
                outputnode,
                [("outputnode.fa_file", "fa_file"), ("outputnode.snr_tsv", "snr_tsv")],
            ),
            *((fit_wf, ds_maps[m], [(f"outputnode.{m}_file", "in_file")]) for m in ALL_METRICS),
            (
                fit_wf,
                ds_maps["outlierfraction"],
                [("outputnode.outlier_fraction_file", "in_file")],
            ),
        ]
    )
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
