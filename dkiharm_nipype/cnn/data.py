"""Inputs and targets of the harmonization CNN: normalisation, scaling, voxel sampling.

The network sees one scan's diffusion-weighted volumes divided voxel-wise by the mean b0
(b0 volumes are dropped: after normalisation they only carry noise around 1), ordered by
shell then acquisition order so that scans whose b0s are interleaved differently still
line up. Targets are the eight reference-scanner DKI maps (:data:`.model.OUTPUT_NAMES`),
with diffusivities given in mm^2/s as written by DIPY/FSL, scaled by :class:`TargetScaling`.

Because the network is a 3x3x3 convolution followed by per-voxel layers, training and
inference work on *neighbourhood vectors*: for each brain voxel, the 27 neighbours' input
channels, gathered lazily from a cropped, zero-padded copy of the volume
(:class:`VoxelNeighbourhoods`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils.dwi import B0_THRESHOLD
from .model import OUTPUT_NAMES

__all__ = [
    "B0_THRESHOLD",
    "CLIP_RANGE",
    "DIFFUSIVITY_UNIT_SCALE",
    "TargetScaling",
    "TrainingSubject",
    "VoxelNeighbourhoods",
    "FIT_CLIP",
    "dwi_order",
    "fit_channels",
    "gather_neighbourhoods",
    "make_training_sets",
    "mask_bounding_box",
    "normalize_dwi",
    "padded_neighbourhoods",
]

"""Volumes with b below this (s/mm^2) are b0s."""
CLIP_RANGE = (0.0, 1.5)
"""Normalised signals are clipped to this range (S/S0 > 1 is noise or artefact)."""
DIFFUSIVITY_UNIT_SCALE = 1000.0
"""mm^2/s -> um^2/ms, the unit in which diffusivities are O(1)."""
_DIFFUSIVITIES = {"md", "ad", "rd"}
FIT_CLIP = 6.0
"""Scaled fit maps fed to the network (``--network-input dwi+fit``) are clipped to +-this."""


def dwi_order(bvals: np.ndarray, *, b0_threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Indices of the diffusion-weighted volumes, sorted by shell then acquisition order.

    Shells are b-values rounded to 100 s/mm^2, so small per-volume jitter does not reorder.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    dwi = np.flatnonzero(bvals >= b0_threshold)
    if dwi.size == 0:
        raise ValueError(f"No diffusion-weighted volume (b >= {b0_threshold}) in {bvals}.")
    if dwi.size == bvals.size:
        raise ValueError(f"No b0 volume (b < {b0_threshold}) to normalise by in {bvals}.")
    shells = np.round(bvals[dwi] / 100.0)
    return dwi[np.argsort(shells, kind="stable")]


def normalize_dwi(
    dwi: np.ndarray,
    bvals: np.ndarray,
    *,
    b0_threshold: float = B0_THRESHOLD,
    clip: tuple[float, float] = CLIP_RANGE,
) -> np.ndarray:
    """Divide the DWIs by the voxel's mean b0; returns ``(X, Y, Z, n_dwi)`` float32.

    Voxels whose mean b0 is not positive or not finite (background, masked-out slabs) are
    set to 0, as are non-finite signals; the ratio is clipped to ``clip``.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    if dwi.ndim != 4 or dwi.shape[-1] != bvals.size:
        raise ValueError(
            f"DWI shape {dwi.shape} does not match {bvals.size} b-values; expected (X, Y, Z, "
            f"{bvals.size})."
        )
    order = dwi_order(bvals, b0_threshold=b0_threshold)
    b0 = np.mean(dwi[..., bvals < b0_threshold], axis=-1, dtype=np.float64).astype(np.float32)
    valid = np.isfinite(b0) & (b0 > 0)
    inv = np.zeros_like(b0)
    np.divide(1.0, b0, out=inv, where=valid)
    # Volume by volume into a C-contiguous output: fancy indexing a strided view would
    # allocate a second full-size temporary.
    out = np.empty((*dwi.shape[:3], order.size), dtype=np.float32)
    for j, i in enumerate(order):
        np.multiply(dwi[..., i], inv, out=out[..., j])
    np.clip(out, clip[0], clip[1], out=out)  # +-inf become the bounds
    out[np.isnan(out)] = 0.0
    return out


