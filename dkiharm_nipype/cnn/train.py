"""Training the harmonization CNN for one target scanner (paper section 2.2, Fig. 1).

:func:`fit` is the plain loop: Adam on a masked loss (training samples are brain voxels
only), validation after every epoch, early stopping, best weights restored.
:func:`train_harmonizer` adds the bookkeeping around it: target scaling, the train /
validation split, the seeded network and the model card.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import NETWORK_INPUTS
from ..errors import DkiharmInputError
from ..evaluation.scores import nrmse
from ..utils.env import resolve_device
from .data import (
    B0_THRESHOLD,
    CLIP_RANGE,
    FIT_CLIP,
    TargetScaling,
    TrainingSubject,
    VoxelNeighbourhoods,
    fit_channels,
    make_training_sets,
)
from .infer import predict_voxels
from .linear import fit_linear_mapping, select_mappings
from .model import OUTPUT_NAMES, HierarchicalDKINet
from .modelio import ModelCard
from .ood import fit_ood_model

__all__ = [
    "EarlyStopping",
    "FitResult",
    "choose_mapping",
    "fit",
    "resolve_precision",
    "train_harmonizer",
    "validation_metrics",
]

_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}

#: Arithmetic of the training passes: ``auto`` is bfloat16 autocast where the device does it
#: natively (CPUs with AVX512-BF16/AMX, GPUs with bf16 support), else float32.
PRECISIONS = ("auto", "fp32", "bf16")

#: Fewest labelled brain voxels (all training subjects together) a network is trained on:
#: the default network has ~460,000 weights for 96 volumes; below this it fits noise.
MIN_TRAINING_VOXELS = 1000


class TooFewVoxelsError(DkiharmInputError):
    """The training subjects hold too few labelled brain voxels to train a network."""


def check_training_voxels(
    subjects: Sequence[TrainingSubject], *, scanner: str, minimum: int = MIN_TRAINING_VOXELS
) -> int:
    """Count the training voxels; raise :class:`TooFewVoxelsError` below ``minimum``."""
    counts = {
        (s.name or f"subject {i + 1}"): int(s.training_mask().sum())
        for i, s in enumerate(subjects)
    }
    total = sum(counts.values())
    if total < minimum:
        detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise TooFewVoxelsError(
            f"Only {total} labelled brain voxels to train the scanner-{scanner} network "
            f"({detail}); at least {minimum} are needed: check the brain masks and the "
            "registered reference maps of these scans, or add training participants "
            "(--train-participants)."
        )
    return total


@dataclass
class EarlyStopping:
    """Stop once the monitored loss has not fallen by more than ``min_delta`` (relative)
    below the loss of its last such fall for ``patience`` epochs.

    With ``min_delta=0`` every new lowest loss resets the count (the classic rule); with
    ``min_delta > 0`` a curve that keeps creeping down by less than that stops too.
    """

    patience: int = 10
    min_delta: float = 0.0
    plateau: float = math.inf
    stale: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1; got {self.patience}.")
        if not 0.0 <= self.min_delta < 1.0:
            raise ValueError(f"min_delta must be in [0, 1); got {self.min_delta}.")

    def step(self, loss: float) -> bool:
        """Record one epoch's loss; ``True`` when training should stop."""
        if loss < self.plateau * (1.0 - self.min_delta):
            self.plateau, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@dataclass
