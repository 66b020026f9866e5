"""Voxelwise ComBat (combatlearn) and the common-space plumbing of the comparators."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype.comparators.combat import (
    ComBatInputError,
    combat,
    combat_maps,
    participant_covariates,
    read_participants,
)
from dkiharm_nipype.comparators.commonspace import build_common_space, invert_deformation
from dkiharm_nipype.errors import DkiharmInputError
from dkiharm_nipype.registration import Registration, affine_deformation

SITES = ("A", "B", "C")
GAMMA = {"A": 0.0, "B": 0.15, "C": -0.1}  # additive site effects
DELTA = {"A": 1.0, "B": 1.6, "C": 0.7}  # multiplicative (noise scale) site effects


def _synthetic(n_subjects=6, n_voxels=2000, seed=0):
    """Traveling subjects on three sites: y = base + slope * age + gamma_s + delta_s * e."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 70, n_subjects)
    sex = np.array(["M", "F"] * (n_subjects // 2))
    base = rng.normal(1.0, 0.1, n_voxels)
    slope = rng.normal(0.005, 0.001, n_voxels)
    rows, sites, ages, sexes = [], [], [], []
    for site in SITES:
        gamma = GAMMA[site] + rng.normal(0, 0.02, n_voxels)
        for k in range(n_subjects):
            noise = DELTA[site] * rng.normal(0, 0.05, n_voxels)
            rows.append(base + slope * age[k] + gamma + noise)
            sites.append(site), ages.append(age[k]), sexes.append(sex[k])
    return np.array(rows), np.array(sites), np.array(ages), np.array(sexes), base, slope


def _site_stats(data, sites, ages, base, slope):
    """Per site: mean offset from the truth, and noise SD around a per-voxel fit of
    site means and a common age slope (what ComBat's scale parameter acts on)."""
    offsets = np.array([(data - base - np.outer(ages, slope))[sites == s].mean() for s in SITES])
    design = np.c_[(sites[:, None] == np.array(SITES)).astype(float), ages]
    resid = data - design @ np.linalg.lstsq(design, data, rcond=None)[0]
    spreads = np.array([resid[sites == s].std(axis=0, ddof=1).mean() for s in SITES])
    return offsets, spreads


def test_combat_removes_site_effects_and_keeps_the_age_effect():
    data, sites, ages, sexes, base, slope = _synthetic()
    result = combat(data, sites, continuous={"age": ages}, discrete={"sex": sexes})
    assert result.covariates == ["age", "sex"]
    off_before, sd_before = _site_stats(data, sites, ages, base, slope)
    off_after, sd_after = _site_stats(result.data, sites, ages, base, slope)
    # additive: site offsets 0, +0.15, -0.10 -> spread below 0.01
    assert np.ptp(off_before) > 0.24 and np.ptp(off_after) < 0.01
    # multiplicative: noise SD 0.05 x (1, 1.6, 0.7); largest / smallest site SD measured
    # 2.08 -> 1.27 (combatlearn 2.3, whose priors pool across sites, leaves 1.65)
    assert sd_before.max() / sd_before.min() > 2.0 and sd_after.max() / sd_after.min() < 1.4
    # the age slope survives: mean fitted slope within 2 % of the true 0.005 per year
    fitted = np.polyfit(ages, result.data.mean(axis=1), 1)[0]
    assert fitted == pytest.approx(slope.mean(), rel=0.02)
    # the adjustment is affine per value, as the back-mapping to scan space assumes
    np.testing.assert_allclose(result.scale * data + result.shift, result.data, atol=1e-10)


def test_combat_reference_site_is_left_unchanged():
    data, sites, ages, sexes, base, slope = _synthetic(seed=1)
    result = combat(data, sites, continuous={"age": ages}, reference_site="A")
    np.testing.assert_array_equal(result.data[sites == "A"], data[sites == "A"])
    off_after, sd_after = _site_stats(result.data, sites, ages, base, slope)
    assert np.abs(off_after - off_after[0]).max() < 0.01  # B and C moved onto A
    assert sd_after.max() / sd_after.min() < 1.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": ["A"] * 4}, "at least two scanners but all 4 are from 'A'"),
        ({"sites": ["A", "A", "A", "B"]}, "Scanner 'B' has a single scan"),
        ({"sites": ["A", "A", "B"]}, r"data has shape \(4, 10\) for 3 site labels"),
        ({"reference_site": "D"}, "reference_site='D' is not one of the scanners A, B"),
        ({"continuous": {"age": [20, 30]}}, "continuous covariates have 2 values for 4 scans"),
        (
            {"continuous": {"age": [20, 30, 20, 30]}, "discrete": {"sex": list("MFMF")}},
            "design .* has 4 columns for 4 scans",
        ),
    ],
)
def test_combat_bad_input_gives_one_line_errors(kwargs, message):
    args = {"sites": ["A", "A", "B", "B"], **kwargs}
    with pytest.raises(ComBatInputError, match=message) as err:
        combat(np.random.default_rng(0).normal(size=(4, 10)), **args)
    assert "\n" not in str(err.value)
    bad = np.ones((4, 10))
    bad[0, 0] = np.nan
    with pytest.raises(ComBatInputError, match="1 NaN/inf values"):
        combat(bad, ["A", "A", "B", "B"])


def test_participants_covariates(tiny_bids):
    rows = read_participants(tiny_bids)
    assert sorted(rows) == ["01", "02", "03"]
    cont, disc = participant_covariates(["sub-01", "02", "03", "01"], rows)
    np.testing.assert_array_equal(cont["age"], [23, 24, 27, 23])
    assert list(disc["sex"]) == ["M", "F", "F", "M"]
    # a constant column is collinear with the site indicators: left out
    cont, disc = participant_covariates(["02", "03"], rows)
    assert "sex" not in disc and list(cont) == ["age"]
    assert read_participants(tiny_bids / "no-such-dir") == {}


