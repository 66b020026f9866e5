"""How alike two images are, and the guards that stop a failed registration.

Correlation of intensity-normalized images before and after registration (the check every
engine's result passes, FNIRT's included), Dice overlaps, and the plausibility of an affine
stage between two scans of one head.
"""

from __future__ import annotations

import nibabel as nb
import numpy as np

from .grids import (
    RegistrationInputError,
    _load,
    _mask_array,
    affine_deformation,
    check_same_grid,
    resample,
)

#: Largest scaling (either way) an affine stage may find between two scans of one head;
#: beyond it the affine is a divergence (it happens on small, noisy maps) and the rigid
#: stage's result is kept.
MAX_AFFINE_SCALE = 1.25


#: A registration that lowers the images' correlation by more than this has failed.
FAILURE_MARGIN = 0.1


class RegistrationFailedError(RegistrationInputError):
    """A registration left the images less alike than it found them."""


def intensity_scale(
    data: np.ndarray, mask: np.ndarray | None = None, *, percentile: float = 99.5
) -> float:
    """The ``percentile`` of ``data`` inside ``mask`` (or > 0): :func:`normalize_intensity`'s 1."""
    sel = mask.astype(bool) if mask is not None else data > 0
    if not sel.any():
        raise RegistrationInputError(
            "The image to register is empty (no voxel > 0 in its mask); check the input map."
        )
    return float(np.percentile(data[sel], percentile)) or 1.0


def normalize_intensity(
    data: np.ndarray, mask: np.ndarray | None = None, *, percentile: float = 99.5
) -> np.ndarray:
    """Scale ``data`` to 1 at its ``percentile`` inside ``mask`` (or > 0), clip to [0, 1.5].

    Scanners differ in intensity scale and b0 contrast; a common scale lets the
    intensity-difference metric of ``mrregister`` compare them and bounds outliers.
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float32))
    sel = mask.astype(bool) if mask is not None else data > 0
    out = np.clip(data / intensity_scale(data, mask, percentile=percentile), 0.0, 1.5)
    if mask is not None:
        out = out * sel
    return out.astype(np.float32)


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``mask``."""
    mask = mask.astype(bool)
    x, y = a[mask].astype(float), b[mask].astype(float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary images (1 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def mean_label_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``b`` (e.g. white-matter ROIs)."""
    labels = [v for v in np.unique(b) if v != 0]
    return float(np.mean([dice(a == v, b == v) for v in labels])) if labels else 1.0


def check_registration(metrics: dict, *, fixed: str, moving: str, engine: str) -> None:
    """Raise :class:`RegistrationFailedError` when a registration lowered the images'
    correlation (``metrics``: ``correlation_before``/``_after``) by more than
    :data:`FAILURE_MARGIN`."""
    if metrics["correlation_after"] < metrics["correlation_before"] - FAILURE_MARGIN:
        raise RegistrationFailedError(
            f"Registering {moving} to {fixed} with {engine} failed: it lowered their "
            f"correlation from {metrics['correlation_before']:.2f} to "
            f"{metrics['correlation_after']:.2f}; check that both are maps of the same head "
            "(with brain masks), or choose another --registration engine."
        )


def registration_similarity(fixed, moving, registered, *, moving_mask=None) -> dict[str, float]:
    """Correlation of ``fixed`` with ``moving`` before (world-aligned) and after registration.

    For registrations run by other software (FSL FNIRT): ``registered`` is ``moving``
    resampled onto ``fixed``'s grid by that software. Intensities are normalized as in
    :func:`register` (``registered`` with ``moving``'s scale, taken inside ``moving_mask``)
    and correlated where the fixed image is > 0.
    """
    fixed_img, moving_img, registered_img = _load(fixed), _load(moving), _load(registered)
    check_same_grid(registered_img, fixed_img, names=("registered image", "fixed image"))
    mmask = _mask_array(moving_mask, moving_img, "moving")
    fdata = normalize_intensity(fixed_img.get_fdata(dtype=np.float32))
    mraw = np.nan_to_num(moving_img.get_fdata(dtype=np.float32))
    scale = intensity_scale(mraw, mmask)
    mnorm = nb.Nifti1Image(np.clip(mraw / scale, 0.0, 1.5), moving_img.affine)
    after = np.clip(np.nan_to_num(registered_img.get_fdata(dtype=np.float32)) / scale, 0.0, 1.5)
    return _correlations(nb.Nifti1Image(fdata, fixed_img.affine), mnorm, after, fdata > 0)


def _correlations(fnorm: nb.Nifti1Image, mnorm: nb.Nifti1Image, after: np.ndarray, sel) -> dict:
    """Correlation of the normalized fixed image with the normalized moving one world-aligned
    (before) and with ``after`` (the moving image registered onto the fixed grid), in ``sel``."""
    fdata = np.asanyarray(fnorm.dataobj)
    before = resample(mnorm, affine_deformation(fnorm.shape, fnorm.affine), fnorm.affine)
    return {
        "correlation_before": correlation(fdata, before.get_fdata(), sel),
        "correlation_after": correlation(fdata, after, sel),
    }


def linear_scales(affine: np.ndarray) -> np.ndarray:
    """Scalings (singular values) of an affine's linear part: 1 for a rigid transform."""
    return np.linalg.svd(np.asarray(affine, dtype=float)[:3, :3], compute_uv=False)


def plausible_affine(affine: np.ndarray, max_scale: float = MAX_AFFINE_SCALE) -> bool:
    """Whether an affine between two scans of one head scales by at most ``max_scale``."""
    scales = linear_scales(affine)
    return bool(np.all(scales <= max_scale) and np.all(scales >= 1.0 / max_scale))
