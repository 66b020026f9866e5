"""Nipype interface to the DKI fit of :mod:`dkiharm_nipype.dki`."""

from __future__ import annotations

import json
import os
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

from .. import __version__
from ..dki.fit import METHODS, DKIInputError, fit_dki
from ..dki.maps import ALL_METRICS
from ..dki.provenance import fit_options, map_sidecar, model_object
from ..utils.io import load_mask, read_gradients


class _FitDKIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D diffusion-weighted NIfTI series")
    bval_file = File(exists=True, mandatory=True, desc="FSL-style b-values (s/mm^2)")
    bvec_file = File(exists=True, mandatory=True, desc="FSL-style b-vectors (3 rows)")
    mask_file = File(exists=True, desc="brain mask; voxels outside are left at 0")
    method = traits.Enum(
        "irlls", "wls", "ols", usedefault=True, desc="fit method (irlls: robust, see dki.fit)"
    )
    b_max = traits.Float(desc="use only volumes with b <= b_max (s/mm^2), e.g. 3000")
    constraints = traits.Bool(
        True,
        usedefault=True,
        desc="project onto D >= 0 and directional kurtosis in [0, 3] after the fit",
    )
    outlier_threshold = traits.Float(
        3.5, usedefault=True, desc="IRLLS rejects |S - S_hat| > threshold x robust sigma"
    )
    n_threads = traits.Int(desc="torch threads used by the fit (default: torch's)")


class _FitDKIOutputSpec(TraitedSpec):
    md_file = File(exists=True, desc="mean diffusivity map (mm^2/s)")
    ad_file = File(exists=True, desc="axial diffusivity map (mm^2/s)")
    rd_file = File(exists=True, desc="radial diffusivity map (mm^2/s)")
    fa_file = File(exists=True, desc="fractional anisotropy map")
    mk_file = File(exists=True, desc="mean kurtosis map")
    ak_file = File(exists=True, desc="axial kurtosis map")
    rk_file = File(exists=True, desc="radial kurtosis map")
    kfa_file = File(exists=True, desc="kurtosis fractional anisotropy map")
    s0_file = File(exists=True, desc="fitted S0 map")
    outlier_fraction_file = File(exists=True, desc="per-voxel fraction of rejected volumes")
    outliers_per_volume_file = File(exists=True, desc="TSV: rejected voxels per volume")
    sidecar_files = traits.List(File(exists=True), desc="JSON sidecar of every map")