@dataclass(frozen=True)
class TargetScaling:
    """Affine map between physical DKI maps and the network's targets: ``t = (y - offset) /
    scale``.

    ``mode="units"`` expresses diffusivities in um^2/ms and keeps FA and kurtosis as they are;
    ``mode="zscore"`` standardises each map over the training voxels (default: it balances
    the loss across maps of different spread). Recorded in the model card.
    """

    mode: str
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    names: tuple[str, ...] = OUTPUT_NAMES

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.offset) != n or len(self.scale) != n:
            raise ValueError(f"TargetScaling needs {n} offsets and scales, one per map.")
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise ValueError(f"TargetScaling scales must be finite and > 0; got {self.scale}.")

    @classmethod
    def fit(
        cls, labels: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, mode: str = "zscore"
    ) -> TargetScaling:
        """Scaling for physical labels ``(X, Y, Z, 8)`` restricted to ``masks``."""
        unit = np.array(
            [1.0 / DIFFUSIVITY_UNIT_SCALE if n in _DIFFUSIVITIES else 1.0 for n in OUTPUT_NAMES]
        )
        if mode == "units":
            return cls(mode, (0.0,) * len(unit), tuple(float(u) for u in unit))
        if mode != "zscore":
            raise ValueError(f"Target scaling mode must be 'units' or 'zscore'; got {mode!r}.")
        values = np.concatenate([lab[m] for lab, m in zip(labels, masks, strict=True)], axis=0)
        values = values[np.isfinite(values).all(axis=1)]
        if values.shape[0] < 2:
            raise ValueError("Cannot z-score targets: fewer than 2 valid voxels in the masks.")
        std = values.std(axis=0)
        # A constant map would give a zero scale: fall back to its physical unit.
        std = np.where(std > 0, std, unit)
        return cls(mode, tuple(map(float, values.mean(axis=0))), tuple(map(float, std)))

    def to_targets(self, labels: np.ndarray) -> np.ndarray:
        return ((labels - np.asarray(self.offset)) / np.asarray(self.scale)).astype(np.float32)

    def to_physical(self, targets: np.ndarray) -> np.ndarray:
        return (targets * np.asarray(self.scale) + np.asarray(self.offset)).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "names": list(self.names),
            "offset": list(self.offset),
            "scale": list(self.scale),
            "label_units": "diffusivities (md, ad, rd) in mm^2/s; fa, kurtosis unitless",
        }

    @classmethod
    def from_dict(cls, d: dict) -> TargetScaling:
        names = tuple(d.get("names", OUTPUT_NAMES))
        if names != OUTPUT_NAMES:
            raise ValueError(f"Model card targets {names} differ from {OUTPUT_NAMES}.")
        return cls(str(d["mode"]), tuple(map(float, d["offset"])), tuple(map(float, d["scale"])))


@dataclass
class TrainingSubject:
    """One traveling subject: target-scanner input and co-registered reference labels.

    ``dwi`` is normalised (:func:`normalize_dwi`), ``labels`` are ``(X, Y, Z, 8)`` physical
    maps in :data:`.model.OUTPUT_NAMES` order, ``mask`` the brain mask; voxels in the
    optional ``exclude`` mask (e.g. a tissue left out) are not used for training, nor are
    voxels outside the optional ``label_mask`` (where the labels are valid: the support
    of their registration, :meth:`~dkiharm_nipype.registration.Registration.support`).
    ``fit``, the scan's own DKI maps (same layout as ``labels``), is needed for the
    ``dwi+fit`` network input only.
    """

    dwi: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    exclude: np.ndarray | None = None
    name: str = ""
    fit: np.ndarray | None = None
    label_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = self.dwi.shape[:3]
        if self.dwi.ndim != 4:
            raise ValueError(f"Subject {self.name!r}: dwi must be 4-D; got {self.dwi.shape}.")
        if self.labels.shape != (*shape, len(OUTPUT_NAMES)):
            raise ValueError(
                f"Subject {self.name!r}: labels {self.labels.shape} must be (*{shape}, "
                f"{len(OUTPUT_NAMES)}) in the order {', '.join(OUTPUT_NAMES)}."
            )
        if self.fit is not None and self.fit.shape != self.labels.shape:
            raise ValueError(
                f"Subject {self.name!r}: fit maps {self.fit.shape} must be shaped like the "
                f"labels {self.labels.shape}."
            )
        for what in ("mask", "exclude", "label_mask"):
            m = getattr(self, what)
            if m is not None and m.shape != shape:
                raise ValueError(f"Subject {self.name!r}: {what} {m.shape} must be {shape}.")

    def training_mask(self) -> np.ndarray:
        """Brain mask minus excluded voxels, voxels outside ``label_mask`` and voxels with
        non-finite labels."""
        m = self.mask.astype(bool) & np.isfinite(self.labels).all(axis=-1)
        if self.exclude is not None:
            m &= ~self.exclude.astype(bool)
        if self.label_mask is not None:
            m &= self.label_mask.astype(bool)
        return m


