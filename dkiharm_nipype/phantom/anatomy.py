"""Head and brain geometry of the traveling-subject phantom.

The brain is described analytically in a *template* frame of normalised coordinates
``u = (x, y, z) / radii`` (RAS, brain ellipsoid of radius 1), so that it can be evaluated
at any point: on a coarse grid for ground truth, on a finer grid for Gibbs ringing, at
EPI-distorted positions or under a rigid head movement, without resampling.

A subject is the template seen through a smooth random deformation and a random brain
size; fibre directions are carried through the deformation with its Jacobian.

A subject can carry focal :class:`Lesion` s, spheres placed in the template frame: like
every other structure they are evaluated through the subject's deformation and each
visit's head pose, so a lesion sits at the same anatomical place in every scan.

White matter holds three fibre systems whose layout follows the 15 ICBM-DTI-81 regions
used in the paper (Mori et al. 2008):

* commissural: the corpus callosum arch (genu, body, splenium), left-right with the
  forceps bending anteriorly/posteriorly and the radiation rising laterally;
* projection: cerebral peduncle -> internal capsule (anterior limb, posterior limb,
  retrolenticular part) -> corona radiata (anterior, superior, posterior), a fan that
  runs inferior-superior;
* association: cingulum, superior longitudinal fasciculus, external capsule, sagittal
  stratum and posterior thalamic radiation, anterior-posterior tubes.

The corona radiata, the lateral callosal radiation and the SLF overlap, which gives
genuine two- and three-way crossings. WM outside the bundles carries a weaker
"background" population oriented towards the cortex.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: The 15 white-matter ROIs of the paper (ICBM-DTI-81 names): (index, abbreviation, name).
ROIS: tuple[tuple[int, str, str], ...] = (
    (1, "GCC", "Genu of corpus callosum"),
    (2, "BCC", "Body of corpus callosum"),
    (3, "SCC", "Splenium of corpus callosum"),
    (4, "CP", "Cerebral peduncle"),
    (5, "ALIC", "Anterior limb of internal capsule"),
    (6, "PLIC", "Posterior limb of internal capsule"),
    (7, "RLIC", "Retrolenticular part of internal capsule"),
    (8, "PTR", "Posterior thalamic radiation"),
    (9, "SS", "Sagittal stratum"),
    (10, "EC", "External capsule"),
    (11, "ACR", "Anterior corona radiata"),
    (12, "SCR", "Superior corona radiata"),
    (13, "PCR", "Posterior corona radiata"),
    (14, "CgC", "Cingulum (cingulate gyrus)"),
    (15, "SLF", "Superior longitudinal fasciculus"),
)
ROI_INDEX = {abbr: idx for idx, abbr, _ in ROIS}

#: Tissue classes carried by every anatomy sample (columns of ``AnatomySample.tissues``).
TISSUES = ("wm", "gm", "sgm", "csf", "scalp")

#: Fibre populations of an anatomy sample, in this order.
POPULATIONS = ("cc", "proj", "assoc", "bg")

# Association tubes: name -> (x_centre(y), z_centre(y), rx, rz, y0, y1); functions of y.
_TUBES = {
    "SLF": (lambda y: 0.40 + 0 * y, lambda y: 0.33 - 0.12 * y**2, 0.065, 0.08, -0.52, 0.36),
    "CgC": (
        lambda y: 0.085 + 0 * y,
        lambda y: 0.12 + 0.29 * np.sqrt(np.clip(1 - (y / 0.52) ** 2, 0, None)),
        0.04,
        0.05,
        -0.46,
        0.42,
    ),
    "EC": (lambda y: 0.425 + 0 * y, lambda y: -0.05 + 0 * y, 0.03, 0.11, -0.12, 0.32),
    "SS": (lambda y: 0.43 + 0 * y, lambda y: -0.22 + 0.1 * (y + 0.05), 0.05, 0.09, -0.72, -0.08),
    "PTR": (lambda y: 0.24 - 0.3 * (y + 0.2), lambda y: 0.03 + 0 * y, 0.05, 0.07, -0.72, -0.18),
}


@dataclass(frozen=True)
class Lesion:
    """A focal white-matter lesion: a soft sphere of one subject's tissue.

    ``centre`` is in normalised template coordinates (the brain ellipsoid has radius 1).
    The default lies in the right hemisphere's deep white matter, lateral to the external
    capsule, at the level of the grid centre (so partial-coverage slabs hold it), where the
    surrounding white matter is homogeneous: without any lesion effect the core differs from
    the ring around it by < 5 % in every map. ``radius_mm`` is the core radius (0.6 mm
    boundary blur, as the tissues). In the core a share ``free_water`` of the tissue water
    becomes free water (vasogenic oedema), a share ``intra_loss`` of the intra-axonal signal
    moves to the extra-axonal space (axonal loss) and the extra-axonal Gamma shape grows by
    ``1 + 4 intra_loss`` (a damaged, more homogeneous space: less kurtosis); all fade out
    with the boundary. Defaults, truth at TE 60 ms (``hard``): MD +63 %, FA -57 %, MK -17 %,
    RK -13 % against the surrounding WM
    (:func:`dkiharm_nipype.evaluation.scores.lesion_contrast`).
    """

    subject: int
    centre: tuple[float, float, float] = (0.62, 0.1, -0.1)
    radius_mm: float = 6.0
    free_water: float = 0.3
    intra_loss: float = 0.5

    def __post_init__(self):
        if not 0.5 <= self.radius_mm <= 40.0:
            raise ValueError(
                f"lesion radius {self.radius_mm} mm is outside [0.5, 40] mm; give e.g. 6."
            )
        for name in ("free_water", "intra_loss"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"lesion {name} {value} is outside [0, 1]; give e.g. 0.35.")


@dataclass(frozen=True)
class SubjectAnatomy:
    """One virtual subject: brain size, smooth deformation and tissue-parameter variation.

    ``modes`` is a (K, 7) array of deformation modes ``(wx, wy, wz, phase, ax, ay, az)``:
    displacement ``d(u) = sum_k a_k sin(w_k . u + phase_k)`` in normalised units.
    """

    radii_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    modes: np.ndarray
    texture: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    age: int = 25
    sex: str = "F"
    lesions: tuple[Lesion, ...] = ()


def make_subject(
    rng: np.random.Generator,
    radii_mm: tuple[float, float, float],
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    *,
    deformation: float = 0.03,
    variability: float = 1.0,
) -> SubjectAnatomy:
    """Draw a subject: brain size +-4 %, ~3 % smooth deformation, tissue-parameter multipliers.

    The parameter multipliers scale the template values of
    :mod:`dkiharm_nipype.phantom.microstructure` (intra-axonal fraction, diffusivities,
    extra-axonal heterogeneity, free water); their spread follows the between-subject
    variation of WM biophysical parameters reported in healthy adults (a few percent).
    """
    scale = 1.0 + 0.04 * rng.standard_normal(3).clip(-2, 2)
    radii = tuple(float(r * s) for r, s in zip(radii_mm, scale, strict=True))
    n_modes = 8
    w = rng.normal(0.0, 2.2, size=(n_modes, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(n_modes, 1))
    amp = rng.normal(0.0, deformation / np.sqrt(n_modes / 3), size=(n_modes, 3))
    modes = np.concatenate([w, phase, amp], axis=1)
    tex_w = rng.normal(0.0, 3.0, size=(6, 3))
    tex_p = rng.uniform(0, 2 * np.pi, size=(6, 1))
    tex_a = rng.normal(0.0, 1.0, size=(6, 1))
    texture = np.concatenate([tex_w, tex_p, tex_a], axis=1)
    v = variability
    params = {
        "f_intra": float(1 + v * 0.05 * rng.standard_normal()),
        "d_axial": float(1 + v * 0.03 * rng.standard_normal()),
        "d_extra": float(1 + v * 0.04 * rng.standard_normal()),
        "heterogeneity": float(1 + v * 0.06 * rng.standard_normal()),
        "f_free": float(1 + v * 0.15 * rng.standard_normal()),
    }
    return SubjectAnatomy(
        radii_mm=radii,
        centre_mm=tuple(float(c) for c in centre_mm),
        modes=modes,
        texture=texture,
        params=params,
        age=int(rng.integers(22, 30)),
        sex=str(rng.choice(["F", "M"])),
    )


@dataclass
class AnatomySample:
    """Tissue fractions, fibre populations and labels at N points (float32 arrays)."""

    tissues: np.ndarray  # (N, 5) fractions in TISSUES order; skull/air is the remainder
    weights: np.ndarray | None = None  # (N, 4) WM population weights, POPULATIONS order
    directions: np.ndarray | None = None  # (N, 4, 3) unit fibre directions (subject mm frame)
    radial: np.ndarray | None = None  # (N, 3) unit direction towards the cortex
    texture: np.ndarray | None = None  # (N,) smooth relative variation of tissue parameters
    texture2: np.ndarray | None = None  # (N,) a second, independent smooth field (dispersion)
    labels: np.ndarray | None = None  # (N,) ROI index (0 = none)
    lesion: np.ndarray | None = None  # (N,) lesion weight in [0, 1] (subjects with lesions)
    lesion_free: np.ndarray | None = None  # (N,) free-water share added by the lesion
    lesion_loss: np.ndarray | None = None  # (N,) share of intra-axonal signal lost


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _deform(subject: SubjectAnatomy, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template coordinates of subject points and the Jacobian of the map (N, 3, 3)."""
    m = subject.modes.astype(np.float32)
    arg = u @ np.ascontiguousarray(m[:, :3].T) + m[:, 3]  # (N, K)
    s, c = np.sin(arg), np.cos(arg)
    ut = u + s @ np.ascontiguousarray(m[:, 4:7])
    outer = (m[:, 4:7, None] * m[:, None, :3]).reshape(len(m), 9)  # a_k w_k^T
    jac = (c @ outer).reshape(-1, 3, 3) + np.eye(3)
    return ut.astype(np.float32), jac.astype(np.float32)


