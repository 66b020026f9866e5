"""Accuracy and time of the registration engines on the phantom, where the truth is known.

One traveling subject of ``paper-dataset1`` (110 x 110 x 70 voxels, 2 mm): the reference
scanner D's FA is registered into the DWI space of scanners A and C, and D's true DKI maps
and tissue labels are carried along. Rows:

* ``none``: no registration (grids overlaid as they are);
* ``truth``: the phantom's known transform (poses from the ``xfm`` files, plus C's EPI
  displacement field);
* one row per engine (``dipy-syn``, ``mrtrix``, ``ants`` when antspyx imports).

Fixed image: FA of a DTI fit (b <= 1000) of the target's run-1 DWIs inside the true brain
mask (dilated by a voxel; a stand-in for a good brain extraction). A has a reversed-PE b0,
so its DWIs are taken as distortion corrected: they are unwarped with the known field (an
ideal TOPUP). C has none and keeps its distortion. The moving FA comes from D's DWIs
unwarped the same way. Scores compare the warped D truth with the target's own truth in
the target DWI frame (for C: its truth displaced by the distortion):

* error: mean distance (mm) in the target brain between estimated and true positions;
* NRMSE of FA and MD in the target brain (the ``truth`` row's NRMSE is the floor set by
  the protocols' different TE/TR; a warp fitted to the images can go below it);
* Dice of WM (probseg > 0.5) and mean Dice of the 14 white-matter ROIs.

Usage::

    python benchmarks/registration.py --bids /tmp/ds1          # generates it if absent
    python benchmarks/registration.py --bids /tmp/ds1 --engines dipy-syn,mrtrix

Generating the dataset (1 subject, scanners A, C, D) takes about 4-5 minutes on 1 core;
the registrations about 1-2 minutes in all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MRTRIX_QUIET", "1")

import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from dkiharm_nipype import registration as reg  # noqa: E402
from dkiharm_nipype.evaluation.scores import nrmse  # noqa: E402
from dkiharm_nipype.phantom import truth  # noqa: E402

SUBJECT = "01"
REFERENCE = "D"
TARGETS = {"A": False, "C": True}  # target -> keeps its EPI distortion


def _dataset(path: Path) -> Path:
    if (path / "derivatives").is_dir():
        return path
    from dkiharm_nipype.phantom import generate

    print(f"generating paper-dataset1 (1 subject, A/C/D) in {path} ...", flush=True)
    return generate(path, preset="paper-dataset1", seed=0, subjects=1, scanners=["A", "C", "D"])


def _unwarp(data: np.ndarray, disp: np.ndarray, axis: int) -> np.ndarray:
    """Ideal distortion correction: sample each volume where the undistorted voxel was imaged."""
    grid = np.indices(disp.shape, dtype=np.float32)
    pos = grid.copy()
    for _ in range(6):  # y = x + d(y), solved by fixed-point iteration
        pos[axis] = grid[axis] + ndimage.map_coordinates(disp, pos, order=1, mode="nearest")
    return np.stack(
        [ndimage.map_coordinates(data[..., k], pos, order=1) for k in range(data.shape[-1])], -1
    )


def _fa(bids: Path, session: str, *, distorted: bool) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """DTI FA (b <= 1000) of run 1 and its brain mask, optionally ideally unwarped."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    stem = (
        bids
        / f"sub-{SUBJECT}"
        / f"ses-{session}"
        / "dwi"
        / f"sub-{SUBJECT}_ses-{session}_run-1_dwi"
    )
    img = nb.load(f"{stem}.nii.gz")
    bvals, bvecs = np.loadtxt(f"{stem}.bval"), np.loadtxt(f"{stem}.bvec")
    keep = bvals <= 1100
    data = np.asarray(img.dataobj, dtype=np.float32)[..., keep]
    if not distorted:
        fmap = (
            truth.truth_root(bids) / f"sub-{SUBJECT}" / f"ses-{session}" / "fmap"
            / f"sub-{SUBJECT}_ses-{session}_space-dwi_desc-displacement_fieldmap.nii.gz"
        )  # fmt: skip
        if fmap.is_file():
            data = _unwarp(data, np.asarray(nb.load(fmap).dataobj, np.float32), axis=1)
    # A good brain extraction is assumed: the true brain mask in this DWI frame, dilated by
    # one voxel (median-Otsu on the b0 lost half of A's brain to its receive bias).
    frame, affine = truth.truth_deformation(
        bids, SUBJECT, fixed_session=session, moving_session=session, distortion=distorted
    )
    brain = truth.load_scan_labels(bids, SUBJECT, session, what="brain")
    mask = ndimage.binary_dilation(
        np.asanyarray(reg.resample(brain, frame, affine, order=0).dataobj) > 0
    )
    gtab = gradient_table(bvals[keep], bvecs=bvecs[:, keep])
    fa = np.nan_to_num(TensorModel(gtab, fit_method="WLS").fit(data, mask=mask).fa) * mask
    return (
        nb.Nifti1Image(fa.astype(np.float32), img.affine),
        nb.Nifti1Image(mask.astype(np.uint8), img.affine),
    )


