"""Small array operations on diffusion-weighted series: b=0 selection, mean b0, masks."""

from __future__ import annotations

import numpy as np

from ..errors import DkiharmInputError

#: b-values at or below this (s/mm^2) count as b=0; scanners report b=0 as e.g. 5 or 10.
B0_THRESHOLD = 50.0


def b0_indices(bvals: np.ndarray, *, threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Indices of the b=0 volumes of a series with b-values ``bvals``.

    Raises
    ------
    DkiharmInputError
        If no b-value is at or below ``threshold``.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    idx = np.flatnonzero(bvals <= threshold)
    if idx.size == 0:
        raise DkiharmInputError(
            f"No b=0 volume (b <= {threshold:g} s/mm^2) among b-values "
            f"{sorted(set(np.round(bvals).astype(int).tolist()))}; a b=0 volume is needed "
            "for the mean b0, the mask and TOPUP."
        )
    return idx


def check_volumes(shape: tuple[int, ...], bvals: np.ndarray, *, source: str = "the DWI") -> None:
    """Raise :class:`DkiharmInputError` unless an image of ``shape`` has one volume per b-value."""
    n_vols = shape[3] if len(shape) == 4 else 1
    if n_vols != np.asarray(bvals).size:
        raise DkiharmInputError(
            f"{source} has {n_vols} volumes but its .bval file lists {np.asarray(bvals).size} "
            "b-values; use the .bval/.bvec files that belong to this image."
        )


def mean_b0(data: np.ndarray, bvals: np.ndarray, *, threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Voxel-wise mean of the b=0 volumes of the 4-D ``data``."""
    check_volumes(data.shape, bvals)
    return data[..., b0_indices(bvals, threshold=threshold)].mean(axis=-1, dtype=np.float64)


def degibbs_axes(metadata: dict | None = None) -> list[int]:
    """The in-plane voxel axes of a 2-D multi-slice acquisition, for ``mrdegibbs -axes``.

    Gibbs-ringing removal (Kellner et al. 2016, *MRM* 76:1574) works within the acquired
    slices, so the two axes other than BIDS ``SliceEncodingDirection`` (default ``k``,
    axial) are returned. Self-contained so that it can run in a Nipype ``Function`` node.
    """
    slice_dir = (metadata or {}).get("SliceEncodingDirection") or "k"
    if slice_dir[0] not in "ijk":
        raise DkiharmInputError(
            f"SliceEncodingDirection {slice_dir!r} is not one of i, i-, j, j-, k, k-; "
            "fix the DWI sidecar."
        )
    return [axis for axis in range(3) if axis != "ijk".index(slice_dir[0])]
