"""Scans whose outputs already exist: a participant run's published files, or another
pipeline's preprocessed DWIs (``--derivatives``), fed to the graph without recomputation."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..utils.published import PreprocessedDWI, PublishedScan

#: The per-scan workflow's ``outputnode`` fields (see :func:`.dki.init_scan_wf`).
SCAN_OUTPUTS = ("dwi_file", "bval_file", "bvec_file", "mask_file", "maps", "fa_file", "snr_tsv")


def init_published_scan_wf(*, published: PublishedScan, name: str = "scan_wf") -> pe.Workflow:
    """Stand-in for :func:`.dki.init_scan_wf` that serves a scan's published derivatives.

    Its ``outputnode`` has the per-scan workflow's fields, so the group level connects to
    it in the same way; Nipype removes identity nodes, so nothing of it runs.

    Examples
    --------
    >>> from pathlib import Path
    >>> from dkiharm_nipype.dki.maps import ALL_METRICS
    >>> published = PublishedScan(dwi=Path("d.nii.gz"), bval=Path("d.bval"),
    ...     bvec=Path("d.bvec"), mask=Path("m.nii.gz"),
    ...     maps=tuple(Path(f"{m}.nii.gz") for m in ALL_METRICS), snr=Path("snr.tsv"),
    ...     fa=Path("fa.nii.gz"))
    >>> scan_wf = init_published_scan_wf(published=published)
    >>> scan_wf.get_node("outputnode").inputs.fa_file
    'fa.nii.gz'

    A step of your own reads the published maps as it would a fresh fit:

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> tract_stats = pe.Node(niu.IdentityInterface(fields=["fa", "maps"]), name="tract_stats")
    >>> wf.connect([(scan_wf, tract_stats, [("outputnode.fa_file", "fa"),
    ...                                     ("outputnode.maps", "maps")])])
    >>> "tract_stats" in wf.list_node_names()
    True
    """
    workflow = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=list(SCAN_OUTPUTS)), name="outputnode")
    outputnode.inputs.dwi_file = str(published.dwi)
    outputnode.inputs.bval_file = str(published.bval)
    outputnode.inputs.bvec_file = str(published.bvec)
    outputnode.inputs.mask_file = str(published.mask)
    outputnode.inputs.maps = [str(m) for m in published.maps]
    outputnode.inputs.fa_file = str(published.fa)
    outputnode.inputs.snr_tsv = str(published.snr)
    workflow.add_nodes([outputnode])
    return workflow


def init_preprocessed_dwi_wf(
    *, preprocessed: PreprocessedDWI, name: str = "preprocessed_wf"
) -> pe.Workflow:
    """Stand-in for :func:`.preproc.init_dwi_preproc_wf` for a scan preprocessed elsewhere.

    The series, gradients and brain mask of another pipeline (QSIPrep's ``desc-preproc_dwi``
    and ``desc-brain_mask``) pass through unchanged; no noise map exists, so the scan's SNR
    uses the spread of its b=0 frames.

    Examples
    --------
    >>> from pathlib import Path
    >>> pre = PreprocessedDWI(dwi=Path("p.nii.gz"), bval=Path("p.bval"), bvec=Path("p.bvec"),
    ...                       mask=Path("m.nii.gz"), pipeline="QSIPrep", root=Path("qsiprep"))
    >>> preproc_wf = init_preprocessed_dwi_wf(preprocessed=pre)
    >>> preproc_wf.get_node("outputnode").inputs.mask_file
    'm.nii.gz'

    In a pipeline of your own, in place of dkiharm's preprocessing:

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec"]), name="source")
    >>> fit = pe.Node(niu.IdentityInterface(fields=["dwi", "mask"]), name="fit")
    >>> wf.connect([
    ...     (source, preproc_wf, [("dwi", "inputnode.dwi_file"), ("bval", "inputnode.bval_file"),
    ...                           ("bvec", "inputnode.bvec_file")]),
    ...     (preproc_wf, fit, [("outputnode.dwi_file", "dwi"), ("outputnode.mask_file", "mask")])])
    >>> sorted(wf.list_node_names())
    ['fit', 'preprocessed_wf.inputnode', 'preprocessed_wf.outputnode', 'source']
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"This run's DWI series had been preprocessed by {preprocessed.pipeline}; "
        "dkiharm used them, with their brain mask, as provided."
    )
    fields = ["dwi_file", "bval_file", "bvec_file", "metadata", "fmap_epi_files", "fmap_metadata"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["dwi_file", "bval_file", "bvec_file", "mask_file", "noise_file"]
        ),
        name="outputnode",
    )
    outputnode.inputs.mask_file = str(preprocessed.mask)
    workflow.connect(
        [
            (
                inputnode,
                outputnode,
                [("dwi_file", "dwi_file"), ("bval_file", "bval_file"), ("bvec_file", "bvec_file")],
            )
        ]
    )
    return workflow
