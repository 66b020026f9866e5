"""Thin interfaces for DWI preprocessing; the science is in :mod:`dkiharm_nipype.utils`."""

from __future__ import annotations

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
from nipype.interfaces.mrtrix3.base import MRTrix3Base
from nipype.interfaces.mrtrix3.utils import BrainMask
from nipype.utils.filemanip import fname_presuffix

from ..preproc.masks import median_otsu_mask
from ..utils.dwi import B0_THRESHOLD, mean_b0
from ..utils.env import resolve_device, torch_threads
from ..utils.fsl import sidecar_name, write_topup_files
from ..utils.io import load_mask, read_bvals


class DWI2Mask(MRTrix3Base, BrainMask):
    """MRtrix3 ``dwi2mask`` that also takes the gradient table (``in_bvec``/``in_bval``).

    Nipype's :class:`~nipype.interfaces.mrtrix3.utils.BrainMask` declares the MRtrix3
    gradient inputs but, being a plain ``CommandLine``, cannot render ``-fslgrad``; a NIfTI
    DWI has no gradient table in its header, so ``dwi2mask`` needs it.

    Examples
    --------
    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> for name in ("dwi.nii.gz", "dwi.bvec", "dwi.bval"):
    ...     _ = open(name, "w")
    >>> mask = DWI2Mask(in_file="dwi.nii.gz", in_bvec="dwi.bvec", in_bval="dwi.bval",
    ...                 out_file="brainmask.nii.gz")
    >>> mask.cmdline
    'dwi2mask -fslgrad dwi.bvec dwi.bval dwi.nii.gz brainmask.nii.gz'

    In an existing pipeline, after a node that gives the DWI and its gradient table:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec"]), name="source")
    >>> brain_mask = pe.Node(DWI2Mask(out_file="brainmask.nii.gz", nthreads=2),
    ...                      name="brain_mask")
    >>> wf.connect([(source, brain_mask, [("dwi", "in_file"), ("bval", "in_bval"),
    ...                                   ("bvec", "in_bvec")])])
    >>> sorted({"in_file", "in_bval", "in_bvec"} & set(wf.inputs.brain_mask.get()))
    []
    >>> os.chdir(cwd)
    """


def _save_like(data, ref, dtype, in_file: str, suffix: str, cwd: str) -> str:
    """Write ``data`` as ``dtype`` on the grid of image ``ref``; return the new path."""
    out_file = fname_presuffix(in_file, suffix=suffix, newpath=cwd)
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    nb.Nifti1Image(np.asarray(data, dtype=dtype), ref.affine, header).to_filename(out_file)
    return out_file


class _MeanB0InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4-D diffusion-weighted series")
    in_bval = File(exists=True, mandatory=True, desc="b-values (FSL format)")
    b0_threshold = traits.Float(
        B0_THRESHOLD, usedefault=True, desc="largest b-value (s/mm^2) counted as b=0"
    )


class _MeanB0OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="mean of the b=0 volumes")


class MeanB0(SimpleInterface):
    """Average the b=0 volumes of a DWI series.

    Examples
    --------
    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> data = np.stack([np.full((2, 2, 2), v, "f4") for v in (100, 40, 110, 30)], -1)
    >>> nb.Nifti1Image(data, np.eye(4)).to_filename("dwi.nii.gz")
    >>> np.savetxt("dwi.bval", [[0, 1000, 5, 2000]])
    >>> res = MeanB0(in_file="dwi.nii.gz", in_bval="dwi.bval").run()
    >>> float(nb.load(res.outputs.out_file).get_fdata().mean())  # b=0 and b=5 volumes
    105.0

    In an existing pipeline, e.g. to give a registration its reference image:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> denoise = pe.Node(niu.IdentityInterface(fields=["out_file", "bval"]), name="denoise")
    >>> mean_b0 = pe.Node(MeanB0(b0_threshold=50.0), name="mean_b0")
    >>> wf.connect([(denoise, mean_b0, [("out_file", "in_file"), ("bval", "in_bval")])])
    >>> sorted(wf.inputs.mean_b0.get())
    ['b0_threshold']
    >>> os.chdir(cwd)
    """

    input_spec = _MeanB0InputSpec
    output_spec = _MeanB0OutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        b0 = mean_b0(
            np.asarray(img.dataobj),
            read_bvals(self.inputs.in_bval),
            threshold=self.inputs.b0_threshold,
        )
        self._results["out_file"] = _save_like(
            b0, img, np.float32, self.inputs.in_file, "_b0ref", runtime.cwd
        )
        return runtime


class _MedianOtsuMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3-D mean b0 image")
    median_radius = traits.Int(2, usedefault=True, desc="median filter radius (voxels)")
    numpass = traits.Int(1, usedefault=True, desc="number of median filter passes")


