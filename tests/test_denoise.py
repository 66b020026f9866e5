"""MP-PCA denoising (dkiharm_nipype.preproc.denoise) against known noise and MRtrix3 dwidenoise."""

from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nb
import numpy as np
import pytest
import torch

from dkiharm_nipype.preproc.denoise import mp_threshold, mppca

SIGMA = 30.0


def _gram_eigenvalues(x: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x)
    return torch.linalg.eigvalsh(x.transpose(1, 2) @ x)


@pytest.mark.parametrize("estimator", ["exp1", "exp2"])
def test_mp_threshold_pure_noise_and_low_rank(estimator):
    rng = np.random.default_rng(0)
    noise = rng.normal(0, SIGMA, (200, 125, 40))
    sigma2, n_noise = mp_threshold(_gram_eigenvalues(noise), 125, 40, estimator=estimator)
    assert abs(np.sqrt(sigma2.mean().item()) / SIGMA - 1) < 0.03
    assert n_noise.float().mean() > 39  # (nearly) every component is noise

    signal = rng.normal(0, 1, (200, 125, 3)) @ rng.normal(0, 300, (200, 3, 40))
    sigma2, n_noise = mp_threshold(_gram_eigenvalues(signal + noise), 125, 40)
    assert abs(np.sqrt(sigma2.mean().item()) / SIGMA - 1) < 0.05
    assert (n_noise == 37).float().mean() > 0.9  # the 3 signal components are kept
    with pytest.raises(ValueError, match="estimator must be"):
        mp_threshold(_gram_eigenvalues(noise), 125, 40, estimator="exp3")


@pytest.fixture(scope="module")
def dwi():
    """24x24x16 kurtotic DWIs (2 b0, 19 + 19 directions) whose fibre turns across the
    volume, with Gaussian noise of standard deviation ``SIGMA`` (S0 = 1000)."""
    rng = np.random.default_rng(1)
    shape = (24, 24, 16)
    bvals = np.r_[0, 0, np.full(19, 1000), np.full(19, 2000)].astype(float)
    dirs = rng.normal(size=(38, 3))
    bvecs = np.vstack([np.zeros((2, 3)), dirs / np.linalg.norm(dirs, axis=1, keepdims=True)])
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"), -1)
    theta = np.pi / 2 * grid[..., 0]
    axis = np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=-1)
    adc = 1e-3 * (0.5 + 1.2 * (axis @ bvecs.T) ** 2) * (1 + 0.3 * grid[..., 1:2])
    s0 = 1000.0 * (1 + 0.2 * grid[..., 2:3])
    clean = s0 * np.exp(-bvals * adc + (bvals * adc) ** 2 * 0.8 / 6)
    noisy = (clean + rng.normal(0, SIGMA, clean.shape)).astype(np.float32)
    return clean, noisy


def _rmse(x, truth):
    return float(np.sqrt(np.mean((x - truth) ** 2)))


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_mppca_removes_noise_and_estimates_sigma(dwi, stride):
    clean, noisy = dwi
    res = mppca(noisy, stride=stride)
    assert res.denoised.shape == noisy.shape and res.denoised.dtype == np.float32
    assert _rmse(res.denoised, clean) < 0.4 * _rmse(noisy, clean)
    assert abs(np.median(res.sigma) / SIGMA - 1) < 0.1
    assert 1 <= np.median(res.rank) <= 6


