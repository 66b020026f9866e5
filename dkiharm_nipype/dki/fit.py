"""Vectorized DKI fitting: OLS, WLS and robust IRLLS with outlier rejection.

All voxels of a chunk are solved at once with batched normal equations in torch: the
weighted normal matrices ``X^T diag(w) X`` of every voxel come from one GEMM of the
weights with the per-volume outer products of the design rows, followed by a batched
Cholesky solve. Memory is bounded by ``chunk_size`` voxels.

Methods
-------
``"ols"``
    Ordinary linear least squares on ``ln S`` (one shared pseudo-inverse).
``"wls"``
    Weighted linear least squares with weights ``Ŝ²`` from the OLS-predicted signal
    (Veraart et al. 2013), as dipy's ``fit_method="WLS"``.
``"irlls"``
    Iteratively reweighted linear least squares with outlier rejection, after the
    IRLLS of Collier et al. (2015) and REKINDLE (Tax et al. 2015):

    1. OLS, then WLS as above.
    2. Signal residuals ``e = S - Ŝ`` (homoscedastic for Gaussian noise, unlike the
       log-domain residuals, whose spread grows as the signal falls) and a robust noise
       estimate
       ``σ = 1.4826 MAD(e)`` per voxel. Voxels with no ``|e| > k σ`` keep the WLS fit
       (on clean data that is most voxels, which is where the speed comes from).
    3. Other voxels are re-fitted with Geman-McClure weights
       ``w = Ŝ² / (1 + (e / σ)²)²``, σ re-estimated each iteration, until the parameters
       change by less than ``tol`` (relative) or ``max_iter`` iterations.
    4. Measurements with ``|e| > k σ`` (``k = outlier_threshold``) are outliers; a final
       WLS (weights ``Ŝ²``) on the inliers gives the estimate. A voxel keeping fewer than
       ``23`` inliers, or whose inlier system is singular, keeps its robust fit.

Optional constraints (``constraints=True``), applied after the fit as a projection, not
as a constrained least-squares fit:

* eigenvalues of D below ``min_diffusivity`` are raised to it (D positive definite);
* directional kurtosis ``K(n) = MD² W(n) / D(n)²`` is brought into
  ``[kurtosis_range[0], kurtosis_range[1]]`` on 64 directions of a hemisphere by
  alternating projections (POCS, 20 rounds) between the box of clipped ``MD² W(n)``
  values and the 15-dimensional space of kurtosis tensors; voxels already inside are
  unchanged. Where POCS has not converged, the result is pulled towards a feasible
  isotropic kurtosis tensor just far enough to lie inside the bounds on all 64
  directions (K(n) between them is not bounded, so MK can exceed the upper bound by a
  fraction of a percent). The default range
  ``[0, 3]`` is dipy's ``mean_kurtosis`` clip; since MK is the spherical mean of K(n) it
  keeps MK inside it too (brain tissue has K(n) well below 3: the phantom's largest
  true RK is 2.0).
  This is the cheap counterpart of the constrained fits of Tabesh et al. (2011).

References
----------
Jensen JH et al. (2005) MRM 53:1432. Tabesh A et al. (2011) MRM 65:823.
Veraart J et al. (2013) NeuroImage 81:335. Collier Q et al. (2015) MRM 73:2174.
Tax CMW et al. (2015) MRM 73:794. Henriques RN et al. (2021) Front. Neurosci. (dipy DKI).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DkiharmInputError
from ..utils.dwi import B0_THRESHOLD
from ..utils.env import torch_threads
from .design import DT_ORDER, KT_ORDER, N_PARAMS, _monomials, design_matrix, params_to_tensors
from .maps import ALL_METRICS, dki_metrics, dt_to_matrix

#: Fit methods accepted by :func:`fit_dki`.
METHODS = ("ols", "wls", "irlls")


#: Largest plausible b-value in s/mm²; larger ones suggest s/m².
B_UNIT_MAX = 100_000.0

#: dipy's MIN_POSITIVE_SIGNAL: signals are clipped to this before the logarithm.
MIN_SIGNAL = 1e-4

_MAD_TO_SIGMA = 1.4826


class DKIInputError(DkiharmInputError):
    """Input that a DKI fit cannot use; the message says what is wrong and how to fix it."""


@dataclass
class DKIFit:
    """Result of :func:`fit_dki`; arrays have the spatial shape of the input.

    Attributes
    ----------
    s0 : (...) fitted non-weighted signal.
    dt : (..., 6) diffusion tensor (dipy lower-triangular order, mm²/s).
    kt : (..., 15) kurtosis tensor W (dipy order).
    mask : (...) bool, voxels that were fitted.
    outlier_fraction : (...) share of the used volumes rejected per voxel (IRLLS).
    outliers_per_volume : (N,) number of voxels in which each volume was rejected.
    volumes_used : (N,) bool, volumes within ``b_max``.
    sigma : (...) robust noise estimate 1.4826 MAD of the signal residuals (IRLLS; 0 else).
    n_iter : (...) robust iterations run per voxel (0: the WLS fit had no outlier).
    method : the fit method.
    outlier_mask : (..., N) bool, only when ``return_outlier_mask=True``.
    """

    s0: np.ndarray
    dt: np.ndarray
    kt: np.ndarray
    mask: np.ndarray
    outlier_fraction: np.ndarray
    outliers_per_volume: np.ndarray
    volumes_used: np.ndarray
    sigma: np.ndarray
    n_iter: np.ndarray
    method: str
    outlier_mask: np.ndarray | None = None
    options: dict = field(default_factory=dict)

    def metrics(
        self, metrics: Iterable[str] = ALL_METRICS, *, n_threads: int | None = None, **kwargs
    ) -> dict[str, np.ndarray]:
        """Scalar maps (see :func:`~dkiharm_nipype.dki.maps.dki_metrics`), 0 outside mask.

        ``n_threads`` voxel blocks are computed in parallel (default: the fit's threads).
        """
        metrics = tuple(metrics)
        dt, kt = self.dt[self.mask], self.kt[self.mask]
        workers = max(1, int(n_threads or self.options.get("n_threads") or 1))
        bounds = np.linspace(0, dt.shape[0], workers + 1).astype(int)

        def block(i: int) -> dict[str, np.ndarray]:
            sl = slice(bounds[i], bounds[i + 1])
            return dki_metrics(dt[sl], kt[sl], metrics, **kwargs)

        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(block, range(workers)))
        out = {}
        for name in metrics:
            full = np.zeros(self.mask.shape)
            full[self.mask] = np.concatenate([part[name] for part in parts])
            out[name] = full
        return out


# --------------------------------------------------------------------------- validation


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def validate_gradients(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    n_volumes: int | None = None,
    b_max: float | None = None,
    source: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a gradient table for DKI and return ``(bvals, unit bvecs (N, 3), used)``.

    Rules (each failure raises :class:`DKIInputError` with one sentence):

    * one b-value and one b-vector per volume (bvecs as (N, 3) or FSL's (3, N));
    * b-values finite and >= 0, in s/mm²: a largest b-value below 50 suggests ms/µm²
      (multiply by 1000), above 100000 suggests s/m² (divide by 1e6);
    * volumes with b <= 50 s/mm² count as b = 0 volumes for the shell rules; they keep
      their small b-value if their b-vector is a unit vector (as in dipy), else b is set
      to 0;
    * every diffusion-weighted volume needs a unit b-vector: zero vectors are an error,
      norms within 1 % of 1 are renormalized, others are an error;
    * ``b_max`` keeps volumes with ``b <= b_max + 50``;
    * the used volumes need a b = 0 or at least two non-zero shells (shells are b-values
      rounded to the nearest 100 s/mm²), and a design matrix of full rank 22.
    """
    where = _where(source)
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvals.ndim != 1:
        bvals = bvals.squeeze()
        if bvals.ndim != 1:
            raise DKIInputError(
                f"b-values{where} have shape {bvals.shape}; give one row or column of numbers."
            )
    n = bvals.size
    if bvecs.ndim == 2 and bvecs.shape[0] == 3 and bvecs.shape[1] == n and n != 3:
        bvecs = bvecs.T
    if bvecs.ndim != 2 or bvecs.shape[1] != 3:
        raise DKIInputError(
            f"b-vectors{where} have shape {bvecs.shape}; give three rows (FSL) or columns."
        )
    if bvecs.shape[0] != n:
        raise DKIInputError(
            f"Found {n} b-values but {bvecs.shape[0]} b-vectors{where}; the bval and bvec "
            "files must describe the same volumes."
        )
    if n_volumes is not None and n_volumes != n:
        raise DKIInputError(
            f"The image has {n_volumes} volumes but the gradient table{where} has {n} "
            "entries; use the bval/bvec files that belong to this image."
        )
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()):
        raise DKIInputError(f"The gradient table{where} contains NaN or Inf; fix the files.")
    if (bvals < 0).any():
        raise DKIInputError(
            f"Negative b-value {bvals.min():g}{where}; b-values must be >= 0 s/mm²."
        )
    if bvals.max() < B0_THRESHOLD:
        raise DKIInputError(
            f"The largest b-value{where} is {bvals.max():g}, which looks like ms/µm² (or only "
            "b = 0 volumes); give b-values in s/mm² (multiply by 1000)."
        )
    if bvals.max() > B_UNIT_MAX:
        raise DKIInputError(
            f"The largest b-value{where} is {bvals.max():g}, which looks like s/m²; give "
            "b-values in s/mm² (divide by 1e6)."
        )
    weighted = bvals > B0_THRESHOLD
    norms = np.linalg.norm(bvecs, axis=1)
    zero = weighted & (norms < 1e-6)
    if zero.any():
        i = int(np.flatnonzero(zero)[0])
        raise DKIInputError(
            f"Volume {i}{where} has b = {bvals[i]:g} s/mm² but a zero b-vector "
            f"({zero.sum()} such volumes); fix the bvec file or set their b-value to 0."
        )
    off = weighted & (np.abs(norms - 1.0) > 0.01)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DKIInputError(
            f"Volume {i}{where} has a b-vector of norm {norms[i]:.3f} ({off.sum()} "
            "diffusion-weighted volumes are not unit length); normalize the b-vectors and, "
            "if their length encoded the b-value, scale the b-values by the squared norm."
        )
    # Low-b volumes keep their small weighting when they come with a direction (as dipy).
    directed = weighted | (np.abs(norms - 1.0) <= 0.01)
    unit = np.zeros_like(bvecs)
    unit[directed] = bvecs[directed] / norms[directed, None]
    bvals = np.where(directed, bvals, 0.0)
    used = np.ones(n, dtype=bool) if b_max is None else bvals <= b_max + B0_THRESHOLD
    shells = np.unique(np.round(bvals[used & weighted], -2))
    if shells.size < 2:
        limit = "" if b_max is None else f" with b_max = {b_max:g}"
        raise DKIInputError(
            f"DKI needs at least two non-zero b-value shells, but the volumes{where}{limit} "
            f"have shells {shells.tolist()} s/mm²; use a multi-shell scan"
            + (" or raise b_max." if b_max is not None else ".")
        )
    if not (used & ~weighted).any() and shells.size < 3:
        raise DKIInputError(
            f"Without b = 0 volumes{where}, DKI needs three non-zero shells (found "
            f"{shells.tolist()} s/mm²); include the b = 0 volumes."
        )
    X = design_matrix(bvals[used], unit[used])
    rank = np.linalg.matrix_rank(X / np.abs(X).max(axis=0))
    if rank < N_PARAMS:
        raise DKIInputError(
            f"The {used.sum()} used volumes{where} determine only {rank} of the 22 DKI "
            "parameters; DKI needs at least 15 non-collinear directions on a shell and 2 "
            "shells."
        )
    return bvals, unit, used


