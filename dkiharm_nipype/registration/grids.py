"""Voxel grids, deformation fields and resampling: what every registration engine shares.

A **deformation field** lives on the fixed grid: for every fixed voxel, the RAS world position
(mm) in the moving image that lands there (the "pull-back" convention of MRtrix3
``mrtransform -warp``). :func:`resample` pulls any map through it: linearly for continuous
maps, nearest neighbour for labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..errors import DkiharmInputError

#: Voxel sizes (mm) closer than this count as equal.
VOXEL_TOLERANCE_MM = 1e-3


class RegistrationInputError(DkiharmInputError):
    """The images or the options given to a registration cannot be used."""


class GridMismatchError(RegistrationInputError):
    """Two images that must share a voxel grid do not."""


def _load(img: str | os.PathLike | nb.spatialimages.SpatialImage) -> nb.Nifti1Image:
    return img if isinstance(img, nb.spatialimages.SpatialImage) else nb.load(img)


def _name(img, default: str) -> str:
    name = getattr(img, "get_filename", lambda: None)() if not isinstance(img, str | Path) else img
    return Path(name).name if name else default


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) of a voxel-to-world ``affine``."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def check_same_voxel_size(img_a, img_b, *, names: tuple[str, str] = ("image", "image")) -> None:
    """Raise :class:`GridMismatchError` unless both images have the same voxel size."""
    a, b = _load(img_a), _load(img_b)
    va, vb = voxel_sizes(a.affine), voxel_sizes(b.affine)
    if not np.allclose(va, vb, atol=VOXEL_TOLERANCE_MM):
        raise GridMismatchError(
            f"{_name(img_a, names[0])} has voxels of {_fmt(va)} mm but "
            f"{_name(img_b, names[1])} has {_fmt(vb)} mm; resample one onto the other's grid "
            "(or pick a registration engine instead of 'none')."
        )


def check_same_grid(img_a, img_b, *, names: tuple[str, str] = ("image", "image")) -> None:
    """Raise :class:`GridMismatchError` unless both images share shape and voxel-to-world."""
    check_same_voxel_size(img_a, img_b, names=names)
    a, b = _load(img_a), _load(img_b)
    if a.shape[:3] != b.shape[:3] or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise GridMismatchError(
            f"{_name(img_a, names[0])} (grid {a.shape[:3]}) and {_name(img_b, names[1])} "
            f"(grid {b.shape[:3]}) are not on the same voxel grid; give images on one grid "
            "(e.g. all maps of one DKI fit)."
        )


def _fmt(v) -> str:
    return "x".join(f"{x:.3g}" for x in v)


def grid_positions(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) position of every voxel centre, shape ``(*shape, 3)``."""
    ijk = np.stack(np.meshgrid(*map(np.arange, shape[:3]), indexing="ij"), axis=-1)
    return (ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]).astype(np.float32)


def affine_deformation(
    shape: Sequence[int], affine: np.ndarray, fixed_to_moving: np.ndarray | None = None
) -> np.ndarray:
    """Deformation field of a linear map: ``fixed_to_moving`` (4x4, world mm) at each voxel."""
    pos = grid_positions(shape, affine)
    if fixed_to_moving is None:
        return pos
    m = np.asarray(fixed_to_moving, dtype=float)
    return (pos @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


def resample(
    img,
    deformation: np.ndarray,
    fixed_affine: np.ndarray,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> nb.Nifti1Image:
    """Pull ``img`` (3-D or 4-D) onto the fixed grid through a deformation field.

    Parameters
    ----------
    img
        Image (or path) in the moving space.
    deformation
        ``(X, Y, Z, 3)`` moving-world positions (RAS mm) of the fixed voxels.
    fixed_affine
        Voxel-to-world affine of the fixed grid (that of the output).
    order
        1 (trilinear) for continuous maps, 0 (nearest neighbour) for labels; label images
        keep their data type.
    """
    img = _load(img)
    inv = np.linalg.inv(img.affine)
    coords = deformation @ inv[:3, :3].T.astype(np.float32) + inv[:3, 3].astype(np.float32)
    coords = np.moveaxis(coords, -1, 0)
    data = np.asanyarray(img.dataobj)
    label = order == 0
    src = data if label else data.astype(np.float32)
    vols = [src] if src.ndim == 3 else [src[..., k] for k in range(src.shape[3])]
    out = [
        ndimage.map_coordinates(
            v, coords, order=order, mode="constant", cval=cval, prefilter=False
        )
        for v in vols
    ]
    out = out[0] if src.ndim == 3 else np.stack(out, axis=-1)
    header = img.header.copy()
    if not label:
        header.set_data_dtype(np.float32)
    res = nb.Nifti1Image(out.astype(data.dtype if label else np.float32), fixed_affine, header)
    res.set_qform(fixed_affine, code=1)
    res.set_sform(fixed_affine, code=1)
    return res


def _mask_array(mask, ref: nb.Nifti1Image, what: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask_img = _load(mask)
    check_same_grid(mask_img, ref, names=(f"{what} mask", f"{what} image"))
    return np.asanyarray(mask_img.dataobj) > 0
