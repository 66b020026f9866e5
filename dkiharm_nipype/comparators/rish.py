"""RISH harmonization of DWIs (the paper's second comparator).

Rotation-invariant spherical-harmonic features (Mirzaalian et al. 2016, *NeuroImage*
135:311; Cetin Karayumak et al. 2019, *NeuroImage* 184:180): on each shell the
b0-normalized signal ``S / S0`` is fitted with DIPY's real, symmetric SH basis
(``descoteaux07``, orthonormal) of even orders up to ``lmax`` by plain least squares
(DIPY ``sf_to_sh``'s default, ``smooth=0``). A Laplace-Beltrami weight (0.006 in
``QballModel``) would shrink order ``l`` by a factor that depends on the direction count
(l = 4 halved with 30 directions), so scale maps between protocols with different counts
would learn the estimator rather than the scanner. The RISH feature of order
``l`` is the energy ``sum_m c_lm^2``, invariant to rotations of the signal on the
sphere. ``lmax`` follows the direction count as in dMRIharmonization: the largest even
order with at most as many coefficients as directions (6 -> 2, 15 -> 4, 28 -> 6, 45 -> 8),
taken over all scans of a shell so that features are comparable.

Training (traveling subjects, :func:`train_rish`): the target-scanner and
reference-scanner scans of the training subjects are registered non-linearly to one
template scan (a reference scan), their RISH features are averaged per scanner on the
template grid, and the scale map of each shell and order is

    scale_l = smooth(E_ref[RISH_l]) / smooth(E_target[RISH_l])

The means are smoothed before the ratio (a Gaussian of ``smoothing_mm`` normalized inside
the shared mask), because higher orders are near zero in isotropic tissue and a raw
ratio there is noise; the scale is then clipped to ``[1 / max_scale, max_scale]`` and
set to 1 outside the voxels shared by all training scans.

Applying (:func:`apply_rish`, :func:`harmonize_dwi`): the template is registered to the
test scan, scale maps are resampled onto its grid, and on every shell each order's
coefficients are multiplied by ``sqrt(scale_l)``. The signal is resynthesized on the
scan's own directions; by default the part of the signal that the SH fit does not
represent (noise, orders above ``lmax``) is kept (``keep_residual``), since DKI needs
the fourth-order angular content that ``lmax = 2`` drops for 6-14 directions;
``keep_residual=False`` is dMRIharmonization's pure resynthesis. b0 volumes are kept.
The harmonized series holds the b0s and the shells learned in training: shells the
target lacks (e.g. the reference's b = 3000 s/mm^2 in the paper) are left out, as in
the paper. The caller then refits DKI with :func:`dkiharm_nipype.dki.fit.fit_dki`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..errors import DkiharmInputError
from ..registration import register, resample, voxel_sizes
from ..utils.dwi import B0_THRESHOLD, check_volumes
from ..utils.io import read_gradients
from .commonspace import build_common_space

#: Shells whose b-values differ by at most this (s/mm^2) are the same shell.
B_TOLERANCE = 100.0

#: Laplace-Beltrami regularization weight of the SH fit (0: least squares; see above).
SH_SMOOTH = 0.0

#: Floor of the resynthesized ``S / S0`` (below CSF's ``exp(-2000 * 3e-3)``).
MIN_NORMALIZED_SIGNAL = 1e-3

#: Largest SH order used (45 coefficients).
LMAX_CAP = 8


class RISHInputError(DkiharmInputError):
    """DWIs or models that RISH harmonization cannot use."""


# ------------------------------------------------------------------------------ shells
def find_shells(bvals: np.ndarray, *, tolerance: float = B_TOLERANCE) -> list[float]:
    """Mean b-value of each shell (b > :data:`B0_THRESHOLD`), ascending.

    b-values are grouped greedily in ascending order: a value within ``tolerance`` of
    the first of the current group joins it.
    """
    values = np.sort(np.asarray(bvals, dtype=float).ravel())
    values = values[values > B0_THRESHOLD]
    shells: list[list[float]] = []
    for b in values:
        if shells and b - shells[-1][0] <= tolerance:
            shells[-1].append(b)
        else:
            shells.append([b])
    return [float(np.mean(s)) for s in shells]


def shell_volumes(bvals: np.ndarray, shell: float, *, tolerance: float = B_TOLERANCE):
    """Indices of the volumes of ``shell`` (within ``tolerance``)."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    return np.flatnonzero((bvals > B0_THRESHOLD) & (np.abs(bvals - shell) <= tolerance))