def _validate_data(
    dwi: np.ndarray, mask: np.ndarray | None, *, source: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    where = _where(source)
    dwi = np.asarray(dwi)
    if dwi.ndim == 3:
        raise DKIInputError(
            f"The image{where} is 3-D {dwi.shape}; DKI needs a 4-D diffusion series "
            "(x, y, z, volumes)."
        )
    if dwi.ndim not in (2, 4):
        raise DKIInputError(
            f"The image{where} has shape {dwi.shape}; give a 4-D series (x, y, z, volumes) "
            "or a 2-D (voxels, volumes) array."
        )
    spatial = dwi.shape[:-1]
    if mask is None:
        mask = np.ones(spatial, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise DKIInputError(
                f"The mask has shape {mask.shape} but the image{where} has spatial shape "
                f"{spatial}; use a mask in the same space as the image."
            )
        mask = mask > 0
    if not mask.any():
        raise DKIInputError(
            f"The mask{where} is empty; give a mask with at least one voxel inside the brain."
        )
    if np.isfinite(dwi).all():  # one fast pass; locate the bad voxels only when needed
        return dwi, mask
    bad = ~np.isfinite(dwi[mask]).all(axis=-1)
    if bad.any():
        raise DKIInputError(
            f"{int(bad.sum())} voxels inside the mask{where} contain NaN or Inf; fix the image "
            "or exclude those voxels from the mask."
        )
    return dwi, mask


# --------------------------------------------------------------------------- solvers


class _Solver:
    """Batched (weighted) linear least squares with one fixed design matrix."""

    def __init__(self, X: np.ndarray, dtype: torch.dtype):
        # Column scaling keeps the normal equations well conditioned.
        self.scale = np.abs(X).max(axis=0)
        Xs = X / self.scale
        self.X = torch.as_tensor(Xs, dtype=dtype)
        # Contiguous transposes: torch's CPU matmul is much slower on transposed views.
        self.X_T = torch.as_tensor(np.ascontiguousarray(Xs.T), dtype=dtype)
        self.pinv_T = torch.as_tensor(np.ascontiguousarray(np.linalg.pinv(Xs).T), dtype=dtype)
        p = Xs.shape[1]
        # X^T diag(w) X for all voxels is one GEMM of the weights with the row outer products.
        outer = Xs[:, :, None] * Xs[:, None, :]
        self.outer = torch.as_tensor(outer.reshape(Xs.shape[0], p * p), dtype=dtype)
        self.p = p
        self.fallback = _Solver(X, torch.float64) if dtype != torch.float64 else None

    def ols(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.pinv_T

    def wls(self, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve per voxel; returns ``(beta, ok)`` with ok False where the system is singular."""
        n, p = y.shape[0], self.p
        w = w / w.amax(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        A = (w @ self.outer).reshape(n, p, p)
        rhs = ((w * y) @ self.X).unsqueeze(-1)
        L, info = torch.linalg.cholesky_ex(A)
        ok = info == 0
        beta = torch.cholesky_solve(rhs, L).squeeze(-1)
        # A singular voxel yields NaN; the caller keeps its previous estimate.
        ok &= torch.isfinite(beta).all(dim=1)
        if self.fallback is not None and not bool(ok.all()):
            # float32 normal equations can lose definiteness where float64 keeps it.
            bad = torch.nonzero(~ok).squeeze(1)
            b64, ok64 = self.fallback.wls(y[bad].double(), w[bad].double())
            beta[bad] = b64.to(beta.dtype)
            ok[bad] = ok64
        return beta, ok

    def predict(self, beta: torch.Tensor) -> torch.Tensor:
        return beta @ self.X_T

    def unscale(self, beta: torch.Tensor) -> np.ndarray:
        return beta.cpu().numpy().astype(np.float64) / self.scale


def _row_median(a: np.ndarray) -> np.ndarray:
    """Median of each row (numpy's introselect: several times faster than torch's sort)."""
    n = a.shape[1]
    half = n // 2
    if n % 2:
        return np.partition(a, half, axis=1)[:, half]
    # One selection, then the smallest of the upper half (two kth values cost 4x more).
    part = np.partition(a, half - 1, axis=1)
    return 0.5 * (part[:, half - 1] + part[:, half:].min(axis=1))


def _robust_sigma(e: torch.Tensor) -> torch.Tensor:
    """1.4826 × median absolute deviation per row."""
    a = e.numpy()
    dev = np.abs(a - _row_median(a)[:, None])
    return torch.from_numpy(_MAD_TO_SIGMA * _row_median(dev))


def _signal_residuals(solver: _Solver, y: torch.Tensor, beta: torch.Tensor):
    s_pred = solver.predict(beta).clamp(max=80.0).exp()
    return s_pred, y.exp() - s_pred


def _irlls_chunk(
    solver: _Solver,
    y: torch.Tensor,
    beta: torch.Tensor,
    *,
    threshold: float,
    max_iter: int,
    tol: float,
    gm_scale: float = 2.0,
    n_stages: int = 1,
):
    """Robust refinement of a WLS fit; returns ``(beta, outliers, sigma, n_iter)``."""
    n, N = y.shape
    s_pred, e = _signal_residuals(solver, y, beta)
    # Residuals of a fit with p parameters spread less than the noise: correct the MAD
    # by sqrt(N / (N - p)), and keep σ fixed afterwards, since re-estimating it from a
    # down-weighted fit lets the fit collapse onto a subset of the data.
    sigma = _robust_sigma(e) * (N / (N - N_PARAMS)) ** 0.5
    sigma = torch.maximum(sigma, 1e-6 * s_pred.amax(dim=1))
    outliers = torch.zeros((n, N), dtype=torch.bool)
    n_iter = torch.zeros(n, dtype=torch.int32)
    suspect = (e.abs() > threshold * sigma[:, None]).any(dim=1)
    idx = torch.nonzero(suspect).squeeze(1)
    if idx.numel() == 0:
        return beta, outliers, sigma, n_iter
    yi, bi = y[idx], beta[idx].clone()
    si, ei, sig = s_pred[idx], e[idx], sigma[idx]
    iters = torch.zeros(idx.numel(), dtype=torch.int32)
    dof = (N / (N - N_PARAMS)) ** 0.5
    for _stage in range(n_stages):
        active = torch.ones(idx.numel(), dtype=torch.bool)
        for _ in range(max_iter):
            a = torch.nonzero(active).squeeze(1)
            if a.numel() == 0:
                break
            w = si[a] ** 2 / (1.0 + (ei[a] / (gm_scale * sig[a, None])) ** 2) ** 2
            new, ok = solver.wls(yi[a], w)
            scale = bi[a].abs().amax(dim=1).clamp_min(1e-12)
            change = (new - bi[a]).abs().amax(dim=1) / scale
            upd = a[ok]
            bi[upd] = new[ok]
            iters[a] += 1
            si[upd], ei[upd] = _signal_residuals(solver, yi[upd], bi[upd])
            active[a] = ok & (change > tol)
        # The WLS-based σ is inflated where outliers distorted the WLS fit; re-estimate it
        # from the robust fit (never above the previous estimate).
        sig = torch.minimum(sig, torch.maximum(_robust_sigma(ei) * dof, 1e-6 * si.amax(dim=1)))
    out_i = ei.abs() > threshold * sig[:, None]
    inliers = (~out_i).sum(dim=1)
    has = out_i.any(dim=1) & (inliers > N_PARAMS)
    h = torch.nonzero(has).squeeze(1)
    if h.numel():
        final, ok = solver.wls(yi[h], si[h] ** 2 * (~out_i[h]))
        bi[h[ok]] = final[ok]
    out_i[~has] = False
    beta = beta.clone()
    beta[idx] = bi
    outliers[idx] = out_i
    sigma[idx] = sig
    n_iter[idx] = iters
    return beta, outliers, sigma, n_iter


# --------------------------------------------------------------------------- constraints


def _hemisphere(n: int = 64) -> np.ndarray:
    """``n`` near-uniform unit vectors on the upper hemisphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_DIRS = _hemisphere()
_KT_MONO = _monomials(_DIRS, KT_ORDER)  # (64, 15): W(n) = _KT_MONO @ kt
_DT_MONO = _monomials(_DIRS, DT_ORDER)  # (64, 6): D(n) = _DT_MONO @ dt
_KT_MONO_PINV = np.linalg.pinv(_KT_MONO)
#: Coefficients of the isotropic kurtosis tensor, W(n) = |n|⁴ = 1 on the sphere.
_KT_ISO = _KT_MONO_PINV @ np.ones(len(_DIRS))


def constrain_params(
    params: np.ndarray,
    *,
    min_diffusivity: float = 1e-5,
    kurtosis_range: tuple[float, float] = (0.0, 3.0),
    n_rounds: int = 20,
) -> np.ndarray:
    """Project linear-model parameters (n, 22) onto plausible tensors (see module notes)."""
    params = params.copy()
    # Eigenvalues >= m  <=>  D - m I is positive semi-definite: check all principal minors
    # (cheap), and decompose only the voxels that fail.
    xx, xy, yy, xz, yz, zz = (
        params[:, i] - (min_diffusivity if i in (1, 3, 6) else 0.0) for i in range(1, 7)
    )
    det = xx * (yy * zz - yz**2) - xy * (xy * zz - yz * xz) + xz * (xy * yz - yy * xz)
    low = (
        (np.minimum(np.minimum(xx, yy), zz) < 0)
        | (np.minimum(np.minimum(xx * yy - xy**2, xx * zz - xz**2), yy * zz - yz**2) < 0)
        | (det < 0)
    )
    if low.any():
        evals, evecs = np.linalg.eigh(dt_to_matrix(params[low, 1:7]))
        ev = np.maximum(evals, min_diffusivity)
        D = np.einsum("nij,nj,nkj->nik", evecs, ev, evecs)
        params[low, 1:7] = D[:, [0, 1, 1, 0, 1, 2], [0, 0, 1, 2, 2, 2]]
    # MD² W(n) must lie in [kmin, kmax] × D(n)², since K(n) = MD² W(n) / D(n)².
    # torch matmuls: they follow the torch thread setting, unlike numpy's BLAS pool.
    t = torch.from_numpy(params)
    mono, pinv_t = torch.from_numpy(_KT_MONO.T.copy()), torch.from_numpy(_KT_MONO_PINV.T.copy())
    d_dir = t[:, 1:7] @ torch.from_numpy(_DT_MONO.T.copy())
    lo, hi = kurtosis_range[0] * d_dir**2, kurtosis_range[1] * d_dir**2

    def inside(coef, lo, hi):
        a = coef @ mono
        return ((a >= lo - 1e-9 * hi) & (a <= hi * (1 + 1e-9))).all(dim=1)

    rows = torch.nonzero(~inside(t[:, 7:], lo, hi)).squeeze(1)
    coef, lo, hi = t[rows, 7:], lo[rows], hi[rows]
    # A round leaves a tensor that is already inside unchanged (mono has full column
    # rank), so converged rows need no bookkeeping: test and drop them every 5 rounds.
    for done_rounds in range(1, n_rounds + 1):
        if rows.numel() == 0:
            break
        coef = torch.clamp(coef @ mono, lo, hi) @ pinv_t
        if done_rounds % 5 == 0 and done_rounds < n_rounds:
            done = inside(coef, lo, hi)
            t[rows[done], 7:] = coef[done]
            rows, coef, lo, hi = rows[~done], coef[~done], lo[~done], hi[~done]
    if rows.numel():
        # POCS has not converged here: move from a feasible isotropic kurtosis tensor
        # towards the POCS result as far as the bounds allow (the bounds are linear in the
        # step), which lands inside on every sampled direction.
        iso = torch.from_numpy(_KT_ISO)
        v = torch.minimum((coef @ mono).mean(dim=1).clamp_min(0), hi.amin(dim=1))
        v = torch.maximum(v, lo.amax(dim=1))
        anchor = v[:, None] * iso
        step = (coef - anchor) @ mono
        base = v[:, None].expand_as(step)
        room = torch.where(step > 0, hi - base, lo - base)
        alpha = torch.where(step != 0, room / step, torch.ones_like(step)).amin(dim=1)
        coef = anchor + alpha.clamp(0, 1)[:, None] * (coef - anchor)
    t[rows, 7:] = coef
    return params


# --------------------------------------------------------------------------- entry point


def fit_dki(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    method: str = "irlls",
    b_max: float | None = None,
    constraints: bool = False,
    outlier_threshold: float = 3.5,
    max_iter: int = 5,
    tol: float = 1e-2,
    min_signal: float = MIN_SIGNAL,
    min_diffusivity: float = 1e-5,
    kurtosis_range: tuple[float, float] = (0.0, 3.0),
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 8192,
    n_threads: int | None = None,
    return_outlier_mask: bool = False,
    source: str = "",
) -> DKIFit:
    """Fit the DKI model to a diffusion series.

    Parameters
    ----------
    dwi : array (x, y, z, N) or (voxels, N)
        Diffusion-weighted signal.
    bvals, bvecs : array (N,), (N, 3) or (3, N)
        Gradient table in s/mm² (see :func:`validate_gradients` for the checks).
    mask : array (x, y, z), optional
        Voxels to fit (default: all).
    method : {"irlls", "wls", "ols"}
        See the module documentation.
    b_max : float, optional
        Use only volumes with b <= b_max (+50 s/mm² tolerance), e.g. 3000.
    constraints : bool
        Project the fit onto D >= ``min_diffusivity`` and directional kurtosis within
        ``kurtosis_range``.
    outlier_threshold : float
        IRLLS rejects measurements with ``|S - Ŝ| > outlier_threshold × σ``.
    max_iter, tol : int, float
        Robust iterations per voxel and the relative parameter change that stops them.
    min_signal : float
        Signals are clipped to this before the logarithm (dipy's default).
    dtype : torch.dtype
        Precision of the solves: ``torch.float32`` (default; accuracy to truth on the
        phantom is unchanged to 4 digits, and voxels whose float32 normal equations are
        not positive definite are re-solved in float64) or ``torch.float64``.
    chunk_size : int
        Voxels solved at once (memory ~ chunk_size × 22² × 8 bytes).
    n_threads : int, optional
        Chunks fitted in parallel (threads; default: torch's thread count).
    return_outlier_mask : bool
        Keep the (x, y, z, N) boolean outlier mask in the result.
    source : str
        Name of the input (e.g. a file name) quoted in error messages.

    Examples
    --------
    >>> from dkiharm_nipype.dki.simulate import random_tissue_tensors
    >>> from dkiharm_nipype.dki.design import dki_signal
    >>> rng = np.random.default_rng(0)
    >>> g = rng.normal(size=(30, 3)); g /= np.linalg.norm(g, axis=1, keepdims=True)
    >>> bvals = np.r_[0, 0, [1000] * 30, [2000] * 30]
    >>> bvecs = np.r_[np.zeros((2, 3)), g, g]
    >>> dt, kt = random_tissue_tensors(10, rng=0)
    >>> signal = dki_signal(np.full(10, 100.0), dt, kt, bvals, bvecs)
    >>> fit = fit_dki(signal, bvals, bvecs)
    >>> bool(np.abs(fit.kt - kt).max() < 1e-3 * np.abs(kt).max()), fit.method
    (True, 'irlls')
    >>> exact = fit_dki(signal, bvals, bvecs, dtype=torch.float64)
    >>> bool(np.allclose(exact.kt, kt, atol=1e-8))
    True
    """
    method = str(method).lower()
    if method not in METHODS:
        raise DKIInputError(f"Unknown fit method {method!r}; use one of {list(METHODS)}.")
    dwi, mask = _validate_data(dwi, mask, source=source)
    bvals, bvecs, used = validate_gradients(
        bvals, bvecs, n_volumes=dwi.shape[-1], b_max=b_max, source=source
    )
    X = design_matrix(bvals[used], bvecs[used])
    spatial = mask.shape
    n_total = dwi.shape[-1]
    coords = np.nonzero(mask)
    n_vox = coords[0].size
    params = np.empty((n_vox, N_PARAMS))
    sigma = np.zeros(n_vox)
    n_iter = np.zeros(n_vox, dtype=np.int32)
    outlier_count = np.zeros(n_vox, dtype=np.int32)
    outlier_rows = np.zeros((n_vox, n_total), dtype=bool) if return_outlier_mask else None
    used_idx = np.flatnonzero(used)
    options = {"threshold": outlier_threshold, "max_iter": max_iter, "tol": tol}
    projection = {"min_diffusivity": min_diffusivity, "kurtosis_range": kurtosis_range}

    np_dtype = np.float32 if dtype == torch.float32 else np.float64

    def fit_chunk(sl: slice) -> np.ndarray:
        # Gather the chunk's voxels (works for C- and Fortran-ordered images alike).
        signal = np.ascontiguousarray(dwi[tuple(c[sl] for c in coords)][:, used], np_dtype)
        y = torch.from_numpy(np.log(np.maximum(signal, np_dtype(min_signal))))
        beta = solver.ols(y)
        if method in ("wls", "irlls"):
            s_pred = solver.predict(beta).clamp(max=80.0).exp()
            new, ok = solver.wls(y, s_pred**2)
            beta = torch.where(ok[:, None], new, beta)
        per_volume = np.zeros(n_total, dtype=np.int64)
        if method == "irlls":
            # The robust refinement runs in float64: with down-weighted measurements the
            # normal equations lose the precision that float32 keeps for plain WLS.
            robust = solver.fallback or solver
            beta, out, sig, its = _irlls_chunk(robust, y.double(), beta.double(), **options)
            out_np = out.numpy()
            sigma[sl], n_iter[sl] = sig.numpy(), its.numpy()
            outlier_count[sl] = out_np.sum(axis=1)
            per_volume[used_idx] = out_np.sum(axis=0)
            if outlier_rows is not None:
                outlier_rows[sl][:, used_idx] = out_np
        chunk = solver.unscale(beta)
        if constraints:
            chunk = constrain_params(chunk, **projection)
        params[sl] = chunk
        return per_volume

    slices = [slice(i, min(i + chunk_size, n_vox)) for i in range(0, n_vox, chunk_size)]
    workers = max(1, min(int(n_threads or torch.get_num_threads()), len(slices)))
    # Chunks run in parallel threads with single-threaded torch ops: batched LAPACK
    # calls on 22 x 22 systems do not parallelize well inside torch, whole chunks do.
    with torch_threads(1 if workers > 1 else n_threads), torch.no_grad():
        solver = _Solver(X, dtype)
        if workers == 1:
            counts = [fit_chunk(sl) for sl in slices]
        else:
            with ThreadPoolExecutor(workers) as pool:
                counts = list(pool.map(fit_chunk, slices))
    per_volume = np.sum(counts, axis=0, dtype=np.int64)

    s0_v, dt_v, kt_v = params_to_tensors(params)

    def scatter(values: np.ndarray, dtype=np.float64) -> np.ndarray:
        full = np.zeros(spatial + values.shape[1:], dtype=dtype)
        full[mask] = values
        return full

    outlier_mask = None
    if outlier_rows is not None:
        outlier_mask = scatter(outlier_rows, bool)
    return DKIFit(
        s0=scatter(s0_v),
        dt=scatter(dt_v),
        kt=scatter(kt_v),
        mask=mask,
        outlier_fraction=scatter(outlier_count / used.sum()),
        outliers_per_volume=per_volume,
        volumes_used=used,
        sigma=scatter(sigma),
        n_iter=scatter(n_iter, np.int32),
        method=method,
        outlier_mask=outlier_mask,
        options={
            "b_max": b_max,
            "constraints": constraints,
            "outlier_threshold": outlier_threshold,
            "max_iter": max_iter,
            "min_diffusivity": min_diffusivity,
            "kurtosis_range": list(kurtosis_range),
            "n_threads": workers,
        },
    )
