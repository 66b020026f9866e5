"""The linear DKI signal model: design matrix and parameter conversions.

The log signal of the diffusion kurtosis model (Jensen et al. 2005) is linear in 22
unknowns,

.. math::

    \\ln S(b, g) = \\ln S_0 - b \\sum_{ij} g_i g_j D_{ij}
                   + \\frac{b^2}{6} \\sum_{ijkl} g_i g_j g_k g_l \\, \\bar{D}^2 W_{ijkl},

so an ordinary linear fit estimates ``[ln S0, D (6), MD^2 W (15)]``; ``W`` is recovered by
dividing by the squared mean diffusivity ``MD = trace(D) / 3``. Element orders follow dipy
(``dipy.reconst.dki``): the diffusion tensor in lower-triangular order
``Dxx, Dxy, Dyy, Dxz, Dyz, Dzz`` and the kurtosis tensor as
``Wxxxx, Wyyyy, Wzzzz, Wxxxy, Wxxxz, Wxyyy, Wyyyz, Wxzzz, Wyzzz, Wxxyy, Wxxzz, Wyyzz,
Wxxyz, Wxyyz, Wxyzz``. Units: b in s/mm², diffusivities in mm²/s, W dimensionless.

Unlike dipy, whose last column is ``-1`` for ``-ln S0``, the first column here is ``+1``
for ``ln S0``.
"""

from __future__ import annotations

import numpy as np

#: Number of unknowns of the linear DKI model.
N_PARAMS = 22

#: Diffusion tensor element names in dipy's lower-triangular order.
DT_ORDER = ("xx", "xy", "yy", "xz", "yz", "zz")

#: Kurtosis tensor element names in dipy's order.
KT_ORDER = (
    "xxxx",
    "yyyy",
    "zzzz",
    "xxxy",
    "xxxz",
    "xyyy",
    "yyyz",
    "xzzz",
    "yzzz",
    "xxyy",
    "xxzz",
    "yyzz",
    "xxyz",
    "xyyz",
    "xyzz",
)

_AXIS = {"x": 0, "y": 1, "z": 2}


def _multiplicity(index: str) -> int:
    """Number of distinct permutations of a tensor index, e.g. 'xxyy' -> 6."""
    from math import factorial

    count = factorial(len(index))
    for axis in set(index):
        count //= factorial(index.count(axis))
    return count


def _monomials(bvecs: np.ndarray, order: tuple[str, ...]) -> np.ndarray:
    """Products of gradient components, times the symmetric multiplicity of each index."""
    cols = []
    for index in order:
        term = np.full(bvecs.shape[0], float(_multiplicity(index)))
        for axis in index:
            term = term * bvecs[:, _AXIS[axis]]
        cols.append(term)
    return np.stack(cols, axis=-1)


def design_matrix(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Build the (N, 22) DKI design matrix.

    Parameters
    ----------
    bvals : array (N,)
        b-values in s/mm².
    bvecs : array (N, 3) or (3, N)
        Unit gradient directions (any vector for b = 0 volumes).

    Returns
    -------
    X : array (N, 22)
        Columns ``[1, -b g g^T (6, dipy lower-triangular order with the off-diagonal
        factor 2), b^2/6 g^4 (15, dipy W order with the symmetric multiplicities)]`` so that
        ``ln S = X @ [ln S0, D, MD^2 W]``.

    Examples
    --------
    >>> X = design_matrix(np.array([0, 1000.0]), np.array([[0, 0, 0], [1.0, 0, 0]]))
    >>> X.shape, float(X[1, 1]), float(X[1, 7])
    ((2, 22), -1000.0, 166666.66666666666)
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.ndim == 2 and bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    if bvecs.ndim != 2 or bvecs.shape != (bvals.size, 3):
        raise ValueError(
            f"bvecs of shape {bvecs.shape} do not match {bvals.size} b-values; "
            "pass an (N, 3) or (3, N) array with one direction per b-value."
        )
    X = np.empty((bvals.size, N_PARAMS))
    X[:, 0] = 1.0
    X[:, 1:7] = -bvals[:, None] * _monomials(bvecs, DT_ORDER)
    X[:, 7:] = (bvals[:, None] ** 2 / 6.0) * _monomials(bvecs, KT_ORDER)
    return X


def mean_diffusivity_from_dt(dt: np.ndarray) -> np.ndarray:
    """Mean diffusivity ``trace(D) / 3`` from lower-triangular tensor elements (..., 6)."""
    dt = np.asarray(dt)
    return (dt[..., 0] + dt[..., 2] + dt[..., 5]) / 3.0


def params_to_tensors(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split linear-model parameters (..., 22) into ``(S0, dt (..., 6), kt (..., 15))``.

    ``kt`` is W, i.e. the fitted ``MD^2 W`` divided by the squared mean diffusivity; where
    ``MD <= 0`` (an unphysical fit) W is set to 0, as dipy does.
    """
    params = np.asarray(params)
    s0 = np.exp(params[..., 0])
    dt = params[..., 1:7]
    md2 = mean_diffusivity_from_dt(dt) ** 2
    positive = mean_diffusivity_from_dt(dt) > 0
    safe = np.where(positive, md2, 1.0)
    kt = np.where(positive[..., None], params[..., 7:] / safe[..., None], 0.0)
    return s0, dt, kt


def tensors_to_params(s0: np.ndarray, dt: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`params_to_tensors`: ``(S0, dt, kt)`` to parameters (..., 22)."""
    s0 = np.asarray(s0, dtype=np.float64)
    dt = np.asarray(dt, dtype=np.float64)
    kt = np.asarray(kt, dtype=np.float64)
    md2 = mean_diffusivity_from_dt(dt) ** 2
    return np.concatenate([np.log(s0)[..., None], dt, kt * md2[..., None]], axis=-1)


def dki_signal(
    s0: np.ndarray,
    dt: np.ndarray,
    kt: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
) -> np.ndarray:
    """Noise-free DKI signal (..., N) for tensors with leading shape (...).

    ``S = S0 exp(-b D(g) + b^2 MD^2 K(g) / 6)`` with ``D(g) = g^T D g`` and
    ``MD^2 K(g) = sum g_i g_j g_k g_l MD^2 W_ijkl`` (Jensen et al. 2005).
    """
    X = design_matrix(bvals, bvecs)
    return np.exp(tensors_to_params(s0, dt, kt) @ X.T)
