"""Reading the phantom's ground truth and moving scan-space maps into subject space.

Subject space is the space of the subject's T1w image (``space-T1w``); every session has
a rigid transform ``from-dwi_to-T1w`` (4 x 4, RAS world mm) in
``derivatives/phantom-truth/sub-X/ses-Y/xfm/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates

from ..registration.grids import grid_positions
from .bids import TRUTH_PIPELINE

PARAMS = ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")


def truth_root(bids_root: str | Path) -> Path:
    """``<bids_root>/derivatives/phantom-truth``, checked to exist."""
    root = Path(bids_root) / "derivatives" / TRUTH_PIPELINE
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist; generate the dataset with dkiharm-phantom first."
        )
    return root


def _sub(label: str) -> str:
    return str(label).removeprefix("sub-")


def _ses(label: str) -> str:
    return str(label).removeprefix("ses-")


def scan_prefix(bids_root, subject: str, session: str, run: int = 1) -> Path:
    sub, ses = _sub(subject), _ses(session)
    return (
        truth_root(bids_root)
        / f"sub-{sub}"
        / f"ses-{ses}"
        / "dwi"
        / (f"sub-{sub}_ses-{ses}_run-{int(run)}_space-dwi")
    )


def load_truth(
    bids_root, subject: str, session: str, run: int = 1, *, params=PARAMS
) -> dict[str, nib.Nifti1Image]:
    """True DKI maps of one scan, in its DWI space, keyed by parameter name."""
    prefix = scan_prefix(bids_root, subject, session, run)
    out = {}
    for name in params:
        path = prefix.with_name(prefix.name + f"_model-dki_param-{name}_desc-truth_dwimap.nii.gz")
        if not path.is_file():
            raise FileNotFoundError(f"no truth map {path}; check subject/session/run labels.")
        out[name] = nib.load(path)
    return out


def load_scan_labels(bids_root, subject: str, session: str, run: int = 1, *, what: str):
    """A scan-space tissue/ROI image: ``what`` is WM, GM, SGM, CSF, brain or wmrois."""
    prefix = scan_prefix(bids_root, subject, session, run)
    suffix = {
        "brain": "_desc-brain_mask",
        "wmrois": "_desc-wmrois_dseg",
    }.get(what, f"_label-{what}_probseg")
    return nib.load(prefix.with_name(prefix.name + suffix + ".nii.gz"))


def load_subject_labels(bids_root, subject: str, *, what: str) -> nib.Nifti1Image:
    """A subject-space (T1w frame, DWI resolution) tissue/ROI image.

    ``what`` as in :func:`load_scan_labels`.
    """
    sub = _sub(subject)
    suffix = {"brain": "_desc-brain_mask", "wmrois": "_desc-wmrois_dseg"}.get(
        what, f"_label-{what}_probseg"
    )
    return nib.load(
        truth_root(bids_root) / f"sub-{sub}" / "anat" / f"sub-{sub}_space-T1w{suffix}.nii.gz"
    )


def load_rois(bids_root) -> list[tuple[int, str, str]]:
    """The ROI table: (index, name, abbreviation)."""
    lines = (truth_root(bids_root) / "desc-wmrois_dseg.tsv").read_text().splitlines()[1:]
    return [(int(i), name, abbr) for i, name, abbr in (ln.split("\t") for ln in lines if ln)]


def scan_to_subject(bids_root, subject: str, session: str) -> np.ndarray:
    """Rigid 4 x 4 transform: DWI world (mm) -> subject/T1w world (mm)."""
    sub, ses = _sub(subject), _ses(session)
    path = (
        truth_root(bids_root)
        / f"sub-{sub}"
        / f"ses-{ses}"
        / "xfm"
        / f"sub-{sub}_ses-{ses}_from-dwi_to-T1w_mode-image_xfm.txt"
    )
    return np.loadtxt(path)


def to_subject_space(
    img,
    bids_root,
    subject: str,
    session: str,
    *,
    reference: nib.Nifti1Image | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> nib.Nifti1Image:
    """Resample a scan-space map (image or path) onto the subject grid with the known pose.

    ``reference`` defaults to the subject-space brain mask; use ``order=0`` for labels.
    """
    img = nib.load(img) if not isinstance(img, nib.spatialimages.SpatialImage) else img
    if reference is None:
        reference = load_subject_labels(bids_root, subject, what="brain")
    xfm = scan_to_subject(bids_root, subject, session)
    # subject voxel -> subject world -> scan world -> scan voxel
    vox2vox = np.linalg.inv(img.affine) @ np.linalg.inv(xfm) @ reference.affine
    shape = reference.shape[:3]
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), 0).reshape(3, -1)
    src = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 3:
        out = map_coordinates(data, src, order=order, cval=cval).reshape(shape)
    else:
        out = np.stack(
            [
                map_coordinates(data[..., k], src, order=order, cval=cval).reshape(shape)
                for k in range(data.shape[3])
            ],
            -1,
        )
    return nib.Nifti1Image(out.astype(np.float32), reference.affine)


def truth_deformation(
    bids_root: str | Path,
    subject: str,
    *,
    fixed_session: str,
    moving_session: str,
    run: int = 1,
    distortion: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The true fixed-to-moving deformation between two scans of the phantom.

    For a voxel ``y`` of the fixed scan's DWI grid, the signal there came from the
    undistorted DWI-world point ``x = y - d(y) e_pe`` (``d``: the phantom's displacement
    fieldmap, in voxels along the phase-encoding axis ``e_pe``; only with ``distortion``),
    i.e. the subject-space point ``T_fixed x``, seen by the moving scan at
    ``T_moving^-1 T_fixed x`` (``T``: ``from-dwi_to-T1w`` rigid transforms). The moving scan
    is taken as undistorted (its truth maps are, and a reversed-PE scan is corrected).

    Returns
    -------
    deformation, fixed_affine
        ``(X, Y, Z, 3)`` moving-world positions, and the fixed grid's affine.
    """
    ref = load_scan_labels(bids_root, subject, fixed_session, run, what="brain")
    x = grid_positions(ref.shape, ref.affine)
    sub, ses = str(subject).removeprefix("sub-"), str(fixed_session).removeprefix("ses-")
    fmap = (
        truth_root(bids_root) / f"sub-{sub}" / f"ses-{ses}" / "fmap"
        / f"sub-{sub}_ses-{ses}_space-dwi_desc-displacement_fieldmap.nii.gz"
    )  # fmt: skip
    if distortion and fmap.is_file():
        pe_dir = json.loads(fmap.with_name(fmap.name.replace(".nii.gz", ".json")).read_text())[
            "PhaseEncodingDirection"
        ]
        # the field is signed (PE polarity included) along the voxel axis of pe_dir
        column = ref.affine[:3, "ijk".index(pe_dir[0])].astype(np.float32)
        x = x - np.asarray(nib.load(fmap).dataobj, dtype=np.float32)[..., None] * column
    to_moving = np.linalg.inv(scan_to_subject(bids_root, subject, moving_session))
    m = to_moving @ scan_to_subject(bids_root, subject, fixed_session)
    return (x @ m[:3, :3].T.astype(np.float32) + m[:3, 3]).astype(np.float32), ref.affine