def _scores(warped: dict, target: dict, error_mm: np.ndarray) -> dict[str, float]:
    brain = target["brain"] > 0
    return {
        "error_mm": float(error_mm[brain].mean()),
        "fa_nrmse": nrmse(warped["fa"], target["fa"], brain),
        "md_nrmse": nrmse(warped["md"], target["md"], brain),
        "wm_dice": reg.dice(warped["wm"] > 0.5, target["wm"] > 0.5),
        "roi_dice": reg.mean_label_dice(warped["rois"], target["rois"]),
    }


def _warp_all(images: dict, deformation, affine) -> dict[str, np.ndarray]:
    return {
        key: np.asanyarray(
            reg.resample(
                img, deformation, affine, order=0 if key in ("rois", "brain") else 1
            ).dataobj
        )
        for key, img in images.items()
    }


def _truth_images(bids: Path, session: str) -> dict:
    maps = truth.load_truth(bids, SUBJECT, session, params=("fa", "md"))
    return {
        **maps,
        "wm": truth.load_scan_labels(bids, SUBJECT, session, what="WM"),
        "rois": truth.load_scan_labels(bids, SUBJECT, session, what="wmrois"),
        "brain": truth.load_scan_labels(bids, SUBJECT, session, what="brain"),
    }


def run(bids: Path, engines: list[str], n_threads: int = 1) -> list[dict]:
    moving_fa, moving_mask = _fa(bids, REFERENCE, distorted=False)
    moving = _truth_images(bids, REFERENCE)
    rows = []
    for target, distorted in TARGETS.items():
        fixed_fa, fixed_mask = _fa(bids, target, distorted=distorted)
        # the target's own truth in its DWI frame (displaced by C's distortion)
        frame, affine = truth.truth_deformation(
            bids, SUBJECT, fixed_session=target, moving_session=target, distortion=distorted
        )
        expected = _warp_all(_truth_images(bids, target), frame, affine)
        true_deformation, _ = truth.truth_deformation(
            bids, SUBJECT, fixed_session=target, moving_session=REFERENCE, distortion=distorted
        )
        for engine in ["none", "truth", *engines]:
            if engine == "truth":
                deformation = true_deformation
                seconds = float("nan")
            else:
                result = reg.register(
                    fixed_fa, moving_fa, engine=engine, fixed_mask=fixed_mask,
                    moving_mask=moving_mask, n_threads=n_threads,
                )  # fmt: skip
                deformation = result.deformation
                seconds = result.seconds if engine != "none" else 0.0
            row = {"target": target, "engine": engine, "seconds": seconds}
            error = np.linalg.norm(deformation - true_deformation, axis=-1)
            row.update(_scores(_warp_all(moving, deformation, affine), expected, error))
            rows.append(row)
            print(_format([row], header=not rows[:-1]), flush=True)
    return rows


def _format(rows: list[dict], header: bool = True) -> str:
    cols = (
        "target",
        "engine",
        "seconds",
        "error_mm",
        "fa_nrmse",
        "md_nrmse",
        "wm_dice",
        "roi_dice",
    )
    lines = []
    if header:
        lines.append(
            "| D -> | engine | time (s) | error (mm) | FA NRMSE | MD NRMSE | WM Dice | ROI Dice |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sec = "-" if np.isnan(r["seconds"]) else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['target']} | {r['engine']} | {sec} | "
            + " | ".join(f"{r[c]:.3f}" for c in cols[3:])
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bids", type=Path, required=True, help="phantom dataset (made if absent)"
    )
    parser.add_argument(
        "--engines",
        default=",".join(e for e in reg.OPEN_ENGINES if reg.engine_available(e)),
        help="comma-separated open engines (default: those installed)",
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per registration")
    args = parser.parse_args(argv)
    bids = _dataset(args.bids)
    rows = run(bids, [e for e in args.engines.split(",") if e], n_threads=args.threads)
    print("\n" + _format(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
