"""Orchestration: simulate every subject on every scanner and write the BIDS dataset.

For each subject and scanner (one session = one visit, one rigid head position):

1. ground truth on the scan's native grid: anatomy at the voxel centres (undistorted),
   compartment signal at the scan's TE/TR on the canonical b-table, log-linear DKI fit;
2. acquisition: the object on a finer in-plane grid at EPI-distorted positions, with the
   gradient imperfections, receive bias and Jacobian intensity change, k-space truncated
   to the matrix with partial Fourier; the reversed-PE b0 displaced the other way;
3. one noisy magnitude realisation per run (fresh noise), stored as int16.

Work is split by session (one subject on one scanner) over ``n_jobs`` processes, longest
first; seeds come from ``SeedSequence([seed, subject, scanner, run])`` (never from a
worker) and every job runs on one BLAS/OpenMP/torch thread, so the bytes written do not
depend on ``n_jobs`` (``tests/test_determinism.py``).
Everything is written into a temporary sibling folder that is renamed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import bids as bw
from .anatomy import (
    ROI_INDEX,
    AnatomySample,
    SubjectAnatomy,
    evaluate,
    make_subject,
    max_displacement,
)
from .microstructure import prepare, truth_dki
from .presets import Preset, get_preset
from .scanners import (
    Scanner,
    add_noise,
    apply_affine,
    bias_field,
    gradient_tensor,
    grid_affine,
    grid_points,
    kspace_sample,
    pe_axis,
    pe_sign,
    random_pose,
    reverse_pe,
    scan_table,
    susceptibility_hz,
)

_CHUNK = 400_000
_DIR_LABEL = {"j-": "AP", "j": "PA", "i-": "RL", "i": "LR"}
TRUTH_PARAMS = ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")


class PhantomError(ValueError):
    """Bad phantom input (preset, output folder, seed); the message says how to fix it."""


def _evaluate(subject: SubjectAnatomy, pts: np.ndarray, **kw):
    """Anatomy in chunks (bounded memory), then concatenated."""
    if len(pts) <= _CHUNK:
        return evaluate(subject, pts, **kw)
    parts = [evaluate(subject, pts[i : i + _CHUNK], **kw) for i in range(0, len(pts), _CHUNK)]
    out = parts[0]
    for name in _FIELDS:
        vals = [getattr(p, name) for p in parts]
        if vals[0] is not None:
            setattr(out, name, np.concatenate(vals))
    return out


_FIELDS = (
    "tissues",
    "weights",
    "directions",
    "radial",
    "texture",
    "texture2",
    "labels",
    "lesion",
    "lesion_free",
    "lesion_loss",
)


def _candidates(subject: SubjectAnatomy, pts: np.ndarray, edge_mm: float = 0.6) -> np.ndarray:
    """Indices of the points that can hold any tissue (conservative, before deformation).

    Outside the head ellipsoid (normalised radius 1.2) and the brainstem/CSF cylinder the
    soft tissue indicators are below ``sigmoid(-12)`` ~ 6e-6: zero for the signal. The
    bound adds the largest possible deformation displacement.
    """
    radii = np.asarray(subject.radii_mm, np.float32)
    u = (pts - np.asarray(subject.centre_mm, np.float32)) / radii
    margin = max_displacement(subject) + 12.0 * edge_mm / float(radii.min())
    r2 = u[:, 0] ** 2 + u[:, 1] ** 2 + u[:, 2] ** 2
    near = r2 < (1.20 + margin) ** 2
    stem = np.hypot(u[:, 0] / 0.26, (u[:, 1] + 0.12) / 0.24) < 1.0 + margin / 0.24
    near |= stem & (u[:, 2] < 0)
    return np.flatnonzero(near)


def _tissues(subject: SubjectAnatomy, pts: np.ndarray, **kw) -> np.ndarray:
    """Tissue fractions (N, 5) at every point, evaluated only where tissue can be."""
    cand = _candidates(subject, pts, kw.get("edge_mm", 0.6))
    out = np.zeros((len(pts), 5), np.float32)
    out[cand] = _evaluate(subject, pts[cand], fibres=False, **kw).tissues
    return out


def _sample(
    subject: SubjectAnatomy,
    pts: np.ndarray,
    *,
    threshold: float,
    columns: slice,
    labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, AnatomySample]:
    """Tissues (N, 5) everywhere, and the full sample where ``tissues[:, columns]`` sums
    above ``threshold``: (tissues, indices, sample at those indices); one evaluation."""
    cand = _candidates(subject, pts)
    smp = _evaluate(subject, pts[cand], fibres=True, labels=labels)
    tissues = np.zeros((len(pts), 5), np.float32)
    tissues[cand] = smp.tissues
    keep = smp.tissues[:, columns].sum(1) > threshold
    for name in _FIELDS:
        val = getattr(smp, name)
        if val is not None:
            setattr(smp, name, val[keep])
    return tissues, cand[keep], smp


def _sub(index: int) -> str:
    return f"{index + 1:02d}"


def _seed(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _interp_along(grid: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``grid`` (R, L) at fractional indices ``t`` (R, L) per row."""
    n = grid.shape[1]
    t = np.clip(t, 0, n - 1)
    i0 = np.minimum(t.astype(np.int32), n - 2)
    w = (t - i0).astype(np.float32)
    g0 = np.take_along_axis(grid, i0, 1)
    g1 = np.take_along_axis(grid, i0 + 1, 1)
    return g0 + w * (g1 - g0)


