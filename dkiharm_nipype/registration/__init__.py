"""Registration of reference-scanner DKI maps into a target scan's DWI space.

* :mod:`.engines` — the engines (DIPY SyN, MRtrix3, ANTs; FNIRT runs as Nipype nodes) and
  :func:`register`, which returns a :class:`Registration` (a deformation field).
* :mod:`.grids` — voxel grids, deformation fields and :func:`resample`.
* :mod:`.similarity` — correlation and Dice, and the guards that stop a failed registration.

The public names of the three are re-exported here: ``from dkiharm_nipype.registration
import register, resample``. The phantom's true deformation is
:func:`dkiharm_nipype.phantom.truth.truth_deformation`.
"""

from .engines import (
    DEFAULT_OPEN_ENGINE,
    ENGINES,
    FNIRT_COMMANDS,
    MRTRIX_REGISTRATION_COMMANDS,
    OPEN_ENGINES,
    SUPPORT_TOLERANCE,
    EngineNotAvailableError,
    FNIRTNotFoundError,
    Registration,
    UnknownEngineError,
    apply_registration,
    check_engine,
    engine_available,
    missing_fnirt,
    register,
    resolve_engine,
)
from .grids import (
    VOXEL_TOLERANCE_MM,
    GridMismatchError,
    RegistrationInputError,
    affine_deformation,
    check_same_grid,
    check_same_voxel_size,
    grid_positions,
    resample,
    voxel_sizes,
)
from .similarity import (
    FAILURE_MARGIN,
    MAX_AFFINE_SCALE,
    RegistrationFailedError,
    check_registration,
    correlation,
    dice,
    intensity_scale,
    linear_scales,
    mean_label_dice,
    normalize_intensity,
    plausible_affine,
    registration_similarity,
)

__all__ = [
    "DEFAULT_OPEN_ENGINE",
    "ENGINES",
    "FAILURE_MARGIN",
    "FNIRT_COMMANDS",
    "MAX_AFFINE_SCALE",
    "MRTRIX_REGISTRATION_COMMANDS",
    "OPEN_ENGINES",
    "SUPPORT_TOLERANCE",
    "VOXEL_TOLERANCE_MM",
    "EngineNotAvailableError",
    "FNIRTNotFoundError",
    "GridMismatchError",
    "Registration",
    "RegistrationFailedError",
    "RegistrationInputError",
    "UnknownEngineError",
    "affine_deformation",
    "apply_registration",
    "check_engine",
    "check_registration",
    "check_same_grid",
    "check_same_voxel_size",
    "correlation",
    "dice",
    "engine_available",
    "grid_positions",
    "intensity_scale",
    "linear_scales",
    "mean_label_dice",
    "missing_fnirt",
    "normalize_intensity",
    "plausible_affine",
    "register",
    "registration_similarity",
    "resample",
    "resolve_engine",
    "voxel_sizes",
]