class FitDKI(SimpleInterface):
    """Fit diffusion kurtosis imaging and write the eight scalar maps with BIDS sidecars.

    Maps follow dipy's definitions (:mod:`dkiharm_nipype.dki.maps`) and are named
    with the BIDS diffusion-derivatives pattern ``<source>_model-dki_param-<map>_dwimap``.

    Examples
    --------
    >>> fit = FitDKI()
    >>> fit.inputs.method
    'irlls'
    >>> fit.inputs.b_max = 3000.0
    >>> sorted(fit.output_spec().copyable_trait_names())[:3]
    ['ad_file', 'ak_file', 'fa_file']

    A full run on a tiny synthetic scan:

    >>> import tempfile, nibabel as nb
    >>> from dkiharm_nipype.dki.design import dki_signal
    >>> from dkiharm_nipype.dki.simulate import random_tissue_tensors
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> g = rng.normal(size=(20, 3)); g /= np.linalg.norm(g, axis=1, keepdims=True)
    >>> bvals = np.r_[0, [1000] * 20, [2000] * 20]; bvecs = np.r_[np.zeros((1, 3)), g, g]
    >>> dt, kt = random_tissue_tensors(8, rng=0)
    >>> sig = dki_signal(np.full(8, 100.0), dt, kt, bvals, bvecs).reshape(2, 2, 2, -1)
    >>> nb.Nifti1Image(sig.astype("f4"), np.eye(4)).to_filename("sub-01_dwi.nii.gz")
    >>> np.savetxt("sub-01_dwi.bval", bvals[None]); np.savetxt("sub-01_dwi.bvec", bvecs.T)
    >>> res = FitDKI(dwi_file="sub-01_dwi.nii.gz", bval_file="sub-01_dwi.bval",
    ...              bvec_file="sub-01_dwi.bvec").run()
    >>> os.path.basename(res.outputs.mk_file)
    'sub-01_model-dki_param-mk_dwimap.nii.gz'
    >>> json.loads(Path(res.outputs.sidecar_files[4]).read_text())["Model"]["FitMethod"]
    'IRLLS'

    In an existing pipeline, after any preprocessing that gives a DWI series and a mask,
    and before a sink of your own:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> preproc = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec", "mask"]),
    ...                   name="preproc")
    >>> fit_dki = pe.Node(FitDKI(method="wls", b_max=2000.0, n_threads=2), name="fit_dki",
    ...                   n_procs=2)
    >>> collect = pe.Node(niu.IdentityInterface(fields=["mk", "kfa"]), name="collect")
    >>> wf.connect([
    ...     (preproc, fit_dki, [("dwi", "dwi_file"), ("bval", "bval_file"),
    ...                         ("bvec", "bvec_file"), ("mask", "mask_file")]),
    ...     (fit_dki, collect, [("mk_file", "mk"), ("kfa_file", "kfa")]),
    ... ])
    >>> sorted(wf.inputs.fit_dki.get())  # what is left to set: the fit options only
    ['b_max', 'constraints', 'method', 'n_threads', 'outlier_threshold']
    >>> os.chdir(cwd)
    """

    input_spec = _FitDKIInputSpec
    output_spec = _FitDKIOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        name = os.path.basename(inputs.dwi_file)
        img = nb.load(inputs.dwi_file)
        mask = None
        if isdefined(inputs.mask_file):
            mask = load_mask(inputs.mask_file)
        bvals, bvecs = read_gradients(inputs.bval_file, inputs.bvec_file, error=DKIInputError)
        source = (
            f"{name} (bval: {os.path.basename(inputs.bval_file)}, "
            f"bvec: {os.path.basename(inputs.bvec_file)})"
        )
        if mask is not None and mask.shape != img.shape[:3]:
            raise DKIInputError(
                f"The mask {os.path.basename(inputs.mask_file)} has shape {mask.shape} but "
                f"{name} has spatial shape {img.shape[:3]}; resample the mask to the image."
            )
        fit = fit_dki(
            np.asanyarray(img.dataobj, dtype=np.float32),
            bvals,
            bvecs,
            mask=mask,
            method=inputs.method,
            b_max=inputs.b_max if isdefined(inputs.b_max) else None,
            constraints=inputs.constraints,
            outlier_threshold=inputs.outlier_threshold,
            n_threads=inputs.n_threads if isdefined(inputs.n_threads) else None,
            source=source,
        )
        maps = fit.metrics(ALL_METRICS)
        maps["s0"] = fit.s0
        maps["outlierfraction"] = fit.outlier_fraction
        shells = sorted({float(b) for b in np.round(bvals[fit.volumes_used], -2)})
        model = model_object(
            fit_options(**fit.options, method=fit.method),
            shells=shells,
            iterations=int(fit.n_iter.max()) if fit.n_iter.size else 0,
        )
        stem = _bids_stem(inputs.dwi_file)
        sidecars = []
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        for key, data in maps.items():
            out = fname_presuffix(
                stem + ".nii.gz",
                suffix=f"_model-dki_param-{key}_dwimap",
                newpath=runtime.cwd,
            )
            nb.Nifti1Image(data.astype(np.float32), img.affine, header).to_filename(out)
            meta = map_sidecar(key, model)
            meta["Sources"] = [name]
            meta["Software"] = {"Name": "dkiharm", "Version": __version__}
            sidecar = out.replace(".nii.gz", ".json")
            Path(sidecar).write_text(json.dumps(meta, indent=2))
            sidecars.append(sidecar)
            trait = "outlier_fraction_file" if key == "outlierfraction" else f"{key}_file"
            self._results[trait] = out
        tsv = fname_presuffix(
            stem + ".tsv", suffix="_model-dki_outliers", newpath=runtime.cwd, use_ext=True
        )
        rows = ["volume\tbval\tused\tn_outlier_voxels"]
        rows += [
            f"{i}\t{bvals[i]:g}\t{int(fit.volumes_used[i])}\t{int(fit.outliers_per_volume[i])}"
            for i in range(bvals.size)
        ]
        Path(tsv).write_text("\n".join(rows) + "\n")
        self._results["outliers_per_volume_file"] = tsv
        self._results["sidecar_files"] = sidecars
        return runtime


def _bids_stem(dwi_file: str) -> str:
    """``/x/sub-01_dwi.nii.gz`` -> ``sub-01`` (the entities without the ``_dwi`` suffix)."""
    base = os.path.basename(dwi_file)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base[: -len("_dwi")] if base.endswith("_dwi") else base


__all__ = ["FitDKI", "METHODS"]