class _MedianOtsuMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="binary brain mask (uint8)")


class MedianOtsuMask(SimpleInterface):
    """Brain mask of a mean b0 with DIPY's ``median_otsu``.

    Examples
    --------
    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> zz, yy, xx = np.mgrid[:16, :16, :16]
    >>> ball = ((xx - 8) ** 2 + (yy - 8) ** 2 + (zz - 8) ** 2 < 25).astype("f4")
    >>> nb.Nifti1Image(100 * ball + 1, np.eye(4)).to_filename("b0.nii.gz")
    >>> res = MedianOtsuMask(in_file="b0.nii.gz", median_radius=1).run()
    >>> mask = nb.load(res.outputs.out_file).get_fdata() > 0
    >>> int(mask.sum()), int((mask & (ball > 0)).sum()), int(ball.sum())  # inside the ball
    (461, 461, 485)

    In an existing pipeline, after :class:`MeanB0`:

    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> mean_b0 = pe.Node(MeanB0(), name="mean_b0")
    >>> brain_mask = pe.Node(MedianOtsuMask(numpass=2), name="brain_mask")
    >>> wf.connect(mean_b0, "out_file", brain_mask, "in_file")
    >>> "in_file" in wf.inputs.brain_mask.get()
    False
    >>> os.chdir(cwd)
    """

    input_spec = _MedianOtsuMaskInputSpec
    output_spec = _MedianOtsuMaskOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        mask = median_otsu_mask(
            np.asarray(img.dataobj),
            median_radius=self.inputs.median_radius,
            numpass=self.inputs.numpass,
        )
        self._results["out_file"] = _save_like(
            mask, img, np.uint8, self.inputs.in_file, "_mask", runtime.cwd
        )
        return runtime


class _TopupEddyFilesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4-D DWI series given to Eddy")
    in_bval = File(exists=True, mandatory=True, desc="b-values of the DWI (FSL format)")
    source_file = File(desc="raw BIDS DWI whose sidecar error messages should name")
    metadata = traits.Dict(mandatory=True, desc="BIDS sidecar of the DWI")
    fmap_files = traits.List(
        File(exists=True), desc="reversed-PE 'epi' fieldmaps (b0s) on the DWI grid"
    )
    fmap_metadata = traits.List(traits.Dict(), desc="BIDS sidecars of fmap_files, in order")
    use_topup = traits.Bool(True, usedefault=True, desc="also write the TOPUP inputs")
    b0_threshold = traits.Float(
        B0_THRESHOLD, usedefault=True, desc="largest b-value (s/mm^2) counted as b=0"
    )


class _TopupEddyFilesOutputSpec(TraitedSpec):
    acqparams = File(exists=True, desc="acquisition parameters (TOPUP --datain, Eddy --acqp)")
    index = File(exists=True, desc="Eddy --index: the acqparams row of each DWI volume")
    imain = File(desc="b0s of the DWI then the fieldmap volumes (TOPUP --imain)")
    config = traits.Str(desc="TOPUP --config suited to the image grid")


class TopupEddyFiles(SimpleInterface):
    """Write ``acqparams.txt``, ``index.txt`` and TOPUP's merged b0s from BIDS metadata.

    See :func:`dkiharm_nipype.utils.fsl.write_topup_files`.

    Examples
    --------
    Eddy's files for a series without reversed-PE fieldmap (no TOPUP):

    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> nb.Nifti1Image(np.ones((4, 4, 2, 3), "f4"), np.eye(4)).to_filename("dwi.nii.gz")
    >>> np.savetxt("dwi.bval", [[0, 1000, 2000]])
    >>> res = TopupEddyFiles(in_file="dwi.nii.gz", in_bval="dwi.bval", use_topup=False,
    ...                      metadata={"PhaseEncodingDirection": "j-",
    ...                                "TotalReadoutTime": 0.05}).run()
    >>> open(res.outputs.acqparams).read().split()
    ['0', '-1', '0', '0.05']
    >>> open(res.outputs.index).read().split()
    ['1', '1', '1']

    In an existing pipeline, feeding FSL's Eddy (the node is built, not run):

    >>> from nipype.interfaces import fsl, utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "meta"]), name="source")
    >>> fsl_files = pe.Node(TopupEddyFiles(use_topup=False), name="fsl_files")
    >>> eddy = pe.Node(fsl.Eddy(repol=True), name="eddy")
    >>> wf.connect([
    ...     (source, fsl_files, [("dwi", "in_file"), ("bval", "in_bval"), ("meta", "metadata")]),
    ...     (fsl_files, eddy, [("acqparams", "in_acqp"), ("index", "in_index")]),
    ... ])
    >>> sorted({"in_acqp", "in_index"} & set(wf.inputs.eddy.get()))
    []
    >>> os.chdir(cwd)
    """

    input_spec = _TopupEddyFilesInputSpec
    output_spec = _TopupEddyFilesOutputSpec

    def _run_interface(self, runtime):
        fmap_files = self.inputs.fmap_files if isdefined(self.inputs.fmap_files) else []
        fmap_meta = self.inputs.fmap_metadata if isdefined(self.inputs.fmap_metadata) else []
        self._results.update(
            write_topup_files(
                self.inputs.in_file,
                read_bvals(self.inputs.in_bval),
                self.inputs.metadata,
                fmap_files=fmap_files,
                fmap_metadata=fmap_meta,
                use_topup=self.inputs.use_topup,
                out_dir=runtime.cwd,
                b0_threshold=self.inputs.b0_threshold,
                source=(
                    sidecar_name(self.inputs.source_file)
                    if isdefined(self.inputs.source_file)
                    else None
                ),
            )
        )
        return runtime


