"""Physically plausible diffusion/kurtosis tensors from Gaussian compartments.

A voxel made of non-exchanging Gaussian compartments with volume fractions ``f_c`` and
diffusion tensors ``D_c`` has (Jensen et al. 2005, eq. 8)::

    D = sum_c f_c D_c
    W_ijkl = 3 / MD^2 * [ sum_c f_c sym(D_c D_c)_ijkl - sym(D D)_ijkl ]

with ``sym(A B)_ijkl = (A_ij B_kl + A_ik B_jl + A_il B_jk) / 3``. Such W always gives
non-negative directional kurtosis, so these tensors are used as ground truth in the tests
and the benchmark.
"""

from __future__ import annotations

import numpy as np

from .design import DT_ORDER, KT_ORDER

_AXIS = {"x": 0, "y": 1, "z": 2}
_DT_IDX = tuple(np.array([[_AXIS[c] for c in name] for name in DT_ORDER]).T)
_KT_IDX = tuple(np.array([[_AXIS[c] for c in name] for name in KT_ORDER]).T)


def sym_outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Symmetrized ``(A_ij B_kl + A_ik B_jl + A_il B_jk) / 3`` in dipy's 15-element order."""
    i, j, k, ll = _KT_IDX
    return (
        a[..., i, j] * b[..., k, ll] + a[..., i, k] * b[..., j, ll] + a[..., i, ll] * b[..., j, k]
    ) / 3.0


def compartment_tensors(
    fractions: np.ndarray, tensors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion (..., 6) and kurtosis (..., 15) tensors of a compartment mixture.

    Parameters
    ----------
    fractions : array (..., C)
        Volume fractions, summing to 1 over the last axis.
    tensors : array (..., C, 3, 3)
        Compartment diffusion tensors in mm²/s.

    Examples
    --------
    >>> d = np.diag([1e-3, 1e-3, 1e-3])
    >>> dt, kt = compartment_tensors(np.array([0.5, 0.5]), np.stack([d, 2 * d]))
    >>> round(float(dt[0]), 6), round(float(kt[0]), 4)
    (0.0015, 0.3333)
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    tensors = np.asarray(tensors, dtype=np.float64)
    mean = np.einsum("...c,...cij->...ij", fractions, tensors)
    second = np.einsum("...c,...cn->...n", fractions, sym_outer(tensors, tensors))
    md = np.trace(mean, axis1=-2, axis2=-1) / 3.0
    kt = 3.0 * (second - sym_outer(mean, mean)) / md[..., None] ** 2
    return mean[..., _DT_IDX[0], _DT_IDX[1]], kt


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly distributed rotation matrices (n, 3, 3)."""
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    det = np.linalg.det(q)
    q[:, :, 0] *= det[:, None]
    return q


def random_tissue_tensors(
    n: int, *, rng: np.random.Generator | int = 0, kind: str = "mixed"
) -> tuple[np.ndarray, np.ndarray]:
    """Random plausible (dt, kt) for ``n`` voxels of white matter, grey matter or both.

    White matter: an intra-axonal stick (fraction 0.4-0.6) and an extra-axonal tensor
    sharing a random axis, plus a restricted isotropic pool. Grey matter: two nearly
    isotropic compartments plus the same pool.
    ``kind`` is ``"wm"``, ``"gm"`` or ``"mixed"`` (half each).
    """
    rng = np.random.default_rng(rng)
    if kind == "mixed":
        dt_w, kt_w = random_tissue_tensors(n - n // 2, rng=rng, kind="wm")
        dt_g, kt_g = random_tissue_tensors(n // 2, rng=rng, kind="gm")
        return np.concatenate([dt_w, dt_g]), np.concatenate([kt_w, kt_g])
    if kind == "wm":
        f = rng.uniform(0.4, 0.6, n)
        intra = np.stack([rng.uniform(2.0e-3, 2.4e-3, n), np.full(n, 5e-5), np.full(n, 5e-5)])
        extra_par = rng.uniform(1.0e-3, 1.4e-3, n)
        extra = np.stack([extra_par, rng.uniform(0.4e-3, 0.6e-3, n), np.full(n, 0.4e-3)])
    elif kind == "gm":
        f = rng.uniform(0.25, 0.45, n)
        base = rng.uniform(0.7e-3, 1.0e-3, n)
        shape = np.stack([np.full(n, 1.3), np.ones(n), np.ones(n)])
        intra = base * rng.uniform(0.3, 0.5, n) * shape
        extra = base * np.stack([np.full(n, 1.5), rng.uniform(1.2, 1.5, n), np.full(n, 1.3)])
    else:
        raise ValueError(f"Unknown tissue kind {kind!r}; use 'wm', 'gm' or 'mixed'.")
    rot = random_rotations(n, rng)
    d_intra = np.einsum("nij,jn,nkj->nik", rot, intra, rot)
    # Extra-axonal compartment shares the axis, with its perpendicular axes spun around it.
    d_extra = np.einsum("nij,jn,nkj->nik", rot, extra, rot)
    # A small restricted isotropic pool (f 0.05-0.15, D 0.1e-3) adds kurtosis along the
    # fibres too, giving white-matter AK ~0.6-1 as measured in vivo.
    f_dot = rng.uniform(0.05, 0.15, n)
    d_dot = np.eye(3) * 1e-4 * np.ones((n, 1, 1))
    fractions = np.stack([f * (1 - f_dot), (1.0 - f) * (1 - f_dot), f_dot], axis=-1)
    return compartment_tensors(fractions, np.stack([d_intra, d_extra, d_dot], axis=1))
