"""The linear baseline: a per-map regression from a scan's own DKI maps to the reference's.

The simplest harmonization a network has to beat (issue #20): for each of the eight maps,
``y_j = a_j x_j + b_j`` (``inputs="own"``: the scan's own map ``j`` only, two numbers per
map) or ``y_j = sum_k A_jk x_k + b_j`` (``inputs="all"``: all eight maps), fitted by
ordinary least squares on the same training voxels as the networks (the target scanner's
fit against the reference scanner's labels registered into it).

It lives with the networks (``cnn``) because it is one of the two mappings a harmonizer
card can apply; the evaluation scores it as a comparator. The group level fits one mapping
per target scanner beside its network
(:func:`dkiharm_nipype.cnn.train.train_harmonizer`), stores it in the model card, scores it
as method ``linear`` everywhere the networks are scored, and uses it where the network does
not beat it on held-out blocks (model selection, :func:`select_mappings`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LINEAR_INPUTS", "LinearMapping", "fit_linear_mapping", "select_mappings"]

#: ``own``: each map from the scan's own same map; ``all``: each map from all eight maps.
LINEAR_INPUTS = ("own", "all")


@dataclass(frozen=True)
class LinearMapping:
    """``y = x @ coef.T + intercept`` over the last axis (maps in ``names`` order)."""

    names: tuple[str, ...]
    inputs: str
    coef: np.ndarray
    intercept: np.ndarray
    n_voxels: int = 0

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.inputs not in LINEAR_INPUTS:
            raise ValueError(f"inputs must be one of {LINEAR_INPUTS}; got {self.inputs!r}.")
        if np.shape(self.coef) != (n, n) or np.shape(self.intercept) != (n,):
            raise ValueError(
                f"A linear mapping of {n} maps needs a {n}x{n} coef and {n} intercepts; got "
                f"{np.shape(self.coef)} and {np.shape(self.intercept)}."
            )

    def apply(self, maps: np.ndarray) -> np.ndarray:
        """Mapped maps ``(..., n)`` (float32) from a scan's own maps ``(..., n)``."""
        maps = np.asarray(maps, dtype=np.float64)
        if maps.shape[-1] != len(self.names):
            raise ValueError(
                f"Maps of shape {maps.shape} given to a linear mapping of {len(self.names)} "
                f"maps ({', '.join(self.names)})."
            )
        return (maps @ np.asarray(self.coef).T + np.asarray(self.intercept)).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "inputs": self.inputs,
            "coef": np.asarray(self.coef).tolist(),
            "intercept": np.asarray(self.intercept).tolist(),
            "n_voxels": int(self.n_voxels),
            "model": "ordinary least squares, y = x @ coef.T + intercept (physical units)",
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearMapping:
        return cls(
            names=tuple(d["names"]),
            inputs=str(d["inputs"]),
            coef=np.asarray(d["coef"], dtype=float),
            intercept=np.asarray(d["intercept"], dtype=float),
            n_voxels=int(d.get("n_voxels", 0)),
        )


def fit_linear_mapping(
    x: np.ndarray, y: np.ndarray, *, names: Sequence[str], inputs: str = "own"
) -> LinearMapping:
    """Least-squares mapping from own maps ``x`` ``(V, n)`` to reference labels ``y``.

    Voxels with a non-finite value in ``x`` or ``y`` are left out. ``inputs="all"``
    standardises the columns before solving (diffusivities are ~1e-3, kurtoses ~1) and
    returns the coefficients in physical units.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(names)
    if x.ndim != 2 or x.shape[1] != n or y.shape != x.shape:
        raise ValueError(f"x and y must both be (voxels, {n}); got {x.shape} and {y.shape}.")
    keep = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
    x, y = x[keep], y[keep]
    if x.shape[0] < (n + 1 if inputs == "all" else 2):
        raise ValueError(f"Too few finite voxels ({x.shape[0]}) to fit a linear mapping.")
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    coef, intercept = np.zeros((n, n)), np.zeros(n)
    if inputs == "own":
        for j in range(n):
            zj = (x[:, j] - mu[j]) / sd[j]
            slope = float(np.mean(zj * (y[:, j] - y[:, j].mean())) / max(np.mean(zj**2), 1e-30))
            coef[j, j] = slope / sd[j]
            intercept[j] = y[:, j].mean() - coef[j, j] * mu[j]
    elif inputs == "all":
        design = np.column_stack([(x - mu) / sd, np.ones(len(x))])
        sol, *_ = np.linalg.lstsq(design, y, rcond=None)
        coef = (sol[:n] / sd[:, None]).T
        intercept = sol[n] - coef @ mu
    else:
        raise ValueError(f"inputs must be one of {LINEAR_INPUTS}; got {inputs!r}.")
    return LinearMapping(tuple(names), inputs, coef, intercept, n_voxels=int(x.shape[0]))


def select_mappings(
    network: Mapping[str, float], linear: Mapping[str, float], *, mode: str = "auto"
) -> dict[str, dict]:
    """Per map, which mapping harmonizes: the network or the linear baseline.

    ``network`` and ``linear`` are held-out NRMSEs per map; ``mode="auto"`` keeps the
    network only where it is strictly better (ties go to the simpler mapping),
    ``"network"``/``"linear"`` force one. Returns ``{map: {chosen, val_nrmse_network,
    val_nrmse_linear}}``.
    """
    if mode not in ("auto", "network", "linear"):
        raise ValueError(f"selection must be 'auto', 'network' or 'linear'; got {mode!r}.")
    out = {}
    for name, net in network.items():
        lin = float(linear[name])
        if mode == "auto":
            chosen = "network" if np.isfinite(net) and net < lin else "linear"
        else:
            chosen = mode
        out[name] = {"chosen": chosen, "val_nrmse_network": float(net), "val_nrmse_linear": lin}
    return out
