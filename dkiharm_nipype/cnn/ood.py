"""Voxelwise out-of-distribution (OOD) flag: inputs unlike the harmonizer's training data.

A network trained on healthy traveling subjects has never seen a lesion; where a scan's
input differs from every training voxel its output is an extrapolation. At training time
:func:`fit_ood_model` summarises the network input of every training voxel (the normalised
DWI signal, S/S0, in the card's shell order) as a small feature vector per shell:

* ``-log(mean S/S0)`` over the shell's directions (a b-weighted mean diffusivity), and
* the coefficient of variation of S/S0 across the shell's directions (an anisotropy),

standardises the features and fits a Gaussian mixture (a few components: white matter,
grey matter, CSF and their mixtures) with a ridge-regularised covariance by EM. A voxel's
distance is its smallest Mahalanobis distance to a component; the threshold is the
``percentile`` (99.5th by default) of the training voxels' distances, so about 0.5 % of
voxels like the training data are flagged by construction. Everything is stored as plain
numbers (JSON, in the model card's ``training["ood"]``), never pickled.
At apply time :func:`score_scan` returns the distance map and ``distance > threshold``,
the ``desc-ood_mask`` written beside the harmonized maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .data import B0_THRESHOLD, CLIP_RANGE, normalize_dwi

__all__ = [
    "OOD_COMPONENTS",
    "OOD_PERCENTILE",
    "fit_ood_model",
    "mahalanobis_min",
    "score_scan",
    "score_voxels",
    "shell_features",
    "voxel_features",
]

OOD_PERCENTILE = 99.5
"""Percentile of the training voxels' distances used as the flagging threshold."""
OOD_COMPONENTS = 4
"""Gaussian components of the training-distribution model."""
_FLOOR = 1e-3  # S/S0 floor before the log (clipped noise in CSF at high b)
_MAX_FIT_VOXELS = 50_000
_REG = 1e-2  # ridge on standardised covariances


def shell_features(signal: np.ndarray, shell_sizes: Sequence[int] | None = None) -> np.ndarray:
    """Per-voxel features ``(V, 2 * n_shells)`` of normalised signals ``(V, n_dwi)``.

    ``shell_sizes`` are the volumes per shell in the (shell-sorted) channel order, e.g. a
    protocol fingerprint's ``directions``; ``None`` (or sizes that do not add up) treats
    all volumes as one shell.
    """
    signal = np.asarray(signal, dtype=np.float64)
    n = signal.shape[-1]
    sizes = list(shell_sizes or [])
    if not sizes or sum(sizes) != n or min(sizes) < 1:
        sizes = [n]
    feats, start = [], 0
    for size in sizes:
        block = signal[:, start : start + size]
        start += size
        mean = np.maximum(block.mean(axis=1), _FLOOR)
        feats.append(-np.log(mean))
        feats.append(block.std(axis=1) / mean if size > 1 else np.zeros_like(mean))
    return np.stack(feats, axis=1)


def voxel_features(
    volume: np.ndarray, mask: np.ndarray, shell_sizes: Sequence[int] | None = None
) -> np.ndarray:
    """Features ``(V, 6 * n_shells)`` of the mask's voxels of a normalised DWI ``(X, Y, Z, n)``.

    The network sees a 3x3x3 neighbourhood, and so does the flag: each voxel's
    :func:`shell_features`, their mean and their standard deviation over its 3x3x3
    neighbours inside ``mask``. A partial-volume voxel at a tissue border has unlike
    neighbours; a lesion core with the same signal mixture has like ones.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    centre = shell_features(volume[mask], shell_sizes)
    maps = np.zeros((*mask.shape, centre.shape[1]))
    maps[mask] = centre
    weight = ndimage.uniform_filter(mask.astype(float), size=3, mode="constant")[mask]
    weight = np.maximum(weight, 1e-6)
    mean = np.empty_like(centre)
    sq = np.empty_like(centre)
    for j in range(centre.shape[1]):
        mean[:, j] = ndimage.uniform_filter(maps[..., j], size=3, mode="constant")[mask]
        sq[:, j] = ndimage.uniform_filter(maps[..., j] ** 2, size=3, mode="constant")[mask]
    mean /= weight[:, None]
    std = np.sqrt(np.maximum(sq / weight[:, None] - mean**2, 0.0))
    return np.concatenate([centre, mean, std], axis=1)


def fit_ood_model(
    signals: Sequence[np.ndarray],
    *,
    shell_sizes: Sequence[int] | None = None,
    n_components: int = OOD_COMPONENTS,
    percentile: float = OOD_PERCENTILE,
    seed: int = 0,
) -> dict:
    """Training-distribution model of per-voxel features; a JSON-serialisable dict.

    ``signals`` are ``(volume, mask)`` pairs, one per training scan: its normalised DWI
    (:func:`.data.normalize_dwi`) and the voxels to learn from (its training mask).
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100); got {percentile}.")
    x = np.concatenate([voxel_features(v, m, shell_sizes) for v, m in signals], axis=0)
    x = x[np.isfinite(x).all(axis=1)]
    if x.shape[0] < 10 * (n_components + x.shape[1]):
        raise ValueError(
            f"Only {x.shape[0]} training voxels for an OOD model of {n_components} components "
            f"over {x.shape[1]} features."
        )
    centre, spread = x.mean(axis=0), x.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    z = (x - centre) / spread
    # The mixture is fitted on 70 % of the voxels and the threshold read on the other 30 %:
    # an in-sample percentile of an overfitted mixture would flag too many new voxels.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(z))
    n_fit = int(0.7 * len(z))
    fit_rows, held = z[order[:n_fit][:_MAX_FIT_VOXELS]], z[order[n_fit:]]
    weights, means, covs = _fit_gmm(fit_rows, n_components, rng)
    model = {
        "method": "gaussian-mixture minimum Mahalanobis distance of per-shell signal features",
        "features": "per shell: -log(mean S/S0) and CV of S/S0 across directions; their "
        "3x3x3 neighbourhood mean and standard deviation",
        "shell_sizes": [int(s) for s in (shell_sizes or [])],
        "center": centre.tolist(),
        "scale": spread.tolist(),
        "weights": weights.tolist(),
        "means": means.tolist(),
        "covariances": covs.tolist(),
        "ridge": _REG,
        "percentile": float(percentile),
    }
    distance = score_voxels(model, held, standardised=True)
    model["threshold"] = float(np.percentile(distance, percentile))
    model["n_voxels"] = int(len(z))
    return model