def _ellipsoid(u: np.ndarray, centre, semi) -> np.ndarray:
    d = (u - np.asarray(centre, dtype=np.float32)) / np.asarray(semi, dtype=np.float32)
    return np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 2] ** 2)


def _inv3(m: np.ndarray) -> np.ndarray:
    """Inverse of (N, 3, 3) matrices by the adjugate (much faster than batched LAPACK)."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    g, h, i = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    co = np.empty_like(m)
    co[:, 0, 0] = e * i - f * h
    co[:, 0, 1] = c * h - b * i
    co[:, 0, 2] = b * f - c * e
    co[:, 1, 0] = f * g - d * i
    co[:, 1, 1] = a * i - c * g
    co[:, 1, 2] = c * d - a * f
    co[:, 2, 0] = d * h - e * g
    co[:, 2, 1] = b * g - a * h
    co[:, 2, 2] = a * e - b * d
    det = a * co[:, 0, 0] + b * co[:, 1, 0] + c * co[:, 2, 0]
    return co / det[:, None, None]


def max_displacement(subject: SubjectAnatomy) -> float:
    """Upper bound of the deformation's displacement (normalised units)."""
    return float(np.linalg.norm(subject.modes[:, 4:7], axis=1).sum())


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _add_lesions(
    sample: AnatomySample, subject: SubjectAnatomy, ut: np.ndarray, radii, edge_mm: float
) -> None:
    """Lesion weight, added free water and intra-axonal loss at the points (template ``ut``)."""
    n = len(ut)
    weight = np.zeros(n, np.float32)
    free = np.zeros(n, np.float32)
    loss = np.zeros(n, np.float32)
    for lesion in subject.lesions:
        d_mm = np.linalg.norm((ut - np.asarray(lesion.centre, np.float32)) * radii, axis=1)
        w = _sigmoid((np.float32(lesion.radius_mm) - d_mm) / np.float32(edge_mm))
        weight = np.maximum(weight, w)
        free = np.maximum(free, np.float32(lesion.free_water) * w)
        loss = np.maximum(loss, np.float32(lesion.intra_loss) * w)
    sample.lesion, sample.lesion_free, sample.lesion_loss = weight, free, loss


