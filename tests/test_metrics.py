"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dkiharm_nipype.evaluation.scores import (
    cv_histogram,
    cv_map,
    masked_stats,
    nrmse,
    roi_stats,
    snr_matrix,
    snr_table,
    wm_mask_from_fit,
)


def test_scan_rescan_nrmse_by_hand():
    run1 = np.array([0.8, 1.0, 1.2, 1.0])
    run2 = np.array([0.9, 1.0, 1.0, np.nan])  # NaN voxels are ignored
    # diffs 0.1, 0, -0.2 -> RMSE sqrt(0.05 / 3); mean |run1| over the same voxels = 1.0
    assert nrmse(run2, run1) == pytest.approx(np.sqrt(0.05 / 3) / 1.0)
    with pytest.raises(ValueError, match="empty set of voxels"):
        nrmse(run2, run1, np.zeros(4, bool))


def test_cv_map_three_scanners_by_hand():
    maps = np.array([[0.9, 2.0, 0.0], [1.0, 2.0, 0.0], [1.1, 2.0, 0.0]])
    cv = cv_map(maps)
    # SD (ddof 1) of 0.9, 1.0, 1.1 is 0.1; mean 1.0; zero mean -> NaN
    assert cv[0] == pytest.approx(0.1)
    assert cv[1] == 0.0
    assert np.isnan(cv[2])


def test_wm_mask_rule():
    fa = np.array([0.10, 0.30, 0.50, 0.60, 0.25, np.nan])
    md = np.array([0.7e-3, 0.8e-3, 3.0e-3, 0.9e-3, 1.5e-3, 0.8e-3])
    brain = np.array([1, 1, 1, 0, 1, 1], bool)
    # low FA; WM; CSF (MD too high); outside the brain; at both limits; not finite
    assert wm_mask_from_fit(fa, md, brain).tolist() == [False, True, False, False, True, False]
    assert wm_mask_from_fit(fa, md).tolist() == [False, True, False, True, True, False]


def test_masked_and_roi_stats_by_hand():
    values = np.array([1.0, 2.0, 6.0, np.nan, 10.0, 4.0])
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    assert masked_stats(values, mask) == {"mean": 3.0, "median": 2.0, "n_voxels": 3}
    empty = masked_stats(values, np.zeros(6, bool))
    assert empty["n_voxels"] == 0 and np.isnan(empty["mean"])
    labels = np.array([1, 1, 2, 2, 2, 0])
    stats = roi_stats(values, labels, {1: "GCC", 2: "BCC", 3: "SCC"})
    assert set(stats) == {"GCC", "BCC"}  # SCC is absent from the label image
    assert stats["GCC"] == {"mean": 1.5, "median": 1.5, "n_voxels": 2}
    assert stats["BCC"] == {"mean": 8.0, "median": 8.0, "n_voxels": 2}


def test_cv_histogram_counts_every_voxel():
    cv = np.array([0.05, 0.15, 0.15, 0.95, np.nan, 0.35])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    counts, edges = cv_histogram(cv, mask, bins=4, upper=0.4)
    assert edges.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    # 0.95 is clipped into the last bin; NaN and the voxel outside the mask are dropped
    assert counts.tolist() == [1, 2, 0, 1]


def test_snr_matrix_averages_runs_and_picks_the_reference():
    rows = [
        {"participant_id": "sub-01", "scanner": "A", "snr_db": "20"},
        {"participant_id": "sub-01", "scanner": "A", "snr_db": "22"},
        {"participant_id": "sub-01", "scanner": "D", "snr_db": "30"},
        {"participant_id": "sub-02", "scanner": "A", "snr_db": "24"},
        {"participant_id": "sub-02", "scanner": "D", "snr_db": "28"},
    ]
    cells, means, reference = snr_matrix(rows)
    assert cells[("sub-01", "A")] == [20.0, 22.0]
    assert means == {"A": pytest.approx(22.0), "D": pytest.approx(29.0)}
    assert reference == "D"
    text, ref = snr_table(rows)
    assert ref == "D"
    assert "21.00" in text.splitlines()[1]  # sub-01 on A: mean of its two runs
