"""``--device auto`` is decided inside each node, on the host that runs it, not at submission.

GPU availability is monkeypatched (``torch.cuda.is_available``): the same workflow built on a
CPU-only "login node" must take the GPU on a "GPU node", and the card must name the device
that training actually used.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nb
import numpy as np
import pytest
import torch

from dkiharm_nipype.cnn import train as train_module
from dkiharm_nipype.cnn.train import EarlyStopping
from dkiharm_nipype.errors import DkiharmInputError
from dkiharm_nipype.utils.env import resolve_device


def _gpu(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_follows_the_host(monkeypatch, available, expected):
    _gpu(monkeypatch, available)
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_bad_device_is_one_line():
    with pytest.raises(DkiharmInputError, match=r"must be auto, cpu, cuda or cuda:N; got 'gpu'"):
        resolve_device("gpu")


def test_cli_keeps_auto_for_the_nodes(monkeypatch, tmp_path):
    """The submitting host has a GPU here, yet the config keeps 'auto' (no decision at
    submission), and MP-PCA/training/inference nodes are built with 'auto'."""
    from dkiharm_nipype.cli.parser import parse_args
    from dkiharm_nipype.workflows.preproc import init_dwi_preproc_wf

    _gpu(monkeypatch, True)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.8.0"}')
    config = parse_args([str(bids), str(tmp_path / "out"), "group", "-w", str(tmp_path / "w")])
    assert config.device == "auto" and config.denoiser == "mppca"
    from dkiharm_nipype.interfaces.harmonize import ApplyHarmonizer, TrainHarmonizer

    assert TrainHarmonizer(scanner="A").inputs.device == "auto"
    assert ApplyHarmonizer().inputs.device == "auto"
    if shutil.which("mrdegibbs"):
        wf = init_dwi_preproc_wf(preproc="mrtrix", mask_method="median_otsu")
        assert wf.get_node("denoise").inputs.device == "auto"


def _dwi_file(tmp_path) -> str:
    rng = np.random.default_rng(0)
    clean = np.exp(-np.linspace(0, 2, 20))[None, None, None] * 100 * np.ones((8, 8, 8, 1))
    path = str(tmp_path / "dwi.nii.gz")
    nb.Nifti1Image((clean + rng.normal(0, 5, clean.shape)).astype("f4"), np.eye(4)).to_filename(
        path
    )
    return path


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_mppca_node_resolves_on_its_host(monkeypatch, tmp_path, available, expected):
    """The denoising node passes the device of the host that runs it to ``mppca``."""
    import dkiharm_nipype.preproc.denoise as denoise
    from dkiharm_nipype.interfaces.preproc import MPPCADenoise

    seen = []
    real = denoise.mppca

    def spy(*args, device="cpu", **kwargs):
        seen.append(device)
        return real(*args, device="cpu", **kwargs)  # no GPU here: compute on the CPU

    monkeypatch.setattr(denoise, "mppca", spy)
    _gpu(monkeypatch, available)
    MPPCADenoise(in_file=_dwi_file(tmp_path)).run(cwd=str(tmp_path))
    assert seen == [expected]


def test_training_card_records_the_device_used(monkeypatch):
    """``train_harmonizer(device='auto')`` trains where it runs and says so in the card."""
    rng = np.random.default_rng(0)
    from dkiharm_nipype.cnn.data import TrainingSubject

    shape = (10, 10, 8)
    subject = TrainingSubject(
        dwi=rng.random((*shape, 6)).astype(np.float32),
        labels=rng.random((*shape, 8)).astype(np.float32),
        mask=np.ones(shape, bool),
    )
    _gpu(monkeypatch, False)
    _, card, _ = train_module.train_harmonizer(
        [subject], scanner="A", protocol={}, epochs=1, hidden_channels=8, device="auto",
        block_size=2, min_voxels=10,
    )  # fmt: skip
    assert card.training["device"] == "cpu"

    # on a GPU host the same call trains on CUDA (fit() stubbed: no GPU here) and says so
    handed = []

    def fake_fit(*args, device, **kwargs):
        handed.append(str(device))
        return train_module.FitResult(history=[{"seconds": 0.0}])

    monkeypatch.setattr(train_module, "fit", fake_fit)
    monkeypatch.setattr(train_module, "validation_metrics", lambda *a, **k: {})
    monkeypatch.setattr(train_module, "device_description", lambda d: str(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    _gpu(monkeypatch, True)
    _, card, _ = train_module.train_harmonizer(
        [subject], scanner="A", protocol={}, epochs=1, hidden_channels=8, device="auto",
        block_size=2, min_voxels=10, precision="auto",
    )  # fmt: skip
    assert handed == ["cuda"] and card.training["device"] == "cuda"
    assert json.loads(json.dumps(card.training["hyperparameters"]))["precision"] == "bf16"


def test_early_stopping_stops_once_the_curve_is_flat():
    """A curve creeping down by 0.1 % an epoch: the classic rule (min_delta 0) never stops;
    with min_delta 1 % it stops ``patience`` epochs after the last 1 % fall."""
    curve = [1.0, 0.6, 0.5, 0.45] + [0.45 * 0.999**i for i in range(1, 40)]

    def stop_epoch(rule: EarlyStopping) -> int | None:
        for epoch, loss in enumerate(curve, start=1):
            if rule.step(loss):
                return epoch
        return None

    assert stop_epoch(EarlyStopping(patience=5, min_delta=0.0)) is None
    assert stop_epoch(EarlyStopping(patience=5, min_delta=0.01)) == 4 + 5
    curve = [1.0, 1.1, 1.2, 0.5]  # a rise counts as no progress
    assert stop_epoch(EarlyStopping(patience=2, min_delta=0.0)) == 3
    with pytest.raises(ValueError, match="min_delta must be in"):
        EarlyStopping(patience=3, min_delta=1.5)