def evaluate(
    subject: SubjectAnatomy,
    xyz_mm: np.ndarray,
    *,
    edge_mm: float = 0.6,
    fibres: bool = True,
    labels: bool = False,
) -> AnatomySample:
    """Evaluate the subject's anatomy at points ``xyz_mm`` (N, 3) of subject space (mm, RAS).

    Parameters
    ----------
    edge_mm : float
        Width of the tissue boundaries (a sub-voxel blur of the continuous object).
    fibres : bool
        Also compute fibre populations, parameter texture and the radial direction.
    labels : bool
        Also compute the ROI label of each point.
    """
    radii = np.asarray(subject.radii_mm, dtype=np.float32)
    u = ((np.asarray(xyz_mm, dtype=np.float32) - np.asarray(subject.centre_mm)) / radii).astype(
        np.float32
    )
    ut, jac = _deform(subject, u)
    x, y, z = ut[:, 0], ut[:, 1], ut[:, 2]
    ax = np.abs(x)
    # Convert normalised distances to mm for the boundary blur.
    k = float(np.min(radii)) / edge_mm

    def inside(dist_norm: np.ndarray) -> np.ndarray:
        """Soft indicator of ``dist_norm < 0`` (negative inside)."""
        return _sigmoid(-k * dist_norm)

    rho = np.sqrt(x * x + y * y + z * z)
    theta = np.arctan2(y, x)
    phi = np.arccos(np.clip(z / np.maximum(rho, 1e-6), -1, 1))
    gyri = np.sin(9 * theta) * np.sin(7 * phi) + 0.5 * np.sin(5 * theta + 3 * phi)
    head = inside(rho - 1.20)
    skull = inside(rho - 1.13)
    outer_csf = inside(rho - 1.05)
    pial = inside(rho - (0.985 + 0.015 * gyri))
    white = inside(rho - (0.86 + 0.045 * gyri))
    # Brainstem leaving the brain inferiorly (a cylinder around the cerebral peduncles).
    stem = inside(np.hypot(x / 0.2, (y + 0.12) / 0.18) - 1.0) * inside(z + 0.45)
    stem_csf = inside(np.hypot(x / 0.26, (y + 0.12) / 0.24) - 1.0) * inside(z + 0.45)
    white = np.maximum(white, stem)
    pial = np.maximum(pial, stem)
    outer_csf = np.maximum(outer_csf, stem_csf)
    skull = np.maximum(skull, stem_csf)
    scalp = head - skull
    csf = outer_csf - pial
    gm = pial - white
    # Deep structures carved out of the white matter.
    zc = 0.13 - 0.35 * y**2
    vent_l = inside(
        _ellipsoid(np.stack([ax, y, z - zc + 0.13], 1), (0.1, 0.0, 0.13), (0.07, 0.36, 0.09)) - 1
    )
    third = inside(_ellipsoid(ut, (0.0, -0.05, -0.05), (0.025, 0.15, 0.1)) - 1)
    ventricles = np.maximum(vent_l, third)
    half = np.stack([ax, y, z], 1)
    thal = inside(_ellipsoid(half, (0.10, -0.15, -0.02), (0.07, 0.14, 0.1)) - 1)
    caud = inside(_ellipsoid(half, (0.165, 0.2, 0.1), (0.045, 0.12, 0.08)) - 1)
    put = inside(_ellipsoid(half, (0.34, 0.04, -0.06), (0.055, 0.16, 0.12)) - 1)
    deep = np.maximum(np.maximum(thal, caud), put) * (1 - ventricles)
    sgm = white * deep
    csf = csf + white * ventricles
    wm = white * (1 - ventricles) * (1 - deep)
    tissues = np.stack([wm, gm, sgm, csf, scalp], axis=1).clip(0, 1).astype(np.float32)
    sample = AnatomySample(tissues=tissues)
    if subject.lesions:
        _add_lesions(sample, subject, ut, radii, edge_mm)
    if not (fibres or labels):
        return sample

    n_all = len(x)
    if fibres:
        # radial direction and parameter textures everywhere (GM and all tissues use them)
        inv_all = _inv3(jac)
        radial_u = ut / np.maximum(rho, 1e-3)[:, None]
        r_mm = (inv_all * radial_u[:, None, :]).sum(-1) * radii
        sample.radial = _unit(r_mm).astype(np.float32)
        tw = subject.texture.astype(np.float32)
        arg = ut @ np.ascontiguousarray(tw[:, :3].T) + tw[:, 3]
        tex = np.sin(arg) @ np.ascontiguousarray(tw[:, 4])
        sample.texture = (tex / np.sqrt(len(tw))).astype(np.float32)
        tex2 = np.cos(arg) @ np.ascontiguousarray(tw[:, 4])
        sample.texture2 = (tex2 / np.sqrt(len(tw))).astype(np.float32)
    # The fibre systems only matter in WM and deep GM: evaluate them there only.
    sel = np.flatnonzero(wm + sgm > 1e-5)
    x, y, z, ax, ut, rho, wm = x[sel], y[sel], z[sel], ax[sel], ut[sel], rho[sel], wm[sel]

    # --- fibre systems in template coordinates (tangents in u-space) ---
    sgn = np.where(x >= 0, 1.0, -1.0).astype(np.float32)
    one = np.ones_like(x)
    # Corpus callosum: sagittal arch rising laterally.
    zl = z - 0.02 - 0.35 * ax**2
    rcc = np.sqrt((y / 0.42) ** 2 + (zl / 0.28) ** 2)
    m_cc = inside((np.abs(rcc - 1.0) - 0.17) * 0.3) * inside(-zl - 0.03) * inside(ax - 0.72)
    yf = np.clip(y / 0.42, -1, 1)
    t_cc = np.stack([one, 1.4 * x * yf * np.abs(yf), 0.7 * x], 1)
    # Projection fan: CP -> IC -> CR.
    xc = 0.24 + 0.2 * z + 0.12 * z**2
    dxc = 0.2 + 0.24 * z
    half_w = 0.08 + 0.2 * (z + 0.8)
    eta = (y + 0.05) / np.maximum(half_w, 0.05)
    m_proj = (
        inside(np.abs(ax - xc) - (0.045 + 0.02 * np.clip(z, 0, 1)))
        * inside(np.abs(eta) - 1.0)
        * inside(z - 0.78)
    )
    t_proj = np.stack([sgn * dxc, eta * 0.2, one], 1)
    # Association tubes.
    m_assoc = np.zeros_like(x)
    t_assoc = np.zeros_like(ut)
    tube_m = {}
    for name, (fx, fz, rx, rz, y0, y1) in _TUBES.items():
        h = 1e-3
        xcy, zcy = fx(y), fz(y)
        r = np.hypot((ax - xcy) / rx, (z - zcy) / rz)
        m = inside((r - 1.0) * rx) * inside(y0 - y) * inside(y - y1)
        dx = (fx(y + h) - fx(y - h)) / (2 * h)
        dz = (fz(y + h) - fz(y - h)) / (2 * h)
        t = np.stack([sgn * dx, one, dz], 1)
        better = m > m_assoc
        t_assoc[better] = t[better]
        m_assoc = np.maximum(m_assoc, m)
        tube_m[name] = m

    if fibres:
        radial = ut / np.maximum(rho, 1e-3)[:, None]
        tangents = np.stack([t_cc, t_proj, t_assoc, radial], axis=1)  # (n, 4, 3) u-space
        # u-space tangent -> subject mm: x = radii * u_subj, u_t = phi(u_subj).
        inv = inv_all[sel]
        dirs = (inv[:, None, :, :] * tangents[:, :, None, :]).sum(-1) * radii
        directions = np.repeat(sample.radial[:, None, :], 4, axis=1)
        directions[sel] = _unit(dirs)
        sample.directions = directions
        memb = np.stack([m_cc, m_proj, m_assoc], 1)
        total = memb.sum(1, keepdims=True)
        memb = memb / np.maximum(total, 1.0)
        bg = np.clip(1.0 - memb.sum(1, keepdims=True), 0, 1)
        weights = np.zeros((n_all, 4), np.float32)
        weights[:, 3] = 1.0
        weights[sel] = np.concatenate([memb, bg], 1)
        sample.weights = weights

    if labels:
        lab = np.zeros(x.shape, dtype=np.int16)  # on the WM/deep-GM subset
        core = wm > 0.5

        def put_label(abbr: str, cond: np.ndarray) -> None:
            sel = core & cond & (lab == 0)
            lab[sel] = ROI_INDEX[abbr]

        cc = (m_cc > 0.5) & (ax < 0.3)
        proj = m_proj > 0.5
        put_label("CgC", tube_m["CgC"] > 0.5)
        put_label("GCC", cc & (y > 0.26))
        put_label("SCC", cc & (y < -0.26))
        put_label("BCC", cc)
        put_label("CP", proj & (z < -0.42))
        ic = proj & (z >= -0.32) & (z < 0.08)
        put_label("ALIC", ic & (eta > 0.3))
        put_label("PLIC", ic & (eta > -0.35))
        put_label("RLIC", ic)
        put_label("EC", tube_m["EC"] > 0.5)
        put_label("SS", tube_m["SS"] > 0.5)
        put_label("PTR", tube_m["PTR"] > 0.5)
        put_label("SLF", tube_m["SLF"] > 0.5)
        cr = proj & (z >= 0.12) & (z < 0.55)
        put_label("ACR", cr & (eta > 0.33))
        put_label("PCR", cr & (eta < -0.33))
        put_label("SCR", cr)
        sample.labels = np.zeros(n_all, np.int16)
        sample.labels[sel] = lab
    return sample
