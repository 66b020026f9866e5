"""Nipype interface to the open registration engines of :mod:`dkiharm_nipype.registration`."""

from __future__ import annotations

import json
import shutil

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from ..registration import (
    ENGINES,
    FAILURE_MARGIN,
    SUPPORT_TOLERANCE,
    check_registration,
    check_same_grid,
    register,
    registration_similarity,
)


def _write_report(named_after: str, cwd: str, /, **fields) -> str:
    """``<named_after>_registration.json`` in ``cwd`` with ``fields``; returns its path."""
    report = fname_presuffix(named_after, suffix="_registration.json", newpath=cwd, use_ext=False)
    with open(report, "w") as fobj:
        json.dump(fields, fobj, indent=2)
    return report


class _RegisterMapsInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(
        exists=True, mandatory=True, desc="3-D image defining the target space (e.g. target FA)"
    )
    moving_image = File(
        exists=True, mandatory=True, desc="3-D image registered to fixed_image (e.g. reference FA)"
    )
    moving_maps = InputMultiObject(
        File(exists=True),
        desc="continuous maps on the moving image's grid, resampled trilinearly",
    )
    label_maps = InputMultiObject(
        File(exists=True),
        desc="masks/label images on the moving image's grid, resampled by nearest neighbour",
    )
    fixed_mask = File(exists=True, desc="mask of fixed_image restricting the similarity metric")
    moving_mask = File(exists=True, desc="mask of moving_image restricting the similarity metric")
    engine = traits.Enum(
        *(e for e in ENGINES if e != "fnirt"),
        usedefault=True,
        desc="registration engine (auto: the default open engine; none: already aligned)",
    )
    seed = traits.Int(0, usedefault=True, desc="seed of stochastic engines (ANTs sampling)")
    support_tolerance = traits.Float(
        SUPPORT_TOLERANCE,
        usedefault=True,
        desc="support_mask keeps fixed voxels where the trilinearly resampled moving_mask is "
        ">= 1 - this (all eight samples inside)",
    )
    num_threads = traits.Int(1, usedefault=True, desc="threads the engine may use")


class _RegisterMapsOutputSpec(TraitedSpec):
    registered_maps = traits.List(
        File(exists=True), desc="moving_maps on the fixed grid, in the same order"
    )
    registered_labels = traits.List(
        File(exists=True), desc="label_maps on the fixed grid, in the same order"
    )
    registered_image = File(exists=True, desc="moving_image on the fixed grid")
    support_mask = File(
        exists=True,
        desc="fixed-grid voxels whose registered maps were interpolated from moving_mask "
        "voxels only (with no moving_mask: from inside the moving field of view); labels "
        "outside it are blended with the zeros around the moving brain",
    )
    transform = File(
        exists=True,
        desc="deformation field on the fixed grid: moving RAS position (mm) of each voxel "
        "(mrtransform -warp convention)",
    )
    linear_transform = File(
        exists=True, desc="text 4x4 affine stage, fixed world (mm) -> moving world (mm)"
    )
    report = File(exists=True, desc="JSON: engine, seconds and similarity before/after")
    elapsed_seconds = traits.Float(desc="time spent estimating the transform (s)")