def fit_channels(
    maps: np.ndarray, scaling: TargetScaling, mask: np.ndarray, *, clip: float = FIT_CLIP
) -> np.ndarray:
    """A scan's own DKI maps ``(X, Y, Z, 8)`` as network input channels.

    Scaled like the targets (so the residual connection of :class:`.model.HierarchicalDKINet`
    adds like to like), clipped to ``+-clip`` (failed fits stay bounded), non-finite values
    and voxels outside ``mask`` set to 0.
    """
    if maps.ndim != 4 or maps.shape[-1] != len(OUTPUT_NAMES):
        raise ValueError(
            f"Fit maps must be (X, Y, Z, {len(OUTPUT_NAMES)}) in the order "
            f"{', '.join(OUTPUT_NAMES)}; got {maps.shape}."
        )
    out = scaling.to_targets(maps)  # a new float32 array
    np.clip(out, -clip, clip, out=out)
    out[~np.isfinite(out)] = 0.0
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


@dataclass
class VoxelNeighbourhoods:
    """Voxels gathered lazily as neighbourhood vectors (the sparse network input).

    ``flat`` holds cropped, zero-padded volumes, channels last, one row per padded voxel;
    sample ``i`` is the neighbourhood of row ``centres[i]``, i.e. rows
    ``centres[i] + offsets``. ``targets`` are scaled labels ``(V, 8)`` (training only);
    ``own`` the scan's own DKI maps at the same voxels, physical units (training sets of
    subjects that have their ``fit``: the linear baseline is fitted and validated on them).
    """

    flat: torch.Tensor
    centres: torch.Tensor
    offsets: torch.Tensor
    targets: torch.Tensor | None = None
    subject: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    own: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    def inputs(
        self, index: torch.Tensor | slice, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Neighbourhood vectors of samples ``index``, written into ``out`` if given."""
        return gather_neighbourhoods(self.flat, self.centres[index], self.offsets, out=out)

    def to(self, device: torch.device | str) -> VoxelNeighbourhoods:
        move = {"flat": self.flat.to(device), "centres": self.centres.to(device)}
        move["offsets"] = self.offsets.to(device)
        targets = None if self.targets is None else self.targets.to(device)
        return VoxelNeighbourhoods(**move, targets=targets, subject=self.subject, own=self.own)


def gather_neighbourhoods(
    flat: torch.Tensor,
    centres: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(V, len(offsets) * C)`` neighbourhood vectors, laid out ``[offset, channel]``.

    ``out``, a reusable buffer of at least ``V * len(offsets) * C`` elements, avoids
    allocating (and page-faulting) a fresh chunk-sized tensor for every chunk.
    """
    rows = (centres[:, None] + offsets[None, :]).reshape(-1)
    if out is None:
        return flat.index_select(0, rows).view(centres.shape[0], -1)
    out = out.view(-1)[: rows.numel() * flat.shape[1]].view(rows.numel(), flat.shape[1])
    return torch.index_select(flat, 0, rows, out=out).view(centres.shape[0], -1)


def mask_bounding_box(mask: np.ndarray, *, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the mask's bounding box grown by ``margin`` voxels, clipped to the volume."""
    coords = np.nonzero(mask)
    if coords[0].size == 0:
        raise ValueError("The mask is empty: no voxel to process.")
    return tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + 1 + margin, n))
        for c, n in zip(coords, mask.shape, strict=True)
    )


