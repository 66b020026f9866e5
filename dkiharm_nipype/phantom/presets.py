"""Named phantom configurations: the paper's two datasets and a tiny one for tests.

* ``paper-dataset1`` - Table 1 of the paper: four 3T scanners (Trio-, Skyra-, MR750- and
  Prisma-like; D is the reference), five traveling subjects, b0 SNR per subject as in
  Table 3.
* ``mushac`` - Dataset 2 (MUSHAC "standard" protocol): Prisma- and Connectom-like scanners,
  one shared protocol, nine subjects, distortion-corrected data.
* ``tiny`` - three small scanners (two runs + reversed-PE on A, no reversed PE on C, the
  3-shell reference D), three subjects, 24 x 28 x 16 voxels at 2 mm; a few seconds.
* ``hard`` - protocol gaps like real ones on partial coverage: a clinical-like scanner
  (TE 90 ms, b = 1000/2000 with 12/24 directions, 21-22 dB) and a research-like reference
  (TE 60 ms, six shells up to b = 6000 with 3-24 directions, 27-28 dB), four subjects
  (two train by default, two test), a 12-slice slab at 2 mm.
* ``hard-mixed-res`` - ``hard`` with the clinical scanner at 2.5 mm (the group level refuses
  different voxel sizes: reslice first; docs/phantom.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

import numpy as np

from .anatomy import Lesion
from .scanners import Effects, Protocol, Scanner


@dataclass(frozen=True)
class Preset:
    """A traveling-subject study: scanners, subjects and the subject-space grid."""

    name: str
    description: str
    scanners: tuple[Scanner, ...]
    n_subjects: int
    brain_radii_mm: tuple[float, float, float]
    brain_centre_mm: tuple[float, float, float]
    subject_shape: tuple[int, int, int]
    subject_voxel_mm: tuple[float, float, float]
    t1w_voxel_mm: float
    reference: str
    n_jobs: int = 1
    motion_deg: float = 2.0
    motion_mm: float = 3.0
    effects: Effects = field(default_factory=Effects)
    lesions: tuple[Lesion, ...] = ()


def _echo_spacing(bandwidth_hz_px: float) -> float:
    """Echo spacing (s) from the readout bandwidth per pixel plus ~0.1 ms of ramps."""
    return 1.0 / bandwidth_hz_px + 1.0e-4


def _dataset1() -> Preset:
    common = dict(matrix=(110, 110), n_slices=70, voxel_mm=(2.0, 2.0, 2.0), n_b0=6)
    a = Scanner(
        "A",
        "Siemens",
        "TrioTim",
        "35001",
        3.0,
        coil_channels=32,
        noise_channels=1,
        snr_db=(23.51, 23.32, 22.14, 21.65, 20.44),
        protocol=Protocol(
            (1000, 2000),
            (30, 30),
            te_ms=99.0,
            tr_ms=9200.0,
            partial_fourier=6 / 8,
            echo_spacing_s=_echo_spacing(1684),
            acceleration=2,
            repeats=2,
            **common,
        ),
        b_scale=1.02,
        nonlinearity=0.06,
        bias_strength=0.18,
        susceptibility_hz=90.0,
        intensity_scale=1.0,
    )
    b = Scanner(
        "B",
        "Siemens",
        "Skyra",
        "45002",
        3.0,
        coil_channels=20,
        noise_channels=1,
        snr_db=(24.28, 24.58, 24.16, 24.93, 21.89),
        protocol=Protocol(
            (1000, 2000),
            (20, 40),
            te_ms=94.0,
            tr_ms=9300.0,
            partial_fourier=6 / 8,
            echo_spacing_s=_echo_spacing(1818),
            acceleration=2,
            repeats=2,
            **common,
        ),
        b_scale=0.98,
        nonlinearity=0.05,
        bias_strength=0.15,
        susceptibility_hz=90.0,
        intensity_scale=0.8,
    )
    c = Scanner(
        "C",
        "GE",
        "DISCOVERY MR750",
        "MR750-03",
        3.0,
        coil_channels=8,
        noise_channels=2,
        snr_db=(23.06, 23.66, 24.96, 25.71, 21.17),
        protocol=Protocol(
            (1000, 2000),
            (30, 30),
            te_ms=80.0,
            tr_ms=9000.0,
            partial_fourier=4 / 5,
            echo_spacing_s=_echo_spacing(2272),
            acceleration=1,
            repeats=1,
            n_rev_b0=0,
            pe_dir="j",
            **common,
        ),
        b_scale=1.03,
        nonlinearity=0.08,
        bias_strength=0.12,
        susceptibility_hz=90.0,
        intensity_scale=1.3,
    )
    d = Scanner(
        "D",
        "Siemens",
        "Prisma",
        "66004",
        3.0,
        coil_channels=64,
        noise_channels=1,
        snr_db=(30.21, 30.02, 30.66, 31.47, 25.85),
        protocol=Protocol(
            (1000, 2000, 3000),
            (30, 30, 30),
            te_ms=75.0,
            tr_ms=3000.0,
            partial_fourier=6 / 8,
            echo_spacing_s=_echo_spacing(2272),
            acceleration=1,
            repeats=2,
            **common,
        ),
        b_scale=1.0,
        nonlinearity=0.04,
        bias_strength=0.2,
        susceptibility_hz=90.0,
        intensity_scale=1.1,
    )
    return Preset(
        name="paper-dataset1",
        description="Dataset 1 of the paper (Table 1): Trio, Skyra, MR750 and Prisma (reference)",
        scanners=(a, b, c, d),
        n_subjects=5,
        brain_radii_mm=(68.0, 84.0, 60.0),
        brain_centre_mm=(0.0, -4.0, 6.0),
        subject_shape=(110, 110, 70),
        subject_voxel_mm=(2.0, 2.0, 2.0),
        t1w_voxel_mm=1.0,
        reference="D",
        n_jobs=2,
    )


def _mushac() -> Preset:
    common = dict(
        matrix=(92, 92),
        n_slices=60,
        voxel_mm=(2.4, 2.4, 2.4),
        n_b0=6,
        n_rev_b0=0,
        te_ms=89.0,
        tr_ms=7200.0,
        partial_fourier=6 / 8,
        echo_spacing_s=_echo_spacing(2000),
        acceleration=2,
        distortion_corrected=True,
    )
    proto = Protocol((1200, 3000), (60, 60), **common)
    prisma = Scanner(
        "Prisma",
        "Siemens",
        "Prisma",
        "66010",
        3.0,
        coil_channels=32,
        noise_channels=1,
        snr_db=(24.51, 24.96, 20.36, 23.36, 23.31, 23.25, 23.25, 19.93, 22.59),
        protocol=proto,
        b_scale=1.0,
        nonlinearity=0.04,
        bias_strength=0.18,
        intensity_scale=1.0,
    )
    connectom = Scanner(
        "Connectom",
        "Siemens",
        "Connectom",
        "20300",
        3.0,
        coil_channels=64,
        noise_channels=1,
        snr_db=(27.98, 25.09, 22.23, 28.75, 26.94, 18.85, 21.68, 25.66, 25.81),
        protocol=proto,
        b_scale=1.01,
        nonlinearity=0.12,
        bias_strength=0.22,
        intensity_scale=0.9,
    )
    return Preset(
        name="mushac",
        description="Dataset 2 (MUSHAC standard protocol): Prisma and Connectom (reference)",
        scanners=(prisma, connectom),
        n_subjects=9,
        brain_radii_mm=(68.0, 84.0, 60.0),
        brain_centre_mm=(0.0, -4.0, 6.0),
        subject_shape=(92, 92, 60),
        subject_voxel_mm=(2.4, 2.4, 2.4),
        t1w_voxel_mm=1.2,
        reference="Connectom",
        n_jobs=2,
    )


def _tiny() -> Preset:
    """Scanners A, C and D of Dataset 1 on a small grid with fewer directions."""
    full = {s.label: s for s in _dataset1().scanners}
    small = dict(matrix=(24, 28), n_slices=16, n_b0=2)

    def shrink(label, directions, repeats, snr_db):
        sc = full[label]
        proto = replace(sc.protocol, directions=directions, repeats=repeats, **small)
        return replace(sc, protocol=proto, snr_db=snr_db, susceptibility_hz=60.0)

    a = shrink("A", (12, 12), 2, (23.5, 23.3, 22.1))
    c = shrink("C", (10, 16), 1, (23.1, 23.7, 25.0))
    d = shrink("D", (16, 16, 16), 1, (30.2, 30.0, 30.7))
    return Preset(
        name="tiny",
        description="Tiny test phantom: 3 scanners (A: 2 runs + reversed PE, C, reference D)",
        scanners=(a, c, d),
        n_subjects=3,
        brain_radii_mm=(18.5, 22.0, 13.0),
        brain_centre_mm=(0.0, 0.0, 2.0),
        subject_shape=(24, 28, 16),
        subject_voxel_mm=(2.0, 2.0, 2.0),
        t1w_voxel_mm=1.0,
        reference="D",
        n_jobs=1,
        motion_deg=2.0,
        motion_mm=1.0,
    )


def _hard() -> Preset:
    """Two protocols as far apart as the real pairs of issue #20, on a partial-coverage slab.

    A clinical-like Skyra (TE 90 ms, b = 1000/2000 with 12 + 24 directions, 3 b0) against a
    research-like Prisma reference (TE 60 ms, b = 500/1000/2000/3000/4500/6000 with
    3/6/24/24/12/6 directions, 6 b0). The b0 SNRs are those of 2 mm in vivo scans at these
    echo times: ~21-22 dB (the 30 ms longer TE costs ~4 dB of WM signal) and ~27-28 dB.
    Twelve 2 mm slices through the deep white matter (the default lesion's level).
    """
    slab = dict(matrix=(110, 110), n_slices=12, voxel_mm=(2.0, 2.0, 2.0))
    clinical = Scanner(
        "C",
        "Siemens",
        "Skyra",
        "45190",
        3.0,
        coil_channels=20,
        noise_channels=1,
        snr_db=(21.4, 22.0, 21.1, 21.7),
        protocol=Protocol(
            (1000, 2000),
            (12, 24),
            te_ms=90.0,
            tr_ms=4200.0,
            n_b0=3,
            partial_fourier=6 / 8,
            echo_spacing_s=_echo_spacing(1736),
            acceleration=2,
            **slab,
        ),
        b_scale=0.97,
        nonlinearity=0.06,
        bias_strength=0.2,
        susceptibility_hz=90.0,
        intensity_scale=0.85,
    )
    research = Scanner(
        "R",
        "Siemens",
        "Prisma",
        "67021",
        3.0,
        coil_channels=64,
        noise_channels=1,
        snr_db=(27.6, 27.1, 28.2, 27.4),
        protocol=Protocol(
            (500, 1000, 2000, 3000, 4500, 6000),
            (3, 6, 24, 24, 12, 6),
            te_ms=60.0,
            tr_ms=4800.0,
            n_b0=6,
            partial_fourier=7 / 8,
            echo_spacing_s=_echo_spacing(2380),
            acceleration=2,
            **slab,
        ),
        b_scale=1.0,
        nonlinearity=0.04,
        bias_strength=0.15,
        susceptibility_hz=90.0,
        intensity_scale=1.1,
    )
    return Preset(
        name="hard",
        description="Clinical-like C (TE 90 ms, b = 1000/2000, 12/24 directions) vs research-"
        "like reference R (TE 60 ms, b up to 6000, 3-24 directions per shell), 12-slice slab",
        scanners=(clinical, research),
        n_subjects=4,
        brain_radii_mm=(68.0, 84.0, 60.0),
        brain_centre_mm=(0.0, -4.0, 6.0),
        subject_shape=(110, 110, 12),
        subject_voxel_mm=(2.0, 2.0, 2.0),
        t1w_voxel_mm=1.0,
        reference="R",
        n_jobs=2,
    )


def _hard_mixed_res() -> Preset:
    """``hard`` with the clinical scanner at 2.5 mm over the same slab (88 x 88 x 10)."""
    base = _hard()
    clinical, research = base.scanners
    proto = replace(clinical.protocol, matrix=(88, 88), n_slices=10, voxel_mm=(2.5, 2.5, 2.5))
    # SNR grows with the voxel volume (x1.95: +5.8 dB) at the same protocol otherwise
    coarse = replace(
        clinical, protocol=proto, snr_db=tuple(round(v + 5.8, 1) for v in clinical.snr_db)
    )
    return replace(
        base,
        name="hard-mixed-res",
        description="hard with the clinical scanner at 2.5 mm (group level: reslice first)",
        scanners=(coarse, research),
    )


_FACTORIES = {
    "tiny": _tiny,
    "paper-dataset1": _dataset1,
    "mushac": _mushac,
    "hard": _hard,
    "hard-mixed-res": _hard_mixed_res,
}

#: Names accepted by :func:`get_preset` and ``dkiharm-phantom --preset``.
PRESET_NAMES = tuple(_FACTORIES)

_EFFECT_NAMES = {f.name for f in dataclasses.fields(Effects)}
_OVERRIDES = (
    "subjects",
    "scanners",
    "matrix",
    "slices",
    "voxel_mm",
    "n_jobs",
    "gibbs_oversample",
    "snr_offset_db",
    "lesion_subjects",
    "lesion_radius_mm",
    "lesion_free_water",
    "lesion_intra_loss",
    *sorted(_EFFECT_NAMES),
)


def _regrid(shape, voxel_mm, voxel: float) -> tuple[int, int, int]:
    """Grid shape covering the field of view of ``shape`` x ``voxel_mm`` with ``voxel`` mm."""
    fov = np.asarray(shape, dtype=float) * np.asarray(voxel_mm, dtype=float)
    return tuple(int(n) for n in np.maximum(np.round(fov / voxel), 4))


def get_preset(name: str | Preset, **overrides) -> Preset:
    """A preset by name, with optional overrides.

    Overrides: ``subjects`` (int), ``scanners`` (labels to keep), ``matrix`` ((i, j) for
    every scanner, a centred crop of the field of view), ``slices`` (int, a centred slab),
    ``voxel_mm`` (float, isotropic voxel size: the same field of view on a coarser or finer
    grid, e.g. 3.0 for a quick whole-brain run of ``paper-dataset1``; applied before
    ``matrix``/``slices``), ``n_jobs``, ``gibbs_oversample`` (1 disables the finer grid),
    ``snr_offset_db`` (added to every SNR), ``lesion_subjects`` (labels of the subjects that
    get a focal lesion, e.g. ``("03", "04")``: keep them out of training) with
    ``lesion_radius_mm``, ``lesion_free_water`` and ``lesion_intra_loss`` (see
    :class:`~dkiharm_nipype.phantom.anatomy.Lesion`) and any :class:`Effects` switch
    (``noise=False`` ...).
    """
    if isinstance(name, Preset):
        preset, name = name, name.name
    elif name not in _FACTORIES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}.")
    else:
        preset = _FACTORIES[name]()
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(
            f"unknown phantom override(s) {unknown}; use any of {', '.join(_OVERRIDES)}."
        )
    effects = replace(
        preset.effects, **{k: bool(v) for k, v in overrides.items() if k in _EFFECT_NAMES}
    )
    scanners = list(preset.scanners)
    if overrides.get("scanners") is not None:
        keep = list(overrides["scanners"])
        labels = [s.label for s in scanners]
        missing = sorted(set(keep) - set(labels))
        if missing:
            raise ValueError(f"scanner(s) {missing} not in preset {name!r}; choose from {labels}.")
        scanners = [s for s in scanners if s.label in keep]
    voxel = overrides.get("voxel_mm")
    if voxel is not None:
        voxel = float(voxel)
        if not 0.5 <= voxel <= 8.0:
            raise ValueError(f"voxel_mm {voxel} is outside [0.5, 8] mm; give e.g. 3.0.")
    new = []
    for sc in scanners:
        proto = sc.protocol
        if voxel is not None:
            shape = _regrid((*proto.matrix, proto.n_slices), proto.voxel_mm, voxel)
            proto = replace(
                proto,
                matrix=(int(shape[0]), int(shape[1])),
                n_slices=int(shape[2]),
                voxel_mm=(voxel, voxel, voxel),
            )
        if overrides.get("matrix") is not None:
            proto = replace(proto, matrix=tuple(int(m) for m in overrides["matrix"]))
        if overrides.get("slices") is not None:
            proto = replace(proto, n_slices=int(overrides["slices"]))
        sc = replace(sc, protocol=proto, effects=effects)
        if overrides.get("gibbs_oversample") is not None:
            sc = replace(sc, gibbs_oversample=int(overrides["gibbs_oversample"]))
        if overrides.get("snr_offset_db"):
            sc = replace(
                sc, snr_db=tuple(v + float(overrides["snr_offset_db"]) for v in sc.snr_db)
            )
        new.append(sc)
    kw = dict(scanners=tuple(new), effects=effects)
    if overrides.get("subjects") is not None:
        kw["n_subjects"] = int(overrides["subjects"])
    if overrides.get("n_jobs") is not None:
        kw["n_jobs"] = int(overrides["n_jobs"])
    if voxel is not None:
        kw["subject_shape"] = _regrid(preset.subject_shape, preset.subject_voxel_mm, voxel)
        kw["subject_voxel_mm"] = (voxel, voxel, voxel)
        kw["t1w_voxel_mm"] = max(preset.t1w_voxel_mm, voxel / 2)
    if overrides.get("matrix") is not None or overrides.get("slices") is not None:
        shape = list(kw.get("subject_shape", preset.subject_shape))
        if overrides.get("matrix") is not None:
            shape[:2] = [int(m) for m in overrides["matrix"]]
        if overrides.get("slices") is not None:
            shape[2] = int(overrides["slices"])
        kw["subject_shape"] = tuple(shape)
    if preset.reference not in [s.label for s in new]:
        kw["reference"] = new[-1].label
    if overrides.get("lesion_subjects"):
        kw["lesions"] = _lesions(kw.get("n_subjects", preset.n_subjects), overrides)
    else:
        given = [k for k in _OVERRIDES if k.startswith("lesion_") and overrides.get(k) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} given without lesion_subjects; name the subjects that get "
                "a lesion (--lesion-subjects 03)."
            )
    return replace(preset, **kw)


def _lesions(n_subjects: int, overrides: dict) -> tuple[Lesion, ...]:
    """One default :class:`Lesion` in each of ``lesion_subjects`` (labels such as ``"03"``,
    ``"sub-03"`` or 3), with the optional radius, free-water and intra-axonal-loss overrides."""
    params = {
        name: float(overrides[f"lesion_{name}"])
        for name in ("radius_mm", "free_water", "intra_loss")
        if overrides.get(f"lesion_{name}") is not None
    }
    out = []
    for label in overrides["lesion_subjects"]:
        text = str(label).removeprefix("sub-")
        index = int(text) - 1 if text.isdigit() else -1
        if not 0 <= index < n_subjects:
            raise ValueError(
                f"lesion subject {label!r} is not in the dataset; choose among "
                f"{', '.join(f'{i + 1:02d}' for i in range(n_subjects))}."
            )
        out.append(Lesion(index, **params))
    return tuple(sorted(set(out), key=lambda les: les.subject))
