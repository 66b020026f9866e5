"""Every bad input to fit_dki raises a one-sentence DKIInputError saying how to fix it."""

from __future__ import annotations

import numpy as np
import pytest

from dkiharm_nipype.dki.fit import DKIInputError, fit_dki, validate_gradients


@pytest.fixture
def good():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(20, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(20, 1000.0), np.full(20, 2000.0)]
    bvecs = np.r_[np.zeros((1, 3)), g, g]
    dwi = np.full((2, 2, 2, bvals.size), 100.0) * np.exp(-bvals * 1e-3)
    return dwi, bvals, bvecs


def _raises(match, *args, **kwargs):
    with pytest.raises(DKIInputError, match=match) as info:
        fit_dki(*args, **kwargs)
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith("."), message  # one sentence
    return message


def test_good_input_fits(good):
    assert fit_dki(*good).kt.shape == (2, 2, 2, 15)


def test_single_shell(good):
    dwi, bvals, bvecs = good
    _raises("at least two non-zero b-value shells", dwi[..., :21], bvals[:21], bvecs[:21])
    _raises("or raise b_max", dwi, bvals, bvecs, b_max=1000)


def test_count_mismatch(good):
    dwi, bvals, bvecs = good
    _raises("41 b-values but 40 b-vectors", dwi, bvals, bvecs[:-1])
    _raises("image has 40 volumes", dwi[..., :-1], bvals, bvecs)


def test_bad_bvecs(good):
    dwi, bvals, bvecs = good
    zero = bvecs.copy()
    zero[5] = 0
    _raises(r"Volume 5 .* zero b-vector", dwi, bvals, zero)
    scaled = bvecs.copy()
    scaled[7] *= 0.5
    _raises(r"norm 0.500", dwi, bvals, scaled, source="sub-01_dwi.nii.gz")
    # FSL (3, N) layout and rounding-level norms are fine
    assert fit_dki(dwi, bvals, bvecs.T * 1.001).kt.shape == (2, 2, 2, 15)


def test_bval_units(good):
    dwi, bvals, bvecs = good
    _raises(r"ms/µm² .*multiply by 1000", dwi, bvals / 1000, bvecs)
    _raises(r"looks like s/m².*divide by 1e6", dwi, bvals * 1e6, bvecs)
    _raises("Negative b-value", dwi, -bvals, bvecs)


def test_image_and_mask(good):
    dwi, bvals, bvecs = good
    _raises("is 3-D", dwi[..., 0], bvals, bvecs, source="t1.nii.gz")
    _raises("mask in.* is empty", dwi, bvals, bvecs, mask=np.zeros((2, 2, 2)), source="a.nii")
    bad = dwi.copy()
    bad[0, 0, 0, 3] = np.nan
    msg = _raises("1 voxels inside the mask .* NaN or Inf", bad, bvals, bvecs)
    assert "exclude" in msg
    mask = np.ones((2, 2, 2))
    mask[0, 0, 0] = 0
    assert fit_dki(bad, bvals, bvecs, mask=mask).mask.sum() == 7
    _raises("mask has shape", dwi, bvals, bvecs, mask=np.ones((3, 2, 2)))
    _raises("Unknown fit method", dwi, bvals, bvecs, method="nlls")


def test_error_names_the_source(good):
    dwi, bvals, bvecs = good
    msg = _raises("sub-02_dwi.nii.gz", dwi, bvals, bvecs[:-1], source="sub-02_dwi.nii.gz")
    assert "same volumes" in msg


def test_validate_gradients_keeps_small_directed_b():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(16, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, 15.0, np.full(16, 1000.0), np.full(16, 2000.0)]
    bvecs = np.r_[np.zeros((1, 3)), g[:1], g, g]
    b, v, used = validate_gradients(bvals, bvecs, b_max=2000)
    assert b[1] == 15.0 and used.sum() == 34
    with pytest.raises(DKIInputError, match="15 non-collinear"):
        validate_gradients(
            np.r_[0.0, [1000] * 10, [2000] * 10], np.r_[[[0, 0, 0]], g[:10], g[:10]]
        )
