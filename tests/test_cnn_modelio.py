"""Model files: safetensors + card round trip, refusal of pickles and mismatches, protocols."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dkiharm_nipype
from dkiharm_nipype.cnn.data import TargetScaling, padded_neighbourhoods
from dkiharm_nipype.cnn.infer import predict_voxels
from dkiharm_nipype.cnn.model import HierarchicalDKINet
from dkiharm_nipype.cnn.modelio import (
    ModelCard,
    ModelFileError,
    ProtocolMismatchError,
    ProtocolWarning,
    check_fingerprint,
    direction_order,
    load_model,
    read_card,
    save_model,
    scan_fingerprint,
)

BVALS = np.r_[np.zeros(3), np.full(6, 1000.0), np.full(6, 2000.0)]


def fingerprint(bvals=BVALS, te=80.0, voxel=(2.0, 2.0, 2.0), matrix=(110, 110, 70)):
    return scan_fingerprint(bvals, voxel_size=voxel, matrix=matrix, echo_time=te)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = HierarchicalDKINet(12, hidden_channels=8).eval()
    card = ModelCard(
        scanner="Trio",
        protocol=fingerprint(),
        normalization={"b0_threshold": 50.0, "clip": [0.0, 1.5]},
        target_scaling=TargetScaling.fit([], [], mode="units").to_dict(),
        training={"subjects": ["sub-01", "sub-02"], "seed": 0},
    )
    weights, card_path = tmp_path / "m.safetensors", tmp_path / "m_card.json"
    save_model(model, card, weights, card_path)
    return model, weights, card_path


def test_round_trip_gives_identical_outputs(saved):
    model, weights, card_path = saved
    loaded, card = load_model(weights, card_path)
    volume = np.random.default_rng(0).random((6, 5, 4, 12), dtype=np.float32)
    mask = np.ones((6, 5, 4), dtype=bool)
    a, _ = predict_voxels(model, padded_neighbourhoods(volume, mask))
    b, _ = predict_voxels(loaded, padded_neighbourhoods(volume, mask))
    np.testing.assert_array_equal(a, b)
    assert card.scanner == "Trio" and card.architecture == model.hparams
    assert card.provenance["dkiharm_version"] == dkiharm_nipype.__version__
    assert card.provenance["torch_version"] == torch.__version__
    assert {"created"} <= set(card.provenance) and len(card.weights_sha256) == 64
    assert card.protocol["shells"] == [1000, 2000] and card.protocol["directions"] == [6, 6]


def test_crafted_pickle_is_rejected_without_running(saved, tmp_path):
    _, _, card_path = saved
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Exploit()))
    torch_zip = tmp_path / "zip.safetensors"
    torch.save({"conv.weight": torch.zeros(1), "x": Exploit()}, torch_zip)
    for path in (evil, torch_zip):
        with pytest.raises(ModelFileError, match="not a safetensors file") as err:
            load_model(path, card_path)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_foreign_and_mismatched_weights_are_refused(saved, tmp_path):
    model, weights, card_path = saved
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(ModelFileError, match="missing conv.weight"):
        load_model(foreign, card_path)
    wider = tmp_path / "wider.safetensors"
    save_model(
        HierarchicalDKINet(12, hidden_channels=9),
        ModelCard(**_card_fields(card_path)),
        wider,
        tmp_path / "wider.json",
    )
    with pytest.raises(ModelFileError, match=r"conv.weight has shape \(9, 12, 3, 3, 3\)"):
        load_model(wider, card_path)
    other = tmp_path / "other.safetensors"
    save_model(
        HierarchicalDKINet(12, hidden_channels=8),
        ModelCard(**_card_fields(card_path)),
        other,
        tmp_path / "other.json",
    )
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_model(other, card_path)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="safetensors"):
        load_model(truncated, card_path)


def test_bad_cards_are_refused(saved, tmp_path):
    _, weights, card_path = saved
    broken = tmp_path / "broken.json"
    broken.write_text(card_path.read_text()[:-20])
    with pytest.raises(ModelFileError, match="is not valid JSON"):
        read_card(broken)
    alien = tmp_path / "alien.json"
    alien.write_text(json.dumps({"name": "resnet"}))
    with pytest.raises(ModelFileError, match="not a dkiharm model card"):
        load_model(weights, alien)
    data = json.loads(card_path.read_text())
    del data["protocol"]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="lacks the field"):
        read_card(partial)


def test_protocol_mismatch_is_refused(saved):
    card = read_card(saved[2])
    other_shells = np.r_[np.zeros(3), np.full(6, 1000.0), np.full(6, 3000.0)]
    cases = [
        (fingerprint(bvals=other_shells), "b=3000 differs from b=2000"),
        (fingerprint(bvals=np.r_[np.zeros(3), np.full(12, 1000.0)]), "number of shells"),
        (fingerprint(bvals=np.r_[BVALS, 1000.0]), "directions per shell"),
        (fingerprint(voxel=(2.5, 2.5, 2.5)), "different voxel size"),
        (fingerprint(te=99.0), "TE differs by 19 ms"),
    ]
    for scan, reason in cases:
        with pytest.raises(ProtocolMismatchError, match=reason) as err:
            check_fingerprint(card, scan)
        assert "model trained on [b=1000x6, b=2000x6; 3 b0; TE 80 ms" in str(err.value)


def test_near_match_warns(saved):
    card = read_card(saved[2])
    near = np.r_[np.zeros(2), np.full(6, 1000.0), np.full(6, 1980.0)]
    with pytest.warns(ProtocolWarning, match="b=1980 differs from b=2000 by 1.0 %"):
        notes = check_fingerprint(card, fingerprint(bvals=near, te=82.0, matrix=(96, 96, 60)))
    assert any("TE differs by 2 ms" in n for n in notes)
    assert any("2 b0 volumes instead of 3" in n for n in notes)
    assert any("different matrix" in n for n in notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_fingerprint(card, fingerprint()) == []


def _card_fields(card_path) -> dict:
    data = json.loads(card_path.read_text())
    return {k: data[k] for k in ("scanner", "protocol", "normalization", "target_scaling")}


def _directions(n: int, seed: int) -> np.ndarray:
    """``n`` random unit directions that are at least 25 degrees apart (sign-invariant)."""
    rng, dirs = np.random.default_rng(seed), []
    while len(dirs) < n:
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        if all(abs(v @ d) < np.cos(np.radians(25)) for d in dirs):
            dirs.append(v)
    return np.array(dirs)


def _table(dirs: np.ndarray) -> np.ndarray:
    """BVALS' volumes with ``dirs`` (12 rows: 6 per shell) and zeros for the b0s."""
    return np.vstack([np.zeros((3, 3)), dirs])


