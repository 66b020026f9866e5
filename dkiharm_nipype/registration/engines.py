"""Registration of reference-scanner DKI maps into a target scan's DWI space.

The paper (section 2.2) trains the harmonization network on voxel-aligned pairs: target
scanner DWIs as input, reference-scanner IRLLS DKI maps of the same traveling subject as
labels, the labels being registered non-linearly into the target DWI space with FSL FNIRT
(Andersson, Jenkinson & Smith 2007, FMRIB technical report TR07JA2). Between two visits
the head moves (rigid), and a target scan without reversed phase-encoding keeps its EPI
susceptibility distortion (a displacement along the phase-encoding axis), so an affine
stage is followed by a non-linear one.

Open engines, usable without FSL:

* ``dipy-syn``: DIPY's affine registration (centre of mass, rigid and affine with
  mutual information) followed by symmetric normalization (SyN, Avants et al.
  2008, *Med Image Anal* 12:26) with the local cross-correlation metric.
* ``mrtrix``: MRtrix3 ``mrregister -type rigid_affine_nonlinear`` (Raffelt et al. 2011,
  *NeuroImage* 56:1171), a symmetric diffeomorphic registration with the
  intensity-difference metric (both images are brought to a common intensity scale first).
* ``ants``: ANTsPy's ``SyN`` (affine + SyN with mutual information then CC), when
  ``antspyx`` can be imported.

Whatever the engine, the result is one **deformation field** on the fixed grid: for every
fixed voxel, the RAS world position (mm) in the moving image that lands there (the
"pull-back" convention of MRtrix3 ``mrtransform -warp``). Every map is then resampled with
the same field: linearly for continuous maps, nearest neighbour for labels.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..utils.env import FSLNotFoundError, ToolNotFoundError
from .grids import (
    RegistrationInputError,
    _load,
    _mask_array,
    _name,
    affine_deformation,
    check_same_grid,
    grid_positions,
    resample,
)
from .similarity import (
    _correlations,
    check_registration,
    linear_scales,
    normalize_intensity,
    plausible_affine,
)

#: Names accepted by ``registration=``.
ENGINES = ("auto", "fnirt", "dipy-syn", "mrtrix", "ants", "none")

#: Engines implemented in Python or MRtrix3 (no FSL).
OPEN_ENGINES = ("dipy-syn", "mrtrix", "ants")

#: What ``auto`` runs when FSL is not installed; chosen from ``benchmarks/registration.py``
#: (see ``docs/registration.md``): the most accurate of the engines that always run in CI.
DEFAULT_OPEN_ENGINE = "dipy-syn"

#: FSL commands of the FNIRT path.
FNIRT_COMMANDS = ("flirt", "fnirt", "applywarp")

#: MRtrix3 commands of the ``mrtrix`` engine.
MRTRIX_REGISTRATION_COMMANDS = ("mrregister", "mrtransform")


#: A fixed voxel is inside a registered mask's support when the trilinearly resampled
#: mask is at least 1 - this (float32 rounding), i.e. all eight samples were inside.
SUPPORT_TOLERANCE = 1e-3


LOGGER = logging.getLogger("dkiharm.registration")


class UnknownEngineError(RegistrationInputError):
    """``registration=`` names no known engine."""


class FNIRTNotFoundError(FSLNotFoundError):
    """``registration='fnirt'`` was asked for but FSL is not installed."""


class EngineNotAvailableError(ToolNotFoundError):
    """An open engine's software (MRtrix3, antspyx) is not installed."""


# ----------------------------------------------------------------------------- engines
def missing_fnirt() -> list[str]:
    """What is missing to run FLIRT/FNIRT/ApplyWarp (empty when FSL is usable)."""
    missing = [] if os.getenv("FSLDIR") else ["$FSLDIR"]
    return missing + [cmd for cmd in FNIRT_COMMANDS if shutil.which(cmd) is None]


def _ants_importable() -> bool:
    try:
        import ants  # noqa: F401
    except Exception:  # a broken binary wheel raises more than ImportError
        return False
    return True


