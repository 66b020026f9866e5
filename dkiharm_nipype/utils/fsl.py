"""FSL acquisition files (``acqparams.txt``, ``index.txt``) built from BIDS sidecars.

TOPUP (Andersson et al. 2003, *NeuroImage* 20:870) and Eddy (Andersson & Sotiropoulos
2016, *NeuroImage* 125:1063) describe each volume by one row ``x y z t`` of an
acquisition-parameter file: the unit phase-encoding (PE) vector in voxel axes and the
total readout time ``t`` in seconds. Eddy's index file points each DWI volume at its row.

Two conventions meet here:

* BIDS writes the PE direction as a voxel axis with a sign (``i``, ``j-``, ...), and the
  readout time as ``TotalReadoutTime`` or as ``EffectiveEchoSpacing`` with
  ``TotalReadoutTime = EffectiveEchoSpacing * (ReconMatrixPE - 1)``.
* FSL reads images in a radiological voxel frame: when the image's affine has a positive
  determinant (neurological storage, the usual NIfTI/RAS case) FSL flips the first voxel
  axis, so the ``x`` component of the PE vector changes sign, exactly as for ``bvecs``
  (see MRtrix3's ``-export_pe_topup``/``-export_pe_eddy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import DkiharmInputError
from .dwi import B0_THRESHOLD, b0_indices, check_volumes

_PE_AXES = {"i": 0, "j": 1, "k": 2}

#: Readout time written for Eddy when no TOPUP field is used and the sidecar gives none:
#: without a susceptibility field Eddy only needs the PE axis and sign, not the time.
NO_FIELD_READOUT_TIME = 0.05

#: Above this, a readout time in seconds is implausible (usually milliseconds were written).
MAX_READOUT_TIME = 0.5


class MissingMetadataError(DkiharmInputError):
    """A BIDS sidecar lacks (or has an invalid) field that TOPUP/Eddy needs."""


class FieldmapError(DkiharmInputError):
    """The ``epi`` fieldmaps given cannot drive TOPUP for this DWI."""


def sidecar_name(image: str | Path) -> str:
    """Name of the BIDS JSON sidecar next to ``image`` (used in error messages)."""
    name = Path(image).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    return name + ".json"


def flips_x(affine: np.ndarray) -> bool:
    """Whether FSL flips the first voxel axis of an image with this ``affine``."""
    return bool(np.linalg.det(np.asarray(affine)[:3, :3]) > 0)


def pe_vector(
    metadata: Mapping, *, flip_x: bool = False, source: str = "the sidecar"
) -> np.ndarray:
    """The FSL phase-encoding unit vector of ``metadata['PhaseEncodingDirection']``.

    Parameters
    ----------
    metadata
        BIDS sidecar dictionary.
    flip_x
        Flip the sign of the ``x`` component (see :func:`flips_x`).
    source
        Name of the sidecar, quoted in error messages.
    """
    pe_dir = metadata.get("PhaseEncodingDirection")
    if pe_dir is None:
        raise MissingMetadataError(
            f"{source} has no 'PhaseEncodingDirection': add it (one of i, i-, j, j-, k, k-) "
            "to run TOPUP/Eddy, or use --preproc mrtrix."
        )
    if not isinstance(pe_dir, str) or pe_dir not in {f"{a}{s}" for a in "ijk" for s in ("", "-")}:
        raise MissingMetadataError(
            f"{source} has 'PhaseEncodingDirection' = {pe_dir!r}; it must be one of "
            "i, i-, j, j-, k, k-."
        )
    vec = np.zeros(3, dtype=int)
    vec[_PE_AXES[pe_dir[0]]] = -1 if pe_dir.endswith("-") else 1
    if flip_x:
        vec[0] = -vec[0]
    return vec


def readout_time(
    metadata: Mapping,
    *,
    shape: Sequence[int] | None = None,
    source: str = "the sidecar",
) -> float:
    """Total readout time (s) of an EPI series, as TOPUP and Eddy define it.

    Taken from ``TotalReadoutTime`` (or ``EstimatedTotalReadoutTime``), else computed as
    ``EffectiveEchoSpacing * (N_PE - 1)`` (BIDS specification, "Phase encoding"), with
    ``N_PE`` from ``ReconMatrixPE`` or else the image ``shape`` along the PE axis.
    """
    for key in ("TotalReadoutTime", "EstimatedTotalReadoutTime"):
        if metadata.get(key) is not None:
            return _checked_time(metadata[key], key, source)

    for key in ("EffectiveEchoSpacing", "EstimatedEffectiveEchoSpacing"):
        if metadata.get(key) is None:
            continue
        echo_spacing = _checked_time(metadata[key], key, source)
        n_pe = metadata.get("ReconMatrixPE")
        if n_pe is None:
            pe_dir = metadata.get("PhaseEncodingDirection")
            if shape is None or not isinstance(pe_dir, str) or pe_dir[:1] not in _PE_AXES:
                raise MissingMetadataError(
                    f"{source} gives {key} but neither 'ReconMatrixPE' nor a valid "
                    "'PhaseEncodingDirection' to count the PE lines: add 'TotalReadoutTime'."
                )
            n_pe = shape[_PE_AXES[pe_dir[0]]]
        return _checked_time(echo_spacing * (int(n_pe) - 1), f"{key} * (N_PE - 1)", source)

    raise MissingMetadataError(
        f"{source} has neither 'TotalReadoutTime' nor 'EffectiveEchoSpacing': add one "
        "(in seconds) to run TOPUP, or use --preproc mrtrix."
    )


def _checked_time(value, key: str, source: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= MAX_READOUT_TIME:
        raise MissingMetadataError(
            f"{source} has {key} = {value:g}, not a time in seconds within "
            f"(0, {MAX_READOUT_TIME:g}]; fix the sidecar (milliseconds must be divided by 1000)."
        )
    return value


def acqparams_from_metadata(
    metadata: Mapping,
    *,
    shape: Sequence[int] | None = None,
    flip_x: bool = False,
    n_volumes: int = 1,
    require_readout: bool = True,
    source: str = "the sidecar",
) -> np.ndarray:
    """Rows ``x y z t`` of an FSL acquisition-parameter file for one EPI series.

    Parameters
    ----------
    metadata
        BIDS sidecar of the series.
    shape
        Image shape, to count PE lines when the readout time comes from the echo spacing.
    flip_x
        Whether FSL flips the first voxel axis of this image (:func:`flips_x`).
    n_volumes
        How many (identical) rows to return, one per volume given to TOPUP.
    require_readout
        When False (Eddy without TOPUP) a missing readout time is replaced by
        :data:`NO_FIELD_READOUT_TIME` instead of raising.
    source
        Name of the sidecar, quoted in error messages.

    Returns
    -------
    numpy.ndarray
        Array of shape ``(n_volumes, 4)``.

    Examples
    --------
    >>> acqparams_from_metadata({"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05})
    array([[ 0.  , -1.  ,  0.  ,  0.05]])
    """
    vec = pe_vector(metadata, flip_x=flip_x, source=source)
    try:
        trt = readout_time(metadata, shape=shape, source=source)
    except MissingMetadataError:
        if require_readout or any(metadata.get(k) is not None for k in _READOUT_KEYS):
            raise
        trt = NO_FIELD_READOUT_TIME
    row = np.array([*vec.astype(float), trt])
    return np.tile(row, (n_volumes, 1))


_READOUT_KEYS = (
    "TotalReadoutTime",
    "EstimatedTotalReadoutTime",
    "EffectiveEchoSpacing",
    "EstimatedEffectiveEchoSpacing",
)


def topup_config(shape: Sequence[int]) -> str:
    """The TOPUP configuration for an image of ``shape``.

    FSL's ``b02b0.cnf`` subsamples by 2 at its coarse levels, which fails when a spatial
    dimension is odd; ``b02b0_1.cnf`` (same schedule, no subsampling) then applies.
    """
    return "b02b0.cnf" if all(int(n) % 2 == 0 for n in shape[:3]) else "b02b0_1.cnf"


def format_acqparams(rows: np.ndarray) -> str:
    """Text of an acquisition-parameter file: ``0 -1 0 0.05`` per row."""
    return "".join(f"{int(x)} {int(y)} {int(z)} {t:.8g}\n" for x, y, z, t in np.asarray(rows))


def write_topup_files(
    dwi_file: str | Path,
    bvals: np.ndarray,
    metadata: Mapping,
    *,
    fmap_files: Sequence[str | Path] = (),
    fmap_metadata: Sequence[Mapping] = (),
    use_topup: bool = True,
    out_dir: str | Path = ".",
    b0_threshold: float = B0_THRESHOLD,
    source: str | None = None,
) -> dict[str, str]:
    """Write the files TOPUP and Eddy read for one DWI series.

    With ``use_topup``, the b=0 volumes of the DWI followed by all volumes of the
    reversed-PE ``epi`` fieldmaps are merged into ``topup_imain.nii.gz``, and
    ``acqparams.txt`` holds one row per merged volume (the DWI's rows first). Eddy reuses
    that file: its ``index.txt`` points every DWI volume at row 1, the DWI's own
    acquisition, which is also the reference frame of TOPUP's field. Without TOPUP,
    ``acqparams.txt`` has the DWI's single row.

    ``source`` names the DWI's sidecar in error messages (default: next to ``dwi_file``;
    give it when ``dwi_file`` is a derivative of the raw series).

    Returns
    -------
    dict
        ``acqparams``, ``index`` and, with ``use_topup``, ``imain`` (merged b0s) and
        ``config`` (see :func:`topup_config`).

    Raises
    ------
    MissingMetadataError
        If a sidecar lacks the PE direction or (for TOPUP) the readout time.
    FieldmapError
        If no fieldmap has a PE direction other than the DWI's, or grids differ.
    """
    out_dir = Path(out_dir)
    source = source or sidecar_name(dwi_file)
    dwi_img = nb.load(dwi_file)
    bvals = np.asarray(bvals, dtype=float).ravel()
    check_volumes(dwi_img.shape, bvals, source=Path(dwi_file).name)
    shape = dwi_img.shape[:3]
    dwi_row = acqparams_from_metadata(
        metadata,
        shape=shape,
        flip_x=flips_x(dwi_img.affine),
        require_readout=use_topup,
        source=source,
    )
    paths = {"acqparams": out_dir / "acqparams.txt", "index": out_dir / "index.txt"}
    paths["index"].write_text(" ".join(["1"] * bvals.size) + "\n")

    if not use_topup:
        paths["acqparams"].write_text(format_acqparams(dwi_row))
        return {key: str(path) for key, path in paths.items()}

    if len(fmap_files) != len(fmap_metadata):
        raise FieldmapError(
            f"Got {len(fmap_files)} fieldmap images but {len(fmap_metadata)} sidecars; "
            "give one metadata dictionary per 'epi' fieldmap."
        )
    if not fmap_files:
        raise FieldmapError(
            f"TOPUP needs a reversed-PE 'epi' fieldmap for {Path(dwi_file).name} but none was "
            "given; add one or build the workflow with has_rpe_fmap=False."
        )

    b0_idx = b0_indices(bvals, threshold=b0_threshold)
    volumes = [np.asarray(dwi_img.dataobj, dtype=np.float32)[..., b0_idx]]
    rows = [np.tile(dwi_row, (b0_idx.size, 1))]
    for fmap_file, fmap_meta in zip(fmap_files, fmap_metadata, strict=True):
        fmap_img = nb.load(fmap_file)
        if fmap_img.shape[:3] != shape:
            raise FieldmapError(
                f"Fieldmap {Path(fmap_file).name} has grid {fmap_img.shape[:3]} but the DWI "
                f"has {shape}; TOPUP needs them on the same grid (use a matching 'epi' scan)."
            )
        data = np.asarray(fmap_img.dataobj, dtype=np.float32)
        data = data[..., np.newaxis] if data.ndim == 3 else data.reshape(*shape, -1)
        volumes.append(data)
        rows.append(
            acqparams_from_metadata(
                fmap_meta,
                shape=shape,
                flip_x=flips_x(fmap_img.affine),
                n_volumes=data.shape[-1],
                source=sidecar_name(fmap_file),
            )
        )
    rows = np.vstack(rows)
    if not np.any(np.any(rows[:, :3] != dwi_row[0, :3], axis=1)):
        raise FieldmapError(
            f"No 'epi' fieldmap ({', '.join(Path(f).name for f in fmap_files)}) has a "
            f"phase-encoding direction other than the DWI's "
            f"({metadata['PhaseEncodingDirection']}); TOPUP needs a reversed-PE b0: fix the "
            "sidecars or build the workflow with has_rpe_fmap=False."
        )

    paths["acqparams"].write_text(format_acqparams(rows))
    paths["imain"] = out_dir / "topup_imain.nii.gz"
    header = dwi_img.header.copy()
    header.set_data_dtype(np.float32)
    nb.Nifti1Image(np.concatenate(volumes, axis=-1), dwi_img.affine, header).to_filename(
        paths["imain"]
    )
    out = {key: str(path) for key, path in paths.items()}
    out["config"] = topup_config(shape)
    return out


def has_reversed_pe(metadata: Mapping, fmap_metadata: Sequence[Mapping]) -> bool:
    """Whether any ``epi`` fieldmap was phase-encoded differently from the DWI.

    Meant for the caller that decides ``has_rpe_fmap`` when building the workflow; only
    the ``PhaseEncodingDirection`` fields are compared.
    """
    dwi_pe = metadata.get("PhaseEncodingDirection")
    return dwi_pe is not None and any(
        meta.get("PhaseEncodingDirection") not in (None, dwi_pe) for meta in fmap_metadata
    )
