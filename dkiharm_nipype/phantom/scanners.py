"""Virtual scanners: acquisition protocols and the imperfections that differ between sites.

Every effect is a plain function on arrays and can be switched off through
:class:`Effects`:

* noise - Rician (one effective channel) or non-central chi (``noise_channels`` > 1,
  sum-of-squares combination) on magnitude data (Constantinides et al. 1997);
* receive bias - a smooth multiplicative coil-sensitivity field;
* gradients - b-value miscalibration and spatial gradient non-linearity, i.e. an
  effective b-matrix per voxel (Bammer et al. 2003);
* Gibbs ringing and partial Fourier - the object is sampled on a grid ``gibbs_oversample``
  times finer in-plane, its k-space truncated to the acquired matrix, the missing partial
  Fourier lines zero-filled (Kellner et al. 2016);
* susceptibility distortion - a smooth off-resonance field near the sinuses and ear canals
  displaces signal along the phase-encoding axis by ``field x TotalReadoutTime`` voxels,
  with the Jacobian intensity change; the reversed-PE b0 is displaced the other way;
* motion - a rigid head position per visit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.fft as sfft

_AXES = {"i": 0, "j": 1, "k": 2}


@dataclass(frozen=True)
class Effects:
    """Switches of the scanner imperfections (all on by default)."""

    noise: bool = True
    bias: bool = True
    gradients: bool = True
    gibbs: bool = True
    partial_fourier: bool = True
    distortion: bool = True
    motion: bool = True


@dataclass(frozen=True)
class Protocol:
    """A diffusion protocol. ``matrix`` is (readout, phase-encoding) = (i, j); k is slices."""

    shells: tuple[int, ...]
    directions: tuple[int, ...]
    te_ms: float
    tr_ms: float
    n_b0: int = 6
    n_rev_b0: int = 1
    matrix: tuple[int, int] = (110, 110)
    n_slices: int = 70
    voxel_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    partial_fourier: float = 1.0
    pe_dir: str = "j-"
    echo_spacing_s: float = 0.00055
    acceleration: int = 1
    repeats: int = 1
    distortion_corrected: bool = False

    def __post_init__(self):
        if len(self.shells) != len(self.directions):
            raise ValueError(
                f"protocol has {len(self.shells)} shells but {len(self.directions)} direction "
                "counts; give one direction count per shell."
            )
        if not 0.5 <= self.partial_fourier <= 1.0:
            raise ValueError(
                f"partial Fourier {self.partial_fourier} is outside [0.5, 1]; use e.g. 0.75 "
                "for 6/8."
            )

    @property
    def effective_echo_spacing(self) -> float:
        """BIDS EffectiveEchoSpacing (s): echo spacing over the in-plane acceleration."""
        return self.echo_spacing_s / self.acceleration

    @property
    def total_readout_time(self) -> float:
        """BIDS TotalReadoutTime (s)."""
        return self.effective_echo_spacing * (self.matrix[1] - 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.matrix[0], self.matrix[1], self.n_slices)

    @property
    def n_volumes(self) -> int:
        return self.n_b0 + sum(self.directions)


@dataclass(frozen=True)
class Scanner:
    """One virtual scanner with its protocol and its hardware-specific imperfections.

    ``snr_db`` lists the b0 SNR in the genu of the corpus callosum,
    ``20 log10(mean b0 / noise SD)``, one value per subject (cycled).
    ``noise_channels`` is the effective number of receive channels of the magnitude
    noise statistics (1 = Rician). It is not the coil count: Siemens adaptive-combine
    reconstructions give Rician magnitudes whatever the array, and sum-of-squares images of
    correlated channels behave like a few effective channels (Aja-Fernandez & Tristan-Vega
    2013). With the coil count itself, a 32-channel scan at the paper's 22 dB would have a
    noise floor at ~60 % of the b0 signal, above the b = 2000 WM signal.
    """

    label: str
    manufacturer: str
    model: str
    serial: str
    field_strength: float
    coil_channels: int
    noise_channels: int
    snr_db: tuple[float, ...]
    protocol: Protocol
    b_scale: float = 1.0
    nonlinearity: float = 0.0
    bias_strength: float = 0.15
    susceptibility_hz: float = 90.0
    intensity_scale: float = 1.0
    gibbs_oversample: int = 2
    effects: Effects = field(default_factory=Effects)

    def snr_for(self, subject_index: int) -> float:
        return float(self.snr_db[subject_index % len(self.snr_db)])


# --- geometry -------------------------------------------------------------------------


def grid_affine(shape: tuple[int, int, int], voxel_mm) -> np.ndarray:
    """RAS voxel-to-world affine of a grid centred on the world origin."""
    aff = np.diag([*map(float, voxel_mm), 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(voxel_mm, dtype=float)
    return aff


def grid_points(shape, affine: np.ndarray, oversample: tuple[int, int, int] = (1, 1, 1)):
    """World coordinates (N, 3) of a grid, optionally ``oversample`` times finer per axis.

    Fine sample ``f * i`` coincides with coarse voxel ``i``, so truncating the fine
    grid's k-space to the coarse matrix returns coarse-grid samples.
    """
    axes = [np.arange(n * f, dtype=np.float32) / f for n, f in zip(shape, oversample, strict=True)]
    ijk = np.empty((*(len(a) for a in axes), 3), np.float32)
    ijk[..., 0] = axes[0][:, None, None]
    ijk[..., 1] = axes[1][None, :, None]
    ijk[..., 2] = axes[2][None, None, :]
    return apply_affine(affine, ijk.reshape(-1, 3))


def rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_pose(rng: np.random.Generator, *, rot_deg: float = 3.0, trans_mm: float = 3.0):
    """Rigid subject-to-scanner transform (4x4, world mm) for one visit."""
    pose = np.eye(4)
    pose[:3, :3] = rotation(
        np.deg2rad(rng.normal(0, rot_deg, 3).clip(-2.5 * rot_deg, 2.5 * rot_deg))
    )
    pose[:3, 3] = rng.normal(0, trans_mm, 3).clip(-2.5 * trans_mm, 2.5 * trans_mm)
    return pose


def apply_affine(aff: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``pts`` (N, 3) mapped by a 4x4 affine, float32 (column-wise: no slow small matmul)."""
    a = np.asarray(aff, dtype=np.float32)
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    out = np.empty(pts.shape, np.float32)
    for r in range(3):
        out[:, r] = a[r, 0] * x + a[r, 1] * y + a[r, 2] * z + a[r, 3]
    return out


