"""The evaluation (CV, NRMSE-to-reference, scan-rescan NRMSE) on known studies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from evaldata import AFFINE, SHAPE, atlas, make_study, rms_over_mean, save, wm

from dkiharm_nipype.errors import DkiharmInputError
from dkiharm_nipype.evaluation.evaluate import (
    CV_COLUMNS,
    NRMSE_COLUMNS,
    SCANRESCAN_COLUMNS,
    ScanMaps,
    evaluate_study,
    read_tsv,
)


def _pick(rows, **match):
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in match.items())]


def _one(rows, key, **match):
    found = _pick(rows, **match)
    assert len(found) == 1, (match, found)
    return float(found[0][key])


@pytest.fixture
def study(tmp_path) -> dict:
    return make_study(tmp_path / "maps")


def test_hand_computed_study(study, tmp_path):
    out = tmp_path / "eval"
    with pytest.warns(UserWarning) as record:
        result = evaluate_study(**study, out_dir=out)
    messages = " | ".join(str(w.message) for w in record)
    assert "sub-02 is excluded from the inter-scanner CV" in messages
    assert "sub-03 is excluded from the evaluation" in messages

    cv = read_tsv(out / "cv.tsv")
    assert tuple(cv[0]) == CV_COLUMNS
    for roi in ("WM", "GCC", "BCC"):
        for param in ("mk", "kfa"):
            assert _one(cv, "cv_mean", method="before", subject="01", param=param, roi=roi) == (
                pytest.approx(0.1, abs=1e-6)
            )
            assert _one(cv, "cv_median", method="dl", subject="01", param=param, roi=roi) == 0
    assert _one(cv, "n_voxels", method="before", subject="01", param="mk", roi="WM") == (
        wm().sum()
    )
    assert {r["subject"] for r in cv} == {"01"}  # sub-02 lacks C, sub-03 lacks D

    nrmse = read_tsv(out / "nrmse.tsv")
    assert tuple(nrmse[0]) == NRMSE_COLUMNS
    k_wm, k_gcc = rms_over_mean(wm()), rms_over_mean(atlas() == 1)
    for sub in ("01", "02"):
        row = dict(method="before", subject=sub, scanner="A", param="mk")
        assert _one(nrmse, "nrmse", **row, run=1, roi="WM") == pytest.approx(0.1 * k_wm, 1e-5)
        assert _one(nrmse, "nrmse", **row, run=2, roi="GCC") == pytest.approx(0.2 * k_gcc, 1e-5)
        row = dict(method="dl", subject=sub, scanner="D", run=1, param="kfa", roi="BCC")
        assert _one(nrmse, "nrmse", **row) == 0
    row = dict(method="before", subject="01", scanner="C", run=1, param="mk", roi="WM")
    assert _one(nrmse, "nrmse", **row) == pytest.approx(0.1 * k_wm, 1e-5)
    # the reference scan's raw fit is the reference: no self-comparison row
    assert not _pick(nrmse, method="before", scanner="D")
    assert not _pick(nrmse, subject="03")

    rescan = read_tsv(out / "scanrescan.tsv")
    assert tuple(rescan[0]) == SCANRESCAN_COLUMNS
    row = dict(subject="01", scanner="A", param="mk", roi="WM")
    assert _one(rescan, "nrmse", method="before", **row) == pytest.approx(k_wm / 3, 1e-5)
    assert _one(rescan, "nrmse", method="dl", **row) == 0
    assert {r["runs"] for r in rescan} == {"1-2"}

    excluded = read_tsv(out / "excluded.tsv")
    assert {(r["subject"], r["excluded_from"], r["missing"]) for r in excluded} == {
        ("02", "cv", "C"),
        ("03", "all", "D"),
    }
    cv_img = nb.load(out / "sub-01" / "cv" / "sub-01_method-before_param-mk_cvmap.nii.gz")
    assert np.allclose(cv_img.get_fdata()[wm()], 0.1, atol=1e-6)
    assert np.allclose(cv_img.affine, AFFINE)
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["reference"] == "D" and summary["methods"] == ["before", "dl"]
    assert len(result.nrmse) == len(nrmse)
    maps = read_tsv(out / "maps.tsv")
    assert all((out / r["path"]).is_file() for r in maps)
    assert len(_pick(maps, kind="map", subject="01")) == 2 * 4 * 2  # methods x scans x params


def _errors_leave_nothing(study, out: Path, match: str, **override):
    with pytest.raises(DkiharmInputError, match=match) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_study(**{**study, **override}, out_dir=out)
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())
    return str(info.value)


def test_atlas_in_another_space(study, tmp_path):
    moved = save(atlas(), tmp_path / "atlas_mni.nii.gz", affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    msg = _errors_leave_nothing(
        study, tmp_path / "out", r"ROI atlas .*atlas_mni.nii.gz.* resample it", atlases=moved
    )
    assert "reference scan's space" in msg


def test_atlas_with_unknown_labels(study, tmp_path):
    labels = atlas()
    labels[1, 1, 1] = 7
    bad = save(labels, tmp_path / "atlas7.nii.gz")
    _errors_leave_nothing(
        study, tmp_path / "out", r"atlas7.nii.gz has labels \[7\] that its ROI table", atlases=bad
    )


def test_wm_mask_outside_the_brain(study, tmp_path):
    outside = np.zeros(SHAPE, np.uint8)
    outside[0, :, :] = 1  # the brain starts at x = 1
    bad = save(outside, tmp_path / "wm_bad.nii.gz")
    _errors_leave_nothing(
        study, tmp_path / "out", r"wm_bad.nii.gz has 0 of its 60 voxels inside", wm_masks=bad
    )


def test_user_wm_mask_is_used(study, tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:5, 2:8, 1:5] = 1  # half of the default WM
    path = save(mask, tmp_path / "wm.nii.gz")
    with pytest.warns(UserWarning):
        result = evaluate_study(
            **study, out_dir=tmp_path / "out", wm_masks={"01": path, "02": path}
        )
    assert _one(result.cv, "n_voxels", method="before", subject="01", param="mk", roi="WM") == 48


def test_unknown_reference_scanner(study, tmp_path):
    with pytest.raises(DkiharmInputError, match="reference scanner 'Z' has no scan"):
        evaluate_study(**{**study, "reference": "Z"}, out_dir=tmp_path / "out")


def test_interface(study, tmp_path, monkeypatch):
    from dkiharm_nipype.interfaces.evaluation import EvaluateHarmonization

    monkeypatch.chdir(tmp_path)
    scans = [
        {"subject": s.subject, "scanner": s.scanner, "run": s.run,
         "maps": {m: {p: str(f) for p, f in ms.items()} for m, ms in s.maps.items()}}
        for s in study["scans"] if s.subject == "01"
    ]  # fmt: skip
    node = EvaluateHarmonization(
        scans=scans, reference="D", params=["mk"], engine="none",
        roi_atlas=str(study["atlases"]), roi_table=str(study["roi_table"]),
    )  # fmt: skip
    res = node.run(cwd=str(tmp_path))
    cv = read_tsv(res.outputs.cv_tsv)
    assert _one(cv, "cv_mean", method="before", subject="01", param="mk", roi="WM") == (
        pytest.approx(0.1, abs=1e-6)
    )
    assert read_tsv(res.outputs.excluded_tsv) == []


# ---------------------------------------------------------------------- tiny phantom
def test_tiny_phantom_raw_fits_vary_more_than_truth(tiny_bids, tmp_path):
    """Registered with dipy-SyN, the raw IRLLS fits of one subject vary across scanners far
    more than the phantom's true maps do (those differ only by interpolation and the
    scanners' TE-weighted truths)."""
    from dkiharm_nipype.dki.fit import fit_dki
    from dkiharm_nipype.evaluation.scores import wm_mask_from_fit
    from dkiharm_nipype.phantom import truth
    from dkiharm_nipype.registration import dice

    params = ("fa", "md", "mk", "ak", "rk", "kfa")
    scans = []
    for ses, run in (("A", 1), ("A", 2), ("C", 1), ("D", 1)):
        prefix = tiny_bids / f"sub-01/ses-{ses}/dwi/sub-01_ses-{ses}_run-{run}_dwi"
        img = nb.load(f"{prefix}.nii.gz")
        mask = np.asanyarray(
            truth.load_scan_labels(tiny_bids, "01", ses, run, what="brain").dataobj
        )
        fit = fit_dki(
            img.get_fdata(dtype=np.float32), np.loadtxt(f"{prefix}.bval"),
            np.loadtxt(f"{prefix}.bvec"), mask=mask > 0, n_threads=1,
        )  # fmt: skip
        before = {
            p: save(v.astype(np.float32), tmp_path / f"{ses}{run}_{p}.nii.gz", img.affine)
            for p, v in fit.metrics(params).items()
        }
        maps = truth.load_truth(tiny_bids, "01", ses, run, params=params)
        true = {p: i.get_filename() for p, i in maps.items()}
        scans.append(ScanMaps("01", ses, {"before": before, "truth": true}, run=str(run)))
    atlas_img = truth.load_scan_labels(tiny_bids, "01", "D", 1, what="wmrois")
    result = evaluate_study(
        scans, reference="D", out_dir=tmp_path / "eval", engine="dipy-syn",
        atlases=atlas_img.get_filename(),
        roi_table=tiny_bids / "derivatives/phantom-truth/desc-wmrois_dseg.tsv",
    )  # fmt: skip
    cv = {(r["method"], r["param"]): r["cv_mean"] for r in result.cv if r["roi"] == "WM"}
    print({k: round(v, 3) for k, v in cv.items()})
    for param in ("mk", "ak", "rk", "kfa"):
        assert cv[("truth", param)] < 0.15
        assert cv[("before", param)] > 2 * cv[("truth", param)]
    rois = {r["roi"] for r in result.nrmse} - {"WM"}
    assert len(rois) >= 5  # the phantom's WM ROIs present in the tiny crop
    # the default WM rule on the reference fit finds the phantom's white matter
    d_truth = truth.load_truth(tiny_bids, "01", "D", 1, params=("fa", "md"))
    rule = wm_mask_from_fit(d_truth["fa"].get_fdata(), d_truth["md"].get_fdata())
    true_wm = truth.load_scan_labels(tiny_bids, "01", "D", 1, what="WM").get_fdata() > 0.5
    print("WM rule Dice vs phantom WM:", round(dice(rule, true_wm), 3))
    assert dice(rule, true_wm) > 0.6
