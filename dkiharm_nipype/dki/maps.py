"""Scalar maps of the diffusion and kurtosis tensors, vectorized over voxels.

The definitions are dipy's (``dipy.reconst.dki``, Henriques et al. 2021), so maps from
:func:`dki_metrics` can replace ``DiffusionKurtosisFit.md/.ad/.rd/.fa/.mk()/.ak()/.rk()/
.kfa`` voxel for voxel:

* eigenvalues of D are sorted in decreasing order and clipped at ``min_diffusivity``
  (0 by default, like ``dipy.reconst.dti.decompose_tensor``); MD, AD = λ1,
  RD = (λ2 + λ3) / 2 and FA use the clipped eigenvalues;
* MK, RK and AK use the analytical solutions of Tabesh et al. (2011) with W rotated into
  the eigenframe of D, including the handling of dipy's default (Cython, ``fast=True``)
  code of (near-)equal eigenvalues (a pair within 2.5 % uses the limit formula) and of
  non-positive eigenvalues (any eigenvalue <= 2e-7 mm²/s gives 0);
* MK, AK and RK are then clipped to ``[min_kurtosis, max_kurtosis]``, by default
  ``[-3/7, 10]`` as in ``DiffusionKurtosisFit.mk/ak/rk`` (the module-level
  ``dipy.reconst.dki.mean_kurtosis`` uses ``max_kurtosis=3``; pass it to match that);
  ``None`` disables either bound;
* KFA is Glenn et al. (2015)'s ``||W - MKT I||_F / ||W||_F``, 0 where the kurtosis
  tensor mean is <= 1e-8, unclipped.

Carlson's elliptic integrals come from ``scipy.special.elliprf/elliprd`` (machine
precision). dipy stops its Carlson iterations at a tolerance that leaves ~1e-5 relative
error in R_F, which the 1 / ((λ1-λ2)(λ1-λ3)) factor of F1 amplifies near the 2.5 %
branch limits; MK therefore agrees with dipy to ~1e-3 absolute at worst and far better
typically, and with a dense spherical quadrature of K(n) more closely than dipy does
(measured in ``tests/test_dki_metrics.py``). AD, RD, MD, FA, AK, RK and KFA agree with
dipy to ~1e-12 relative.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.special import elliprd, elliprf

from .design import KT_ORDER, _monomials

#: Every map :func:`dki_metrics` can compute.
ALL_METRICS = ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")

_KURTOSIS_MAPS = {"mk", "ak", "rk"}
# dipy's thresholds (dki._positive_evals, _F1m/_F2m, _G1m/_G2m)
_POSITIVE_EVAL = 2e-7
_EQUAL_F = 2.5e-2

_LOWER_TRI = np.array([[0, 1, 3], [1, 2, 4], [3, 4, 5]])


def dt_to_matrix(dt: np.ndarray) -> np.ndarray:
    """Lower-triangular elements (..., 6) to symmetric matrices (..., 3, 3)."""
    return np.asarray(dt)[..., _LOWER_TRI]


def _quartic(kt: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Directional kurtosis tensor ``W(v) = sum_ijkl W_ijkl v_i v_j v_k v_l`` per voxel."""
    return np.einsum("nk,nk->n", _monomials(v, KT_ORDER), kt)