class FitResult:
    """Per-epoch ``history`` (dicts: epoch, loss, val_loss, seconds) and the best epoch."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_loss: float = math.inf


def fit(
    model: HierarchicalDKINet,
    train_data: VoxelNeighbourhoods,
    val_data: VoxelNeighbourhoods | None = None,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 1024,
    patience: int = 10,
    min_delta: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    loss: str = "mse",
    samples_per_epoch: int | None = None,
    weight_decay: float = 0.0,
    precision: str = "fp32",
    log: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` on neighbourhood vectors; keep the weights of the best epoch.

    Early stopping watches the validation loss (the training loss without ``val_data``) and
    stops after ``patience`` epochs in which it did not fall more than ``min_delta``
    (relative) below the loss of the last such fall (:class:`EarlyStopping`): a curve that
    has flattened stops, while the weights kept are those of the lowest loss seen. Seeded
    and, on CPU, deterministic. ``samples_per_epoch`` caps the voxels drawn (without
    replacement, anew each epoch) per epoch, so that an epoch of a large training set stays
    short on a CPU. ``precision`` (:data:`PRECISIONS`, :func:`resolve_precision`) sets the
    arithmetic of the training and validation passes; weights and optimiser stay float32.
    ``weight_decay`` is Adam's L2 penalty (regularisation for small training sets).
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {sorted(_LOSSES)}; got {loss!r}.")
    if train_data.targets is None or not len(train_data):
        raise ValueError("fit() needs training voxels with targets.")
    stopping = EarlyStopping(patience, min_delta)
    device = torch.device(resolve_device(str(device)))
    autocast = _autocast(device, resolve_precision(precision, device))
    criterion = _LOSSES[loss]
    result = FitResult()
    with _deterministic(device):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        model.to(device)
        train = train_data.to(device)
        val = val_data.to(device) if val_data is not None and len(val_data) else None
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        best_state = copy.deepcopy(model.state_dict())
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            model.train()
            total, seen = 0.0, 0
            for idx in _batches(len(train), batch_size, order, device, samples_per_epoch):
                with autocast():
                    out = model.forward_voxels(train.inputs(idx))
                batch_loss = criterion(out.float(), train.targets[idx])
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                total += batch_loss.item() * idx.numel()
                seen += idx.numel()
            train_loss = total / seen
            with autocast():
                val_loss = _evaluate(model, val, criterion, batch_size) if val else None
            monitored = train_loss if val_loss is None else val_loss
            record = {"epoch": epoch, "loss": train_loss, "val_loss": val_loss}
            record["seconds"] = time.perf_counter() - start
            result.history.append(record)
            if log is not None:
                log(record)
            if monitored < result.best_loss:
                result.best_loss, result.best_epoch = monitored, epoch
                best_state = copy.deepcopy(model.state_dict())
            if stopping.step(monitored):
                break
        model.load_state_dict(best_state)
    return result


def train_harmonizer(
    subjects: Sequence[TrainingSubject],
    *,
    scanner: str,
    protocol: Mapping,
    hidden_channels: int = 150,
    num_shared_layers: int = 2,
    dropout: float = 0.1,
    kernel_size: int = 3,
    target_scaling: str = "zscore",
    val_fraction: float = 0.1,
    block_size: int = 8,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 1024,
    patience: int = 10,
    min_delta: float = 0.0,
    loss: str = "mse",
    samples_per_epoch: int | None = None,
    precision: str = "fp32",
    network_input: str = "dwi",
    seed: int = 0,
    device: str | torch.device = "cpu",
    normalization: Mapping | None = None,
    log: Callable[[dict], None] | None = None,
    min_voxels: int = MIN_TRAINING_VOXELS,
    weight_decay: float = 0.0,
    linear_inputs: str = "own",
    selection: str = "auto",
) -> tuple[HierarchicalDKINet, ModelCard, FitResult]:
    """Train a harmonizer for one target scanner from traveling subjects.

    ``subjects`` hold target-scanner DWIs normalised with ``normalization`` (the
    :func:`.data.normalize_dwi` arguments, recorded in the card; defaults to the package
    defaults) and reference-scanner labels registered to them. ``network_input="dwi+fit"``
    also feeds each scan's own DKI maps (``TrainingSubject.fit``) and lets the network learn
    a correction of them. Returns the trained network (best epoch), its card (to save with
    :func:`.modelio.save_model`) and the fit history.

    When every subject has its own ``fit`` (whatever the network input), the linear baseline
    (:func:`~dkiharm_nipype.cnn.linear.fit_linear_mapping`, ``linear_inputs``) is
    fitted on the network's training voxels and both are scored on the held-out validation
    blocks; ``selection`` (``auto``: per map, the network only where it is strictly better)
    decides which one harmonizes each map. The card's ``mapping`` records the linear
    mapping, the choice and the validation NRMSEs behind it.
    """
    if network_input not in NETWORK_INPUTS:
        raise ValueError(f"network_input must be one of {NETWORK_INPUTS}; got {network_input!r}.")
    check_training_voxels(subjects, scanner=scanner, minimum=min_voxels)
    device = torch.device(resolve_device(str(device)))  # "auto": decided here, where it runs
    precision = resolve_precision(precision, device)
    normalization = dict(normalization or {"b0_threshold": B0_THRESHOLD, "clip": CLIP_RANGE})
    normalization["clip"] = list(normalization["clip"])
    normalization.setdefault(
        "input", "non-b0 volumes sorted by shell then acquisition order, / voxel mean b0"
    )
    # Labels blended with the zeros around the reference brain (outside their registration's
    # support) would be trained on as if they were tissue: such voxels are left out.
    outside = sum(
        int((s.mask.astype(bool) & ~s.label_mask.astype(bool)).sum())
        for s in subjects
        if s.label_mask is not None
    )
    scaling = TargetScaling.fit(
        [s.labels for s in subjects], [s.training_mask() for s in subjects], mode=target_scaling
    )
    # Training-distribution model of the network input: the voxelwise OOD flag (cnn/ood.py).
    try:
        ood = fit_ood_model(
            [(s.dwi, _input_mask(s)) for s in subjects],
            shell_sizes=protocol.get("directions"),
            seed=seed,
        )
    except ValueError as err:  # too few voxels for the mixture: no flag, said in the card
        ood = {"skipped": str(err)}
    residual = 0
    if network_input == "dwi+fit":
        missing = [s.name or f"subject {i + 1}" for i, s in enumerate(subjects) if s.fit is None]
        if missing:
            raise ValueError(
                f"network_input='dwi+fit' needs every training scan's own DKI maps; none for "
                f"{', '.join(missing)}."
            )
        subjects = [
            dataclasses.replace(
                s, dwi=np.concatenate([s.dwi, fit_channels(s.fit, scaling, s.mask)], axis=-1)
            )
            for s in subjects
        ]
        residual = len(OUTPUT_NAMES)
        normalization["fit_maps"] = {
            "channels": list(OUTPUT_NAMES),
            "scaling": "target_scaling",
            "clip": FIT_CLIP,
        }
        normalization["input"] += "; then the scan's own DKI maps (residual base)"
    train, val = make_training_sets(
        subjects,
        scaling=scaling,
        val_fraction=val_fraction,
        block_size=block_size,
        seed=seed,
        kernel_size=kernel_size,
    )
    torch.manual_seed(seed)  # the initial weights are part of the seeded run
    model = HierarchicalDKINet(
        subjects[0].dwi.shape[-1],
        hidden_channels=hidden_channels,
        num_shared_layers=num_shared_layers,
        dropout=dropout,
        kernel_size=kernel_size,
        residual_channels=residual,
    )
    result = fit(
        model,
        train,
        val,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        patience=patience,
        min_delta=min_delta,
        loss=loss,
        samples_per_epoch=samples_per_epoch,
        weight_decay=weight_decay,
        precision=precision,
        seed=seed,
        device=device,
        log=log,
    )
    held_out = val if val is not None else train
    metrics = validation_metrics(model, held_out, scaling, device=device)
    mapping = choose_mapping(
        model, train, held_out, scaling, inputs=linear_inputs, selection=selection, device=device
    )
    hyper = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": patience}
    hyper.update(
        loss=loss,
        val_fraction=val_fraction,
        block_size=block_size,
        samples_per_epoch=samples_per_epoch,
        network_input=network_input,
        weight_decay=weight_decay,
        min_delta=min_delta,
        precision=precision,
    )
    card = ModelCard(
        scanner=scanner,
        protocol=dict(protocol),
        normalization=normalization,
        target_scaling=scaling.to_dict(),
        architecture=dict(model.hparams),
        training={
            "subjects": [s.name or f"subject{i}" for i, s in enumerate(subjects)],
            "n_train_voxels": len(train),
            "n_val_voxels": 0 if val is None else len(val),
            "label_masks": all(s.label_mask is not None for s in subjects),
            "n_brain_voxels_outside_label_masks": outside,
            "seed": seed,
            "hyperparameters": {**hyper, "optimizer": "adam", "target_scaling": target_scaling},
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "best_loss": result.best_loss,
            "seconds": round(sum(h["seconds"] for h in result.history), 2),
            "device": device_description(device),
            "validation": metrics,
            "ood": ood,
        },
        mapping=mapping,
    )
    return model.cpu(), card, result


#: Fewest held-out voxels with independent labels that model selection decides on.
MIN_SELECTION_VOXELS = 100


def choose_mapping(
    model: HierarchicalDKINet,
    train: VoxelNeighbourhoods,
    held_out: VoxelNeighbourhoods,
    scaling: TargetScaling,
    *,
    inputs: str = "own",
    selection: str = "auto",
    device: str | torch.device = "cpu",
) -> dict:
    """The card's ``mapping``: the linear baseline fitted on ``train`` and, per map, the
    mapping chosen by held-out NRMSE (``{}`` when the scans' own fits are not given).

    Only held-out voxels whose label is not the scan's own fit count: against its own noisy
    fit (a reference-scanner scan without a rescan) the identity scores 0 and a network that
    denoises always loses, which says nothing about which is closer to the truth. With fewer
    than :data:`MIN_SELECTION_VOXELS` such voxels ``auto`` keeps the network and says why.
    """
    if train.own is None or held_out.own is None:
        return {}
    labels = scaling.to_physical(train.targets.cpu().numpy())
    linear = fit_linear_mapping(train.own, labels, names=OUTPUT_NAMES, inputs=inputs)
    truth = scaling.to_physical(held_out.targets.cpu().numpy())
    own = np.isclose(held_out.own, truth, rtol=1e-4, atol=0.0).all(axis=1)
    scored = np.flatnonzero(~own)
    info = {
        "mode": selection,
        "rule": "per map, the network only where its held-out NRMSE is strictly lower",
        "held_out": "validation blocks" if held_out is not train else "training voxels",
        "n_voxels": int(scored.size),
        "n_voxels_own_fit_labels": int(own.sum()),
    }
    if scored.size < MIN_SELECTION_VOXELS and selection == "auto":
        info["maps"] = {n: {"chosen": "network"} for n in OUTPUT_NAMES}
        info["reason"] = (
            f"{scored.size} held-out voxels have labels other than the scan's own fit (fewer "
            f"than {MIN_SELECTION_VOXELS}): no evidence against the network, which is kept"
        )
        return {"linear": linear.to_dict(), "selection": info}
    idx = torch.from_numpy(scored)
    subset = dataclasses.replace(
        held_out,
        centres=held_out.centres.cpu()[idx],
        targets=held_out.targets.cpu()[idx],
        subject=held_out.subject[scored] if held_out.subject.size else held_out.subject,
        own=held_out.own[scored],
    )
    net = scaling.to_physical(predict_voxels(model, subset, device=device)[0])
    lin = linear.apply(subset.own)
    truth = truth[scored]
    network_nrmse = {n: nrmse(net[:, i], truth[:, i]) for i, n in enumerate(OUTPUT_NAMES)}
    linear_nrmse = {n: nrmse(lin[:, i], truth[:, i]) for i, n in enumerate(OUTPUT_NAMES)}
    info["maps"] = select_mappings(network_nrmse, linear_nrmse, mode=selection)
    return {"linear": linear.to_dict(), "selection": info}


def _input_mask(subject: TrainingSubject) -> np.ndarray:
    """Voxels whose input the network is trained to take: the brain minus ``exclude`` (labels
    outside their registration's support do not make the input unlike the training data)."""
    mask = subject.mask.astype(bool)
    return mask if subject.exclude is None else mask & ~subject.exclude.astype(bool)


def device_description(device: str | torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: where a network was trained."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def validation_metrics(
    model: HierarchicalDKINet,
    data: VoxelNeighbourhoods,
    scaling: TargetScaling,
    *,
    device: str | torch.device = "cpu",
) -> dict:
    """Per-map RMSE (physical units) and NRMSE of the deterministic network on ``data``."""
    pred, _ = predict_voxels(model, data, device=device)
    pred = scaling.to_physical(pred)
    ref = scaling.to_physical(data.targets.cpu().numpy())
    return {
        name: {
            "rmse": float(np.sqrt(np.mean((pred[:, i] - ref[:, i]) ** 2))),
            "nrmse": nrmse(pred[:, i], ref[:, i]),
        }
        for i, name in enumerate(OUTPUT_NAMES)
    }


def _batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    limit: int | None = None,
) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)[: limit or n]
    yield from (b.to(device) for b in order.split(batch_size))


@torch.no_grad()
def _evaluate(model, data: VoxelNeighbourhoods, criterion, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(data), batch_size):
        idx = slice(start, start + batch_size)
        out = model.forward_voxels(data.inputs(idx)).float()
        total += criterion(out, data.targets[idx], reduction="sum").item() / out.shape[1]
    return total / len(data)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is ``bf16`` where ``device`` computes it natively.

    bfloat16 autocast runs the network's matrix products in bfloat16 (float32 accumulation);
    on a CPU with AVX512-BF16 or AMX it measured 1.4-2.2x faster per training step for this
    network, but not per epoch of a small study's training, whose validation loss it left
    worse (docs/benchmarks.md, *Training*): not the default. Without native support it would
    be emulated, and slower than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if device.type == "cpu" and native else "fp32"


def _autocast(device: torch.device, precision: str) -> Callable[[], torch.autocast]:
    """A factory of the autocast context of ``precision`` on ``device``."""
    enabled = precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU; on GPU, warn where cuBLAS/cuDNN cannot promise it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