# --- gradient table -------------------------------------------------------------------


@lru_cache(maxsize=64)
def shell_directions(n: int, seed: int = 0) -> np.ndarray:
    """``n`` well-spread unit directions (electrostatic repulsion on the hemisphere)."""
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    xyz = rng.standard_normal((n, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    hemi, _ = disperse_charges(HemiSphere(xyz=xyz), 300, const=0.2)
    dirs = np.asarray(hemi.vertices, dtype=float)
    dirs[dirs[:, 2] < 0] *= -1
    return dirs


def scan_table(protocol: Protocol, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """b-values and unit vectors of a protocol, b0s interleaved as on clinical scanners."""
    bvals, bvecs = [], []
    for k, (b, n) in enumerate(zip(protocol.shells, protocol.directions, strict=True)):
        bvals.append(np.full(n, float(b)))
        bvecs.append(shell_directions(n, seed * 101 + k))
    dw_b = np.concatenate(bvals)
    dw_g = np.concatenate(bvecs)
    n_dw, n_b0 = len(dw_b), protocol.n_b0
    # b0 at the start and then evenly between the diffusion-weighted volumes.
    positions = set(np.round(np.linspace(0, n_dw + n_b0, n_b0, endpoint=False)).astype(int))
    out_b, out_g, it = [], [], 0
    for pos in range(n_dw + n_b0):
        if pos in positions or it >= n_dw:
            out_b.append(0.0)
            out_g.append([0.0, 0.0, 0.0])
        else:
            out_b.append(dw_b[it])
            out_g.append(dw_g[it])
            it += 1
    return np.asarray(out_b), np.asarray(out_g, dtype=float)


# --- imperfections --------------------------------------------------------------------


def gradient_tensor(world: np.ndarray, *, b_scale: float, nonlinearity: float) -> np.ndarray:
    """Per-point gradient coil tensor ``L`` (N, 3, 3): effective gradient ``L g``.

    ``b_scale`` is the b-value miscalibration (b_eff = b_scale * b at isocentre),
    ``nonlinearity`` the relative gradient deviation at 10 cm from isocentre, with the
    quadratic spatial pattern of a cylindrical coil (z-coil stronger off-axis, x/y weaker).
    """
    r = (world / 100.0).astype(np.float32)
    x, y, z = r[:, 0], r[:, 1], r[:, 2]
    a = np.float32(nonlinearity)
    lt = np.zeros((world.shape[0], 3, 3), np.float32)
    lt[:, 0, 0] = 1 - a * (0.5 * x * x + 0.25 * y * y - 0.5 * z * z)
    lt[:, 1, 1] = 1 - a * (0.25 * x * x + 0.5 * y * y - 0.5 * z * z)
    lt[:, 2, 2] = 1 + a * (z * z - 0.5 * (x * x + y * y))
    lt[:, 0, 2] = lt[:, 2, 0] = a * 0.5 * x * z
    lt[:, 1, 2] = lt[:, 2, 1] = a * 0.5 * y * z
    lt[:, 0, 1] = lt[:, 1, 0] = a * 0.25 * x * y
    return lt * np.float32(np.sqrt(b_scale))


def bias_field(world: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth receive-sensitivity field (N,): exp of a random low-order polynomial.

    Array coils are brighter near the periphery; ``strength`` is the field's relative
    standard deviation over the head.
    """
    r = (world / 90.0).astype(np.float32)
    x, y, z = r[:, 0], r[:, 1], r[:, 2]
    basis = np.stack([x, y, z, x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y])
    coef = rng.normal(0, 1, basis.shape[0]).astype(np.float32)
    coef /= np.sqrt(np.sum(coef**2) / 2)
    poly = coef @ basis + 0.8 * (x * x + y * y + z * z - 0.5)
    return np.exp(np.float32(strength) * poly).astype(np.float32)


def susceptibility_hz(subject_xyz: np.ndarray, radii_mm, centre_mm, peak_hz: float) -> np.ndarray:
    """Off-resonance (Hz) of air-tissue interfaces: frontal sinus and ear canals.

    Smooth Gaussian lobes centred just outside the inferior frontal and temporal brain,
    in subject coordinates so the field moves with the head.
    """
    u = (subject_xyz - np.asarray(centre_mm, np.float32)) / np.asarray(radii_mm, np.float32)
    out = np.zeros(u.shape[0], np.float32)
    for c, w, a in (
        ((0.0, 0.95, -0.45), 0.28, 1.0),
        ((0.85, -0.05, -0.7), 0.25, 0.7),
        ((-0.85, -0.05, -0.7), 0.25, 0.7),
        ((0.0, 0.6, -0.8), 0.3, -0.35),
    ):
        d2 = np.sum((u - np.asarray(c, np.float32)) ** 2, axis=1)
        out += np.float32(a) * np.exp(-d2 / np.float32(2 * w * w))
    return (np.float32(peak_hz) * out).astype(np.float32)


def pe_sign(pe_dir: str) -> float:
    return -1.0 if pe_dir.endswith("-") else 1.0


def pe_axis(pe_dir: str) -> int:
    return _AXES[pe_dir[0]]


def reverse_pe(pe_dir: str) -> str:
    return pe_dir[:-1] if pe_dir.endswith("-") else pe_dir + "-"


def kspace_sample(
    fine: np.ndarray,
    *,
    oversample: int,
    partial_fourier: float,
    pe_axis: int = 1,
) -> np.ndarray:
    """Acquire a fine in-plane object (X*f, Y*f, Z): truncate k-space, zero-fill partial Fourier.

    Returns the magnitude of the complex zero-filled reconstruction on the coarse grid
    (float32); noise is added afterwards on that magnitude as if on complex data, the
    Rician/non-central chi statistics only depending on the magnitude.

    Implementation: a real FFT along the readout axis, truncated to the acquired band
    before the FFT along the phase-encoding axis; the negative readout frequencies follow
    from Hermitian symmetry; the inverse is a small complex FFT on the acquired matrix.
    Identical (to float32 rounding) to a full complex FFT of the fine grid.
    """
    if oversample == 1 and partial_fourier >= 1.0:
        return fine.astype(np.float32, copy=False)
    f = oversample
    nx, ny = fine.shape[0] // f, fine.shape[1] // f
    fy = fine.shape[1]
    # acquired frequencies (fftshift order): -(n // 2) ... n - n // 2 - 1
    kx = np.arange(-(nx // 2), nx - nx // 2)
    ky = np.arange(-(ny // 2), ny - ny // 2)
    kxmax = int(np.abs(kx).max())
    half = sfft.rfft(fine.astype(np.float32, copy=False), axis=0)[: kxmax + 1]
    half = sfft.fft(half, axis=1)  # (kxmax + 1, fy, Z), ky in FFT order
    ky_idx = ky % fy
    band = np.empty((nx, ny, fine.shape[2]), np.complex64)
    pos = kx >= 0
    band[pos] = half[kx[pos]][:, ky_idx]
    # K(-kx, ky) = conj(K(kx, -ky)) for a real object
    band[~pos] = np.conj(half[-kx[~pos]][:, (-ky) % fy])
    if partial_fourier < 1.0:
        n_pe = (nx, ny)[pe_axis]
        missing = int(round((1.0 - partial_fourier) * n_pe))
        sl = [slice(None)] * 3
        sl[pe_axis] = slice(0, missing)
        band[tuple(sl)] = 0
    img = sfft.ifft2(sfft.ifftshift(band, axes=(0, 1)), axes=(0, 1), overwrite_x=True)
    return (np.abs(img) / np.float32(f * f)).astype(np.float32)


def add_noise(
    magnitude: np.ndarray, sigma: float, channels: int, rng: np.random.Generator
) -> np.ndarray:
    """Magnitude noise: Rician (1 channel) or non-central chi with ``channels`` channels.

    For L channels combined by sum of squares, ``M^2 = (S + s z1)^2 + s^2 chi2_{2L-1}``;
    the chi-square term uses the Wilson-Hilferty cube transform of a normal variate,
    accurate to <1 % for 2L-1 >= 3 and much faster than Gamma sampling. The normal
    variates come from torch (vectorised Box-Muller, ~2x numpy's ziggurat here), seeded
    from ``rng`` so that a seed still fixes every byte. Returns float32 in the input's
    memory layout.
    """
    import torch

    gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    mag = np.asarray(magnitude, dtype=np.float32)
    order = "F" if mag.flags.f_contiguous and not mag.flags.c_contiguous else "C"
    shape = (mag.size,)
    s = float(sigma)
    real = torch.randn(shape, generator=gen)
    rest = torch.randn(shape, generator=gen)
    real.mul_(s).add_(torch.from_numpy(np.ravel(mag, order=order)))
    real.mul_(real)
    if channels <= 1:
        rest.mul_(s)
        rest.mul_(rest)
    else:
        dof = 2 * channels - 1
        c = 2.0 / (9.0 * dof)
        rest.mul_(float(np.sqrt(c))).add_(1 - c).clamp_(min=0)
        rest = rest * rest * rest
        rest.mul_(dof * s * s)
    real.add_(rest).sqrt_()
    return real.numpy().reshape(mag.shape, order=order)