def _with_dirs(bvecs):
    return scan_fingerprint(
        BVALS, voxel_size=(2, 2, 2), matrix=(110, 110, 70), echo_time=80.0, bvecs=bvecs
    )


def test_direction_table_order_and_sign():
    dirs = _directions(12, seed=1)
    trained = _with_dirs(_table(dirs))
    assert len(trained["gradients"]) == BVALS.size and trained["gradients"][3][0] == 1000
    # the same directions, flipped in sign and given as a 3 x N (FSL) table: the same scan
    flipped = _with_dirs(_table(-dirs).T)
    assert flipped["direction_digest"] == trained["direction_digest"]
    order, worst = direction_order(trained, flipped)
    assert order is None and worst < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_fingerprint(trained, flipped) == []
    # the same directions in another order within each shell: refused by nothing, re-ordered
    perm = np.r_[np.arange(3), 3 + np.random.default_rng(2).permutation(6), 9 + np.arange(6)[::-1]]
    shuffled = _with_dirs(_table(dirs)[perm])
    assert shuffled["direction_digest"] == trained["direction_digest"]
    order, worst = direction_order(trained, shuffled)
    assert worst < 1e-3
    np.testing.assert_array_equal(perm[order], np.arange(BVALS.size))  # back in trained order
    with pytest.warns(ProtocolWarning, match="re-ordered to the trained order"):
        check_fingerprint(trained, shuffled)


def test_other_directions_are_refused():
    dirs = _directions(12, seed=1)
    trained = _with_dirs(_table(dirs))
    other = _with_dirs(_table(_directions(12, seed=7)))
    assert other["direction_digest"] != trained["direction_digest"]
    with pytest.raises(ProtocolMismatchError, match="gradient directions differ: b=1000 "):
        check_fingerprint(trained, other)
    # a small rotation (3 degrees) passes silently; 10 degrees passes with a warning
    for angle, warns in ((3.0, False), (10.0, True)):
        c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
        rotated = _with_dirs(_table(dirs @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_fingerprint(trained, rotated)
        assert any("differ by up to" in str(w.message) for w in caught) is warns
    # a card written before directions were recorded: checked for the rest, with a note
    legacy = {k: v for k, v in trained.items() if k not in ("gradients", "direction_digest")}
    with pytest.warns(ProtocolWarning, match="not recorded in the model card"):
        check_fingerprint(legacy, other)