class RegisterMaps(SimpleInterface):
    """Register a moving image to a fixed one and carry maps and labels along.

    An affine then non-linear registration (see :func:`dkiharm_nipype.registration.register`)
    gives one deformation field; every moving map is resampled through it. With
    ``engine='none'`` the images must share one voxel grid and are passed through unchanged.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np, nibabel as nb
    >>> cwd = os.getcwd(); os.chdir(tempfile.mkdtemp())
    >>> yy, xx, zz = np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij")
    >>> blob = np.exp(-(xx**2 + 2 * yy**2 + 3 * zz**2) * 3).astype("f4")
    >>> nb.Nifti1Image(blob, np.eye(4)).to_filename("fa.nii.gz")
    >>> nb.Nifti1Image((blob > 0.5).astype("u1"), np.eye(4)).to_filename("mask.nii.gz")
    >>> res = RegisterMaps(fixed_image="fa.nii.gz", moving_image="fa.nii.gz",
    ...                    moving_maps=["fa.nii.gz"], label_maps=["mask.nii.gz"],
    ...                    engine="none").run()
    >>> os.path.basename(res.outputs.registered_maps[0])
    'fa_registered.nii.gz'
    >>> json.loads(open(res.outputs.report).read())["engine"]
    'none'

    In an existing pipeline, to bring maps of one scan into the space of another
    (e.g. an atlas FA to a subject's FA):

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> subject = pe.Node(niu.IdentityInterface(fields=["fa", "mask"]), name="subject")
    >>> atlas = pe.Node(niu.IdentityInterface(fields=["fa", "labels"]), name="atlas")
    >>> to_subject = pe.Node(RegisterMaps(engine="dipy-syn", num_threads=2), name="to_subject")
    >>> wf.connect([
    ...     (subject, to_subject, [("fa", "fixed_image"), ("mask", "fixed_mask")]),
    ...     (atlas, to_subject, [("fa", "moving_image"), ("labels", "label_maps")]),
    ... ])
    >>> to_subject.inputs.engine, "label_maps" in wf.inputs.to_subject.get()
    ('dipy-syn', False)
    >>> os.chdir(cwd)
    """

    input_spec = _RegisterMapsInputSpec
    output_spec = _RegisterMapsOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        moving_maps = list(inputs.moving_maps) if isdefined(inputs.moving_maps) else []
        label_maps = list(inputs.label_maps) if isdefined(inputs.label_maps) else []
        for path in moving_maps + label_maps:
            check_same_grid(path, inputs.moving_image, names=("moving map", "moving image"))
        reg = register(
            inputs.fixed_image,
            inputs.moving_image,
            engine=inputs.engine,
            fixed_mask=inputs.fixed_mask if isdefined(inputs.fixed_mask) else None,
            moving_mask=inputs.moving_mask if isdefined(inputs.moving_mask) else None,
            seed=inputs.seed,
            n_threads=inputs.num_threads,
            work_dir=runtime.cwd,
        )

        def _out(path: str, suffix: str = "_registered") -> str:
            return fname_presuffix(path, suffix=suffix, newpath=runtime.cwd)

        def _carry(paths: list[str], label: bool) -> list[str]:
            out = []
            for path in paths:
                out.append(_out(path))
                if reg.engine == "none":  # same grid, identity: bit-for-bit copy
                    shutil.copyfile(path, out[-1])
                else:
                    reg.apply(path, label=label).to_filename(out[-1])
            return out

        self._results["registered_maps"] = _carry(moving_maps, label=False)
        self._results["registered_labels"] = _carry(label_maps, label=True)
        self._results["registered_image"] = _out(inputs.moving_image, "_warped")
        reg.apply(inputs.moving_image).to_filename(self._results["registered_image"])
        self._results["support_mask"] = _out(inputs.moving_image, "_support")
        if isdefined(inputs.moving_mask):
            support_of = inputs.moving_mask
        else:  # the field of view: every voxel of the moving grid
            moving = nb.load(inputs.moving_image)
            support_of = nb.Nifti1Image(np.ones(moving.shape[:3], np.uint8), moving.affine)
        reg.support(support_of, tolerance=inputs.support_tolerance).to_filename(
            self._results["support_mask"]
        )

        transform = _out(inputs.moving_image, "_xfm")
        reg.to_nifti().to_filename(transform)
        linear = fname_presuffix(
            inputs.moving_image, suffix="_affine.txt", newpath=runtime.cwd, use_ext=False
        )
        with open(linear, "w") as fobj:
            fobj.write("# fixed world (RAS mm) -> moving world (RAS mm)\n")
            for row in reg.linear:
                fobj.write(" ".join(f"{v:.10f}" for v in row) + "\n")
        report = _write_report(
            inputs.moving_image,
            runtime.cwd,
            engine=reg.engine,
            requested_engine=inputs.engine,
            seconds=round(reg.seconds, 3),
            fixed_image=inputs.fixed_image,
            moving_image=inputs.moving_image,
            **reg.metrics,
        )
        self._results.update(
            transform=transform,
            linear_transform=linear,
            report=report,
            elapsed_seconds=reg.seconds,
        )
        return runtime


