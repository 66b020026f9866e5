"""Harmonized DKI maps from one scan: sparse, chunked inference and MC-dropout.

Only brain voxels are computed: each chunk of ``batch_voxels`` masked voxels is gathered as
3x3x3 neighbourhood vectors and passed through :meth:`.model.HierarchicalDKINet.
forward_voxels`, so memory is bounded by the chunk and time scales with the mask, not the
field of view.

MC-dropout (Gal & Ghahramani 2016): with ``mc_samples = N > 0`` dropout stays active and the
mean and standard deviation of N passes are returned. Dropout sits right before the output
layers, so the trunk is computed once per chunk and only the cheap heads are sampled.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils.env import resolve_device
from .data import (
    FIT_CLIP,
    VoxelNeighbourhoods,
    fit_channels,
    mask_bounding_box,
    normalize_dwi,
    padded_neighbourhoods,
)
from .model import OUTPUT_NAMES, HierarchicalDKINet
from .modelio import ModelCard

__all__ = ["harmonize_scan", "linear_maps", "predict_voxels"]


def predict_voxels(
    model: HierarchicalDKINet,
    voxels: VoxelNeighbourhoods,
    *,
    device: str | torch.device = "cpu",
    batch_voxels: int = 4096,
    mc_samples: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Network outputs (scaled targets) ``(V, 8)`` at ``voxels``; std too with MC-dropout."""
    if batch_voxels < 1:
        raise ValueError(f"batch_voxels must be >= 1; got {batch_voxels}.")
    if mc_samples == 1 or mc_samples < 0:
        raise ValueError(f"mc_samples must be 0 (off) or >= 2; got {mc_samples}.")
    device = torch.device(resolve_device(str(device)))
    was_training = model.training
    model.eval().to(device)
    voxels = voxels.to(device)
    n_out = len(OUTPUT_NAMES)
    mean = np.empty((len(voxels), n_out), dtype=np.float32)
    std = np.empty_like(mean) if mc_samples else None
    with torch.inference_mode(), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        buffer = voxels.flat.new_empty(
            min(batch_voxels, len(voxels)), model.conv.weight[0].numel()
        )
        for start in range(0, len(voxels), batch_voxels):
            chunk = slice(start, start + batch_voxels)
            inputs = voxels.inputs(chunk, out=buffer)
            shallow, deep = model.voxel_features(inputs)
            base = model.residual_base(inputs)  # 0 unless the scan's own fit is an input
            if not mc_samples:
                mean[chunk] = (model.heads(shallow, deep, dropout=False) + base).cpu().numpy()
                continue
            # One vectorised pass over all samples: only dropout and the heads are sampled.
            draws = model.heads(
                shallow.expand(mc_samples, *shallow.shape),
                deep.expand(mc_samples, *deep.shape),
                dropout=True,
            )
            std_t, mean_t = torch.std_mean(draws, dim=0)
            mean[chunk], std[chunk] = (mean_t + base).cpu().numpy(), std_t.cpu().numpy()
    model.train(was_training)
    return mean, std


