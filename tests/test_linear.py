"""The linear baseline (issue #20.1) and model selection against it (#20.2)."""

from __future__ import annotations

import numpy as np
import pytest

from dkiharm_nipype.cnn.data import TrainingSubject, normalize_dwi
from dkiharm_nipype.cnn.infer import harmonize_scan, linear_maps
from dkiharm_nipype.cnn.linear import LinearMapping, fit_linear_mapping, select_mappings
from dkiharm_nipype.cnn.model import OUTPUT_NAMES
from dkiharm_nipype.cnn.modelio import scan_fingerprint
from dkiharm_nipype.cnn.train import train_harmonizer

#: Physical scale of each map (diffusivities in mm^2/s, FA and kurtoses unitless).
UNITS = np.array([1e-3, 1.5e-3, 0.6e-3, 0.5, 1.0, 0.7, 1.2, 0.4])


def test_linear_mapping_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    x = UNITS * (0.5 + rng.random((500, 8)))
    slope = 0.6 + rng.random(8)
    offset = 0.1 * UNITS * rng.normal(size=8)
    own = fit_linear_mapping(x, x * slope + offset, names=OUTPUT_NAMES, inputs="own")
    np.testing.assert_allclose(np.diag(own.coef), slope, rtol=1e-9)
    np.testing.assert_allclose(own.intercept, offset, rtol=1e-9, atol=1e-15)
    assert np.count_nonzero(own.coef - np.diag(np.diag(own.coef))) == 0

    a = np.diag(slope) + 0.05 * rng.normal(size=(8, 8)) * UNITS[:, None] / UNITS[None, :]
    every = fit_linear_mapping(x, x @ a.T + offset, names=OUTPUT_NAMES, inputs="all")
    np.testing.assert_allclose(every.coef, a, rtol=1e-7, atol=1e-9)
    again = LinearMapping.from_dict(every.to_dict())  # as stored in the model card
    np.testing.assert_allclose(again.apply(x), (x @ a.T + offset).astype(np.float32), rtol=1e-5)
    with pytest.raises(ValueError, match="Too few finite voxels"):
        fit_linear_mapping(x[:1], x[:1], names=OUTPUT_NAMES)


def test_selection_keeps_the_network_only_where_it_is_better():
    chosen = select_mappings({"mk": 0.1, "ak": 0.3, "rk": 0.2}, {"mk": 0.2, "ak": 0.2, "rk": 0.2})
    assert {k: v["chosen"] for k, v in chosen.items()} == {
        "mk": "network", "ak": "linear", "rk": "linear"  # a tie goes to the simpler mapping
    }  # fmt: skip
    assert select_mappings({"mk": 0.1}, {"mk": 0.2}, mode="linear")["mk"]["chosen"] == "linear"


def _train(labels_from_fit):
    rng = np.random.default_rng(1)
    shape, bvals = (16, 16, 10), np.r_[0.0, 0.0, np.full(12, 1000.0)]
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    fit = (UNITS * (0.5 + rng.random((*shape, 8)))).astype(np.float32)
    labels = labels_from_fit(fit)
    dwi = (100 + 20 * rng.random((*shape, bvals.size))).astype(np.float32)
    subject = TrainingSubject(normalize_dwi(dwi, bvals), labels, mask, name="sub-1", fit=fit)
    protocol = scan_fingerprint(bvals, voxel_size=(2, 2, 2), matrix=shape)
    model, card, _ = train_harmonizer(
        [subject], scanner="A", protocol=protocol, hidden_channels=16, epochs=3,
        block_size=4, seed=0,
    )  # fmt: skip
    return model, card, dwi, bvals, mask, fit, labels


def test_selection_picks_the_baseline_when_the_network_is_worse():
    """The scan's own fit maps carry the labels exactly (a linear map of them), its DWIs
    only noise: on held-out blocks the network cannot match the linear mapping, so every
    map is harmonized by it and the applied output equals the linear mapping."""
    model, card, dwi, bvals, mask, fit, labels = _train(
        lambda fit: (1.2 * fit + 0.05 * UNITS).astype(np.float32)
    )
    choices = card.mapping["selection"]["maps"]
    assert {c["chosen"] for c in choices.values()} == {"linear"}
    assert all(c["val_nrmse_linear"] < 1e-5 < c["val_nrmse_network"] for c in choices.values())
    assert card.mapping["selection"]["n_voxels"] > 100  # held-out blocks, not training voxels

    maps, _ = harmonize_scan(model, card, dwi, bvals, mask, fit_maps=fit)
    np.testing.assert_array_equal(maps, linear_maps(card, fit, mask))
    np.testing.assert_allclose(maps[mask], labels[mask], rtol=1e-5)
    with pytest.raises(ValueError, match="chose the linear mapping"):
        harmonize_scan(model, card, dwi, bvals, mask)


def test_selection_does_not_judge_against_the_scans_own_fit():
    """A reference-scanner scan labelled with its own fit: the identity would score 0 on
    held-out blocks and always win, which says nothing about the truth; the network is
    kept and the card says why."""
    _, card, *_ = _train(lambda fit: fit.copy())
    selection = card.mapping["selection"]
    assert {c["chosen"] for c in selection["maps"].values()} == {"network"}
    assert selection["n_voxels"] == 0 and "no evidence against the network" in selection["reason"]
    np.testing.assert_allclose(np.diag(card.mapping["linear"]["coef"]), 1.0, rtol=1e-4)
