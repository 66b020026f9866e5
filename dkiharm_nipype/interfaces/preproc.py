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

from ..utils.dwi import B0_THRESHOLD, mean_b0, median_otsu_mask
from ..utils.fsl import sidecar_name, write_topup_files


class DWI2Mask(MRTrix3Base, BrainMask):
    """MRtrix3 ``dwi2mask`` that also takes the gradient table (``in_bvec``/``in_bval``).

    Nipype's :class:`~nipype.interfaces.mrtrix3.utils.BrainMask` declares the MRtrix3
    gradient inputs but, being a plain ``CommandLine``, cannot render ``-fslgrad``; a NIfTI
    DWI has no gradient table in its header, so ``dwi2mask`` needs it.

    >>> mask = DWI2Mask(in_file='dwi.nii.gz', in_bvec='dwi.bvec', in_bval='dwi.bval',
    ...                 out_file='brainmask.nii.gz')  # doctest: +SKIP
    >>> mask.cmdline  # doctest: +SKIP
    'dwi2mask -fslgrad dwi.bvec dwi.bval dwi.nii.gz brainmask.nii.gz'
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
    """Average the b=0 volumes of a DWI series."""

    input_spec = _MeanB0InputSpec
    output_spec = _MeanB0OutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        b0 = mean_b0(
            np.asarray(img.dataobj),
            np.loadtxt(self.inputs.in_bval, ndmin=1),
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
    """Brain mask of a mean b0 with DIPY's ``median_otsu``."""

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
    """Write ``acqparams.txt``, ``index.txt`` and TOPUP's merged b0s from BIDS metadata."""

    input_spec = _TopupEddyFilesInputSpec
    output_spec = _TopupEddyFilesOutputSpec

    def _run_interface(self, runtime):
        fmap_files = self.inputs.fmap_files if isdefined(self.inputs.fmap_files) else []
        fmap_meta = self.inputs.fmap_metadata if isdefined(self.inputs.fmap_metadata) else []
        self._results.update(
            write_topup_files(
                self.inputs.in_file,
                np.loadtxt(self.inputs.in_bval, ndmin=1),
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
