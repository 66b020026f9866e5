"""The noise floor of the evaluation (issue #20.4): the reference scan's own repeatability."""

from __future__ import annotations

import numpy as np
import pytest

from dkiharm_nipype.dki.halves import split_directions
from dkiharm_nipype.evaluation.scores import cv_floor, cv_map, noise_floor, nrmse


def test_half_split_floor_of_noise_only_matches_its_analytical_value():
    """Full scans carry noise sigma, halves sigma * sqrt(2): the floor estimated from two
    halves is sigma / mean|ref|, the NRMSE of a perfect harmonization (the true map) against
    the noisy reference scan."""
    rng = np.random.default_rng(0)
    shape, sigma = (60, 60, 40), 0.05
    truth = 0.8 + 0.4 * rng.random(shape)
    half = [truth + rng.normal(0, sigma * np.sqrt(2), shape) for _ in range(2)]
    expected = sigma / truth.mean()
    assert noise_floor(*half, truth, kind="halves") == pytest.approx(expected, rel=0.01)
    scans = [truth + rng.normal(0, sigma, shape) for _ in range(3)]  # full scans, a rescan
    assert nrmse(truth, scans[0]) == pytest.approx(expected, rel=0.01)  # perfect harmonization
    floor = noise_floor(scans[0], scans[1], scans[0], kind="rescan")
    assert floor == pytest.approx(expected, rel=0.01)
    # CV of three raw scans that differ by noise only, and its estimate from the two halves
    cv = np.nanmean(cv_map(np.stack(scans)))
    assert cv_floor(*half, truth, np.ones(shape), n_scanners=3) == pytest.approx(cv, rel=0.02)
    with pytest.raises(ValueError, match="floor kind"):
        noise_floor(*half, truth, kind="split")


def test_halves_interleave_every_shell():
    bvals = np.r_[0, 0, 0, np.tile([1000, 2000, 3000], 9), 0]
    first, second = split_directions(bvals)
    assert not set(first) & set(second) and len(first) + len(second) == bvals.size
    for b in (0, 1000, 2000, 3000):
        n = (bvals == b).sum()
        assert sorted([(bvals[first] == b).sum(), (bvals[second] == b).sum()]) == [
            n // 2,
            n - n // 2,
        ]


def test_every_score_has_its_ratio_to_the_floor(tmp_path):
    """The hand-computed study (tests/evaldata.py) with two halves of sub-01's reference
    scan, 1.1 b and 0.9 b: floor = rms(0.2 b) / 2 / mean(b) = 0.1 k."""
    import warnings

    from evaldata import PARAMS, base, make_study, rms_over_mean, save, wm

    from dkiharm_nipype.evaluation.evaluate import baseline_rows, evaluate_study, read_tsv

    study = make_study(tmp_path / "maps")
    halves = [
        {p: save(f * base(), tmp_path / f"half{f}_{p}.nii.gz") for p in PARAMS} for f in (1.1, 0.9)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_study(**study, out_dir=tmp_path / "eval", halves={"01": halves})
    floor = 0.1 * rms_over_mean(wm())
    rows = read_tsv(tmp_path / "eval" / "floor.tsv")
    row = next(r for r in rows if r["subject"] == "01" and r["param"] == "mk" and r["roi"] == "WM")
    assert row["kind"] == "halves" and float(row["nrmse_floor"]) == pytest.approx(floor, 1e-5)
    nrmse = read_tsv(tmp_path / "eval" / "nrmse.tsv")
    a1 = next(
        r for r in nrmse
        if (r["method"], r["subject"], r["scanner"], r["run"], r["param"], r["roi"])
        == ("before", "01", "A", "1", "mk", "WM")
    )  # fmt: skip
    # NRMSE of A run 1 is 0.1 k: at the floor
    assert float(a1["ratio_to_floor"]) == pytest.approx(1.0, 1e-4)
    assert all(r["floor"] == "" for r in nrmse if r["subject"] == "02")  # no halves, no rescan
    cv = read_tsv(tmp_path / "eval" / "cv.tsv")
    assert all(float(r["ratio_to_floor"]) > 0 for r in cv if r["method"] == "before")

    # networks against the linear baseline, on test subjects and on held-out blocks
    fake = [
        {"method": m, "subject": s, "scanner": "A", "run": "1", "param": "mk", "roi": "WM",
         "nrmse": v}
        for m, s, v in (("dl", "01", 0.2), ("dl", "02", 0.3), ("linear", "01", 0.2),
                        ("linear", "02", 0.2))
    ]  # fmt: skip
    (row,) = baseline_rows(fake, reference="D")
    assert (row["nrmse_dl"], row["nrmse_linear"], row["dl_beats_linear"]) == (0.25, 0.2, "False")
    card = {"scanner": "A", "mapping": {"selection": {"maps": {"mk": {
        "chosen": "linear", "val_nrmse_network": 0.3, "val_nrmse_linear": 0.1}}}}}  # fmt: skip
    (row,) = baseline_rows([], reference="D", cards=[card], held_out=False)
    assert row["source"].startswith("held-out blocks") and row["chosen"] == "linear"
