"""Derivative naming, atomic publication and the SNR measure."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
from nipype.interfaces.base import isdefined

from dkiharm_nipype.evaluation.scores import auto_wm_roi, snr_in_roi
from dkiharm_nipype.interfaces.bids import (
    DerivativesDataSink,
    OptionalDerivativesDataSink,
    derivative_name,
)
from dkiharm_nipype.utils.derivatives import publish_derivatives


@pytest.mark.parametrize(
    ("source", "entities", "expected"),
    [
        (
            "sub-01_ses-A_run-2_dwi.nii.gz",
            {"space": "dwi", "model": "dki", "param": "rk"},
            "sub-01/ses-A/dwi/sub-01_ses-A_run-2_space-dwi_model-dki_param-rk_dwimap.nii.gz",
        ),
        (
            "sub-01_ses-B_acq-hi_run-1_dwi.nii.gz",
            {"space": "dwi", "model": "dki", "param": "mk", "desc": "harmonized"},
            "sub-01/ses-B/dwi/sub-01_ses-B_acq-hi_run-1_space-dwi_model-dki_param-mk_"
            "desc-harmonized_dwimap.nii.gz",
        ),
        (
            "sub-03_dwi.nii.gz",
            {"space": "dwi", "model": "dki", "param": "fa"},
            "sub-03/dwi/sub-03_space-dwi_model-dki_param-fa_dwimap.nii.gz",
        ),
    ],
)
def test_derivative_names_follow_bids(source, entities, expected):
    assert str(derivative_name(f"/raw/{source}", suffix="dwimap", **entities)) == expected


def test_sink_and_publish_are_atomic(tmp_path):
    src = tmp_path / "map.nii.gz"
    nb.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)).to_filename(src)
    staging = tmp_path / "staging"
    sink = DerivativesDataSink(
        base_directory=str(staging),
        in_file=str(src),
        source_file="/raw/sub-01_ses-A_run-1_dwi.nii.gz",
        space="dwi",
        model="dki",
        param="md",
        meta_dict={"Model": "DKI"},
    )
    res = sink.run(cwd=str(tmp_path))
    assert res.outputs.out_file.endswith("_space-dwi_model-dki_param-md_dwimap.nii.gz")
    raw = "bids:raw:sub-01/ses-A/dwi/sub-01_ses-A_run-1_dwi.nii.gz"
    assert json.loads(open(res.outputs.out_meta).read()) == {
        "Model": "DKI",
        "Sources": [raw],
        "SpatialReference": raw,  # space-dwi is no template: it names its image
    }
    out = tmp_path / "out"
    written = publish_derivatives(staging, out)
    assert len(written) == 2
    assert not list(out.rglob(".*tmp*"))  # no temporary files left behind
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "dkiharm"


def test_optional_sink_stores_nothing_without_a_file(tmp_path):
    sink = OptionalDerivativesDataSink(
        base_directory=str(tmp_path / "staging"),
        source_file="/raw/sub-01_ses-A_run-1_dwi.nii.gz",
        space="dwi",
        desc="ood",
        suffix="mask",
    )
    res = sink.run(cwd=str(tmp_path))
    assert not isdefined(res.outputs.out_file) and not (tmp_path / "staging").exists()
    src = tmp_path / "mask.nii.gz"
    nb.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4)).to_filename(src)
    sink.inputs.in_file = str(src)
    out = sink.run(cwd=str(tmp_path)).outputs.out_file
    assert out.endswith("sub-01/ses-A/dwi/sub-01_ses-A_run-1_space-dwi_desc-ood_mask.nii.gz")


def test_snr_matches_hand_computation():
    rng = np.random.default_rng(0)
    shape = (6, 6, 6)
    bvals = np.array([0, 0, 0, 0, 1000, 2000])
    dwi = np.empty(shape + (6,))
    dwi[..., :4] = 100.0 + rng.normal(0, 5.0, shape + (4,))
    dwi[..., 4:] = 40.0
    roi = np.zeros(shape, bool)
    roi[2:4, 2:4, 2:4] = True
    res = snr_in_roi(dwi, bvals, roi)
    signal = dwi[roi][:, :4].mean()
    noise = np.sqrt(np.mean(dwi[roi][:, :4].var(axis=1, ddof=1)))
    assert res["snr"] == pytest.approx(signal / noise)
    assert res["snr_db"] == pytest.approx(20 * np.log10(signal / noise))
    assert res["roi_voxels"] == 8 and res["n_b0"] == 4
    # a noise map takes precedence: 100 / 4 -> 27.96 dB
    res_map = snr_in_roi(
        np.where(np.arange(6) < 4, 100.0, 40.0) * np.ones(shape + (6,)),
        bvals,
        roi,
        noise_map=np.full(shape, 4.0),
    )
    assert res_map["snr_db"] == pytest.approx(20 * np.log10(25.0))
    with pytest.raises(ValueError, match="empty"):
        snr_in_roi(dwi, bvals, np.zeros(shape, bool))


def test_auto_wm_roi_selects_coherent_white_matter():
    shape = (9, 9, 9)
    brain = np.zeros(shape, bool)
    brain[1:8, 1:8, 1:8] = True
    fa = np.full(shape, 0.2)
    md = np.full(shape, 0.8e-3)
    fa[4, 4, 2:7] = 0.7  # a bundle
    md[4, 4, 6] = 2.5e-3  # partial volume with CSF at one end
    fa[1, 1, 1] = 0.9  # bright edge voxel outside the eroded brain
    roi = auto_wm_roi(fa, md, brain)
    assert set(map(tuple, np.argwhere(roi))) == {(4, 4, z) for z in range(2, 6)}


def test_nrmse_and_cv_match_hand_computation():
    from dkiharm_nipype.evaluation.scores import cv_map, mean_cv, nrmse, roi_nrmse

    ref = np.array([1.0, 2.0, 3.0, 4.0])
    est = np.array([1.5, 2.0, 2.5, 4.0])
    # RMSE = sqrt((0.25 + 0 + 0.25 + 0) / 4) = sqrt(0.125); mean |ref| = 2.5
    assert nrmse(est, ref) == pytest.approx(np.sqrt(0.125) / 2.5)
    assert nrmse(est, ref, np.array([1, 1, 0, 0], bool)) == pytest.approx(np.sqrt(0.125) / 1.5)
    maps = np.array([[1.0, 2.0], [1.2, 2.0], [0.8, 2.0]])  # three scanners, two voxels
    cv = cv_map(maps)
    assert cv[0] == pytest.approx(0.2 / 1.0) and cv[1] == 0.0  # SD (ddof=1) = 0.2
    assert mean_cv(maps, np.array([True, True])) == pytest.approx(0.1)
    labels = np.array([1, 1, 2, 2])
    assert roi_nrmse(est, ref, labels, {1: "GCC", 2: "BCC", 3: "SCC"}) == pytest.approx(
        {"GCC": np.sqrt(0.125) / 1.5, "BCC": np.sqrt(0.125) / 3.5}
    )


def test_dataset_description_is_rewritten_and_links_the_raw_dataset(tmp_path):
    from dkiharm_nipype import __version__

    raw = tmp_path / "study"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(
        json.dumps({"Name": "study", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.1/x"})
    )
    out = raw / "derivatives" / "dkiharm"
    out.mkdir(parents=True)
    stale = {"Name": "old", "GeneratedBy": [{"Name": "dkiharm", "Version": "0.0.1"}]}
    (out / "dataset_description.json").write_text(json.dumps(stale))
    publish_derivatives(None, out, bids_dir=raw)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Version"] == __version__  # not the first run's forever
    # bids:raw: URIs of the sidecars resolve through DatasetLinks, relative inside the dataset
    assert desc["DatasetLinks"] == {"raw": "../.."}
    assert desc["SourceDatasets"] == [{"URL": "../..", "DOI": "doi:10.1/x"}]
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "*_dwimap.nii.gz" in ignore and "*_desc-preproc_dwi.bval" in ignore