def engine_available(engine: str) -> bool:
    """Whether ``engine`` can run on this machine (``auto`` and ``none`` always can)."""
    engine = check_engine(engine)
    if engine == "fnirt":
        return not missing_fnirt()
    if engine == "mrtrix":
        return all(shutil.which(cmd) for cmd in MRTRIX_REGISTRATION_COMMANDS)
    if engine == "ants":
        return _ants_importable()
    return True


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is one of :data:`ENGINES`, else raise a one-line error."""
    if engine not in ENGINES:
        raise UnknownEngineError(
            f"Unknown registration engine {engine!r}; choose one of {', '.join(ENGINES)}."
        )
    return engine


def resolve_engine(engine: str = "auto") -> str:
    """The engine that will run for ``engine``, checked to be installed.

    ``auto`` is FNIRT when FSL is installed (the paper's tool), else
    :data:`DEFAULT_OPEN_ENGINE`.

    Raises
    ------
    UnknownEngineError
        If ``engine`` is not one of :data:`ENGINES`.
    FNIRTNotFoundError, EngineNotAvailableError
        If the software of the requested engine is missing.
    """
    engine = check_engine(engine)
    if engine == "auto":
        return "fnirt" if not missing_fnirt() else DEFAULT_OPEN_ENGINE
    if engine == "fnirt" and missing_fnirt():
        raise FNIRTNotFoundError(
            f"registration='fnirt' needs FSL but {', '.join(missing_fnirt())} is missing; "
            f"install FSL (and set $FSLDIR) or use registration='auto' or "
            f"'{DEFAULT_OPEN_ENGINE}'."
        )
    if engine == "mrtrix" and not engine_available("mrtrix"):
        raise EngineNotAvailableError(
            "registration='mrtrix' needs MRtrix3's mrregister and mrtransform on PATH; "
            f"install MRtrix3 or use registration='{DEFAULT_OPEN_ENGINE}'."
        )
    if engine == "ants" and not engine_available("ants"):
        raise EngineNotAvailableError(
            "registration='ants' needs the Python package antspyx (import ants failed); "
            f"pip install antspyx or use registration='{DEFAULT_OPEN_ENGINE}'."
        )
    return engine


# ---------------------------------------------------------------------- registration
@dataclass
class Registration:
    """A fixed-grid deformation field and how it was obtained."""

    engine: str
    deformation: np.ndarray
    fixed_affine: np.ndarray
    linear: np.ndarray = field(default_factory=lambda: np.eye(4))
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)

    def to_nifti(self) -> nb.Nifti1Image:
        """The deformation field as a 4-D NIfTI (usable by ``mrtransform -warp``)."""
        img = nb.Nifti1Image(self.deformation.astype(np.float32), self.fixed_affine)
        img.header.set_intent("vector")
        return img

    def apply(self, img, *, label: bool = False) -> nb.Nifti1Image:
        """Resample ``img`` (moving space) onto the fixed grid (nearest for ``label``)."""
        return resample(img, self.deformation, self.fixed_affine, order=0 if label else 1)

    def support(self, moving_mask, *, tolerance: float = SUPPORT_TOLERANCE) -> nb.Nifti1Image:
        """Fixed-grid voxels whose trilinear samples draw on ``moving_mask`` voxels only.

        A map carried by :meth:`apply` is exact (not blended with the zeros outside the
        moving brain or field of view) only there: the mask, resampled trilinearly, is 1.
        Returned as a ``uint8`` mask on the fixed grid.
        """
        mask = _load(moving_mask)
        binary = nb.Nifti1Image(
            (np.asanyarray(mask.dataobj) > 0).astype(np.float32), mask.affine, mask.header
        )
        inside = np.asanyarray(self.apply(binary).dataobj) >= 1.0 - tolerance
        out = nb.Nifti1Image(inside.astype(np.uint8), self.fixed_affine)
        out.set_qform(self.fixed_affine, code=1)
        out.set_sform(self.fixed_affine, code=1)
        return out


def register(
    fixed,
    moving,
    *,
    engine: str = "auto",
    fixed_mask=None,
    moving_mask=None,
    seed: int = 0,
    n_threads: int = 1,
    work_dir: str | os.PathLike | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed`` (affine then non-linear) with an open engine.

    Parameters
    ----------
    fixed, moving
        3-D images (or paths): e.g. the target scan's FA in its DWI space, and the
        reference scan's FA.
    engine
        ``auto`` (:data:`DEFAULT_OPEN_ENGINE` here: FNIRT runs through the Nipype graph of
        :func:`~dkiharm_nipype.workflows.registration.init_label_registration_wf`),
        ``dipy-syn``, ``mrtrix``, ``ants``, or ``none`` (the images are already aligned on
        one voxel grid: identity).
    fixed_mask, moving_mask
        Optional brain masks restricting the similarity metric.
    seed
        Seed of stochastic engines (ANTs sampling).
    n_threads
        Threads the engine may use.
    work_dir
        Folder for the engines' temporary files (a temporary folder by default).

    Returns
    -------
    Registration
        Deformation field on the fixed grid, the linear stage, run time (s) and metrics:
        correlation of the intensity-normalized images inside the fixed mask before
        (world-aligned) and after registration.
    """
    engine = check_engine(engine)
    if engine == "fnirt":
        raise RegistrationInputError(
            "registration='fnirt' runs as FSL nodes of init_label_registration_wf, not "
            "through register(); use the workflow or an open engine (dipy-syn, mrtrix, ants)."
        )
    if engine == "auto":
        engine = DEFAULT_OPEN_ENGINE
    engine = resolve_engine(engine)
    fixed_img, moving_img = _load(fixed), _load(moving)
    for img, what in ((fixed_img, "fixed"), (moving_img, "moving")):
        if len(img.shape) != 3:
            raise RegistrationInputError(
                f"The {what} image {_name(img, what)} has shape {img.shape}; registration "
                "needs a 3-D map (e.g. FA or the mean b0)."
            )
    fmask = _mask_array(fixed_mask, fixed_img, "fixed")
    mmask = _mask_array(moving_mask, moving_img, "moving")
    if engine == "none":
        check_same_grid(moving_img, fixed_img, names=("moving image", "fixed image"))

    start = time.perf_counter()
    fdata = normalize_intensity(fixed_img.get_fdata(dtype=np.float32), fmask)
    mdata = normalize_intensity(moving_img.get_fdata(dtype=np.float32), mmask)
    fnorm = nb.Nifti1Image(fdata, fixed_img.affine)
    mnorm = nb.Nifti1Image(mdata, moving_img.affine)
    if engine == "none":
        deformation, linear = affine_deformation(fixed_img.shape, fixed_img.affine), np.eye(4)
    else:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            run = {"dipy-syn": _run_dipy, "mrtrix": _run_mrtrix, "ants": _run_ants}[engine]
            deformation, linear = run(
                fnorm, mnorm, fmask, mmask, seed=seed, n_threads=n_threads, tmp=Path(tmp)
            )
    seconds = time.perf_counter() - start

    sel = fmask if fmask is not None else fdata > 0
    after = resample(mnorm, deformation, fnorm.affine).get_fdata()
    metrics = {
        **_correlations(fnorm, mnorm, after, sel),
        "max_displacement_mm": float(
            np.linalg.norm(
                deformation - affine_deformation(fixed_img.shape, fixed_img.affine, linear),
                axis=-1,
            ).max()
        ),
    }
    check_registration(
        metrics,
        fixed=_name(fixed_img, "the fixed image"),
        moving=_name(moving_img, "the moving image"),
        engine=engine,
    )
    return Registration(engine, deformation, fixed_img.affine, linear, seconds, metrics)


#: SyN iterations per level, coarsest first, and the CC window radius (voxels).
_SYN_ITERS = [25, 10, 5]
_CC_RADIUS = 2


def _n_levels(shape: Sequence[int], radius: int, most: int = 3) -> int:
    """Pyramid levels (halving) whose coarsest grid keeps every side >= 2 * radius + 2."""
    smallest = min(shape[:3])
    levels = 1
    while levels < most and smallest / 2**levels >= 2 * radius + 2:
        levels += 1
    return levels


def _run_dipy(fixed, moving, fmask, mmask, *, seed, n_threads, tmp):
    """DIPY: centre of mass -> rigid -> affine (MI, to half resolution), then SyN (CC)."""
    from dipy.align.imaffine import (
        AffineRegistration,
        MutualInformationMetric,
        transform_centers_of_mass,
    )
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric
    from dipy.align.transforms import (
        AffineTransform3D,
        RigidTransform3D,
    )

    static, mov = fixed.get_fdata(dtype=np.float32), moving.get_fdata(dtype=np.float32)
    sa, ma = fixed.affine, moving.affine
    start = transform_centers_of_mass(static, sa, mov, ma).affine
    # The linear stages stop at half resolution: SyN refines at full resolution, and the
    # full-resolution affine levels cost ~4x the rest for no measured gain (docs/registration.md).
    n_aff = _n_levels(static.shape, 2)
    factors = [4, 2, 1][-n_aff:][:2] if n_aff > 1 else [1]
    # Dense MI sampling (sampling_proportion=None) keeps the result deterministic.
    affreg = AffineRegistration(
        metric=MutualInformationMetric(nbins=32, sampling_proportion=None),
        level_iters=[50, 20, 10][-n_aff:][: len(factors)],
        sigmas=[3.0, 1.0, 0.0][-n_aff:][: len(factors)],
        factors=factors,
        verbosity=0,
    )
    masks = {
        "static_mask": None if fmask is None else fmask.astype(np.int32),
        "moving_mask": None if mmask is None else mmask.astype(np.int32),
    }
    for transform in (RigidTransform3D(), AffineTransform3D()):
        found = affreg.optimize(
            static,
            mov,
            transform,
            None,
            static_grid2world=sa,
            moving_grid2world=ma,
            starting_affine=start,
            **masks,
        ).affine
        if isinstance(transform, AffineTransform3D) and not plausible_affine(found):
            LOGGER.warning(
                "dipy affine stage diverged (scales %s); keeping the rigid alignment",
                np.array2string(linear_scales(found), precision=2),
            )
            break
        start = found
    sdr = SymmetricDiffeomorphicRegistration(
        CCMetric(3, sigma_diff=2.0, radius=_CC_RADIUS),
        level_iters=_SYN_ITERS[-_n_levels(static.shape, _CC_RADIUS) :],
    )
    sdr.verbosity = 0
    mapping = sdr.optimize(static, mov, static_grid2world=sa, moving_grid2world=ma, prealign=start)
    # The positions DiffeomorphicMap.transform samples (imwarp._warp_forward/_warp_backward),
    # with x the fixed voxel centre (mm): forward y = P x + f(Dinv P x); SyN returns an
    # inverted map whose transform is y = Pinv (x + b(Dinv x)).
    x = grid_positions(static.shape, sa)
    if mapping.is_inverse:
        field, pre, at = mapping.backward, mapping.prealign_inv, x
    else:
        field, pre = mapping.forward, mapping.prealign
        at = x = affine_deformation(static.shape, sa, pre)
        pre = None
    dinv = np.asarray(mapping.disp_world2grid, dtype=np.float32)
    idx = np.moveaxis(at @ dinv[:3, :3].T + dinv[:3, 3], -1, 0)
    field = np.asarray(field, dtype=np.float32)
    disp = np.stack(
        [ndimage.map_coordinates(field[..., k], idx, order=1, cval=0.0) for k in range(3)],
        axis=-1,
    )
    y = x + disp
    if pre is not None:
        pre = np.asarray(pre, dtype=np.float32)
        y = y @ pre[:3, :3].T + pre[:3, 3]
    return y.astype(np.float32), np.asarray(start)


def _run_mrtrix(fixed, moving, fmask, mmask, *, seed, n_threads, tmp):
    """MRtrix3 ``mrregister -type rigid_affine_nonlinear``; warp1 is the pull-back field."""
    fixed.to_filename(tmp / "fixed.nii")
    moving.to_filename(tmp / "moving.nii")
    cmd = [
        "mrregister", str(tmp / "moving.nii"), str(tmp / "fixed.nii"),
        "-type", "rigid_affine_nonlinear",
        "-affine", str(tmp / "affine.txt"),
        "-nl_warp", str(tmp / "warp1.nii"), str(tmp / "warp2.nii"),
        "-nthreads", str(int(n_threads)), "-quiet", "-force",
    ]  # fmt: skip
    for mask, ref, opt in ((mmask, moving, "-mask1"), (fmask, fixed, "-mask2")):
        if mask is not None:
            path = tmp / f"{opt[1:]}.nii"
            nb.Nifti1Image(mask.astype(np.uint8), ref.affine).to_filename(path)
            cmd += [opt, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"mrregister failed: {proc.stderr.strip()[-500:]}")
    warp = nb.load(tmp / "warp1.nii")
    if warp.shape[:3] != fixed.shape or not np.allclose(warp.affine, fixed.affine, atol=1e-3):
        raise RuntimeError("mrregister returned a warp off the fixed grid")
    deformation = np.asarray(warp.dataobj, dtype=np.float32).reshape(*fixed.shape, 3)
    # -affine is image2 -> image1 (fixed world -> moving world), the pull-back linear map.
    linear = np.loadtxt(tmp / "affine.txt", comments="#")
    if linear.shape == (3, 4):
        linear = np.vstack([linear, [0, 0, 0, 1]])
    # Outside the moving FOV mrregister writes NaN: map those voxels nowhere.
    return np.nan_to_num(deformation, nan=1e9), linear


def _run_ants(fixed, moving, fmask, mmask, *, seed, n_threads, tmp):
    """ANTsPy ``SyN``; the composite transform is read back as a displacement field."""
    import ants

    previous = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(n_threads))
    try:
        return _ants_deformation(ants, fixed, moving, fmask, seed=seed, tmp=tmp)
    finally:
        if previous is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = previous