def _distorted_sources(
    world: np.ndarray,
    grid_shape: tuple[int, int, int],
    hz: np.ndarray,
    scanner: Scanner,
    pe_dir: str,
    step_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object positions imaged at ``world`` grid points by an EPI readout along ``pe_dir``.

    A spin at x appears at ``y = x + D(x) e_pe`` with ``D = s * field(x) * TRT * voxel``;
    ``x`` is found by fixed-point iteration and the intensity scales by ``1 / (1 + dD/dpe)``.
    ``hz`` is the off-resonance field at the (undistorted) grid points; D and dD/dpe between
    grid points come from linear interpolation along the phase-encoding lines (the field
    is smooth on the scale of centimetres). Returns the source points (world mm), the
    Jacobian intensity factor and D (mm) at the sources.
    """
    proto = scanner.protocol
    axis = pe_axis(pe_dir)
    scale = np.float32(pe_sign(pe_dir) * proto.total_readout_time * proto.voxel_mm[axis])
    disp = np.moveaxis((scale * hz).reshape(grid_shape), axis, -1)
    lines = disp.shape
    disp = np.ascontiguousarray(disp.reshape(-1, lines[-1]))
    deriv = np.gradient(disp, step_mm, axis=1).astype(np.float32)
    y = np.ascontiguousarray(
        np.moveaxis(world[:, axis].reshape(grid_shape), axis, -1).reshape(disp.shape)
    )
    y0 = y[:, :1]
    src = y.copy()
    for _ in range(4):
        src = y - _interp_along(disp, (src - y0) / step_mm)
    t = (src - y0) / step_mm
    d_src = _interp_along(disp, t)
    jac = 1.0 / np.clip(1.0 + _interp_along(deriv, t), 0.2, 5.0)

    def back(a):
        return np.moveaxis(a.reshape(lines), -1, axis).reshape(-1)

    out = world.copy()
    out[:, axis] = back(src)
    return out, back(jac).astype(np.float32), back(d_src)


def _acquire(
    subject: SubjectAnatomy,
    scanner: Scanner,
    to_subject: np.ndarray,
    affine: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    bias_rng: np.random.Generator,
    *,
    pe_dir: str,
    hz: np.ndarray | None = None,
    n_reversed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Noise-free magnitude images (X, Y, Z, M) of one acquisition, the displacement, the
    off-resonance field on the fine grid, and ``n_reversed`` b0 images with the phase
    encoding reversed (or None).

    The reversed-PE b0s reuse this acquisition's anatomy: the b0 object, known at the
    source positions of this readout, is interpolated along each phase-encoding line to the
    reversed readout's source positions (:func:`_resample_lines`) instead of evaluating
    the anatomy again (a third of a session's cost)."""
    proto, eff = scanner.protocol, scanner.effects
    shape = proto.shape
    f = scanner.gibbs_oversample if eff.gibbs else 1
    fine_shape = (shape[0] * f, shape[1] * f, shape[2])
    world = grid_points(shape, affine, (f, f, 1))
    jac = np.ones(len(world), np.float32)
    disp = None
    if eff.distortion and not proto.distortion_corrected:
        if hz is None:
            hz = susceptibility_hz(
                apply_affine(to_subject, world),
                subject.radii_mm,
                subject.centre_mm,
                scanner.susceptibility_hz,
            )
        axis = pe_axis(pe_dir)
        step = proto.voxel_mm[axis] / (f if axis < 2 else 1)  # PE spacing of the fine grid
        grid_world = world
        world, jac, disp = _distorted_sources(world, fine_shape, hz, scanner, pe_dir, step)
    pts = apply_affine(to_subject, world)
    _, head, sample = _sample(subject, pts, threshold=1e-3, columns=slice(None))
    model = prepare(sample, subject, te_ms=proto.te_ms, tr_ms=proto.tr_ms)
    grad = None
    if eff.gradients:
        grad = gradient_tensor(
            world[head], b_scale=scanner.b_scale, nonlinearity=scanner.nonlinearity
        )
    amp = jac[head] * np.float32(scanner.intensity_scale)
    if eff.bias:
        amp = amp * bias_field(world[head], bias_rng, scanner.bias_strength)
    pf = proto.partial_fourier if eff.partial_fourier else 1.0
    # Fortran order: volume j is contiguous (noise and int16 conversion per volume) and
    # the array is already in NIfTI's on-disk order (written without a transposed copy).
    out = np.empty((*shape, len(bvals)), np.float32, order="F")
    fine = np.zeros(int(np.prod(fine_shape)), np.float32)
    cache: dict[tuple, np.ndarray] = {}
    for j, (b, g) in enumerate(zip(bvals, bvecs, strict=True)):
        key = (float(b), *np.round(g, 8))
        if key in cache:  # repeated b0s are identical before noise
            out[..., j] = cache[key]
            continue
        fine[head] = model.volume(float(b), g, grad) * amp
        out[..., j] = kspace_sample(
            fine.reshape(fine_shape), oversample=f, partial_fourier=pf, pe_axis=pe_axis(pe_dir)
        )
        if b == 0:
            cache[key] = out[..., j]
    reversed_b0 = None
    if n_reversed:
        obj = np.zeros(int(np.prod(fine_shape)), np.float32)
        obj[head] = model.volume(0.0, np.zeros(3)) * (amp / jac[head])  # b0 object
        rev_pe = reverse_pe(pe_dir)
        if disp is None:  # no distortion: the reversed readout images the same object
            rev_fine, rev_jac = obj, 1.0
        else:  # axis and step: set with the forward readout's distortion above
            rev_world, rev_jac, _ = _distorted_sources(
                grid_world, fine_shape, hz, scanner, rev_pe, step
            )
            rev_fine = _resample_lines(obj, world[:, axis], rev_world[:, axis], fine_shape, axis)
        img = kspace_sample(
            (rev_fine * rev_jac).reshape(fine_shape),
            oversample=f,
            partial_fourier=pf,
            pe_axis=pe_axis(rev_pe),
        )
        reversed_b0 = np.empty((*shape, n_reversed), np.float32, order="F")
        reversed_b0[...] = img[..., None]
    if disp is not None:
        disp = disp.reshape(fine_shape)[::f, ::f, :]
    return out, disp, hz, reversed_b0


def _resample_lines(
    values: np.ndarray, src: np.ndarray, dst: np.ndarray, grid_shape, axis: int
) -> np.ndarray:
    """Values known at positions ``src`` along each line of ``axis`` of the grid, linearly
    interpolated at positions ``dst`` on the same lines (all flat, grid point order).

    ``src`` is made non-decreasing along each line (an EPI readout never folds the object
    here: the Jacobian stays positive); outside a line's sampled span the edge value holds.
    """

    def lines(a):
        return np.moveaxis(a.reshape(grid_shape), axis, -1).reshape(-1, grid_shape[axis])

    x = np.maximum.accumulate(lines(src).astype(np.float64), axis=1)
    v = lines(values)
    q = lines(dst).astype(np.float64)
    n_lines, n = x.shape
    # one global search: shift each line past the previous one
    span = float(max(x.max() - x.min(), q.max() - q.min())) + 1.0
    base = (np.arange(n_lines, dtype=np.float64) * 3 * span - x[:, :1].min())[:, None]
    flat_x = (x + base).ravel()
    q = np.clip(q, x[:, :1], x[:, -1:])  # outside the sampled span: the edge value
    hi = np.searchsorted(flat_x, (q + base).ravel())
    hi = hi.reshape(n_lines, n) - (np.arange(n_lines) * n)[:, None]
    hi = np.clip(hi, 1, n - 1)
    lo = hi - 1
    x0 = np.take_along_axis(x, lo, 1)
    x1 = np.take_along_axis(x, hi, 1)
    w = np.clip((q - x0) / np.maximum(x1 - x0, 1e-9), 0, 1)
    v0 = np.take_along_axis(v, lo, 1)
    v1 = np.take_along_axis(v, hi, 1)
    out = (v0 + w.astype(np.float32) * (v1 - v0)).astype(np.float32)
    other = [n for k, n in enumerate(grid_shape) if k != axis]
    return np.moveaxis(out.reshape(*other, grid_shape[axis]), -1, axis).reshape(-1)


def _session(
    root: Path,
    truth_root: Path,
    preset: Preset,
    subject: SubjectAnatomy,
    si: int,
    ki: int,
    scanner: Scanner,
    seed: int,
) -> dict:
    sub, ses = _sub(si), scanner.label
    proto, eff = scanner.protocol, scanner.effects
    shape = proto.shape
    affine = grid_affine(shape, proto.voxel_mm)
    rng = _seed(seed, si, ki, 0)
    pose = np.eye(4)
    if eff.motion:
        pose = random_pose(rng, rot_deg=preset.motion_deg, trans_mm=preset.motion_mm)
    to_subject = np.linalg.inv(pose)  # scan world -> subject world

    # 1. truth on the native grid
    world = grid_points(shape, affine)
    pts = apply_affine(to_subject, world)
    tissues, brain, sample = _sample(
        subject, pts, threshold=1e-2, columns=slice(0, 4), labels=True
    )
    model = prepare(sample, subject, te_ms=proto.te_ms, tr_ms=proto.tr_ms)
    truth = truth_dki(model, metrics=TRUTH_PARAMS)
    labels = np.zeros(len(pts), np.int16)
    labels[brain] = sample.labels
    lesion = None
    if sample.lesion is not None:
        lesion = np.zeros(len(pts), np.float32)
        lesion[brain] = sample.lesion

    # 2. acquisition (noise-free)
    bvals, bvecs = scan_table(proto, seed=1000 * ki + 17 + sum(map(ord, ses)))
    bias_seed = (seed, si, ki, 1)
    data, disp, hz, rev = _acquire(
        subject,
        scanner,
        to_subject,
        affine,
        bvals,
        bvecs,
        _seed(*bias_seed),
        pe_dir=proto.pe_dir,
        n_reversed=proto.n_rev_b0,
    )

    # noise level from the b0 SNR in the genu of the corpus callosum
    b0_mean = data[..., bvals == 0].mean(-1).ravel()
    roi = labels == ROI_INDEX["GCC"]
    if roi.sum() < 3:
        roi = tissues[:, 0] > 0.9
    snr_db = scanner.snr_for(si)
    sigma = float(b0_mean[roi].mean() / 10 ** (snr_db / 20))

    # 3. write runs
    ses_dir = root / f"sub-{sub}" / f"ses-{ses}"
    dwi_names = []
    meta = _sidecar(scanner)
    for run in range(1, proto.repeats + 1):
        stem = ses_dir / "dwi" / f"sub-{sub}_ses-{ses}_run-{run}_dwi"
        noisy = _noisy_int16(data, sigma, scanner, _seed(seed, si, ki, 10 + run))
        bw.write_nifti(Path(str(stem) + ".nii.gz"), noisy, affine)
        bw.write_gradients(stem, bvals, bvecs)
        bw.write_json(Path(str(stem) + ".json"), meta)
        dwi_names.append(f"ses-{ses}/dwi/{stem.name}.nii.gz")
    if rev is not None:
        rdir = reverse_pe(proto.pe_dir)
        stem = ses_dir / "fmap" / f"sub-{sub}_ses-{ses}_dir-{_DIR_LABEL[rdir]}_epi"
        noisy = _noisy_int16(rev, sigma, scanner, _seed(seed, si, ki, 9))
        bw.write_nifti(Path(str(stem) + ".nii.gz"), noisy, affine)
        bw.write_json(
            Path(str(stem) + ".json"),
            {**meta, "PhaseEncodingDirection": rdir, "IntendedFor": dwi_names},
        )

    # truth derivatives in DWI space
    tdir = truth_root / f"sub-{sub}" / f"ses-{ses}"
    first = None
    for run in range(1, proto.repeats + 1):
        prefix = tdir / "dwi" / f"sub-{sub}_ses-{ses}_run-{run}_space-dwi"
        if first is None:
            for name in TRUTH_PARAMS:
                full = np.zeros(len(pts), np.float32)
                full[brain] = truth[name]
                bw.write_nifti(
                    _p(prefix, f"_model-dki_param-{name}_desc-truth_dwimap"),
                    full.reshape(shape),
                    affine,
                    xyzt="mm",
                )
            _write_tissues(prefix, tissues, labels, shape, affine)
            if lesion is not None:
                _write_lesion(prefix, lesion, shape, affine)
            first = prefix
        else:
            _link_all(first, prefix)
        if lesion is not None:
            _write_lesion_json(prefix, subject)
        bw.write_json(
            _p(prefix, "_model-dki_desc-truth_dwimap", ".json"),
            {
                "Description": (
                    "Ground-truth DKI: weighted (S^2) log-linear least-squares DKI fit of "
                    "the noise-free, artefact-free compartment signal at this scan's TE/TR on "
                    "the canonical b = 0/1000/2000/3000 s/mm2 scheme (48 directions per "
                    "shell, 9 b0), on the undistorted DWI grid."
                ),
                "Sources": [f"bids::sub-{sub}/{dwi_names[run - 1]}"],
                "EchoTime": proto.te_ms / 1000,
                "RepetitionTime": proto.tr_ms / 1000,
                "NoiseSigma": sigma,
                "NoiseChannels": scanner.noise_channels,
                "TargetSNRdB": snr_db,
                "IntensityScale": scanner.intensity_scale,
                "Effects": asdict(eff),
                "Units": {"md": "mm2/s", "ad": "mm2/s", "rd": "mm2/s"},
            },
        )
    xfm = tdir / "xfm" / f"sub-{sub}_ses-{ses}_from-dwi_to-T1w_mode-image_xfm.txt"
    xfm.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(
        xfm,
        to_subject,
        fmt="%.10f",
        header="RAS world(mm) of the DWI -> RAS world(mm) of subject/T1w space",
    )
    if disp is not None:
        fm = tdir / "fmap" / f"sub-{sub}_ses-{ses}_space-dwi_desc-displacement_fieldmap.nii.gz"
        vox = proto.voxel_mm[pe_axis(proto.pe_dir)]
        bw.write_nifti(fm, (disp / vox).astype(np.float32), affine)
        bw.write_json(
            fm.with_name(fm.name.replace(".nii.gz", ".json")),
            {
                "Description": "EPI displacement along the phase-encoding axis (voxels) of "
                "the signal imaged at each DWI voxel; the reversed-PE b0 has the opposite.",
                "Units": "voxel",
                "PhaseEncodingDirection": proto.pe_dir,
                "TotalReadoutTime": proto.total_readout_time,
            },
        )
    return {"session": ses, "sigma": sigma}


def _p(prefix: Path, suffix: str, ext: str = ".nii.gz") -> Path:
    return prefix.with_name(prefix.name + suffix + ext)


def _link_all(src_prefix: Path, dst_prefix: Path) -> None:
    """Identical truth of a repeated run: hard links (copies where links fail)."""
    for f in sorted(src_prefix.parent.glob(src_prefix.name + "_*.nii.gz")):
        dst = dst_prefix.with_name(f.name.replace(src_prefix.name, dst_prefix.name))
        try:
            os.link(f, dst)
        except OSError:
            shutil.copyfile(f, dst)


def _write_tissues(prefix: Path, tissues, labels, shape, affine) -> None:
    names = {"WM": tissues[:, 0], "GM": tissues[:, 1], "SGM": tissues[:, 2], "CSF": tissues[:, 3]}
    for label, arr in names.items():
        bw.write_nifti(
            _p(prefix, f"_label-{label}_probseg"), arr.reshape(shape).astype(np.float32), affine
        )
    brain = tissues[:, :4].sum(1) > 0.5
    bw.write_nifti(_p(prefix, "_desc-brain_mask"), brain.reshape(shape).astype(np.uint8), affine)
    bw.write_nifti(_p(prefix, "_desc-wmrois_dseg"), labels.reshape(shape).astype(np.int16), affine)


def _write_lesion(prefix: Path, weight: np.ndarray, shape, affine) -> None:
    """Lesion probability and core mask (weight > 0.5)."""
    bw.write_nifti(
        _p(prefix, "_label-lesion_probseg"), weight.reshape(shape).astype(np.float32), affine
    )
    mask = _p(prefix, "_desc-lesion_mask")
    bw.write_nifti(mask, (weight > 0.5).reshape(shape).astype(np.uint8), affine)


def _write_lesion_json(prefix: Path, subject: SubjectAnatomy) -> None:
    """The lesion mask's sidecar: the lesion model and where it is."""
    bw.write_json(
        _p(prefix, "_desc-lesion_mask", ".json"),
        {
            "Description": "Core of the simulated focal lesion(s) (lesion weight > 0.5): a "
            "share FreeWater of the tissue water is free water (oedema) and a share "
            "IntraAxonalLoss of the intra-axonal signal is lost; the same anatomical place "
            "in every scan of this subject.",
            "Lesions": [
                {
                    "CentreTemplate": list(les.centre),
                    "ApproxCentreSubjectMM": [  # without the subject's ~3 % deformation
                        round(c + u * r, 3)
                        for c, u, r in zip(
                            subject.centre_mm, les.centre, subject.radii_mm, strict=True
                        )
                    ],
                    "RadiusMM": les.radius_mm,
                    "FreeWater": les.free_water,
                    "IntraAxonalLoss": les.intra_loss,
                }
                for les in subject.lesions
            ],
        },
    )


def _noisy_int16(data: np.ndarray, sigma: float, scanner: Scanner, rng) -> np.ndarray:
    """One noisy realisation as int16 (Fortran order), volume by volume (bounded memory)."""
    out = np.empty(data.shape, np.int16, order="F")
    for j in range(data.shape[-1]):
        vol = data[..., j]
        if scanner.effects.noise:
            vol = add_noise(vol, sigma, scanner.noise_channels, rng)
        out[..., j] = _to_int16(vol)
    return out


def _to_int16(data: np.ndarray) -> np.ndarray:
    """Round and clip to [0, 32767] as int16 (one temporary, in the input's layout)."""
    tmp = np.rint(data, dtype=np.float32)
    np.clip(tmp, 0, 32767, out=tmp)
    return tmp.astype(np.int16, order="K")


def _sidecar(scanner: Scanner) -> dict:
    p = scanner.protocol
    meta = {
        "Manufacturer": scanner.manufacturer,
        "ManufacturersModelName": scanner.model,
        "DeviceSerialNumber": scanner.serial,
        "MagneticFieldStrength": scanner.field_strength,
        "ReceiveCoilName": f"Head_{scanner.coil_channels}",
        "ReceiveCoilActiveElements": f"{scanner.coil_channels} channels",
        "PulseSequenceType": "SE EPI",
        "EchoTime": p.te_ms / 1000,
        "RepetitionTime": p.tr_ms / 1000,
        "PhaseEncodingDirection": p.pe_dir,
        "TotalReadoutTime": round(p.total_readout_time, 6),
        "EffectiveEchoSpacing": round(p.effective_echo_spacing, 8),
        "PartialFourier": round(p.partial_fourier, 4),
        "ParallelReductionFactorInPlane": p.acceleration,
        "AcquisitionMatrixPE": p.matrix[1],
    }
    return meta


def _make_subject(preset: Preset, seed: int, si: int) -> SubjectAnatomy:
    subject = make_subject(_seed(seed, si, 999), preset.brain_radii_mm, preset.brain_centre_mm)
    lesions = tuple(les for les in preset.lesions if les.subject == si)
    return replace(subject, lesions=lesions) if lesions else subject


def _subject_worker(args) -> dict:
    """Subject-space (= T1w space) tissues and ROIs on the DWI-resolution grid, T1w image."""
    root, truth_root, preset, seed, si = args
    subject = _make_subject(preset, seed, si)
    sub = _sub(si)
    aff = grid_affine(preset.subject_shape, preset.subject_voxel_mm)
    pts = grid_points(preset.subject_shape, aff)
    tissues = _tissues(subject, pts)
    brain = np.flatnonzero(tissues[:, :4].sum(1) > 1e-2)
    labels = np.zeros(len(pts), np.int16)
    smp = _evaluate(subject, pts[brain], fibres=False, labels=True)
    labels[brain] = smp.labels
    prefix = truth_root / f"sub-{sub}" / "anat" / f"sub-{sub}_space-T1w"
    _write_tissues(prefix, tissues, labels, preset.subject_shape, aff)
    if smp.lesion is not None:
        lesion = np.zeros(len(pts), np.float32)
        lesion[brain] = smp.lesion
        _write_lesion(prefix, lesion, preset.subject_shape, aff)
        _write_lesion_json(prefix, subject)
    _write_t1w(root, preset, subject, si, seed)
    return {"participant_id": f"sub-{sub}", "age": subject.age, "sex": subject.sex}


def _session_worker(args) -> dict:
    root, truth_root, preset, seed, si, ki = args
    subject = _make_subject(preset, seed, si)
    return _session(root, truth_root, preset, subject, si, ki, preset.scanners[ki], seed)


def _job(args) -> tuple[str, dict]:
    kind, rest = args[0], args[1:]
    with _one_thread():
        if kind == "subject":
            return kind, _subject_worker(rest)
        return kind, _session_worker(rest)


@contextmanager
def _one_thread():
    """Run a job on one BLAS/OpenMP thread and one torch thread, in a worker or in-process.

    The bytes must not depend on ``n_jobs``: multi-threaded BLAS splits the truth fit's
    products differently (in-process with 2 threads vs 1 in a worker, the truth FA and KFA
    differed by ~1e-16 in isotropic voxels), so every job computes single-threaded.
    """
    import torch
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(saved)


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _single_threaded_children():
    """Spawned children start with one BLAS/OpenMP thread (environment set around spawn)."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cost(preset: Preset, ki: int) -> float:
    """Relative cost of a session (for longest-first scheduling)."""
    sc = preset.scanners[ki]
    p = sc.protocol
    f = sc.gibbs_oversample if sc.effects.gibbs else 1
    return float(np.prod(p.shape)) * (
        f * f * (p.n_volumes + p.n_rev_b0) + 2 * p.repeats * p.n_volumes + 200
    )


def _write_t1w(root: Path, preset: Preset, subject: SubjectAnatomy, si: int, seed: int) -> None:
    """An MPRAGE-like T1w (WM bright, CSF dark) in subject space, in the reference session."""
    fov = np.asarray(preset.subject_shape) * np.asarray(preset.subject_voxel_mm)
    shape = tuple(int(round(v / preset.t1w_voxel_mm)) for v in fov)
    vox = (preset.t1w_voxel_mm,) * 3
    aff = grid_affine(shape, vox)
    pts = grid_points(shape, aff)
    tis = _tissues(subject, pts, edge_mm=0.4)
    contrast = np.array([1.0, 0.62, 0.72, 0.12, 0.85], np.float32)
    img = (tis @ contrast) * 1000.0
    rng = _seed(seed, si, 998)
    img *= bias_field(pts, rng, 0.1)
    img = add_noise(img, 25.0, 1, rng)
    ref = preset.reference
    path = (
        root / f"sub-{_sub(si)}" / f"ses-{ref}" / "anat" / f"sub-{_sub(si)}_ses-{ref}_T1w.nii.gz"
    )
    bw.write_nifti(path, _to_int16(img).reshape(shape), aff)
    bw.write_json(
        path.with_name(path.name.replace(".nii.gz", ".json")),
        {
            "Manufacturer": "Siemens",
            "PulseSequenceType": "MPRAGE",
            "EchoTime": 0.00229,
            "RepetitionTime": 2.3,
            "InversionTime": 0.9,
            "FlipAngle": 8,
        },
    )


def check_output(out_dir: Path, overwrite: bool) -> Path:
    """Resolve the output folder or raise :class:`PhantomError` with the fix."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PhantomError(f"output path {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PhantomError(
            f"output folder {out} is not empty; pass --overwrite (overwrite=True) to replace "
            "it or choose a new folder."
        )
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PhantomError(
            f"cannot create {out}: {probe} is a file, not a folder; choose another output path."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PhantomError(
            f"cannot write to {probe} (permission denied); choose an output folder you can "
            "write to."
        )
    return out


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}; e.g. --seed 0.")
    return int(seed)


def generate(
    out_dir: str | os.PathLike,
    preset: str | Preset = "tiny",
    seed: int = 0,
    *,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Generate a traveling-subject phantom as BIDS raw data with truth derivatives.

    Parameters
    ----------
    out_dir : path
        Dataset root to create (must be empty or absent unless ``overwrite``).
    preset : str or Preset
        ``tiny``, ``paper-dataset1`` or ``mushac`` (see :mod:`.presets`), or a custom
        :class:`~dkiharm_nipype.phantom.presets.Preset`.
    seed : int
        Non-negative seed; the same seed gives byte-identical files.
    overwrite : bool
        Replace an existing non-empty ``out_dir``.
    **overrides
        Passed to :func:`~dkiharm_nipype.phantom.presets.get_preset` (``subjects=2``,
        ``noise=False``, ``matrix=(64, 64)``, ...).

    Returns
    -------
    pathlib.Path
        The BIDS root (``out_dir``).
    """
    seed = check_seed(seed)
    try:
        cfg = get_preset(preset, **overrides)
    except ValueError as exc:
        raise PhantomError(str(exc)) from None
    if cfg.n_subjects < 1:
        raise PhantomError(f"subjects must be >= 1, got {cfg.n_subjects}; e.g. --subjects 2.")
    out = check_output(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        truth_root = tmp / "derivatives" / bw.TRUTH_PIPELINE
        jobs = [
            ("session", tmp, truth_root, cfg, seed, si, ki)
            for si in range(cfg.n_subjects)
            for ki in range(len(cfg.scanners))
        ]
        jobs.sort(key=lambda j: -_cost(cfg, j[-1]))  # longest first: balanced workers
        jobs += [("subject", tmp, truth_root, cfg, seed, si) for si in range(cfg.n_subjects)]
        n_jobs = max(1, min(cfg.n_jobs, len(jobs), os.cpu_count() or 1))
        if n_jobs == 1:
            results = [_job(j) for j in jobs]
        else:
            import multiprocessing as mp

            # one thread per worker: BLAS (the truth fit) and torch (the noise) would
            # otherwise start a thread per core in every worker and oversubscribe the CPU
            with (
                _single_threaded_children(),
                ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as ex,
            ):
                results = list(ex.map(_job, jobs))
        participants = sorted(
            (r for kind, r in results if kind == "subject"), key=lambda r: r["participant_id"]
        )
        bw.write_dataset_files(tmp, cfg, seed, participants)
        bw.write_truth_dataset_files(truth_root, cfg, seed)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / "old")
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
