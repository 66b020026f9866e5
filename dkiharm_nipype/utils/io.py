"""Reading and writing files: atomic writes, b-values and b-vectors, NIfTI images and masks.

One definition of each, so every module reads a ``.bval`` the same way and names the file in
its error. Nothing here imports from the rest of the package but :mod:`dkiharm_nipype.errors`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from ..errors import DkiharmInputError


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling and an atomic rename."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def atomic_write_text(text: str, dst: str | os.PathLike) -> None:
    """Write ``text`` to ``dst`` atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, dst)


def read_bvals(
    bval: str | os.PathLike, *, error: type[DkiharmInputError] = DkiharmInputError
) -> np.ndarray:
    """The b-values of an FSL-style ``.bval`` file as a 1-D float array (one per volume).

    A file that is not numbers raises ``error`` (a :class:`DkiharmInputError`) naming it.
    """
    try:
        return np.loadtxt(bval, ndmin=1, dtype=float).ravel()
    except (OSError, ValueError) as exc:
        raise error(
            f"{bval} cannot be read as b-values ({exc}); it must hold one row of numbers."
        ) from None


def read_gradients(
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    *,
    error: type[DkiharmInputError] = DkiharmInputError,
) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL-style ``.bval``/``.bvec`` files with one-line errors naming the file.

    Returns ``(bvals, bvecs)``: ``(N,)`` b-values and ``(N, 3)`` unit directions (a file with
    three columns instead of three rows is read too). Problems raise ``error`` naming the file.
    """
    bvals = read_bvals(bval, error=error)
    try:
        bvecs = np.loadtxt(bvec, ndmin=2, dtype=float)
    except (OSError, ValueError) as exc:
        raise error(
            f"{bvec} cannot be read as b-vectors ({exc}); it must hold three rows of numbers."
        ) from None
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape[0] != 3:
        raise error(
            f"{bvec} has {bvecs.shape[0]} rows; BIDS b-vectors are 3 rows (x, y, z) with one "
            "column per volume."
        )
    return bvals, bvecs.T


def check_nifti(path: Path, *, min_ndim: int = 4):
    """Load a NIfTI header and data fully, turning truncation and shape problems into errors."""
    import nibabel as nb

    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        nb.filebasedimages.ImageFileError,
    ) as exc:
        raise DkiharmInputError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is truncated or "
            "not NIfTI: copy or convert it again."
        ) from None
    if data.ndim < min_ndim or (min_ndim == 4 and data.shape[-1] < 2):
        raise DkiharmInputError(
            f"{path} is a {data.ndim}-D image of shape {data.shape}; a DWI must be 4-D with "
            "one volume per gradient direction."
        )
    return img, data


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as a boolean array (voxels > 0)."""
    import nibabel as nb

    return np.asanyarray(nb.load(path).dataobj) > 0
