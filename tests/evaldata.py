"""A small synthetic traveling-subject study whose metrics are known by hand.

Every scan lies on one 10 x 10 x 6 grid (registration engine ``none``). With ``b`` a smooth
positive map, the raw fits (``before``) of sub-01 are ``D = b`` (reference), ``A run 1 =
0.9 b``, ``A run 2 = 1.2 b``, ``C = 1.1 b``; the harmonized maps (``dl``) are all ``b``.
Hence, in every voxel, CV before = SD(0.9, 1.1, 1.0) / 1.0 = 0.1 and CV dl = 0; in a region
with ``k = rms(b) / mean(b)`` (:func:`rms_over_mean`), the NRMSE-to-reference of A run 1
and C is 0.1 k, of A run 2 0.2 k, and the scan-rescan NRMSE of A is 0.3 k / 0.9 before,
0 after. sub-02 has no scan on C (kept for the NRMSE, excluded from the CV); sub-03 has no
scan on the reference scanner D (excluded from everything).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np

from dkiharm_nipype.evaluation.evaluate import ScanMaps

SHAPE = (10, 10, 6)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
PARAMS = ("mk", "kfa")
FACTORS = {("A", "1"): 0.9, ("A", "2"): 1.2, ("C", "1"): 1.1, ("D", "1"): 1.0}


def brain() -> np.ndarray:
    out = np.zeros(SHAPE, bool)
    out[1:9, 1:9, 1:5] = True
    return out


def wm() -> np.ndarray:
    """The default WM rule's answer: FA 0.5 in this block, 0.1 elsewhere in the brain."""
    out = np.zeros(SHAPE, bool)
    out[3:7, 2:8, 1:5] = True
    return out


def atlas() -> np.ndarray:
    labels = np.zeros(SHAPE, np.int16)
    labels[3:5, 2:8, 1:5] = 1
    labels[5:7, 2:8, 1:5] = 2
    return labels


ROI_TABLE = "index\tname\tabbreviation\n1\tGenu of corpus callosum\tGCC\n2\tBody\tBCC\n"


def base() -> np.ndarray:
    """The smooth positive map ``b`` (0 outside the brain)."""
    x = np.arange(SHAPE[0])[:, None, None]
    return np.where(brain(), 0.8 + 0.05 * x + np.zeros(SHAPE), 0.0).astype(np.float32)


def rms_over_mean(mask: np.ndarray) -> float:
    """``rms(b) / mean(b)`` in ``mask`` (the NRMSE of ``f b`` against ``b`` is |f - 1| k)."""
    values = base()[mask].astype(float)
    return float(np.sqrt(np.mean(values**2)) / np.mean(values))


def save(data, path: Path, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.Nifti1Image(np.asarray(data), affine).to_filename(path)
    return path


def make_study(root: Path) -> dict:
    """Write the maps, atlas and ROI table under ``root``; returns the inputs of
    :func:`~dkiharm_nipype.evaluation.evaluate.evaluate_study`."""
    b = base()
    fa = np.where(wm(), 0.5, np.where(brain(), 0.1, 0.0)).astype(np.float32)
    md = np.where(brain(), 0.8e-3, 0.0).astype(np.float32)
    layout = {"01": FACTORS, "02": {k: v for k, v in FACTORS.items() if k[0] != "C"}}
    layout["03"] = {("A", "1"): 0.9, ("C", "1"): 1.1}
    scans = []
    for sub, scans_of in layout.items():
        for (scanner, run), factor in scans_of.items():
            stem = root / f"sub-{sub}" / f"sub-{sub}_scanner-{scanner}_run-{run}"
            before = {p: save(factor * b, Path(f"{stem}_before_{p}.nii.gz")) for p in PARAMS}
            before["fa"] = save(fa, Path(f"{stem}_before_fa.nii.gz"))
            before["md"] = save(md, Path(f"{stem}_before_md.nii.gz"))
            dl = {p: save(b, Path(f"{stem}_dl_{p}.nii.gz")) for p in PARAMS}
            scans.append(ScanMaps(sub, scanner, {"before": before, "dl": dl}, run=run))
    atlas_path = save(atlas(), root / "atlas.nii.gz")
    table = root / "rois.tsv"
    table.write_text(ROI_TABLE)
    return {
        "scans": scans,
        "reference": "D",
        "params": PARAMS,
        "engine": "none",
        "atlases": atlas_path,
        "roi_table": table,
    }
