"""The 3-D hierarchical CNN that maps one scan's DWIs to eight DKI maps.

Architecture of Li et al. (IEEE Access 2019) as used for harmonization in section 2.2 of
the paper: a 3x3x3 convolution, then per-voxel (1x1x1) fully connected layers, all with
``hidden_channels`` channels and ReLU; 10 % dropout before the output layers; a *shallow*
head gives MD, AD, RD and a *deep* head, one hidden layer deeper, gives FA, MK, AK, RK, KFA.

Because everything after the first convolution acts voxel by voxel, the network is also
exposed as a function of one voxel's 3x3x3 neighbourhood (:meth:`HierarchicalDKINet.
forward_voxels`), which lets training and inference visit brain voxels only.

Optionally (``residual_channels=8``, dkiharm's ``--network-input dwi+fit``) the last eight
input channels are the scan's own DKI fit, scaled like the targets: the network then sees
the fit beside the DWIs and outputs it plus a learned correction (a residual connection from
the centre voxel's fit to the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OUTPUT_NAMES", "SHALLOW_OUTPUTS", "DEEP_OUTPUTS", "HierarchicalDKINet"]

SHALLOW_OUTPUTS: tuple[str, ...] = ("md", "ad", "rd")
DEEP_OUTPUTS: tuple[str, ...] = ("fa", "mk", "ak", "rk", "kfa")
OUTPUT_NAMES: tuple[str, ...] = SHALLOW_OUTPUTS + DEEP_OUTPUTS
"""Output channel order: MD, AD, RD (shallow head) then FA, MK, AK, RK, KFA (deep head)."""


class HierarchicalDKINet(nn.Module):
    """Hierarchical 3-D CNN for DKI parameter mapping (Li et al. 2019; paper section 2.2).

    Parameters
    ----------
    in_channels
        Number of input volumes: the scan's diffusion-weighted volumes divided by the
        voxel's mean b0 (b0 volumes themselves are dropped, see :mod:`.data`).
    hidden_channels
        Width of every hidden layer (paper: 150).
    num_shared_layers
        Number of 1x1x1 layers shared by both heads after the 3x3x3 convolution (paper:
        "several"; default 2). The deep head adds one more hidden layer.
    dropout
        Dropout probability applied right before each output layer (paper: 0.1).
    kernel_size
        Edge of the cubic first convolution (paper: 3); odd, zero padded to keep the size.
    residual_channels
        0 (paper) or 8: the last 8 of the ``in_channels`` are the scan's own fitted maps in
        :data:`OUTPUT_NAMES` order and target scaling, added to the output at each voxel.

    Shapes
    ------
    ``forward``: ``(N, in_channels, X, Y, Z) -> (N, 8, X, Y, Z)``;
    ``forward_voxels``: ``(V, kernel_size**3 * in_channels) -> (V, 8)``, the neighbourhood
    vector being laid out offset-major, ``[offset (x, y, z in C order), channel]``.
    Output channels follow :data:`OUTPUT_NAMES`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_channels: int = 150,
        num_shared_layers: int = 2,
        dropout: float = 0.1,
        kernel_size: int = 3,
        residual_channels: int = 0,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, minimum=1)
        _check_int("hidden_channels", hidden_channels, minimum=1)
        _check_int("num_shared_layers", num_shared_layers, minimum=0)
        _check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so the output keeps the input size; got {kernel_size}."
            )
        if residual_channels not in (0, len(OUTPUT_NAMES)) or residual_channels >= in_channels:
            raise ValueError(
                f"residual_channels must be 0 or {len(OUTPUT_NAMES)} (fewer than in_channels="
                f"{in_channels}); got {residual_channels!r}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1); got {dropout!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_shared_layers = num_shared_layers
        self.dropout = float(dropout)
        self.kernel_size = kernel_size
        self.residual_channels = residual_channels

        self.conv = nn.Conv3d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2)
        self.shared = nn.ModuleList(
            nn.Linear(hidden_channels, hidden_channels) for _ in range(num_shared_layers)
        )
        self.shallow_out = nn.Linear(hidden_channels, len(SHALLOW_OUTPUTS))
        self.deep_hidden = nn.Linear(hidden_channels, hidden_channels)
        self.deep_out = nn.Linear(hidden_channels, len(DEEP_OUTPUTS))

    @property
    def hparams(self) -> dict[str, int | float]:
        """Constructor arguments, as recorded in the model card."""
        return {
            "in_channels": self.in_channels,
            "hidden_channels": self.hidden_channels,
            "num_shared_layers": self.num_shared_layers,
            "dropout": self.dropout,
            "kernel_size": self.kernel_size,
            "residual_channels": self.residual_channels,
        }

    def neighbourhood_weight(self) -> torch.Tensor:
        """First-layer weight as a ``(hidden, kernel**3 * in_channels)`` matrix.

        Columns are ordered ``[offset, channel]`` to match the neighbourhood vectors built by
        :func:`dkiharm_nipype.cnn.data.gather_neighbourhoods`.
        """
        w = self.conv.weight  # (hidden, C, kx, ky, kz)
        return w.permute(0, 2, 3, 4, 1).reshape(self.hidden_channels, -1)

    def trunk(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-voxel layers after the convolution: ``(..., hidden)`` -> shallow, deep features.

        Returns the inputs of the two dropout + output layers, so MC-dropout can reuse them.
        """
        h = F.relu(features)
        for layer in self.shared:
            h = F.relu(layer(h))
        return h, F.relu(self.deep_hidden(h))

    def heads(
        self, shallow: torch.Tensor, deep: torch.Tensor, *, dropout: bool | None = None
    ) -> torch.Tensor:
        """Dropout then the two output layers; ``dropout=None`` follows ``self.training``."""
        active = self.training if dropout is None else dropout
        shallow = F.dropout(shallow, self.dropout, training=active)
        deep = F.dropout(deep, self.dropout, training=active)
        return torch.cat([self.shallow_out(shallow), self.deep_out(deep)], dim=-1)

    def voxel_features(self, neighbourhoods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First convolution, as one matrix product, and the trunk on neighbourhood vectors."""
        if neighbourhoods.ndim != 2 or neighbourhoods.shape[1] != self.conv.weight[0].numel():
            raise ValueError(
                f"Expected neighbourhood vectors of shape (V, {self.conv.weight[0].numel()}); "
                f"got {tuple(neighbourhoods.shape)}."
            )
        return self.trunk(F.linear(neighbourhoods, self.neighbourhood_weight(), self.conv.bias))

    def residual_base(self, neighbourhoods: torch.Tensor) -> torch.Tensor | float:
        """What the output adds to the heads: the centre voxel's fit channels, or 0."""
        if not self.residual_channels:
            return 0.0
        end = (self.kernel_size**3 // 2 + 1) * self.in_channels  # end of the centre voxel
        return neighbourhoods[:, end - self.residual_channels : end]

    def forward_voxels(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        """Sparse forward on neighbourhood vectors ``(V, kernel**3 * C) -> (V, 8)``.

        Equal to :meth:`forward` at the corresponding voxels (the convolution evaluated
        only where asked).
        """
        out = self.heads(*self.voxel_features(neighbourhoods))
        return out + self.residual_base(neighbourhoods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense forward on whole volumes ``(N, C, X, Y, Z) -> (N, 8, X, Y, Z)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Expected input of shape (N, {self.in_channels}, X, Y, Z); got {tuple(x.shape)}."
            )
        first = self.conv(x).movedim(1, -1)  # channels last: the 1x1x1 layers are Linear
        out = self.heads(*self.trunk(first)).movedim(-1, 1)
        if self.residual_channels:
            out = out + x[:, -self.residual_channels :]
        return out


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