@pytest.mark.skipif(shutil.which("dwidenoise") is None, reason="MRtrix3 dwidenoise not found")
def test_mppca_matches_dwidenoise(dwi, tmp_path):
    """Same data through MRtrix3 ``dwidenoise`` (default 5x5x5 window, exp2 estimator):
    the torch version is at least as close to the noise-free signal and finds the same
    noise level."""
    clean, noisy = dwi
    nb.Nifti1Image(noisy, np.eye(4)).to_filename(tmp_path / "dwi.nii")
    subprocess.run(
        ["dwidenoise", "-nthreads", "1", "-noise", str(tmp_path / "sigma.nii"),
         str(tmp_path / "dwi.nii"), str(tmp_path / "dn.nii")],
        check=True, env={**os.environ, "MRTRIX_QUIET": "1"},
    )  # fmt: skip
    mrtrix = nb.load(tmp_path / "dn.nii").get_fdata()
    mrtrix_sigma = nb.load(tmp_path / "sigma.nii").get_fdata()
    ours = mppca(noisy, stride=2)
    assert _rmse(ours.denoised, clean) <= 1.05 * _rmse(mrtrix, clean)
    assert abs(np.median(ours.sigma) / np.median(mrtrix_sigma) - 1) < 0.05
    # and the two outputs are far closer to each other than to the noisy input
    assert _rmse(ours.denoised, mrtrix) < 0.5 * _rmse(noisy, mrtrix)


def test_the_interface_default_is_the_library_default():
    from dkiharm_nipype.interfaces.preproc import MPPCADenoise
    from dkiharm_nipype.preproc.denoise import DEFAULT_STRIDE

    assert MPPCADenoise().inputs.stride == DEFAULT_STRIDE


def test_mppca_mask_and_errors(dwi):
    _, noisy = dwi
    mask = np.zeros(noisy.shape[:3], bool)
    mask[6:18, 6:18, 4:12] = True
    res = mppca(noisy, mask)
    np.testing.assert_array_equal(res.denoised[~mask], noisy[~mask])
    assert (res.sigma[~mask] == 0).all() and (res.rank[~mask] == -1).all()
    assert (res.sigma[mask] > 0).all()
    empty = mppca(noisy, np.zeros_like(mask))
    np.testing.assert_array_equal(empty.denoised, noisy)
    with pytest.raises(ValueError, match="4-D DWI"):
        mppca(noisy[..., 0])
    with pytest.raises(ValueError, match="odd number"):
        mppca(noisy, extent=4)
    with pytest.raises(ValueError, match="stride must be in"):
        mppca(noisy, stride=6)
    with pytest.raises(ValueError, match="too small for a denoising window"):
        mppca(noisy[:1, :1, :1])
    with pytest.raises(ValueError, match="Mask shape"):
        mppca(noisy, mask[:-1])


@pytest.mark.skipif(shutil.which("dwidenoise") is None, reason="MRtrix3 dwidenoise not found")
def test_two_slice_slab_is_denoised_with_2d_windows(dwi, tmp_path):
    """A two-slice scan: MRtrix3 3.0.3's default 5x5x5 window crashes (SIGSEGV); both
    denoisers use the 5x5x1 window that fits, remove most of the noise and agree."""
    from dkiharm_nipype.preproc.denoise import window_extent

    clean, noisy = dwi
    clean, noisy = clean[:, :, 7:9], noisy[:, :, 7:9]
    assert window_extent(noisy.shape) == (5, 5, 1)
    assert window_extent((24, 24, 16, 40)) == (5, 5, 5)
    nb.Nifti1Image(noisy, np.eye(4)).to_filename(tmp_path / "dwi.nii")
    env = {**os.environ, "MRTRIX_QUIET": "1"}
    crash = subprocess.run(
        ["dwidenoise", str(tmp_path / "dwi.nii"), str(tmp_path / "x.nii")], env=env
    )
    assert crash.returncode != 0  # the failure the adaptive window avoids
    subprocess.run(
        ["dwidenoise", "-extent", "5,5,1", str(tmp_path / "dwi.nii"), str(tmp_path / "dn.nii")],
        check=True, env=env,
    )  # fmt: skip
    mrtrix = nb.load(tmp_path / "dn.nii").get_fdata()
    ours = mppca(noisy, stride=1)
    print(f"RMSE noisy {_rmse(noisy, clean):.1f}, mrtrix {_rmse(mrtrix, clean):.1f}, "
          f"ours {_rmse(ours.denoised, clean):.1f}")  # fmt: skip
    assert _rmse(ours.denoised, clean) < 0.8 * _rmse(noisy, clean)
    assert _rmse(ours.denoised, clean) <= 1.1 * _rmse(mrtrix, clean)