def match_shell(shell: float, shells: Sequence[float], *, tolerance: float = B_TOLERANCE):
    """The element of ``shells`` within ``tolerance`` of ``shell``, or None."""
    close = [s for s in shells if abs(s - shell) <= tolerance]
    return min(close, key=lambda s: abs(s - shell)) if close else None


def lmax_for(n_directions: int) -> int:
    """Largest even SH order with at most ``n_directions`` coefficients (max 8)."""
    if n_directions < 6:
        raise RISHInputError(
            f"A shell has {n_directions} directions; a spherical-harmonic fit needs at "
            "least 6 per shell."
        )
    lmax = 0
    while lmax + 2 <= LMAX_CAP and n_coefficients(lmax + 2) <= n_directions:
        lmax += 2
    return lmax


def n_coefficients(lmax: int) -> int:
    """Number of real symmetric SH coefficients up to even order ``lmax``."""
    return (lmax + 1) * (lmax + 2) // 2


# -------------------------------------------------------------------------- SH and RISH
def sh_basis(bvecs: np.ndarray, lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """DIPY's real symmetric SH basis (descoteaux07, orthonormal) at unit ``bvecs``.

    Returns the ``(N, C)`` basis and the order ``l`` of each column.
    """
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_descoteaux

    v = np.asarray(bvecs, dtype=float)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    _, theta, phi = cart2sphere(v[:, 0], v[:, 1], v[:, 2])
    basis, _, orders = real_sh_descoteaux(lmax, theta, phi, legacy=False)
    return basis, np.asarray(orders)


def fit_sh(
    signal: np.ndarray, bvecs: np.ndarray, lmax: int, *, smooth: float = SH_SMOOTH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularized least-squares SH fit of ``signal`` (..., N) sampled at ``bvecs`` (N, 3).

    Returns the coefficients (..., C), the basis (N, C) and the order of each column.
    """
    from dipy.reconst.shm import smooth_pinv

    basis, orders = sh_basis(bvecs, lmax)
    fit_matrix = smooth_pinv(basis, np.sqrt(smooth) * (-orders * (orders + 1.0)))
    return np.asarray(signal, dtype=float) @ fit_matrix.T, basis, orders


def rish(coeffs: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """RISH features ``sum_m c_lm^2`` of each even order, stacked on the last axis."""
    return np.stack([(coeffs[..., orders == l] ** 2).sum(-1) for l in np.unique(orders)], -1)


def _bvecs(bvecs: np.ndarray, n: int) -> np.ndarray:
    bvecs = np.asarray(bvecs, dtype=float)
    if bvecs.shape == (3, n) and n != 3:
        bvecs = bvecs.T
    if bvecs.shape != (n, 3):
        raise RISHInputError(f"b-vectors have shape {bvecs.shape}; expected {n} x 3 or 3 x {n}.")
    return bvecs


def _mean_b0(dwi: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(np.asarray(bvals) <= B0_THRESHOLD)
    if idx.size == 0:
        raise RISHInputError(
            "The DWI has no b=0 volume; RISH normalizes each shell by the mean b0."
        )
    return dwi[..., idx].mean(-1)


def shell_rish(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    shell: float,
    lmax: int,
    *,
    tolerance: float = B_TOLERANCE,
) -> np.ndarray:
    """RISH features (X, Y, Z, lmax/2 + 1) of one shell, b0-normalized, 0 outside mask."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = _bvecs(bvecs, bvals.size)
    vols = shell_volumes(bvals, shell, tolerance=tolerance)
    mask = np.asarray(mask, bool)
    b0 = _mean_b0(dwi, bvals)[mask]
    norm = dwi[mask][:, vols] / np.maximum(b0, 1e-6)[:, None]
    coeffs, _, orders = fit_sh(norm, bvecs[vols], lmax)
    out = np.zeros((*mask.shape, lmax // 2 + 1))
    out[mask] = rish(coeffs, orders)
    return out


# --------------------------------------------------------------------------- scale maps
def masked_smooth(data: np.ndarray, mask: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian smoothing normalized inside ``mask`` (last axis of ``data`` kept apart)."""
    if np.all(np.asarray(sigma_vox) == 0):
        return data.copy()
    weight = ndimage.gaussian_filter(mask.astype(float), sigma_vox)
    out = np.empty_like(data, dtype=float)
    for k in range(data.shape[-1]):
        num = ndimage.gaussian_filter(np.where(mask, data[..., k], 0.0), sigma_vox)
        out[..., k] = np.where(weight > 1e-6, num / np.maximum(weight, 1e-6), 0.0)
    return out


def scale_maps(
    target: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    mask: np.ndarray,
    *,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    smoothing_mm: float = 2.0,
    max_scale: float = 4.0,
) -> np.ndarray:
    """Scale maps ``smooth(mean reference RISH) / smooth(mean target RISH)`` per order.

    ``target`` and ``reference`` are the training subjects' RISH features (X, Y, Z, L),
    all on one grid. The ratio is clipped to ``[1 / max_scale, max_scale]`` and is 1
    outside ``mask``.
    """
    mask = np.asarray(mask, bool)
    sigma = float(smoothing_mm) / np.asarray(voxel_mm, dtype=float)
    ref = masked_smooth(np.mean(reference, axis=0), mask, sigma)
    tgt = masked_smooth(np.mean(target, axis=0), mask, sigma)
    eps = 1e-12
    scale = np.where(tgt > eps, ref / np.maximum(tgt, eps), 1.0)
    scale = np.clip(scale, 1.0 / max_scale, max_scale)
    scale[~mask] = 1.0
    return scale


def apply_scales(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    scales: dict[float, np.ndarray],
    lmax: dict[float, int],
    *,
    tolerance: float = B_TOLERANCE,
    keep_residual: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each shell's SH coefficients by ``sqrt(scale_l)`` and resynthesize.

    Parameters
    ----------
    scales
        ``{shell b-value: (X, Y, Z, lmax/2 + 1) scale maps on the DWI grid}``.
    lmax
        ``{shell b-value: SH order}`` of the trained model.

    Returns
    -------
    dwi, bvals, bvecs
        The b0 volumes and the harmonized shells (in the input's volume order); shells
        of the input without a scale map are left out.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    check_volumes(dwi.shape, bvals, source="The DWI to harmonize")
    bvecs = _bvecs(bvecs, bvals.size)
    mask = np.asarray(mask, bool)
    b0 = _mean_b0(dwi, bvals)[mask]
    keep = list(np.flatnonzero(bvals <= B0_THRESHOLD))
    out = np.asarray(dwi, dtype=np.float32).copy()
    for shell, scale in scales.items():
        vols = shell_volumes(bvals, shell, tolerance=tolerance)
        order = lmax[shell]
        if vols.size < n_coefficients(order):
            raise RISHInputError(
                f"The b={shell:g} shell has {vols.size} directions but the RISH model uses "
                f"SH order {order} ({n_coefficients(order)} coefficients); train the model "
                "with scans of this direction count."
            )
        signal = dwi[mask][:, vols].astype(float)
        norm = signal / np.maximum(b0, 1e-6)[:, None]
        coeffs, basis, orders = fit_sh(norm, bvecs[vols], order)
        factor = np.sqrt(np.maximum(scale[mask], 0.0))[:, orders // 2]
        new = (coeffs * factor) @ basis.T
        new = norm + new - coeffs @ basis.T if keep_residual else new
        # a floor keeps the log-signal of the DKI fit finite where resynthesis undershoots
        out_shell = np.maximum(new, MIN_NORMALIZED_SIGNAL) * b0[:, None]
        block = out[..., vols]
        block[mask] = out_shell.astype(np.float32)
        out[..., vols] = block
        keep += list(vols)
    keep = np.sort(np.asarray(keep, dtype=int))
    return out[..., keep], bvals[keep], bvecs[keep]


# -------------------------------------------------------------------- registration image
def dti_fa(dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray):
    """FA of a DTI fit (DIPY, WLS) to the b0s and the lowest shell: a registration image."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = _bvecs(bvecs, bvals.size)
    shells = find_shells(bvals)
    if not shells:
        raise RISHInputError("The DWI has no diffusion-weighted volume (b > 50 s/mm^2).")
    use = (bvals <= B0_THRESHOLD) | (np.abs(bvals - shells[0]) <= B_TOLERANCE)
    gtab = gradient_table(bvals[use], bvecs=bvecs[use], b0_threshold=B0_THRESHOLD)
    fit = TensorModel(gtab, fit_method="WLS").fit(dwi[..., use], mask=np.asarray(mask, bool))
    return np.nan_to_num(np.clip(fit.fa, 0, 1)).astype(np.float32)


# ----------------------------------------------------------------------------- the model
@dataclass
class RISHScan:
    """One DWI series in memory: data (X, Y, Z, N), gradients, mask and affine."""

    dwi: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    name: str = "DWI"
    fa: np.ndarray | None = None

    def registration_image(self) -> nb.Nifti1Image:
        fa = (
            self.fa if self.fa is not None else dti_fa(self.dwi, self.bvals, self.bvecs, self.mask)
        )
        return nb.Nifti1Image(np.asarray(fa, dtype=np.float32), self.affine)

    @classmethod
    def from_files(cls, dwi, bval, bvec, mask, fa=None) -> RISHScan:
        """Load a scan from NIfTI + FSL gradient files (and an optional FA map)."""
        img = nb.load(dwi)
        bvals, bvecs = read_gradients(bval, bvec)
        data = np.asarray(img.dataobj, dtype=np.float32)
        check_volumes(data.shape, bvals, source=str(dwi))
        mask_img = nb.load(mask)
        if mask_img.shape[:3] != img.shape[:3]:
            raise RISHInputError(
                f"{Path(mask).name} (grid {mask_img.shape[:3]}) is not on the grid of "
                f"{Path(dwi).name} ({img.shape[:3]}); give the DWI's own brain mask."
            )
        fa_data = None if fa is None else np.asarray(nb.load(fa).dataobj, dtype=np.float32)
        return cls(
            data, bvals, bvecs, np.asarray(mask_img.dataobj) > 0, img.affine, Path(dwi).name,
            fa_data,
        )  # fmt: skip


@dataclass
class RISHModel:
    """Scale maps of one target scanner on a template grid.

    ``scales`` is (X, Y, Z, n_shells, lmax_max/2 + 1); orders above a shell's ``lmax``
    hold 1.
    """

    shells: list[float]
    lmax: list[int]
    scales: np.ndarray
    affine: np.ndarray
    template: np.ndarray
    mask: np.ndarray
    options: dict = field(default_factory=dict)

    def shell_scales(self, k: int) -> np.ndarray:
        return self.scales[..., k, : self.lmax[k] // 2 + 1]

    def save(self, scales_file, template_file, card_file) -> None:
        """Write the scale maps, the template image (+ mask) and a JSON card."""
        nb.Nifti1Image(self.scales.astype(np.float32), self.affine).to_filename(scales_file)
        stack = np.stack([self.template, self.mask.astype(np.float32)], -1)
        nb.Nifti1Image(stack.astype(np.float32), self.affine).to_filename(template_file)
        card = {"shells": self.shells, "lmax": self.lmax, **self.options}
        Path(card_file).write_text(json.dumps(card, indent=2) + "\n")

    @classmethod
    def load(cls, scales_file, template_file, card_file) -> RISHModel:
        card = json.loads(Path(card_file).read_text())
        img = nb.load(scales_file)
        tpl = np.asarray(nb.load(template_file).dataobj, dtype=np.float32)
        shells, lmax = card.pop("shells"), card.pop("lmax")
        scales = np.asarray(img.dataobj, dtype=np.float32)
        if scales.ndim != 5 or scales.shape[3] != len(shells):
            raise RISHInputError(
                f"{Path(scales_file).name} has shape {scales.shape} but {Path(card_file).name} "
                f"lists {len(shells)} shells; use the files written together by TrainRISH."
            )
        return cls(shells, lmax, scales, img.affine, tpl[..., 0], tpl[..., 1] > 0.5, card)


def train_rish(
    targets: Sequence[RISHScan],
    references: Sequence[RISHScan],
    *,
    tolerance: float = B_TOLERANCE,
    smoothing_mm: float = 2.0,
    max_scale: float = 4.0,
    lmax: int | None = None,
    engine: str = "auto",
    n_threads: int = 1,
    n_jobs: int = 1,
    work_dir: str | os.PathLike | None = None,
) -> RISHModel:
    """Learn RISH scale maps (target -> reference scanner) from traveling subjects.

    Parameters
    ----------
    targets, references
        The target- and reference-scanner scans of the same training subjects, paired.
        The first reference scan is the template.
    tolerance
        Shells match when their b-values differ by at most this (s/mm^2).
    smoothing_mm, max_scale
        Smoothing of the mean RISH maps and clipping of their ratio (see module notes).
    lmax
        SH order to use on every shell (default: from the smallest direction count).
    engine, n_threads, n_jobs, work_dir
        Registration options (``n_jobs`` scans at once).
    """
    if len(targets) != len(references) or not targets:
        raise RISHInputError(
            f"RISH training needs paired scans of the same subjects: got {len(targets)} "
            f"target and {len(references)} reference scans."
        )
    target_shells = find_shells(targets[0].bvals, tolerance=tolerance)
    shells, orders = [], []
    for shell in target_shells:
        for scan in (*targets, *references):
            found = match_shell(shell, find_shells(scan.bvals, tolerance=tolerance),
                                tolerance=tolerance)  # fmt: skip
            if found is None:
                raise RISHInputError(
                    f"{scan.name} has no b={shell:g} shell (within {tolerance:g} s/mm^2) but "
                    f"the target scans do; RISH learns each target shell from the same shell "
                    "on both scanners."
                )
        counts = [
            shell_volumes(s.bvals, shell, tolerance=tolerance).size
            for s in (*targets, *references)
        ]
        order = lmax_for(min(counts)) if lmax is None else int(lmax)
        if n_coefficients(order) > min(counts):
            raise RISHInputError(
                f"lmax={order} needs {n_coefficients(order)} directions but a b={shell:g} "
                f"shell has {min(counts)}; lower lmax."
            )
        shells.append(shell)
        orders.append(order)
    scans = [*references, *targets]  # the template is references[0]
    images = [s.registration_image() for s in scans]
    space = build_common_space(
        images,
        [nb.Nifti1Image(s.mask.astype(np.uint8), s.affine) for s in scans],
        template=0,
        engine=engine,
        n_threads=n_threads,
        n_jobs=n_jobs,
        work_dir=work_dir,
    )
    common = space.common_mask
    n_ref = len(references)
    top = max(orders) // 2 + 1
    scales = np.ones((*space.shape, len(shells), top), dtype=np.float32)
    for k, (shell, order) in enumerate(zip(shells, orders, strict=True)):
        feats = []
        for i, scan in enumerate(scans):
            f = shell_rish(scan.dwi, scan.bvals, scan.bvecs, scan.mask, shell, order,
                           tolerance=tolerance)  # fmt: skip
            feats.append(space.to_template_space(i, f.astype(np.float32)))
        scales[..., k, : order // 2 + 1] = scale_maps(
            feats[n_ref:],
            feats[:n_ref],
            common,
            voxel_mm=voxel_sizes(space.affine),
            smoothing_mm=smoothing_mm,
            max_scale=max_scale,
        )
    options = {
        "b_tolerance": tolerance,
        "smoothing_mm": smoothing_mm,
        "max_scale": max_scale,
        "training_targets": [s.name for s in targets],
        "training_references": [s.name for s in references],
        "template": references[0].name,
    }
    template = np.asarray(images[0].dataobj, dtype=np.float32)
    return RISHModel(shells, orders, scales, space.affine, template, common, options)


def harmonize_dwi(
    model: RISHModel,
    scan: RISHScan,
    *,
    keep_residual: bool = True,
    engine: str = "auto",
    n_threads: int = 1,
    work_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RISH-harmonize a test scan of the target scanner with a trained model.

    The template is registered to the scan (non-linear), the scale maps are resampled
    onto the scan's grid, and :func:`apply_scales` does the rest.

    Raises
    ------
    RISHInputError
        If the scan has a shell that the model was not trained for.
    """
    tolerance = float(model.options.get("b_tolerance", B_TOLERANCE))
    scan_shells = find_shells(scan.bvals, tolerance=tolerance)
    extra = [s for s in scan_shells if match_shell(s, model.shells, tolerance=tolerance) is None]
    if extra:
        raise RISHInputError(
            f"{scan.name} has shell(s) b={', '.join(f'{s:g}' for s in extra)} that the RISH "
            f"model (shells {', '.join(f'{s:g}' for s in model.shells)}) was not trained "
            "for; train it on scans with the same shells."
        )
    reg = register(
        scan.registration_image(),
        nb.Nifti1Image(model.template, model.affine),
        engine=engine,
        n_threads=n_threads,
        work_dir=work_dir,
    )
    scales, lmax = {}, {}
    for k, shell in enumerate(model.shells):
        own = match_shell(shell, scan_shells, tolerance=tolerance)
        if own is None:
            continue  # a trained shell this scan lacks: nothing to harmonize
        img = nb.Nifti1Image(model.shell_scales(k), model.affine)
        # outside the template grid the resampling gives 0: no scaling there
        warped = np.asarray(resample(img, reg.deformation, scan.affine, cval=1.0).dataobj)
        scales[own], lmax[own] = warped, model.lmax[k]
    return apply_scales(
        scan.dwi, scan.bvals, scan.bvecs, scan.mask, scales, lmax,
        tolerance=tolerance, keep_residual=keep_residual,
    )  # fmt: skip