def _ants_deformation(ants, fixed, moving, fmask, *, seed, tmp):

    fixed.to_filename(tmp / "fixed.nii.gz")
    moving.to_filename(tmp / "moving.nii.gz")
    f, m = ants.image_read(str(tmp / "fixed.nii.gz")), ants.image_read(str(tmp / "moving.nii.gz"))
    kw = {}
    if fmask is not None:
        nb.Nifti1Image(fmask.astype(np.float32), fixed.affine).to_filename(tmp / "fmask.nii.gz")
        kw["mask"] = ants.image_read(str(tmp / "fmask.nii.gz"))
    reg = ants.registration(
        f, m, type_of_transform="SyN", random_seed=int(seed), outprefix=str(tmp / "ants_"), **kw
    )
    comp = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=str(tmp / "comp_"))
    disp = np.asarray(nb.load(comp).dataobj, dtype=np.float32).reshape(*fixed.shape, 3)
    disp[..., :2] *= -1  # ITK displacements are LPS
    linear = np.eye(4)
    mats = [t for t in reg["fwdtransforms"] if t.endswith(".mat")]
    if mats:
        tx = ants.read_transform(mats[0])
        matrix = np.eye(4)
        p = np.asarray(tx.parameters, dtype=float)
        c = np.asarray(tx.fixed_parameters, dtype=float)
        matrix[:3, :3] = p[:9].reshape(3, 3)
        matrix[:3, 3] = p[9:12] + c - matrix[:3, :3] @ c
        lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        linear = lps @ matrix @ lps
    return grid_positions(fixed.shape, fixed.affine) + disp, linear


def apply_registration(
    registration: Registration, images: Sequence, *, label: bool = False
) -> list[nb.Nifti1Image]:
    """Resample each of ``images`` (moving space) onto the fixed grid."""
    return [registration.apply(img, label=label) for img in images]
