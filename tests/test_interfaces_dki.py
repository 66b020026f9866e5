"""The FitDKI Nipype interface on a small synthetic NIfTI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype import __version__
from dkiharm_nipype.dki.design import dki_signal
from dkiharm_nipype.dki.fit import DKIInputError, fit_dki
from dkiharm_nipype.dki.maps import ALL_METRICS
from dkiharm_nipype.dki.simulate import random_tissue_tensors
from dkiharm_nipype.interfaces.dki import FitDKI


@pytest.fixture
def scan(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0, 0, [1000] * 30, [2000] * 30, [3000] * 30].astype(float)
    bvecs = np.r_[np.zeros((2, 3)), g, g, g]
    dt, kt = random_tissue_tensors(4 * 4 * 3, rng=1)
    sig = dki_signal(np.full(48, 500.0), dt, kt, bvals, bvecs)
    sig = np.abs(sig + rng.normal(0, 10, sig.shape)).reshape(4, 4, 3, -1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    dwi = tmp_path / "sub-01_ses-a_dwi.nii.gz"
    nb.Nifti1Image(sig.astype(np.float32), affine).to_filename(dwi)
    mask = np.ones((4, 4, 3), np.uint8)
    mask[0] = 0
    nb.Nifti1Image(mask, affine).to_filename(tmp_path / "mask.nii.gz")
    np.savetxt(tmp_path / "sub-01_ses-a_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "sub-01_ses-a_dwi.bvec", bvecs.T, fmt="%.8f")
    return tmp_path, sig, bvals, bvecs, mask


def test_fitdki_writes_maps_and_sidecars(scan, tmp_path, monkeypatch):
    root, sig, bvals, bvecs, mask = scan
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = FitDKI(
        dwi_file=str(root / "sub-01_ses-a_dwi.nii.gz"),
        bval_file=str(root / "sub-01_ses-a_dwi.bval"),
        bvec_file=str(root / "sub-01_ses-a_dwi.bvec"),
        mask_file=str(root / "mask.nii.gz"),
        b_max=2000.0,
        n_threads=1,
    ).run()
    out = res.outputs
    # the gradients as the interface reads them (8 decimals in the bvec file)
    expected = fit_dki(
        sig.astype(np.float32),
        np.loadtxt(root / "sub-01_ses-a_dwi.bval"),
        np.loadtxt(root / "sub-01_ses-a_dwi.bvec"),
        mask=mask,
        b_max=2000.0,
        constraints=True,
        n_threads=1,
    ).metrics()
    for name in ALL_METRICS:
        path = Path(getattr(out, f"{name}_file"))
        assert path.name == f"sub-01_ses-a_model-dki_param-{name}_dwimap.nii.gz"
        assert path.parent == work
        img = nb.load(path)
        np.testing.assert_allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
        np.testing.assert_allclose(img.get_fdata(), expected[name], rtol=1e-5, atol=1e-9)
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        model = meta["Model"]
        assert model["FitMethod"] == "IRLLS" and "kurtosis" in model["Description"]
        assert meta["Software"]["Version"] == __version__
        assert model["Parameters"]["BValuesUsed"] == [0.0, 1000.0, 2000.0]
        assert model["Parameters"]["BMax"] == 2000.0 and "Units" in meta
        assert model["Parameters"]["OutlierRejection"]["Threshold"] == 3.5
        assert model["Parameters"]["Iterations"] >= 0
        # the projection the code runs: K(n) in [0, 3], not dipy's [-3/7, 10] map clip
        assert model["Parameters"]["Constraints"]["DirectionalKurtosisRange"] == [0.0, 3.0]
    assert len(out.sidecar_files) == 10
    assert nb.load(out.outlier_fraction_file).shape == (4, 4, 3)
    assert nb.load(out.s0_file).get_fdata()[1:].min() > 0
    rows = Path(out.outliers_per_volume_file).read_text().splitlines()
    assert rows[0].split("\t") == ["volume", "bval", "used", "n_outlier_voxels"]
    assert len(rows) == bvals.size + 1


def test_fitdki_errors_name_the_file(scan, tmp_path, monkeypatch):
    root, *_ = scan
    monkeypatch.chdir(tmp_path)
    short = root / "short.bval"
    short.write_text(" ".join(["0"] * 10) + "\n")
    with pytest.raises(DKIInputError, match="short.bval"):
        FitDKI(
            dwi_file=str(root / "sub-01_ses-a_dwi.nii.gz"),
            bval_file=str(short),
            bvec_file=str(root / "sub-01_ses-a_dwi.bvec"),
        ).run()
    junk = root / "junk.bvec"
    junk.write_text("a b c\n")
    with pytest.raises(DKIInputError, match="junk.bvec"):
        FitDKI(
            dwi_file=str(root / "sub-01_ses-a_dwi.nii.gz"),
            bval_file=str(root / "sub-01_ses-a_dwi.bval"),
            bvec_file=str(junk),
        ).run()