def score_voxels(
    model: Mapping, features: np.ndarray, *, standardised: bool = False
) -> np.ndarray:
    """OOD distance ``(V,)`` of feature rows (:func:`voxel_features`)."""
    z = np.asarray(features, dtype=np.float64)
    if not standardised:
        z = (z - np.asarray(model["center"])) / np.asarray(model["scale"])
    return mahalanobis_min(z, np.asarray(model["means"]), np.asarray(model["covariances"]))


def mahalanobis_min(x: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """Smallest Mahalanobis distance of rows ``x`` ``(V, d)`` to ``K`` Gaussians."""
    out = np.full(len(x), np.inf)
    for mu, cov in zip(means, covs, strict=True):
        chol = np.linalg.cholesky(cov)
        sol = np.linalg.solve(chol, (x - mu).T)
        np.minimum(out, np.sqrt((sol**2).sum(axis=0)), out=out)
    out[~np.isfinite(x).all(axis=1)] = np.inf  # unreadable input is out of distribution
    return out


def score_scan(
    model: Mapping,
    dwi: np.ndarray,
    bvals: np.ndarray,
    mask: np.ndarray,
    *,
    normalization: Mapping | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance map ``(X, Y, Z)`` (0 outside ``mask``) and the OOD mask of one scan.

    ``dwi`` and ``bvals`` in the harmonizer's trained volume order; ``normalization`` is the
    card's (:func:`.data.normalize_dwi` arguments).
    """
    norm = dict(normalization or {})
    mask = np.asarray(mask, dtype=bool)
    volume = normalize_dwi(
        dwi,
        bvals,
        b0_threshold=norm.get("b0_threshold", B0_THRESHOLD),
        clip=tuple(norm.get("clip", CLIP_RANGE)),
    )
    features = voxel_features(volume, mask, model.get("shell_sizes"))
    distance = np.zeros(mask.shape, dtype=np.float32)
    distance[mask] = np.minimum(score_voxels(model, features), np.finfo(np.float32).max)
    return distance, mask & (distance > float(model["threshold"]))


def _fit_gmm(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 200):
    """EM for a full-covariance Gaussian mixture, k-means++ start, ridge ``_REG``."""
    n, d = x.shape
    ridge = _REG * np.eye(d)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[0])
    means = np.array(centres)
    covs = np.repeat((np.cov(x.T).reshape(d, d) + ridge)[None], k, axis=0)
    weights = np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(iters):
        logp = np.stack([_log_gauss(x, m, c) for m, c in zip(means, covs, strict=True)], 1)
        logp += np.log(weights)
        top = logp.max(axis=1, keepdims=True)
        lse = top + np.log(np.exp(logp - top).sum(axis=1, keepdims=True))
        resp = np.exp(logp - lse)
        nk = resp.sum(axis=0) + 1e-12
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        for j in range(k):
            diff = x - means[j]
            covs[j] = (resp[:, j, None] * diff).T @ diff / nk[j] + ridge
        ll = float(lse.mean())
        if ll - previous < 1e-6:
            break
        previous = ll
    return weights, means, covs


def _log_gauss(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * ((sol**2).sum(axis=0) + logdet + x.shape[1] * np.log(2 * np.pi))
