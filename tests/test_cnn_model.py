"""The hierarchical CNN: shapes, head structure, sparse == dense, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkiharm_nipype.cnn.data import normalize_dwi, padded_neighbourhoods
from dkiharm_nipype.cnn.infer import predict_voxels
from dkiharm_nipype.cnn.model import OUTPUT_NAMES, HierarchicalDKINet


@pytest.fixture
def net() -> HierarchicalDKINet:
    torch.manual_seed(0)
    return HierarchicalDKINet(7, hidden_channels=16, num_shared_layers=2).eval()


def test_defaults_follow_the_paper():
    net = HierarchicalDKINet(60)
    assert net.hparams == {
        "in_channels": 60,
        "hidden_channels": 150,
        "num_shared_layers": 2,
        "dropout": 0.1,
        "kernel_size": 3,
        "residual_channels": 0,
    }
    assert net.conv.weight.shape == (150, 60, 3, 3, 3)
    assert OUTPUT_NAMES == ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")


def test_dense_shapes(net):
    out = net(torch.rand(2, 7, 5, 6, 4))
    assert out.shape == (2, 8, 5, 6, 4)


def test_shallow_head_skips_the_deep_hidden_layer(net):
    """MD/AD/RD do not depend on the deep head's extra layer; FA..KFA do."""
    x = torch.rand(30, 27 * 7)
    before = net.forward_voxels(x)
    with torch.no_grad():
        net.deep_hidden.weight.add_(torch.randn_like(net.deep_hidden.weight))
    after = net.forward_voxels(x)
    assert torch.equal(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])
    # one more hidden layer in the deep path than in the shallow one
    assert net.shallow_out.in_features == net.deep_hidden.out_features == 16
    assert net.deep_out.out_features == 5 and net.shallow_out.out_features == 3


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_sparse_forward_equals_dense(kernel_size):
    torch.manual_seed(0)
    net = HierarchicalDKINet(7, hidden_channels=16, kernel_size=kernel_size).eval()
    rng = np.random.default_rng(0)
    volume = rng.random((9, 8, 7, 7), dtype=np.float32)
    mask = rng.random((9, 8, 7)) > 0.4
    mask[0, 0, 0] = mask[-1, -1, -1] = True  # voxels on the volume's edges: zero padding
    with torch.no_grad():
        dense = net(torch.from_numpy(volume).permute(3, 0, 1, 2)[None])[0].permute(1, 2, 3, 0)
    voxels = padded_neighbourhoods(volume, mask, kernel_size=kernel_size)
    sparse, _ = predict_voxels(net, voxels, batch_voxels=13)
    np.testing.assert_allclose(sparse, dense.numpy()[mask], atol=1e-5, rtol=1e-5)
    # an interior mask: the crop keeps real neighbours outside the mask
    inner = np.zeros_like(mask)
    inner[3:5, 2:6, 1:3] = True
    sparse, _ = predict_voxels(net, padded_neighbourhoods(volume, inner, kernel_size=kernel_size))
    np.testing.assert_allclose(sparse, dense.numpy()[inner], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_channels": 0}, ValueError, "in_channels must be >= 1"),
        ({"in_channels": 3.0}, TypeError, "in_channels must be an int"),
        ({"hidden_channels": 0}, ValueError, "hidden_channels must be >= 1"),
        ({"num_shared_layers": -1}, ValueError, "num_shared_layers must be >= 0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a float"),
        ({"kernel_size": 2}, ValueError, "kernel_size must be odd"),
        ({"residual_channels": 3}, ValueError, "residual_channels must be 0 or 8"),
        ({"in_channels": 8, "residual_channels": 8}, ValueError, "fewer than in_channels=8"),
    ],
)
def test_constructor_checks(kwargs, error, match):
    args = {"in_channels": 4, **kwargs}
    with pytest.raises(error, match=match):
        HierarchicalDKINet(args.pop("in_channels"), **args)


def test_residual_network_adds_the_centre_voxels_fit():
    """dwi+fit: the last 8 inputs are the scan's own (scaled) maps; the output is the heads'
    correction plus those maps at the centre voxel, sparse and dense alike."""
    torch.manual_seed(0)
    net = HierarchicalDKINet(7 + 8, hidden_channels=16, residual_channels=8).eval()
    rng = np.random.default_rng(1)
    volume = rng.random((6, 5, 4, 15), dtype=np.float32)
    mask = rng.random((6, 5, 4)) > 0.3
    voxels = padded_neighbourhoods(volume, mask)
    sparse, _ = predict_voxels(net, voxels, batch_voxels=7)
    with torch.no_grad():
        heads = net.heads(*net.voxel_features(voxels.inputs(slice(None))), dropout=False)
        dense = net(torch.from_numpy(volume).permute(3, 0, 1, 2)[None])[0].permute(1, 2, 3, 0)
    np.testing.assert_allclose(sparse - heads.numpy(), volume[mask][:, 7:], atol=1e-6)
    np.testing.assert_allclose(sparse, dense.numpy()[mask], atol=1e-5, rtol=1e-5)
    # MC-dropout: the fit is added to the mean, the spread comes from the heads alone
    mc_mean, mc_std = predict_voxels(net, voxels, mc_samples=200)
    assert np.abs(mc_mean - sparse).mean() < 0.02 and mc_std.max() > 0


def test_forward_rejects_wrong_channels(net):
    with pytest.raises(ValueError, match=r"Expected input of shape \(N, 7, X, Y, Z\)"):
        net(torch.rand(1, 6, 4, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(V, 189\)"):
        net.forward_voxels(torch.rand(3, 10))


def test_normalize_dwi_drops_b0_and_sorts_shells():
    bvals = np.array([0, 2000, 1000, 5, 1000, 2000])
    dwi = np.ones((2, 2, 1, 6), dtype=np.float32) * np.array([100, 20, 50, 100, 40, 10])
    dwi[0, 0, 0] = 0  # background: no b0 signal
    out = normalize_dwi(dwi, bvals)
    assert out.shape == (2, 2, 1, 4)
    np.testing.assert_allclose(out[1, 1, 0], [0.5, 0.4, 0.2, 0.1])
    assert np.all(out[0, 0, 0] == 0)
    with pytest.raises(ValueError, match="No b0 volume"):
        normalize_dwi(dwi[..., 1:3], bvals[1:3])
