"""Which external neuroimaging tools this machine can run.

The workflow factories ask here before adding nodes that need MRtrix3 or FSL, so that a
missing tool is reported once, at build time, in one sentence that says how to fix it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator

from ..errors import DkiharmInputError

#: FSL's eddy has shipped under several names: ``eddy_openmp`` (FSL <= 6.0.5), ``eddy_cpu``
#: and the ``eddy`` dispatcher (FSL >= 6.0.6). Any of them is enough.
EDDY_COMMANDS = ("eddy", "eddy_openmp", "eddy_cpu")

#: What ``--device`` and the interfaces' ``device`` accept: ``auto`` (a GPU when this host
#: has one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

#: MRtrix3 commands the preprocessing runs.
MRTRIX_COMMANDS = ("dwidenoise", "mrdegibbs", "dwi2mask")


class ToolNotFoundError(DkiharmInputError, RuntimeError):
    """A processing step needs an external tool that is not installed (one-line message)."""


class FSLNotFoundError(ToolNotFoundError):
    """FSL (TOPUP/Eddy) was asked for explicitly but is not installed."""


def missing_fsl() -> list[str]:
    """List what is missing to run FSL's TOPUP and Eddy (empty when all is there).

    FSL counts as installed when ``$FSLDIR`` is set, ``topup`` is on ``PATH`` and one of
    :data:`EDDY_COMMANDS` is on ``PATH``.
    """
    missing = []
    if not os.getenv("FSLDIR"):
        missing.append("$FSLDIR")
    if shutil.which("topup") is None:
        missing.append("topup")
    if not any(shutil.which(cmd) for cmd in EDDY_COMMANDS):
        missing.append("eddy (or eddy_openmp/eddy_cpu)")
    return missing


def fsl_available() -> bool:
    """Whether FSL's TOPUP and Eddy can run here."""
    return not missing_fsl()


def missing_mrtrix(commands: tuple[str, ...] = MRTRIX_COMMANDS) -> list[str]:
    """List the MRtrix3 ``commands`` that are not on ``PATH``."""
    return [cmd for cmd in commands if shutil.which(cmd) is None]


@contextlib.contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with ``n_threads`` torch CPU threads (unchanged when 0 or None).

    A Nipype node that declares ``n_procs`` must not let torch start one thread per core:
    two such nodes side by side oversubscribe the cores, and OpenMP's busy waiting then
    makes both many times slower.
    """
    if not n_threads:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str = "auto") -> str:
    """The torch device to use here: ``auto`` becomes ``cuda`` when this host has a GPU
    (``torch.cuda.is_available()``), else ``cpu``; other names are checked and returned.

    Called inside each training, inference and denoising node, on the host that runs it, so
    that a study submitted from a CPU login node still trains on the GPU nodes of a cluster.
    """
    device = str(device)
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise DkiharmInputError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}.")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
