"""What ``--preproc``, ``--denoiser`` and ``--mask-method`` mean, and what ``auto`` becomes.

:func:`resolve_preproc` is the one place where ``--preproc auto`` is decided on this machine
(TOPUP/Eddy when FSL is found, else MRtrix3 only); the CLI, the workflows and the methods
text call it (or :func:`resolved_preproc_mode`) instead of deciding again.
"""

from __future__ import annotations

import logging
from typing import Literal

from ..errors import DkiharmInputError
from ..utils.env import FSLNotFoundError, ToolNotFoundError, missing_fsl, missing_mrtrix

LOGGER = logging.getLogger("dkiharm")

PreprocMode = Literal["auto", "fsl", "mrtrix", "none"]
MaskMethod = Literal["dwi2mask", "median_otsu"]
Denoiser = Literal["dwidenoise", "mppca"]
PREPROC_MODES = ("auto", "fsl", "mrtrix", "none")
DENOISERS = ("dwidenoise", "mppca")
MASK_METHODS = ("dwi2mask", "median_otsu")


def resolve_preproc(preproc: PreprocMode, denoiser: Denoiser = "mppca") -> tuple[bool, bool]:
    """Decide which steps run: ``(run_mrtrix, run_fsl)`` for a ``--preproc`` mode.

    ``auto`` denoises and removes Gibbs ringing, then adds TOPUP/Eddy when FSL is found
    and otherwise logs one line saying they were skipped; ``fsl`` requires FSL;
    ``mrtrix`` never runs FSL; ``none`` passes the data through. ``denoiser="mppca"`` (the
    default) denoises with the torch MP-PCA (:mod:`dkiharm_nipype.preproc.denoise`), so that
    only ``mrdegibbs`` is needed from MRtrix3; ``denoiser="dwidenoise"`` runs MRtrix3's.

    Raises
    ------
    FSLNotFoundError
        If ``preproc == "fsl"`` and FSL is not installed.
    ToolNotFoundError
        If a mode that denoises runs on a machine without MRtrix3.
    """
    if preproc not in PREPROC_MODES:
        raise DkiharmInputError(
            f"preproc={preproc!r} is not a preprocessing mode; use one of {PREPROC_MODES}."
        )
    if denoiser not in DENOISERS:
        raise DkiharmInputError(f"denoiser={denoiser!r} is unknown; use one of {DENOISERS}.")
    if preproc == "none":
        return False, False

    tools = ("dwidenoise", "mrdegibbs") if denoiser == "dwidenoise" else ("mrdegibbs",)
    no_mrtrix = missing_mrtrix(tools)
    if no_mrtrix:
        instead = "--denoiser mppca" if no_mrtrix == ["dwidenoise"] else "--preproc none"
        raise ToolNotFoundError(
            f"--preproc {preproc} runs MRtrix3 but {', '.join(no_mrtrix)} not found on PATH; "
            f"install MRtrix3 >= 3.0 or use {instead}."
        )
    if preproc == "mrtrix":
        return True, False

    no_fsl = missing_fsl()
    if preproc == "fsl" and no_fsl:
        raise FSLNotFoundError(
            f"--preproc fsl needs FSL's TOPUP and Eddy but {', '.join(no_fsl)} not found; "
            "install FSL (and set FSLDIR) or use --preproc mrtrix."
        )
    if no_fsl:
        LOGGER.warning(
            "FSL not found (%s missing): skipping TOPUP and Eddy, preprocessing with "
            "MRtrix3 denoising and Gibbs-ringing removal only.",
            ", ".join(no_fsl),
        )
        return True, False
    return True, True


def resolved_preproc_mode(
    preproc: PreprocMode, denoiser: Denoiser = "mppca", *, check: bool = True
) -> str:
    """The mode that runs: ``auto`` becomes ``fsl`` or ``mrtrix`` (:func:`resolve_preproc`).

    With ``check=False`` an explicit mode is returned as given, without looking for its
    tools (the methods text of a run made elsewhere); ``auto`` is always decided here.
    """
    if not check and preproc != "auto":
        return preproc
    run_mrtrix, run_fsl = resolve_preproc(preproc, denoiser)
    return "fsl" if run_fsl else ("mrtrix" if run_mrtrix else "none")