def test_inverse_of_a_known_affine_deformation():
    shape, affine = (12, 10, 8), np.diag([2.0, 2.0, 2.0, 1.0])
    theta = np.deg2rad(5)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    m[:3, 3] = [1.5, -2.0, 0.5]
    reg = Registration("known", affine_deformation(shape, affine, m), affine)
    back, residual = invert_deformation(reg, shape, affine)
    expected = affine_deformation(shape, affine, np.linalg.inv(m))
    assert np.abs(back - expected).max() < 1e-3 and residual < 1e-3


def _phantom_maps(root, scans, effects, seed=1):
    from dkiharm_nipype.phantom import truth

    rng = np.random.default_rng(seed)
    maps, masks, clean = {"fa": [], "md": []}, [], []
    for sub, ses in scans:
        true = truth.load_truth(root, sub, ses, params=("fa", "md"))
        masks.append(truth.load_scan_labels(root, sub, ses, what="brain"))
        md = true["md"].get_fdata() * effects[ses] * (1 + rng.normal(0, 0.02, true["md"].shape))
        maps["fa"].append(true["fa"])
        maps["md"].append(nb.Nifti1Image(md.astype(np.float32), true["md"].affine))
        clean.append(true["md"].get_fdata())
    return maps, masks, clean


def test_combat_maps_through_the_template_on_the_phantom(tiny_bids):
    """Known MD scale per scanner (A x1.15, C x0.90, D x1) on the truth maps of 9 scans."""
    effects = {"A": 1.15, "C": 0.9, "D": 1.0}
    scans = [(sub, ses) for ses in "DAC" for sub in ("01", "02", "03")]
    maps, masks, clean = _phantom_maps(tiny_bids, scans, effects)
    space = build_common_space(maps["fa"], masks, n_jobs=2)  # two worker processes
    assert max(space.inverse_residual_mm) < 0.01
    assert min(m["correlation_after"] for m in space.metrics[1:]) > 0.85
    sites, subjects = [ses for _, ses in scans], [sub for sub, _ in scans]
    participants = read_participants(tiny_bids)
    spreads = {}
    for backmap in ("affine", "values"):
        res = combat_maps(maps, masks, sites, subjects=subjects, participants=participants,
                          backmap=backmap, space=space)  # fmt: skip
        assert res.covariates == ["age", "sex"] and min(res.coverage) > 0.7
        ratios = {s: [] for s in effects}
        for i, (_, ses) in enumerate(scans):
            out, mask = res.maps["md"][i], np.asanyarray(masks[i].dataobj) > 0
            assert out.shape == masks[i].shape and not out[~mask].any()
            ratios[ses].append(np.median(out[mask] / clean[i][mask]))
        site_means = np.array([np.mean(r) for r in ratios.values()])
        spreads[backmap] = np.ptp(site_means)
    # site-mean MD ratio spread 0.25 before; measured 0.026 (affine) and 0.017 (values)
    assert spreads["affine"] < 0.06 and spreads["values"] < 0.06


def test_combat_interface_on_the_phantom(tiny_bids, tmp_path):
    """Reference site D: its maps come back unchanged, A's move onto them; file names."""
    from dkiharm_nipype.interfaces.comparators import ComBatHarmonize

    scans = [("01", "D"), ("02", "D"), ("01", "A"), ("02", "A")]
    maps, masks, clean = _phantom_maps(tiny_bids, scans, {"A": 1.15, "D": 1.0})
    files = []
    for i, (sub, ses) in enumerate(scans):
        scan_files = []
        for p in ("fa", "md"):
            name = f"sub-{sub}_ses-{ses}_run-1_space-dwi_model-dki_param-{p}_dwimap.nii.gz"
            path = tmp_path / name
            maps[p][i].to_filename(path)
            scan_files.append(str(path))
        files.append(scan_files)
    node = ComBatHarmonize(
        map_files=files, params=["fa", "md"], mask_files=[m.get_filename() for m in masks],
        sites=[ses for _, ses in scans], reference_site="D",
    )  # fmt: skip
    (tmp_path / "work").mkdir()
    out = node.run(cwd=str(tmp_path / "work")).outputs
    assert [len(f) for f in out.out_files] == [2, 2, 2, 2]
    report = json.loads(Path(out.report_file).read_text())
    assert report["ReferenceSite"] == "D" and report["TemplateVoxels"] > 1000
    from importlib.metadata import version

    # the library named is the one whose function ran (was combatlearn, a rejected candidate)
    assert report["Method"].startswith(f"ComBat (neuroCombat {version('neuroCombat')}")
    assert out.out_files[2][1].endswith("sub-01_ses-A_run-1_desc-combat_param-md_dwimap.nii.gz")
    for i in range(4):
        img, src = nb.load(out.out_files[i][1]), nb.load(files[i][1])
        assert img.shape == src.shape and np.allclose(img.affine, src.affine)
        mask = np.asanyarray(masks[i].dataobj) > 0
        ratio = np.median(img.get_fdata()[mask] / clean[i][mask])
        if i < 2:  # reference scans: unchanged inside the mask
            np.testing.assert_allclose(img.get_fdata()[mask], src.get_fdata()[mask], rtol=1e-5)
        else:  # A: x1.15 -> close to D's x1.00
            assert abs(ratio - 1.0) < 0.05
    with pytest.raises(DkiharmInputError, match="2x2x2 mm but brain mask has 1x1x1 mm") as err:
        combat_maps(
            {"fa": [maps["fa"][0], maps["fa"][1]]},
            [masks[0], nb.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4))],
            ["D", "D"],
        )
    assert "\n" not in str(err.value)