def harmonize_scan(
    model: HierarchicalDKINet,
    card: ModelCard,
    dwi: np.ndarray,
    bvals: np.ndarray,
    mask: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_voxels: int = 4096,
    mc_samples: int = 0,
    seed: int = 0,
    fit_maps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Harmonized DKI maps ``(X, Y, Z, 8)`` of one target-scanner scan, in physical units.

    ``dwi`` is ``(X, Y, Z, N)`` with ``bvals`` ``(N,)``; maps are computed inside ``mask``
    only (0 elsewhere), in :data:`.model.OUTPUT_NAMES` order, diffusivities in mm^2/s.
    With ``mc_samples >= 2`` also returns the voxel-wise MC-dropout standard deviation
    (same units), else ``None``. The protocol is checked by the caller
    (:func:`.modelio.check_fingerprint`); here only the channel count must fit. A network
    trained with ``network_input="dwi+fit"`` needs ``fit_maps``, the scan's own DKI maps
    ``(X, Y, Z, 8)`` in :data:`.model.OUTPUT_NAMES` order (ignored by other networks).

    Maps for which the card's model selection chose the linear baseline (``card.mapping``)
    are the linear mapping of ``fit_maps`` (:func:`linear_maps`), not the network's.
    """
    mask = np.asarray(mask, dtype=bool)
    chosen = _linear_choices(card)
    if chosen and fit_maps is None and not model.residual_channels:
        raise ValueError(
            "This harmonizer's model selection chose the linear mapping of the scan's own "
            f"DKI maps for {', '.join(chosen)}: pass the scan's fitted maps (fit_maps)."
        )
    if mask.shape != dwi.shape[:3]:
        raise ValueError(f"Mask shape {mask.shape} does not match the DWI {dwi.shape[:3]}.")
    norm = card.normalization
    # Normalise the mask's bounding box (plus the kernel radius) only: less time and memory.
    box = mask_bounding_box(mask, margin=model.kernel_size // 2)
    volume = normalize_dwi(
        dwi[box], bvals, b0_threshold=norm["b0_threshold"], clip=tuple(norm["clip"])
    )
    n_dwi = model.in_channels - model.residual_channels
    if volume.shape[-1] != n_dwi:
        raise ValueError(
            f"The scan has {volume.shape[-1]} diffusion-weighted volumes but the harmonizer "
            f"expects {n_dwi}; it was trained for another protocol."
        )
    if model.residual_channels:
        if fit_maps is None:
            raise ValueError(
                "This harmonizer was trained with the scan's own DKI maps as input "
                "(--network-input dwi+fit): pass the scan's fitted maps (fit_maps)."
            )
        if fit_maps.shape != (*mask.shape, len(OUTPUT_NAMES)):
            raise ValueError(
                f"fit_maps {fit_maps.shape} must be (*{mask.shape}, {len(OUTPUT_NAMES)})."
            )
        clip = float(norm.get("fit_maps", {}).get("clip", FIT_CLIP))
        extra = fit_channels(fit_maps[box], card.scaling, mask[box], clip=clip)
        volume = np.concatenate([volume, extra], axis=-1)
        del extra
    voxels = padded_neighbourhoods(volume, mask[box], kernel_size=model.kernel_size)
    del volume
    mean, std = predict_voxels(
        model,
        voxels,
        device=device,
        batch_voxels=batch_voxels,
        mc_samples=mc_samples,
        seed=seed,
    )
    scaling = card.scaling
    maps = np.zeros((*mask.shape, len(OUTPUT_NAMES)), dtype=np.float32)
    maps[mask] = scaling.to_physical(mean)
    std_maps = None
    if std is not None:
        std_maps = np.zeros_like(maps)
        std_maps[mask] = std * np.asarray(scaling.scale, dtype=np.float32)
    if chosen:
        linear = linear_maps(card, fit_maps, mask)
        for name in chosen:
            i = OUTPUT_NAMES.index(name)
            maps[..., i] = linear[..., i]
            if std_maps is not None:  # the linear mapping is deterministic
                std_maps[..., i] = 0.0
    return maps, std_maps


def linear_maps(card: ModelCard, fit_maps: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The linear baseline of a scan: the card's linear mapping of its own maps ``(X, Y, Z,
    8)``, inside ``mask`` (0 elsewhere); ``None`` for a card without one."""
    from .linear import LinearMapping

    spec = card.mapping.get("linear") if card.mapping else None
    if not spec:
        return None
    mask = np.asarray(mask, dtype=bool)
    if fit_maps.shape != (*mask.shape, len(OUTPUT_NAMES)):
        raise ValueError(
            f"fit_maps {fit_maps.shape} must be (*{mask.shape}, {len(OUTPUT_NAMES)})."
        )
    out = np.zeros(fit_maps.shape, dtype=np.float32)
    mapped = LinearMapping.from_dict(spec).apply(fit_maps[mask])
    out[mask] = np.where(np.isfinite(mapped), mapped, 0.0)
    return out


def _linear_choices(card: ModelCard) -> list[str]:
    selection = (card.mapping or {}).get("selection", {}).get("maps", {})
    return [n for n in OUTPUT_NAMES if selection.get(n, {}).get("chosen") == "linear"]


def _rng_devices(device: torch.device) -> list:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []
