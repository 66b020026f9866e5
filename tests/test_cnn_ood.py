"""The voxelwise out-of-distribution flag (dkiharm_nipype.cnn.ood)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage, stats

from dkiharm_nipype.cnn.data import normalize_dwi
from dkiharm_nipype.cnn.modelio import scan_fingerprint
from dkiharm_nipype.cnn.ood import fit_ood_model, mahalanobis_min, score_scan


def test_mahalanobis_distance_and_threshold_on_gaussian_data():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.2], [1.2, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0], cov, size=200_000)
    d = mahalanobis_min(x, np.array([[1.0, -2.0]]), cov[None])
    # squared distances of a 2-D Gaussian are chi-square with 2 degrees of freedom
    assert np.percentile(d**2, 99.5) == pytest.approx(stats.chi2.ppf(0.995, 2), rel=0.03)
    assert np.mean(d**2) == pytest.approx(2.0, rel=0.01)


def test_fitted_threshold_flags_half_a_percent_of_new_samples():
    rng = np.random.default_rng(1)
    signal = np.exp(-rng.normal([0.8, 1.6], [0.1, 0.2], size=(20_000, 2)))
    # one shell of 2 "directions", voxels laid out as a 1-voxel-thick volume per sample
    train = (signal[:10_000].reshape(100, 100, 1, 2), np.ones((100, 100, 1), bool))
    model = fit_ood_model([train], n_components=1)
    json.dumps(model)  # plain numbers only
    new = signal[10_000:].reshape(100, 100, 1, 2)
    b = np.array([0, 1000, 1000])
    dwi = np.concatenate([np.ones((100, 100, 1, 1)), new], axis=-1)
    distance, flagged = score_scan(model, dwi, b, np.ones((100, 100, 1), bool))
    assert 0.002 < flagged.mean() < 0.012
    assert distance.min() >= 0


def _scan(root, sub, ses="C"):
    import nibabel as nb

    p = root / f"sub-{sub}/ses-{ses}/dwi/sub-{sub}_ses-{ses}_run-1_dwi"
    t = root / "derivatives/phantom-truth" / f"sub-{sub}/ses-{ses}/dwi"
    t = t / f"sub-{sub}_ses-{ses}_run-1_space-dwi_"
    dwi = np.asarray(nb.load(f"{p}.nii.gz").dataobj, np.float32)
    bvals = np.loadtxt(f"{p}.bval")
    mask = nb.load(f"{t}desc-brain_mask.nii.gz").get_fdata() > 0
    wm = nb.load(f"{t}label-WM_probseg.nii.gz").get_fdata()
    return dwi, bvals, mask, wm


def test_oedema_like_lesion_is_flagged_and_normal_brain_is_not(tiny_bids):
    """Trained on two healthy subjects of scanner C, applied to the third with a free-water
    lesion (a 5 mm ball deep in white matter, half its signal free water)."""
    scans = [_scan(tiny_bids, s) for s in ("01", "02", "03")]
    sizes = scan_fingerprint(scans[0][1], voxel_size=(2, 2, 2), matrix=(1, 1, 1))["directions"]
    model = fit_ood_model(
        [(normalize_dwi(d, b), m) for d, b, m, _ in scans[:2]], shell_sizes=sizes
    )
    dwi, bvals, mask, wm = scans[2]
    _, clean = score_scan(model, dwi, bvals, mask)
    core = np.argwhere(ndimage.binary_erosion(wm > 0.9))
    centre = core[len(core) // 2]
    r = np.sqrt(((np.indices(mask.shape) - centre[:, None, None, None]) ** 2).sum(0))
    lesion = (r <= 2.5) & mask
    free = dwi[..., bvals < 50].mean(-1, keepdims=True) * np.exp(-bvals * 3.0e-3)
    f = np.where(lesion, 0.5, 0.0)[..., None]
    _, flagged = score_scan(model, ((1 - f) * dwi + f * free).astype(np.float32), bvals, mask)
    normal = mask & (r > 5)
    sensitivity, fpr = flagged[lesion].mean(), flagged[normal].mean()
    # measured (tiny phantom, seed 0): sensitivity 0.44, FPR 1.4 % (1.25 % without lesion)
    assert sensitivity > 0.35
    assert fpr < 0.02 and clean[mask].mean() < 0.02


def test_report_shows_where_voxels_were_flagged(tmp_path):
    import nibabel as nb

    from dkiharm_nipype.report.html import figure_ood

    brain = np.zeros((10, 12, 6), bool)
    brain[1:9, 1:11, 1:5] = True
    flagged = np.zeros_like(brain)
    flagged[3:5, 3:5, 2] = True  # 4 of 320 brain voxels, all in slice 2
    files = []
    for name, data in (("md", np.where(brain, 1e-3, 0.0)), ("brain", brain), ("ood", flagged)):
        files.append(tmp_path / f"{name}.nii.gz")
        nb.Nifti1Image(data.astype(np.float32), np.eye(4)).to_filename(files[-1])
    page = figure_ood({"sub-03 ses-A": tuple(files)})
    assert 'id="fig-ood"' in page and "data:image/png;base64," in page
    from dkiharm_nipype.report.figures import fig_ood

    fig = fig_ood({"s": (np.where(brain, 1e-3, 0.0), brain, flagged)})
    assert fig.fractions == {"s": pytest.approx(4 / 320)}
    assert "not-run" in figure_ood({})