def padded_neighbourhoods(
    volume: np.ndarray, mask: np.ndarray, *, kernel_size: int = 3
) -> VoxelNeighbourhoods:
    """Neighbourhoods of the ``mask`` voxels of ``volume`` ``(X, Y, Z, C)``.

    The volume is cropped to the mask's bounding box grown by the kernel radius and zero
    padded only where that box leaves the volume, so the result equals a zero-padded
    ("same") convolution. Samples follow ``np.nonzero(mask)`` (C) order.
    """
    r = kernel_size // 2
    mask = np.asarray(mask, dtype=bool)
    if volume.shape[:3] != mask.shape:
        raise ValueError(f"Mask shape {mask.shape} does not match volume {volume.shape[:3]}.")
    box = mask_bounding_box(mask, margin=r)
    inner = mask_bounding_box(mask)
    # Zero padding where the grown box was clipped by the volume's edge.
    pad = [
        (r - (i.start - b.start), r - (b.stop - i.stop)) for i, b in zip(inner, box, strict=True)
    ]
    padded = np.ascontiguousarray(volume[box], dtype=np.float32)  # no copy if already so
    if any(p for pair in pad for p in pair):
        padded = np.pad(padded, [*pad, (0, 0)])
    shape = padded.shape[:3]
    coords = np.nonzero(mask[inner])
    centres = np.ravel_multi_index(tuple(c + r for c in coords), shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    offsets = [
        sum(d * s for d, s in zip(delta, strides, strict=True))
        for delta in itertools.product(range(-r, r + 1), repeat=3)
    ]
    return VoxelNeighbourhoods(
        flat=torch.from_numpy(padded.reshape(-1, volume.shape[-1])),
        centres=torch.from_numpy(centres.astype(np.int64)),
        offsets=torch.tensor(offsets, dtype=torch.int64),
    )


def make_training_sets(
    subjects: Sequence[TrainingSubject],
    *,
    scaling: TargetScaling,
    val_fraction: float = 0.1,
    block_size: int = 8,
    seed: int = 0,
    kernel_size: int = 3,
) -> tuple[VoxelNeighbourhoods, VoxelNeighbourhoods | None]:
    """Training and validation voxels of all ``subjects``, split by spatial blocks.

    Neighbouring voxels share most of their input, so the split assigns whole
    ``block_size``-cubes (``block_size=1``: single voxels) to validation, at random with
    ``seed``. Returns ``(train, None)`` when ``val_fraction`` is 0. When every subject
    has its own ``fit``, both sets carry it at their voxels (``own``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    if not subjects:
        raise ValueError("No training subject given.")
    channels = {s.dwi.shape[-1] for s in subjects}
    if len(channels) != 1:
        raise ValueError(f"Training subjects have different numbers of DWI volumes: {channels}.")
    rng = np.random.default_rng(seed)
    with_own = all(s.fit is not None for s in subjects)
    parts: dict[str, list] = {"train": [], "val": []}
    owns: dict[str, list] = {"train": [], "val": []}
    row0 = 0
    flats = []
    for i, subj in enumerate(subjects):
        mask = subj.training_mask()
        if not mask.any():
            raise ValueError(f"Subject {subj.name or i!r} has no training voxel left.")
        neigh = padded_neighbourhoods(subj.dwi, mask, kernel_size=kernel_size)
        coords = np.nonzero(mask)
        targets = scaling.to_targets(subj.labels[coords])
        blocks = np.ravel_multi_index(
            tuple(c // block_size for c in coords),
            tuple(-(-n // block_size) for n in mask.shape),
        )
        ids = np.unique(blocks)
        n_val = int(round(val_fraction * ids.size))
        if val_fraction > 0 and not 0 < n_val < ids.size:
            raise ValueError(
                f"Subject {subj.name or i!r}: {ids.size} blocks of {block_size}^3 voxels cannot "
                f"be split with val_fraction={val_fraction}; use a smaller block_size."
            )
        is_val = np.isin(blocks, rng.permutation(ids)[:n_val])
        own = subj.fit[coords] if with_own else None
        for key, sel in (("train", ~is_val), ("val", is_val)):
            parts[key].append((neigh.centres[torch.from_numpy(sel)] + row0, targets[sel], i))
            if own is not None:
                owns[key].append(own[sel])
        flats.append(neigh.flat)
        row0 += neigh.flat.shape[0]
        offsets = neigh.offsets
    flat = torch.cat(flats) if len(flats) > 1 else flats[0]

    def build(key: str) -> VoxelNeighbourhoods | None:
        chunks = [p for p in parts[key] if p[0].numel()]
        if not chunks:
            return None
        return VoxelNeighbourhoods(
            flat=flat,
            centres=torch.cat([c for c, _, _ in chunks]),
            offsets=offsets,
            targets=torch.from_numpy(np.concatenate([t for _, t, _ in chunks])),
            subject=np.concatenate([np.full(c.numel(), i) for c, _, i in chunks]),
            own=np.concatenate(owns[key]).astype(np.float32) if with_own else None,
        )

    return build("train"), build("val")
