"""A common (template) space for the comparators: scans in, maps out, maps back.

ComBat harmonizes voxelwise across scans and RISH learns scale maps across subjects, so
both need the scans voxel-aligned. Following the paper (section 2.3.4) every scan is
registered non-linearly to one **template scan** with
:func:`dkiharm_nipype.registration.register` (default engine: DIPY SyN), data are
pooled on the template grid, and results go back to each scan's own grid.

:class:`~dkiharm_nipype.registration.Registration` holds only the pull-back field on the
fixed (template) grid, so the way back is its numerical inverse
(:func:`invert_deformation`): for every scan voxel ``y``, the template position ``x``
with ``phi(x) = y``, found by fixed-point iteration. This costs a few resamplings instead
of a second non-linear registration per scan, and the round trip is consistent by
construction (the two directions are the same transform).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..errors import DkiharmInputError
from ..registration import (
    Registration,
    affine_deformation,
    check_same_grid,
    grid_positions,
    register,
    resample,
)


class CommonSpaceInputError(DkiharmInputError):
    """Scans that cannot be brought into one common space."""


def _image(data, affine=None, *, name: str = "image") -> nb.Nifti1Image:
    if isinstance(data, nb.spatialimages.SpatialImage):
        return data
    if isinstance(data, str | os.PathLike):
        return nb.load(data)
    if affine is None:
        raise CommonSpaceInputError(f"{name} is an array without an affine; give a NIfTI image.")
    return nb.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine))


def _label(img) -> str:
    name = img.get_filename() if isinstance(img, nb.spatialimages.SpatialImage) else None
    return os.path.basename(name) if name else "an in-memory image"


def invert_deformation(
    registration: Registration,
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    iterations: int = 30,
) -> tuple[np.ndarray, float]:
    """Pull-back field from the moving grid ``(shape, affine)`` into the fixed world.

    ``registration.deformation`` maps each fixed voxel ``x`` to the moving world position
    ``phi(x)``. The inverse is solved for every moving voxel ``y`` by the iteration
    ``x <- x + A^-1 (y - phi(x))`` from ``x = A^-1 (y - t)``, with ``(A, t)`` the
    least-squares affine part of ``phi``; it converges while the non-linear part of
    ``phi`` is a contraction (smooth, diffeomorphic fields such as SyN's). Outside the
    fixed field of view ``phi`` is extended by its affine part plus the edge values of
    the non-linear remainder.

    Returns
    -------
    field, residual
        ``(X, Y, Z, 3)`` fixed-world positions (RAS mm) of the moving voxels, and the
        median ``|phi(x) - y|`` (mm) over the moving voxels whose ``x`` is inside the
        fixed grid.
    """
    phi = np.asarray(registration.deformation, dtype=np.float64)
    fixed_shape = phi.shape[:3]
    x_fixed = grid_positions(fixed_shape, registration.fixed_affine).reshape(-1, 3)
    y_fixed = phi.reshape(-1, 3)
    ok = np.all(np.abs(y_fixed) < 1e6, axis=1)  # mrregister marks "nowhere" with 1e9
    design = np.c_[x_fixed[ok], np.ones(ok.sum())]
    coef = np.linalg.lstsq(design, y_fixed[ok], rcond=None)[0]
    a, t = coef[:3].T, coef[3]
    a_inv = np.linalg.inv(a)
    # phi = affine part + non-linear remainder; only the remainder is interpolated (and
    # extended by its edge values outside the fixed grid)
    rest = (y_fixed - (x_fixed @ a.T + t)).reshape(*fixed_shape, 3)
    rest[~ok.reshape(fixed_shape)] = 0.0
    comps = [np.ascontiguousarray(rest[..., k]) for k in range(3)]
    to_vox = np.linalg.inv(registration.fixed_affine)

    def phi_at(x):
        ijk = (x @ to_vox[:3, :3].T + to_vox[:3, 3]).T
        r = np.stack([ndimage.map_coordinates(c, ijk, order=1, mode="nearest") for c in comps])
        return x @ a.T + t + r.T, ijk.T

    y = grid_positions(shape, affine).reshape(-1, 3).astype(np.float64)
    x = (y - t) @ a_inv.T
    for _ in range(int(iterations)):
        step = (y - phi_at(x)[0]) @ a_inv.T
        x = x + step
        if np.abs(step).max() < 1e-4:  # mm
            break
    mapped, ijk = phi_at(x)
    inside = np.all((ijk >= 0) & (ijk <= np.asarray(fixed_shape) - 1), axis=1)
    err = np.linalg.norm(mapped - y, axis=1)[inside]
    residual = float(np.median(err)) if err.size else float("nan")
    return x.reshape(*shape[:3], 3).astype(np.float32), residual


@dataclass
class CommonSpace:
    """Scans registered to a template scan, with the fields both ways.

    Attributes
    ----------
    template : index of the template scan.
    affine, shape : the template grid.
    to_template : per scan, the pull-back field on the template grid (scan world mm).
    to_scan : per scan, the pull-back field on the scan grid (template world mm).
    scan_affines, scan_shapes : the scans' own grids.
    masks : per scan, its brain mask on the template grid (nearest neighbour).
    inverse_residual_mm : per scan, median error of the inverted field (mm).
    """

    template: int
    affine: np.ndarray
    shape: tuple[int, int, int]
    to_template: list[np.ndarray]
    to_scan: list[np.ndarray]
    scan_affines: list[np.ndarray]
    scan_shapes: list[tuple[int, int, int]]
    masks: list[np.ndarray]
    inverse_residual_mm: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    @property
    def common_mask(self) -> np.ndarray:
        """Template voxels inside every scan's brain mask."""
        return np.logical_and.reduce(self.masks)

    def to_template_space(self, i: int, data: np.ndarray, *, label: bool = False) -> np.ndarray:
        """Resample scan ``i``'s 3-D or 4-D ``data`` onto the template grid."""
        img = nb.Nifti1Image(np.asarray(data), self.scan_affines[i])
        out = resample(img, self.to_template[i], self.affine, order=0 if label else 1)
        return np.asanyarray(out.dataobj)

    def to_scan_space(self, i: int, data: np.ndarray, *, label: bool = False) -> np.ndarray:
        """Resample template-grid 3-D or 4-D ``data`` onto scan ``i``'s grid."""
        img = nb.Nifti1Image(np.asarray(data), self.affine)
        out = resample(img, self.to_scan[i], self.scan_affines[i], order=0 if label else 1)
        return np.asanyarray(out.dataobj)


def build_common_space(
    images: Sequence,
    masks: Sequence,
    *,
    template: int = 0,
    engine: str = "auto",
    use_masks: bool = False,
    n_threads: int = 1,
    n_jobs: int = 1,
    work_dir: str | os.PathLike | None = None,
) -> CommonSpace:
    """Register every scan to ``images[template]`` (affine + non-linear) and invert.

    Parameters
    ----------
    images
        One 3-D image (or path) per scan driving the registration, e.g. its FA map.
    masks
        Brain mask of each scan, on the grid of its image.
    template
        Index of the template scan (e.g. a reference-scanner scan).
    engine
        Engine of :func:`~dkiharm_nipype.registration.register` (``auto``: DIPY SyN).
    use_masks
        Restrict the similarity metric to the masks. Off by default: between subjects
        the masked affine stage of DIPY can diverge on small grids, while the maps are
        already zero outside the brain.
    n_threads, work_dir
        Passed to :func:`~dkiharm_nipype.registration.register`.
    n_jobs
        Scans registered in parallel (processes).
    """
    images = [_image(img, name=f"image {i}") for i, img in enumerate(images)]
    masks = [_image(m, name=f"mask {i}") for i, m in enumerate(masks)]
    if len(images) != len(masks):
        raise CommonSpaceInputError(
            f"Got {len(images)} images but {len(masks)} masks; give one brain mask per scan."
        )
    if not 0 <= template < len(images):
        raise CommonSpaceInputError(
            f"template={template} is not the index of one of the {len(images)} scans."
        )
    for img, mask in zip(images, masks, strict=True):
        if len(img.shape) != 3:
            raise CommonSpaceInputError(
                f"{_label(img)} has shape {img.shape}; registration needs one 3-D map per scan "
                "(e.g. its FA)."
            )
        check_same_grid(mask, img, names=("brain mask", "registration image"))
    fixed = images[template]
    shape, affine = tuple(fixed.shape[:3]), fixed.affine
    jobs = [
        (fixed, img, mask, masks[template] if use_masks else None, i == template)
        for i, (img, mask) in enumerate(zip(images, masks, strict=True))
    ]
    options = {"engine": engine, "n_threads": n_threads, "work_dir": work_dir}
    if n_jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked copy of a process that already ran torch or BLAS threads can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=context) as pool:
            done = list(pool.map(_align, jobs, [options] * len(jobs)))
    else:
        done = [_align(job, options) for job in jobs]
    to_template, to_scan, warped_masks, residuals, metrics = map(list, zip(*done, strict=True))
    return CommonSpace(
        template=template,
        affine=affine,
        shape=shape,
        to_template=to_template,
        to_scan=to_scan,
        scan_affines=[img.affine for img in images],
        scan_shapes=[tuple(img.shape[:3]) for img in images],
        masks=warped_masks,
        inverse_residual_mm=residuals,
        metrics=metrics,
    )


def _align(job, options):
    """Register one scan to the template and invert; runs in a worker with ``n_jobs``."""
    fixed, img, mask, fixed_mask, is_template = job
    shape, affine = tuple(fixed.shape[:3]), fixed.affine
    if is_template:
        reg = Registration("identity", affine_deformation(shape, affine), affine)
    else:
        kw = {"fixed_mask": fixed_mask, "moving_mask": mask} if fixed_mask is not None else {}
        reg = register(fixed, img, **options, **kw)
    back, residual = invert_deformation(reg, img.shape[:3], img.affine)
    mask_img = nb.Nifti1Image((np.asanyarray(mask.dataobj) > 0).astype(np.uint8), img.affine)
    warped = np.asanyarray(reg.apply(mask_img, label=True).dataobj) > 0
    return reg.deformation, back, warped, residual, dict(reg.metrics, engine=reg.engine)