def _carlson(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Carlson's symmetric elliptic integrals ``(R_F, R_D)`` to machine precision."""
    return elliprf(x, y, z), elliprd(x, y, z)


def _carlson_dipy(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dipy's truncated Carlson iterations (``errtol`` 3e-4 for R_F, 1e-4 for R_D).

    Vectorized copy of ``dipy.reconst.dkispeed.carlson_rf_single/carlson_rd_single`` to
    reproduce dipy's maps exactly; the truncation leaves ~1e-5 relative error in R_F.
    """

    def duplicate(x, y, z, a0, q, rd):
        xn, yn, zn, an = x.copy(), y.copy(), z.copy(), a0.copy()
        total, n = np.zeros_like(x), np.zeros_like(x)
        active = q > np.abs(an)
        while active.any():
            sx, sy, sz = np.sqrt(xn[active]), np.sqrt(yn[active]), np.sqrt(zn[active])
            lam = sx * (sy + sz) + sy * sz
            if rd:
                total[active] += 4.0 ** -n[active] / (sz * (zn[active] + lam))
            n[active] += 1
            for arr in (xn, yn, zn, an):
                arr[active] = (arr[active] + lam) * 0.25
            active = 4.0**-n * q > np.abs(an)
        return an, n, total

    a0 = (x + y + z) / 3.0
    q = (3.0 * 3e-4) ** (-1.0 / 6.0) * np.maximum.reduce([abs(a0 - x), abs(a0 - y), abs(a0 - z)])
    an, n, _ = duplicate(x, y, z, a0, q, False)
    xn_over = 4.0**-n
    X = (a0 - x) * xn_over / an
    Y = (a0 - y) * xn_over / an
    Z = -X - Y
    e2, e3 = X * Y - Z * Z, X * Y * Z
    rf = an**-0.5 * (1.0 - e2 / 10.0 + e3 / 14.0 + e2 * e2 / 24.0 - 3.0 / 44.0 * e2 * e3)

    a0 = (x + y + 3.0 * z) / 5.0
    q = (1e-4 / 4.0) ** (-1.0 / 6.0) * np.maximum.reduce([abs(a0 - x), abs(a0 - y), abs(a0 - z)])
    an, n, total = duplicate(x, y, z, a0, q, True)
    X = (a0 - x) / (4.0**n * an)
    Y = (a0 - y) / (4.0**n * an)
    Z = -(X + Y) / 3.0
    e2 = X * Y - 6.0 * Z * Z
    e3 = (3.0 * X * Y - 8.0 * Z * Z) * Z
    e4 = 3.0 * (X * Y - Z * Z) * Z * Z
    e5 = X * Y * Z * Z * Z
    series = (
        1.0
        - 3.0 / 14.0 * e2
        + e3 / 6.0
        + 9.0 / 88.0 * e2 * e2
        - 3.0 / 22.0 * e4
        - 9.0 / 52.0 * e2 * e3
        + 3.0 / 26.0 * e5
    )
    rd = 4.0**-n * an**-1.5 * series + 3.0 * total
    return rf, rd


def _positive(a, b, c):
    return (a > _POSITIVE_EVAL) & (b > _POSITIVE_EVAL) & (c > _POSITIVE_EVAL)


def _rf_rd(a: np.ndarray, b: np.ndarray, c: np.ndarray, carlson=_carlson):
    """``R_F(a/b, a/c, 1)`` and ``R_D(a/b, a/c, 1)``, shared by F1(a, b, c) and F2(a, b, c)."""
    rf, rd = np.zeros_like(a), np.zeros_like(a)
    ok = _positive(a, b, c)
    if ok.any():
        rf[ok], rd[ok] = carlson(a[ok] / b[ok], a[ok] / c[ok], np.ones(int(ok.sum())))
    return rf, rd


def _f1(a: np.ndarray, b: np.ndarray, c: np.ndarray, rf: np.ndarray, rd: np.ndarray):
    """Tabesh et al. (2011) F1 with dipy's limits for equal eigenvalues (dki._F1m).

    ``rf, rd`` come from :func:`_rf_rd` with the same arguments.
    """
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    dab, dac = abs(a - b), abs(a - c)
    near_b, near_c = dab < a * _EQUAL_F, dac < a * _EQUAL_F
    general = ok & ~near_b & ~near_c
    if general.any():
        L1, L2, L3 = a[general], b[general], c[general]
        RF, RD = rf[general], rd[general]
        out[general] = (
            (L1 + L2 + L3) ** 2
            / (18 * (L1 - L2) * (L1 - L3))
            * (
                np.sqrt(L2 * L3) / L1 * RF
                + (3 * L1**2 - L1 * L2 - L1 * L3 - L2 * L3) / (3 * L1 * np.sqrt(L2 * L3)) * RD
                - 1
            )
        )
    ab = ok & near_b & ~near_c
    if ab.any():
        L1 = (a[ab] + b[ab]) / 2.0
        out[ab] = _f2_axial(c[ab], L1) / 2.0
    ac = ok & near_c & ~near_b
    if ac.any():
        L1 = (a[ac] + c[ac]) / 2.0
        out[ac] = _f2_axial(b[ac], L1) / 2.0
    out[ok & near_b & near_c] = 1 / 5.0
    return out


def _f2_axial(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """F2(a, b, b), the limit of dipy's F2 for two equal eigenvalues (positive inputs)."""
    out = np.full_like(a, 6 / 15.0)
    distinct = abs(a - b) >= b * _EQUAL_F
    L1, L3 = a[distinct], b[distinct]
    x = 1.0 - L1 / L3
    sq = np.sqrt(abs(x))
    with np.errstate(invalid="ignore", divide="ignore"):  # np.where evaluates both branches
        alpha = np.where(x > 0, np.arctanh(sq) / sq, np.arctan(sq) / sq)
    out[distinct] = (
        6.0
        * ((L1 + 2.0 * L3) ** 2)
        / (144.0 * L3**2 * (L1 - L3) ** 2)
        * (L3 * (L1 + 2.0 * L3) + L1 * (L1 - 4.0 * L3) * alpha)
    )
    return out


def _f2(a: np.ndarray, b: np.ndarray, c: np.ndarray, rf: np.ndarray, rd: np.ndarray):
    """Tabesh et al. (2011) F2 with dipy's limits for equal eigenvalues (dki._F2m).

    ``rf, rd`` come from :func:`_rf_rd` with the same arguments.
    """
    out = np.zeros_like(a)
    ok = _positive(a, b, c)
    general = ok & (abs(b - c) >= b * _EQUAL_F)
    if general.any():
        L1, L2, L3 = a[general], b[general], c[general]
        out[general] = (((L1 + L2 + L3) ** 2) / (3.0 * (L2 - L3) ** 2)) * (
            ((L2 + L3) / np.sqrt(L2 * L3)) * rf[general]
            + ((2.0 * L1 - L2 - L3) / (3.0 * np.sqrt(L2 * L3))) * rd[general]
            - 2.0
        )
    near = ok & ~general
    if near.any():
        out[near] = _f2_axial(a[near], (b[near] + c[near]) / 2.0)
    return out


def _g1(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Tabesh et al. (2011) G1 with dipy's limit for b ~ c (dkispeed.G1m_single)."""
    ok = _positive(a, b, c)
    general = ok & (abs(b - c) >= b * _EQUAL_F)
    b = np.where(ok, b, 1.0)
    c = np.where(general, c, 0.5 * b)  # any value away from b keeps the masked branch finite
    g = (
        (a + b + c) ** 2
        / (18 * b * (b - c) ** 2)
        * (2.0 * b + (c**2 - 3 * b * c) / np.sqrt(b * c))
    )
    limit = (a + 2.0 * b) ** 2 / (24.0 * b**2)
    return np.where(general, g, np.where(ok, limit, 0.0))


def _g2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Tabesh et al. (2011) G2 with dipy's limit for b ~ c (dkispeed.G2m_single)."""
    ok = _positive(a, b, c)
    general = ok & (abs(b - c) >= b * _EQUAL_F)
    b = np.where(ok, b, 1.0)
    c = np.where(general, c, 0.5 * b)
    g = (a + b + c) ** 2 / (3 * (b - c) ** 2) * ((b + c) / np.sqrt(b * c) - 2)
    limit = (a + 2.0 * b) ** 2 / (12.0 * b**2)
    return np.where(general, g, np.where(ok, limit, 0.0))


def _clip(values: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    return np.clip(values, -np.inf if lo is None else lo, np.inf if hi is None else hi)


def kurtosis_fractional_anisotropy(kt: np.ndarray) -> np.ndarray:
    """KFA of Glenn et al. (2015), as ``dipy.reconst.dki.kurtosis_fractional_anisotropy``."""
    kt = np.asarray(kt, dtype=np.float64)
    w = kt[..., :3]
    cross = kt[..., 3:9]
    pairs = kt[..., 9:12]
    triple = kt[..., 12:15]
    mkt = (w.sum(-1) + 2 * pairs.sum(-1)) / 5.0
    common = 4 * (cross**2).sum(-1) + 12 * (triple**2).sum(-1)
    num = (
        ((w - mkt[..., None]) ** 2).sum(-1)
        + 6 * ((pairs - mkt[..., None] / 3) ** 2).sum(-1)
        + common
    )
    den = (w**2).sum(-1) + 6 * (pairs**2).sum(-1) + common
    valid = (den > 0) & (mkt > 1e-8)
    return np.where(valid, np.sqrt(np.where(valid, num, 0.0) / np.where(valid, den, 1.0)), 0.0)


def dki_metrics(
    dt: np.ndarray,
    kt: np.ndarray,
    metrics: Iterable[str] = ALL_METRICS,
    *,
    min_kurtosis: float | None = -3.0 / 7,
    max_kurtosis: float | None = 10.0,
    min_diffusivity: float = 0.0,
    dipy_compat: bool = False,
) -> dict[str, np.ndarray]:
    """Diffusion and kurtosis scalar maps with dipy's definitions.

    Parameters
    ----------
    dt : array (..., 6)
        Diffusion tensor in dipy's lower-triangular order, mm²/s.
    kt : array (..., 15)
        Kurtosis tensor W in dipy's order.
    metrics : iterable of str
        Any of ``md, ad, rd, fa, mk, ak, rk, kfa``.
    min_kurtosis, max_kurtosis : float or None
        Clipping range of MK, AK and RK (dipy ``DiffusionKurtosisFit`` defaults).
    min_diffusivity : float
        Eigenvalues of D below this are raised to it before any map is computed.
    dipy_compat : bool
        Evaluate Carlson's integrals with dipy's truncated iterations so MK equals dipy's
        to ~1e-12; the default exact integrals are more accurate (dipy's MK is off the
        exact spherical mean of K(n) by up to ~2e-2 on white-matter tensors).

    Returns
    -------
    dict
        One float64 array of the leading shape per requested metric.

    Notes
    -----
    MK (Tabesh et al. 2011, eq. 12)::

        MK = F1(λ1,λ2,λ3) Ŵ1111 + F1(λ2,λ1,λ3) Ŵ2222 + F1(λ3,λ2,λ1) Ŵ3333
           + F2(λ1,λ2,λ3) Ŵ2233 + F2(λ2,λ1,λ3) Ŵ1133 + F2(λ3,λ2,λ1) Ŵ1122

    AK = Ŵ1111 MD² / λ1² and RK = G1(λ1,λ2,λ3) Ŵ2222 + G1(λ1,λ3,λ2) Ŵ3333
    + G2(λ1,λ2,λ3) Ŵ2233, where Ŵ is W in the eigenvector frame of D.

    Examples
    --------
    >>> dt = np.array([1.7e-3, 0, 0.3e-3, 0, 0, 0.3e-3])
    >>> kt = np.zeros(15); kt[:3] = 1.0; kt[9:12] = 1 / 3
    >>> m = dki_metrics(dt, kt, ("md", "fa", "kfa"))
    >>> round(float(m["md"]), 7), round(float(m["fa"]), 3), round(float(m["kfa"]), 6)
    (0.0007667, 0.799, 0.0)
    """
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"Unknown DKI metric(s) {unknown}; choose from {list(ALL_METRICS)}.")
    dt = np.asarray(dt, dtype=np.float64)
    kt = np.asarray(kt, dtype=np.float64)
    shape = dt.shape[:-1]
    if dt.shape[-1] != 6 or kt.shape != shape + (15,):
        raise ValueError(
            f"Expected dt (..., 6) and kt (..., 15) with the same leading shape, got "
            f"{dt.shape} and {kt.shape}; pass dipy-ordered tensor elements."
        )
    dt = dt.reshape(-1, 6)
    kt = kt.reshape(-1, 15)
    out: dict[str, np.ndarray] = {}

    need_eigen = set(metrics) - {"kfa"}
    if need_eigen:
        evals, evecs = np.linalg.eigh(dt_to_matrix(dt))
        evals = np.maximum(evals[:, ::-1], min_diffusivity)  # decreasing, like dipy
        evecs = evecs[:, :, ::-1]
        l1, l2, l3 = evals[:, 0], evals[:, 1], evals[:, 2]
        md = evals.mean(-1)
        if "md" in metrics:
            out["md"] = md
        if "ad" in metrics:
            out["ad"] = l1
        if "rd" in metrics:
            out["rd"] = (l2 + l3) / 2.0
        if "fa" in metrics:
            num = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
            den = (evals**2).sum(-1)
            out["fa"] = np.sqrt(0.5 * num / np.where(den > 0, den, 1.0)) * (den > 0)

    if need_eigen & _KURTOSIS_MAPS:
        # W in the eigenframe: only Ŵaaaa = W(e_a) and Ŵaabb enter MK/AK/RK, with
        # W(v) = sum W_ijkl v_i v_j v_k v_l and the polarization identity
        # Ŵaabb = [W(e_a + e_b) + W(e_a - e_b) - 2 W(e_a) - 2 W(e_b)] / 12.
        e1, e2, e3 = evecs[:, :, 0], evecs[:, :, 1], evecs[:, :, 2]
        w1111, w2222, w3333 = (_quartic(kt, e) for e in (e1, e2, e3))

        def pair(u, v, wu, wv):
            return (_quartic(kt, u + v) + _quartic(kt, u - v) - 2 * wu - 2 * wv) / 12.0

        w1122 = pair(e1, e2, w1111, w2222)
        w1133 = pair(e1, e3, w1111, w3333)
        w2233 = pair(e2, e3, w2222, w3333)
        positive = _positive(l1, l2, l3)
        if "mk" in metrics:
            carlson = _carlson_dipy if dipy_compat else _carlson
            mk = np.zeros_like(l1)
            for (a, b, c), w_aaaa, w_bbcc in (
                ((l1, l2, l3), w1111, w2233),
                ((l2, l1, l3), w2222, w1133),
                ((l3, l2, l1), w3333, w1122),
            ):
                rf, rd = _rf_rd(a, b, c, carlson)
                mk += _f1(a, b, c, rf, rd) * w_aaaa + _f2(a, b, c, rf, rd) * w_bbcc
            out["mk"] = _clip(mk, min_kurtosis, max_kurtosis)
        if "ak" in metrics:
            safe = np.where(positive, l1, 1.0)
            ak = np.where(positive, w1111 * md**2 / safe**2, 0.0)
            out["ak"] = _clip(ak, min_kurtosis, max_kurtosis)
        if "rk" in metrics:
            rk = _g1(l1, l2, l3) * w2222 + _g1(l1, l3, l2) * w3333 + _g2(l1, l2, l3) * w2233
            out["rk"] = _clip(rk, min_kurtosis, max_kurtosis)
    if "kfa" in metrics:
        out["kfa"] = kurtosis_fractional_anisotropy(kt)
    return {name: out[name].reshape(shape) for name in metrics}