class _CheckRegistrationInputSpec(BaseInterfaceInputSpec):
    fixed_image = File(exists=True, mandatory=True, desc="the registration's fixed image")
    moving_image = File(exists=True, mandatory=True, desc="the registration's moving image")
    registered_image = File(
        exists=True, mandatory=True, desc="moving_image resampled onto fixed_image's grid"
    )
    moving_mask = File(exists=True, desc="brain mask of moving_image (its intensity scale)")
    engine = traits.Str("fnirt", usedefault=True, desc="name of the engine, for messages")
    registered_maps = InputMultiObject(
        File(exists=True), desc="maps carried by the same transform, passed on if it passed"
    )


class _CheckRegistrationOutputSpec(TraitedSpec):
    registered_maps = traits.List(File(exists=True), desc="registered_maps, unchanged")
    report = File(exists=True, desc="JSON: engine and correlation before/after")


class CheckRegistration(SimpleInterface):
    """Stop a pipeline whose registration left two images less alike than it found them.

    The open engines check themselves (:func:`~dkiharm_nipype.registration.register`); this
    node does the same for a registration run by other software (FSL FNIRT): the
    correlation of ``fixed_image`` with ``moving_image`` before (world-aligned) and after
    (``registered_image``). A drop of more than ``FAILURE_MARGIN`` raises
    :class:`~dkiharm_nipype.registration.RegistrationFailedError` naming both images, and
    ``registered_maps`` (connect them through this node) never reach the next step.

    Examples
    --------
    After an FSL FNIRT node in an existing pipeline (FNIRT's ``warped_file`` is the moving
    FA on the fixed grid; the maps carried by its warp pass through the check):

    >>> from nipype.interfaces import fsl
    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> images = pe.Node(niu.IdentityInterface(fields=["fixed", "moving"]), name="images")
    >>> fnirt = pe.Node(fsl.FNIRT(), name="fnirt")
    >>> warp_maps = pe.MapNode(fsl.ApplyWarp(), iterfield=["in_file"], name="warp_maps")
    >>> check = pe.Node(CheckRegistration(engine="fnirt"), name="check")
    >>> wf.connect([
    ...     (images, fnirt, [("fixed", "ref_file"), ("moving", "in_file")]),
    ...     (images, check, [("fixed", "fixed_image"), ("moving", "moving_image")]),
    ...     (fnirt, check, [("warped_file", "registered_image")]),
    ...     (warp_maps, check, [("out_file", "registered_maps")]),
    ... ])
    >>> check.inputs.engine
    'fnirt'
    """

    input_spec = _CheckRegistrationInputSpec
    output_spec = _CheckRegistrationOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        metrics = registration_similarity(
            inputs.fixed_image,
            inputs.moving_image,
            inputs.registered_image,
            moving_mask=inputs.moving_mask if isdefined(inputs.moving_mask) else None,
        )
        check_registration(
            metrics, fixed=inputs.fixed_image, moving=inputs.moving_image, engine=inputs.engine
        )
        report = _write_report(
            inputs.moving_image,
            runtime.cwd,
            engine=inputs.engine,
            fixed_image=inputs.fixed_image,
            moving_image=inputs.moving_image,
            failure_margin=FAILURE_MARGIN,
            **metrics,
        )
        maps = list(inputs.registered_maps) if isdefined(inputs.registered_maps) else []
        self._results.update(registered_maps=maps, report=report)
        return runtime