class _MPPCADenoiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4-D raw magnitude DWI series")
    mask = File(exists=True, desc="denoise inside this mask only (default: every voxel)")
    extent = traits.Int(5, usedefault=True, desc="window edge in voxels (odd)")
    stride = traits.Int(  # = denoise.DEFAULT_STRIDE, not imported here: it pulls in torch
        3, usedefault=True, desc="voxels between windows (1: one at every voxel)"
    )
    nthreads = traits.Int(1, usedefault=True, nohash=True, desc="torch threads")
    device = traits.Str(
        "auto",
        usedefault=True,
        desc="torch device: auto (a GPU if the host running the node has one), cpu, cuda, "
        "cuda:N",
    )


class _MPPCADenoiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised DWI series (float32)")
    noise = File(exists=True, desc="noise level (sigma) map")


class MPPCADenoise(SimpleInterface):
    """MP-PCA denoising in torch (:func:`dkiharm_nipype.preproc.denoise.mppca`).

    The same estimator as MRtrix3 ``dwidenoise`` with overlapping windows placed every
    ``stride`` voxels; outputs are named as :class:`~nipype.interfaces.mrtrix3.DWIDenoise`'s,
    so either can fill the ``denoise`` slot of a workflow.

    Examples
    --------
    >>> import os, tempfile
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> clean = np.exp(-np.linspace(0, 2, 30))[None, None, None] * 100 * np.ones((8, 8, 8, 1))
    >>> noisy = (clean + rng.normal(0, 5, clean.shape)).astype("f4")
    >>> nb.Nifti1Image(noisy, np.eye(4)).to_filename("dwi.nii.gz")
    >>> res = MPPCADenoise(in_file="dwi.nii.gz").run()
    >>> sigma = nb.load(res.outputs.noise).get_fdata()
    >>> bool(abs(np.median(sigma) - 5) < 0.5)
    True
    >>> out = nb.load(res.outputs.out_file).get_fdata()
    >>> bool(np.abs(out - clean).std() < 0.5 * np.abs(noisy - clean).std())
    True

    In an existing pipeline, in place of MRtrix3's ``DWIDenoise``:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> source = pe.Node(niu.IdentityInterface(fields=["dwi", "mask"]), name="source")
    >>> denoise = pe.Node(MPPCADenoise(stride=2, nthreads=2), name="denoise", n_procs=2)
    >>> wf.connect([(source, denoise, [("dwi", "in_file"), ("mask", "mask")])])
    >>> sorted(wf.inputs.denoise.get())
    ['device', 'extent', 'nthreads', 'stride']
    >>> os.chdir(cwd)
    """

    input_spec = _MPPCADenoiseInputSpec
    output_spec = _MPPCADenoiseOutputSpec

    def _run_interface(self, runtime):
        from ..preproc.denoise import mppca  # torch: imported when the node runs

        img = nb.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 4:
            raise ValueError(
                f"{self.inputs.in_file} has shape {data.shape}; MP-PCA needs a 4-D DWI series."
            )
        mask = None
        if isdefined(self.inputs.mask):
            mask = load_mask(self.inputs.mask)
        with torch_threads(max(1, self.inputs.nthreads)):
            res = mppca(
                data,
                mask,
                extent=self.inputs.extent,
                stride=self.inputs.stride,
                device=resolve_device(self.inputs.device),  # on the host running this node
            )
        cwd = runtime.cwd
        self._results["out_file"] = _save_like(
            res.denoised, img, np.float32, self.inputs.in_file, "_denoised", cwd
        )
        self._results["noise"] = _save_like(
            res.sigma, img, np.float32, self.inputs.in_file, "_noise", cwd
        )
        return runtime
