"""The reference scan's own repeatability without a rescan: two interleaved halves.

Without a ground truth, the lowest NRMSE-to-reference a harmonization can reach is the
reference scan's own repeatability (issue #20.4). With no rescan of it, the scan is split
into two halves, every shell's directions (and the b0s) taken alternately in acquisition
order, so both halves sample each shell evenly, and each half is fitted with the same fit
as the full scan. :func:`dkiharm_nipype.evaluation.scores.noise_floor` then scales the
difference of the two halves to one full scan's noise.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np

from ..utils.dwi import B0_THRESHOLD
from ..utils.io import read_gradients
from .fit import fit_dki
from .maps import ALL_METRICS

__all__ = ["fit_halves", "split_directions", "write_half_maps"]


def split_directions(
    bvals: np.ndarray, *, b0_threshold: float = B0_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Volume indices of two interleaved halves: per shell (b rounded to 100 s/mm^2) and
    among the b0s, in acquisition order, the even-ranked volumes go to the first half and
    the odd-ranked ones to the second; each half keeps the acquisition order.

    >>> [h.tolist() for h in split_directions(np.array([0, 1000, 1000, 0, 2000, 1000, 2000]))]
    [[0, 1, 4, 5], [2, 3, 6]]
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    shells = np.where(bvals < b0_threshold, 0, np.round(bvals / 100.0))
    halves: tuple[list[int], list[int]] = ([], [])
    for shell in np.unique(shells):
        idx = np.flatnonzero(shells == shell)
        halves[0].extend(idx[0::2].tolist())
        halves[1].extend(idx[1::2].tolist())
    return np.sort(halves[0]), np.sort(halves[1])  # each half in acquisition order


def fit_halves(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "irlls",
    b_max: float | None = None,
    n_threads: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The eight maps of each half (:func:`split_directions`), with the pipeline's fit
    (plausibility constraints on, as for every scan's own maps)."""
    bvecs = np.asarray(bvecs, dtype=float)
    bvecs = bvecs.T if bvecs.shape[0] == 3 and bvecs.shape[1] != 3 else bvecs
    out = []
    for half in split_directions(bvals):
        fit = fit_dki(
            dwi[..., half], np.asarray(bvals)[half], bvecs[half], mask=mask, method=method,
            b_max=b_max, constraints=True, n_threads=n_threads,
        )  # fmt: skip
        out.append(fit.metrics(ALL_METRICS))
    return out


def write_half_maps(
    dwi_file: str | Path,
    bval_file: str | Path,
    bvec_file: str | Path,
    mask_file: str | Path,
    out_stem: str | Path,
    *,
    method: str = "irlls",
    b_max: float | None = None,
    n_threads: int = 1,
) -> list[list[str]]:
    """:func:`fit_halves` of one scan's files; returns, per half, its eight map files
    (``ALL_METRICS`` order) named ``<out_stem>_half-<1|2>_param-<map>_dwimap.nii.gz``."""
    img = nb.load(dwi_file)
    dwi = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(nb.load(mask_file).dataobj) > 0
    bvals, bvecs = read_gradients(bval_file, bvec_file)
    halves = fit_halves(dwi, bvals, bvecs, mask, method=method, b_max=b_max, n_threads=n_threads)
    files = []
    for k, maps in enumerate(halves, 1):
        files.append([])
        for p in ALL_METRICS:
            path = Path(f"{out_stem}_half-{k}_param-{p}_dwimap.nii.gz")
            nb.Nifti1Image(np.asarray(maps[p], dtype=np.float32), img.affine).to_filename(path)
            files[-1].append(str(path))
    return files
