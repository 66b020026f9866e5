"""Compartment model of the phantom's diffusion signal and its DKI ground truth.

Each fibre population is a sum of an intra-axonal "stick" (a zeppelin with a small radial
diffusivity) and an extra-axonal zeppelin whose diffusivity is Gamma-distributed
(shape ``kappa``), the statistical model of Yablonskiy et al. (2003) that gives the
compartment its own kurtosis ``3 / kappa`` as tissue heterogeneity and dispersion do;
isotropic free water is added per tissue. Every compartment carries its own T2 and T1,
so the signal fractions at the scan's echo and repetition times are

.. math:: f_c(TE, TR) \\propto f_c \\, e^{-TE/T_{2,c}} (1 - e^{-TR/T_{1,c}}),

and the apparent kurtosis of a voxel changes with TE as it does on real scanners
(Veraart et al. 2018 measured a longer T2 inside axons than outside).

Focal lesions (:class:`~dkiharm_nipype.phantom.anatomy.Lesion`) turn a share of a voxel's
tissue water into free water (oedema) and move a share of the intra-axonal signal to the
extra-axonal compartment (axonal loss), in proportion to the lesion weight.

White-matter populations (callosal, projection, association, background) have their own
intra-axonal fraction and a spatially varying orientation dispersion ``mu = <(n.e)^2>``,
applied to each compartment's tensor as its orientation average; this brings the WM KFA
to the in vivo range (~0.3-0.6, wide spread) and the inter-scanner KFA CV to the paper's
range (docs/phantom.md, "KFA calibration").

Ground truth
------------
A multi-exponential signal is not exactly a DKI signal, so the ground truth of a scan is
*defined* as the DKI representation of its noise-free, artefact-free signal at the scan's
TE/TR: a weighted log-linear least-squares fit on the dense :func:`canonical_scheme`
(b = 0, 1000, 2000, 3000 s/mm², 48 directions per shell, 9 b0) with weights ``S^2``, the
noise-free signal squared. This is the infinite-SNR limit of the WLLS/IRLLS estimators used
in practice (Veraart et al. 2013; dipy ``WLS``). An unweighted fit is not used because a
compartment signal is not exactly a DKI signal: ordinary and weighted fits of the same
noise-free signal then differ by 3-5 % in MK, whereas the weighted truth is reproduced by
a weighted fit of any well-sampled b <= 3000 protocol within ~0.5 %. The shared design
matrix makes the fit one batched 22 x 22 solve per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..dki.design import design_matrix, params_to_tensors
from ..dki.maps import ALL_METRICS, dki_metrics
from .anatomy import AnatomySample, SubjectAnatomy

#: Diffusivity of free water at body temperature, mm²/s.
D_FREE = 3.0e-3

#: Template tissue parameters (diffusivities in mm²/s, times in ms). ``f_intra`` is the
#: intra-axonal share of the non-free water, ``kappa`` the Gamma shape of the extra-axonal
#: diffusivity distribution (its excess kurtosis is 3 / kappa).
TISSUE_PARAMS: dict[str, dict[str, float]] = {
    "wm": dict(
        pd=0.69,
        f_free=0.0,
        t1=850.0,
        t2_intra=80.0,
        t2_extra=52.0,
        f_intra=0.5,
        d_a=2.4e-3,
        d_ar=0.1e-3,
        de_par=1.4e-3,
        de_perp=0.6e-3,
        kappa=1.5,
    ),
    "wm_bg": dict(
        f_intra=0.32,
        d_a=2.2e-3,
        d_ar=0.45e-3,
        de_par=1.0e-3,
        de_perp=0.8e-3,
        kappa=1.3,
        mu=0.75,
        mu_spread=0.14,
    ),
    # per-bundle overrides of "wm": intra-axonal fraction and orientation coherence
    # ``mu = <(n . e)^2>`` (1: parallel axons, 1/3: isotropic) with its spatial spread
    "wm_cc": dict(f_intra=0.56, mu=0.88, mu_spread=0.08),
    "wm_proj": dict(f_intra=0.50, mu=0.82, mu_spread=0.1),
    "wm_assoc": dict(f_intra=0.46, mu=0.78, mu_spread=0.1),
    "gm": dict(
        pd=0.80,
        f_free=0.03,
        t1=1350.0,
        t2_intra=90.0,
        t2_extra=75.0,
        f_intra=0.25,
        d_a=1.9e-3,
        d_ar=0.15e-3,
        de_par=1.15e-3,
        de_perp=0.9e-3,
        kappa=3.0,
    ),
    "sgm": dict(
        pd=0.78,
        f_free=0.02,
        t1=1150.0,
        t2_intra=70.0,
        t2_extra=58.0,
        f_intra=0.32,
        d_a=1.9e-3,
        d_ar=0.1e-3,
        de_par=1.1e-3,
        de_perp=0.75e-3,
        kappa=3.5,
    ),
    "free": dict(t1=4000.0, t2=1200.0),
    "csf": dict(pd=1.0),
    "scalp": dict(pd=0.35, t1=800.0, t2=40.0, d=1.0e-3),
}

#: Global intensity so that WM b0 lands near 1000 at TE ~80 ms (int16 storage).
S0_SCALE = 4000.0


def _relax(te: float, tr: float, t2: float, t1: float) -> float:
    return float(np.exp(-te / t2) * (1.0 - np.exp(-tr / t1)))


@dataclass
class _Group:
    """One fibre population on the voxels where it is present."""

    idx: np.ndarray  # (n,) voxel indices
    n: np.ndarray  # (3, n) directions
    a_intra: np.ndarray  # (n,) signal amplitude of the intra-axonal compartment
    a_extra: np.ndarray
    d_a: np.ndarray
    d_ar: np.ndarray
    de_par: np.ndarray
    de_perp: np.ndarray
    kappa: np.ndarray


@dataclass
class VoxelModel:
    """Signal coefficients of N voxels at one TE/TR, ready to evaluate any b-table."""

    n_voxels: int
    groups: list[_Group]
    a_free: np.ndarray  # (N,) free-water amplitude
    a_scalp: np.ndarray  # (N,) scalp amplitude
    _grad_id: int | None = None
    _grad_cache: dict | None = None

    def b0(self) -> np.ndarray:
        """Noise-free b = 0 signal."""
        return self.volume(0.0, np.array([1.0, 0.0, 0.0]))

    def _gradient_terms(self, grad: np.ndarray) -> dict:
        """Per-voxel terms of the effective b-matrix, computed once per gradient tensor.

        With ``L`` the coil tensor, ``b_eff = b g^T Q g`` (``Q = L^T L``) and the squared
        projection on a fibre ``n`` is ``b_eff (Lg.n / |Lg|)^2 = b (g . L^T n)^2``, so each
        volume only needs ``Q`` (6 components) and ``m = L^T n`` per population.
        """
        if self._grad_id == id(grad):
            return self._grad_cache
        q = np.einsum("nki,nkj->nij", grad, grad)
        qv = np.stack([q[:, 0, 0], q[:, 1, 1], q[:, 2, 2], q[:, 0, 1], q[:, 0, 2], q[:, 1, 2]])
        groups = []
        for grp in self.groups:
            lt = grad[grp.idx]  # (n, 3, 3)
            m = np.einsum("nki,kn->in", lt, grp.n)  # (3, n) = L^T n
            groups.append((np.ascontiguousarray(m), np.ascontiguousarray(qv[:, grp.idx])))
        self._grad_id, self._grad_cache = id(grad), {"q": qv, "groups": groups}
        return self._grad_cache

    def volume(self, b: float, g: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
        """Signal (N,) for one nominal b-value and direction.

        ``grad`` (N, 3, 3), if given, is the per-voxel gradient coil tensor ``L``: the
        effective gradient is ``L g``, the effective b-value ``b |L g|^2`` (Bammer et al.
        2003), which models b-value miscalibration and gradient non-linearity.
        """
        g = np.asarray(g, dtype=np.float32)
        bf = np.float32(b)
        if b == 0:
            out = self.a_free + self.a_scalp
            for grp in self.groups:
                out[grp.idx] += grp.a_intra + grp.a_extra
            return out

        def quad(qv):
            g0, g1, g2 = (float(v) for v in g)
            return (
                g0 * g0 * qv[0]
                + g1 * g1 * qv[1]
                + g2 * g2 * qv[2]
                + 2 * g0 * g1 * qv[3]
                + 2 * g0 * g2 * qv[4]
                + 2 * g1 * g2 * qv[5]
            )

        terms = None if grad is None else self._gradient_terms(grad)
        beff = bf if terms is None else bf * quad(terms["q"])
        out = self.a_free * np.exp(-beff * np.float32(D_FREE))
        out += self.a_scalp * np.exp(-beff * np.float32(TISSUE_PARAMS["scalp"]["d"]))
        for k, grp in enumerate(self.groups):
            if terms is None:
                m, bn = grp.n, bf
            else:
                m, qv = terms["groups"][k]
                bn = bf * quad(qv)  # b_eff of these voxels
            c = g[0] * m[0] + g[1] * m[1] + g[2] * m[2]
            bc2 = bf * c * c  # b_eff times the squared cosine to the fibre
            e_in = np.exp(-(bn * grp.d_ar + bc2 * (grp.d_a - grp.d_ar)))
            bde = bn * grp.de_perp + bc2 * (grp.de_par - grp.de_perp)
            # (1 + b D / kappa)^-kappa; log(1 + x) is ~4x faster than log1p in float32 and
            # exact enough here (x > 1e-3 wherever the term matters)
            e_ex = np.exp(-grp.kappa * np.log(1 + bde / grp.kappa))
            out[grp.idx] += grp.a_intra * e_in + grp.a_extra * e_ex
        return out

    def signals(self, bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
        """Signal (N, M) for a whole b-table (no gradient imperfections)."""
        out = np.empty((self.n_voxels, len(bvals)), dtype=np.float32)
        for j, (b, g) in enumerate(zip(bvals, bvecs, strict=True)):
            out[:, j] = self.volume(float(b), g)
        return out


def prepare(
    sample: AnatomySample,
    subject: SubjectAnatomy,
    *,
    te_ms: float,
    tr_ms: float,
    min_fraction: float = 1e-4,
) -> VoxelModel:
    """Turn an anatomy sample (with fibres) into signal coefficients at one TE/TR."""
    p = TISSUE_PARAMS
    sp = subject.params
    tis = sample.tissues
    n_vox = tis.shape[0]
    tex = sample.texture if sample.texture is not None else np.zeros(n_vox, np.float32)
    free = p["free"]
    r_free = _relax(te_ms, tr_ms, free["t2"], free["t1"])
    a_free = tis[:, 3] * p["csf"]["pd"] * r_free
    sc = p["scalp"]
    a_scalp = tis[:, 4] * sc["pd"] * _relax(te_ms, tr_ms, sc["t2"], sc["t1"])
    groups: list[_Group] = []

    tex2 = sample.texture2 if sample.texture2 is not None else np.zeros(n_vox, np.float32)
    lesion = sample.lesion is not None

    def add(frac, dirs, par, tissue):
        sel = np.flatnonzero(frac > min_fraction)
        if sel.size == 0:
            return
        t = p[tissue]
        f_free = min(t["f_free"] * sp.get("f_free", 1.0), 0.5)
        f_in = np.clip(par["f_intra"] * sp.get("f_intra", 1.0) * (1 + 0.06 * tex[sel]), 0.05, 0.9)
        amp = frac[sel] * t["pd"] * (1 - f_free)
        if lesion:  # axonal loss; oedema turns a share of the tissue water into free water
            f_in = f_in * (1 - sample.lesion_loss[sel])
            amp = amp * (1 - sample.lesion_free[sel])
        r_in = _relax(te_ms, tr_ms, t["t2_intra"], t["t1"])
        r_ex = _relax(te_ms, tr_ms, t["t2_extra"], t["t1"])
        dax = sp.get("d_axial", 1.0) * (1 + 0.02 * tex[sel])
        dex = sp.get("d_extra", 1.0) * (1 - 0.03 * tex[sel])
        ones = np.ones(sel.size, np.float32)
        d_a, d_ar = par["d_a"] * dax, par["d_ar"] * ones
        de_par, de_perp = par["de_par"] * dex, par["de_perp"] * dex
        if "mu" in par:
            # Orientation dispersion: an axially symmetric fibre-orientation distribution
            # with <(n . e)^2> = mu averages each compartment's tensor to
            # D_par' = mu D_par + (1 - mu) D_perp, D_perp' = ((1 - mu) D_par + (1 + mu) D_perp) / 2
            mu = np.clip(par["mu"] + par["mu_spread"] * 2.0 * tex2[sel], 0.4, 0.98)
            d_a, d_ar = mu * d_a + (1 - mu) * d_ar, ((1 - mu) * d_a + (1 + mu) * d_ar) / 2
            de_par, de_perp = (
                mu * de_par + (1 - mu) * de_perp,
                ((1 - mu) * de_par + (1 + mu) * de_perp) / 2,
            )
        kappa = par["kappa"] * sp.get("heterogeneity", 1.0) * ones
        if lesion:  # a damaged extra-axonal space is more homogeneous (less kurtosis)
            kappa = kappa * (1 + 4 * sample.lesion_loss[sel])
        groups.append(
            _Group(
                idx=sel,
                n=np.ascontiguousarray(dirs[sel].T, dtype=np.float32),
                a_intra=(amp * f_in * r_in).astype(np.float32),
                a_extra=(amp * (1 - f_in) * r_ex).astype(np.float32),
                d_a=np.asarray(d_a, np.float32),
                d_ar=np.asarray(d_ar, np.float32),
                de_par=np.asarray(de_par, np.float32),
                de_perp=np.asarray(de_perp, np.float32),
                kappa=kappa.astype(np.float32),
            )
        )
        return f_free

    w = sample.weights
    for k, pop in enumerate(("wm_cc", "wm_proj", "wm_assoc", "wm_bg")):
        add(tis[:, 0] * w[:, k], sample.directions[:, k], {**p["wm"], **p[pop]}, "wm")
    add(tis[:, 1], sample.radial, p["gm"], "gm")
    add(tis[:, 2], sample.directions[:, 1], p["sgm"], "sgm")
    for tissue, col in (("wm", 0), ("gm", 1), ("sgm", 2)):
        t = p[tissue]
        f_free = min(t["f_free"] * sp.get("f_free", 1.0), 0.5)
        if lesion:
            f_free = f_free + (1 - f_free) * sample.lesion_free
        a_free = a_free + tis[:, col] * t["pd"] * f_free * r_free
    scale = np.float32(S0_SCALE)
    for grp in groups:
        grp.a_intra *= scale
        grp.a_extra *= scale
    return VoxelModel(
        n_voxels=n_vox,
        groups=groups,
        a_free=(a_free * scale).astype(np.float32),
        a_scalp=(a_scalp * scale).astype(np.float32),
    )


@lru_cache(maxsize=4)
def canonical_scheme(n_dirs: int = 48, n_b0: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """The dense b-table that defines the ground truth: b = 0/1000/2000/3000 s/mm²."""
    from .scanners import shell_directions

    dirs = shell_directions(n_dirs, seed=20240601)
    bvals = np.concatenate([np.zeros(n_b0)] + [np.full(n_dirs, b) for b in (1000, 2000, 3000)])
    bvecs = np.concatenate([np.tile([[1.0, 0, 0]], (n_b0, 1))] + [dirs] * 3)
    return bvals, bvecs


def fit_wlls(
    signals: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, *, chunk: int = 20000
) -> np.ndarray:
    """Log-linear DKI parameters (N, 22) of noise-free signals, weights ``S^2``.

    The design matrix is shared: columns are scaled to unit maximum for conditioning, the
    weighted normal matrices of all voxels come from one matrix product with the
    column-pair products, and a batched solve finishes the fit.
    """
    x = design_matrix(bvals, bvecs)
    scale = np.abs(x).max(0)
    xs = x / scale
    n_par = xs.shape[1]
    # All n_par² products: one GEMM fills the normal matrices (scattering only the unique
    # half costs more than the redundant multiplications).
    outer = (xs[:, :, None] * xs[:, None, :]).reshape(len(xs), n_par * n_par)
    out = np.empty((signals.shape[0], n_par))
    for i in range(0, signals.shape[0], chunk):
        s = np.maximum(signals[i : i + chunk].astype(np.float64), 1e-6)
        w = (s / s.max(1, keepdims=True)) ** 2
        a = (w @ outer).reshape(len(s), n_par, n_par)
        rhs = (w * np.log(s)) @ xs
        out[i : i + chunk] = np.linalg.solve(a, rhs[..., None])[..., 0]
    return out / scale


def truth_dki(
    model: VoxelModel,
    *,
    metrics: tuple[str, ...] = ALL_METRICS,
    min_s0: float = 1.0,
) -> dict[str, np.ndarray]:
    """Ground-truth DKI maps (N,) of a voxel model, 0 where the b0 signal is negligible."""
    bvals, bvecs = canonical_scheme()
    sig = model.signals(bvals, bvecs)
    valid = sig[:, 0] > min_s0
    params = fit_wlls(sig[valid], bvals, bvecs)
    _, dt, kt = params_to_tensors(params)
    maps = dki_metrics(dt, kt, metrics)
    out = {}
    for name in metrics:
        full = np.zeros(model.n_voxels, np.float32)
        full[valid] = maps[name]
        out[name] = full
    return out
