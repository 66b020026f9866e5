"""Image-quality and harmonization metrics on plain arrays.

SNR follows the paper's Table 3: the mean b0 signal in a white-matter region of interest
divided by the noise standard deviation there, reported in decibels (20 log10).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..utils.dwi import B0_THRESHOLD


def auto_wm_roi(
    fa: np.ndarray,
    md: np.ndarray,
    brain_mask: np.ndarray,
    *,
    fa_min: float = 0.45,
    md_max: float = 1.1e-3,
) -> np.ndarray:
    """Coherent white matter for SNR when no atlas is given.

    Voxels inside the brain mask eroded by one voxel (away from edges and partial volume)
    with FA >= ``fa_min`` and MD <= ``md_max`` mm^2/s (no CSF contamination). On a real brain
    this selects the corpus callosum and internal capsule, the regions where the paper
    measured SNR (genu of the corpus callosum). On a slab thinner than three voxels the
    erosion is in-plane only (:func:`erode`): a 3-D erosion would leave nothing.
    """
    core = erode(brain_mask)
    return core & np.isfinite(fa) & (fa >= fa_min) & (md <= md_max) & (md > 0)


def erode(mask: np.ndarray, *, iterations: int = 1) -> np.ndarray:
    """Binary erosion by the 6-neighbourhood along the axes with at least three voxels.

    Along an axis of one or two voxels every voxel touches the volume's border, so a 3-D
    erosion empties a thin slab; such axes are left out of the structuring element (a
    two-slice scan is eroded slice by slice, in-plane).
    """
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    for axis, size in enumerate(mask.shape):
        if size < 3:
            index = [1] * mask.ndim
            for end in (0, 2):
                index[axis] = end
                structure[tuple(index)] = False
    return ndimage.binary_erosion(mask, structure=structure, iterations=iterations)


def snr_in_roi(
    dwi: np.ndarray, bvals: np.ndarray, roi: np.ndarray, *, noise_map: np.ndarray | None = None
) -> dict[str, float]:
    """SNR of the b0 signal in ``roi``.

    The signal is the ROI mean of the voxelwise mean b0. The noise standard deviation is,
    by preference, the ROI median of a noise map (e.g. MRtrix3 ``dwidenoise -noise``,
    an MP-PCA estimate); otherwise the root-mean-square over the ROI of the voxelwise
    standard deviation across the b0 frames (needs at least two b0 frames).
    """
    roi = roi.astype(bool)
    n_roi = int(roi.sum())
    b0 = dwi[..., np.asarray(bvals) <= B0_THRESHOLD]
    if n_roi == 0:
        raise ValueError("the SNR region of interest is empty")
    if b0.shape[-1] == 0:
        raise ValueError("the scan has no b0 volume to measure SNR on")
    signal = float(b0[roi].mean())
    if noise_map is not None:
        noise = float(np.median(noise_map[roi]))
        method = "noise map (median in ROI)"
    elif b0.shape[-1] >= 2:
        noise = float(np.sqrt(np.mean(b0[roi].var(axis=-1, ddof=1))))
        method = "standard deviation across b0 frames (RMS in ROI)"
    else:
        raise ValueError("SNR needs a noise map or at least two b0 volumes")
    snr = signal / noise if noise > 0 else float("inf")
    return {
        "signal_mean": signal,
        "noise_sd": noise,
        "snr": snr,
        "snr_db": float(20 * np.log10(snr)) if np.isfinite(snr) else float("inf"),
        "roi_voxels": n_roi,
        "n_b0": int(b0.shape[-1]),
        "noise_method": method,
    }


def snr_matrix(
    rows: list[dict],
) -> tuple[dict[tuple[str, str], list[float]], dict[str, float], str]:
    """Per-scan SNR rows as ``(cells, scanner_means, reference)`` (the Table 3 numbers).

    ``cells[(participant_id, scanner)]`` lists the SNRs (dB) of that subject's runs; the
    reference is the scanner with the highest mean over its scans (the paper's rule).
    """
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        value = snr_value(row["snr_db"])
        if value is not None:  # n/a: no measurable SNR (e.g. no WM in a thin slab)
            cells.setdefault((row["participant_id"], row["scanner"]), []).append(value)
    scanners = sorted({row["scanner"] for row in rows})
    means = {
        sc: float(np.mean(vals)) if (vals := [v for (_, s), vs in cells.items() if s == sc
                                               for v in vs]) else float("nan")
        for sc in scanners
    }  # fmt: skip
    measured = [sc for sc in scanners if np.isfinite(means[sc])]
    return cells, means, (max(measured, key=means.get) if measured else None)


def snr_value(text) -> float | None:
    """An SNR table cell as a number, ``None`` for ``n/a`` (or empty, or not finite)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def snr_table(rows: list[dict]) -> tuple[str, str]:
    """Format per-scan SNR rows as the paper's Table 3 (subjects x scanners, dB).

    Returns ``(table_text, reference_scanner)``; the reference scanner is the one with the
    highest mean SNR over its scans (the paper's rule). Repeated runs are averaged per cell;
    scans without a measurable SNR (``n/a``) are left out, and the reference is ``None`` when
    no scan has one.
    """
    cells, means, reference = snr_matrix(rows)
    scanners = sorted(means)
    subjects = sorted({row["participant_id"] for row in rows})
    scanned = {(row["participant_id"], row["scanner"]) for row in rows}
    width = max([len("subject"), *(len(p) for p in subjects)]) + 2
    lines = ["SNR (dB)".ljust(width) + "".join(f"{sc:>9}" for sc in scanners)]
    for sub in subjects:
        lines.append(
            sub.ljust(width)
            + "".join(
                f"{np.mean(cells[sub, sc]):9.2f}"
                if (sub, sc) in cells
                else f"{'n/a' if (sub, sc) in scanned else '-':>9}"
                for sc in scanners
            )
        )
    lines.append(
        "mean".ljust(width)
        + "".join(
            f"{means[sc]:9.2f}" if np.isfinite(means[sc]) else f"{'n/a':>9}" for sc in scanners
        )
    )
    lines.append(f"reference scanner (highest SNR): {reference or 'none (no measurable SNR)'}")
    return "\n".join(lines), reference


def nrmse(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root-mean-square error normalised by the mean absolute reference value in ``mask``.

    This is the paper's NRMSE-to-reference (and, between two repeats, its scan-rescan
    NRMSE): ``sqrt(mean((x - r)^2)) / mean(|r|)`` over the voxels of ``mask`` (all finite
    voxels when ``mask`` is None).
    """
    estimate, reference = np.asarray(estimate, float), np.asarray(reference, float)
    sel = np.isfinite(estimate) & np.isfinite(reference)
    if mask is not None:
        sel &= np.asarray(mask, bool)
    if not sel.any():
        raise ValueError("NRMSE over an empty set of voxels")
    diff = estimate[sel] - reference[sel]
    return float(np.sqrt(np.mean(diff**2)) / np.mean(np.abs(reference[sel])))


def cv_map(maps: np.ndarray, *, ddof: int = 1) -> np.ndarray:
    """Voxelwise coefficient of variation across scanners (first axis): SD / mean.

    ``maps`` stacks one map per scanner, all in one space. Voxels whose mean is not
    positive get NaN.
    """
    maps = np.asarray(maps, float)
    mean = maps.mean(axis=0)
    sd = maps.std(axis=0, ddof=ddof)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, sd / mean, np.nan)


def mean_cv(maps: np.ndarray, mask: np.ndarray, *, ddof: int = 1) -> float:
    """Mean of the voxelwise inter-scanner CV inside ``mask`` (the paper's WM CV)."""
    cv = cv_map(maps, ddof=ddof)[np.asarray(mask, bool)]
    return float(np.nanmean(cv))


def roi_nrmse(
    estimate: np.ndarray, reference: np.ndarray, labels: np.ndarray, names: dict[int, str]
) -> dict[str, float]:
    """NRMSE-to-reference in each labelled ROI (e.g. the 15 ICBM-DTI-81 WM regions)."""
    out = {}
    for index, name in names.items():
        roi = np.asarray(labels) == index
        if roi.any():
            out[name] = nrmse(estimate, reference, roi)
    return out


#: Default white-matter rule on the reference scan's fit (see :func:`wm_mask_from_fit`).
WM_FA_MIN = 0.2
WM_MD_MAX = 1.5e-3


def wm_mask_from_fit(
    fa: np.ndarray,
    md: np.ndarray,
    brain_mask: np.ndarray | None = None,
    *,
    fa_min: float = WM_FA_MIN,
    md_max: float = WM_MD_MAX,
) -> np.ndarray:
    """White matter from the reference scan's DKI fit, when no WM mask is given.

    Voxels (inside ``brain_mask`` when given) with FA >= ``fa_min`` and
    0 < MD <= ``md_max`` mm^2/s: the usual FA > 0.2 white-matter threshold of DTI studies,
    with free water (CSF, MD ~ 3e-3) excluded. Unlike :func:`auto_wm_roi` (the SNR region:
    coherent WM only) this keeps the whole white matter, the paper's CV/NRMSE domain.
    """
    fa, md = np.asarray(fa, float), np.asarray(md, float)
    wm = np.isfinite(fa) & np.isfinite(md) & (fa >= fa_min) & (md > 0) & (md <= md_max)
    if brain_mask is not None:
        wm &= np.asarray(brain_mask, bool)
    return wm


#: Tissue classes of :func:`tissue_masks_from_fit`: CSF at or above this MD (mm^2/s; free
#: water ~3e-3 at body temperature, tissue 0.6-1.2e-3)...
CSF_MD_MIN = 2.0e-3
#: ... white matter FA >= :data:`WM_FA_MIN` below this MD (adult WM 0.6-0.9e-3).
TISSUE_WM_MD_MAX = 1.1e-3


def tissue_masks_from_fit(
    fa: np.ndarray, md: np.ndarray, brain_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """A three-class segmentation of a scan from its own DTI/DKI fit, when no tissue maps are
    given: ``CSF`` (MD >= :data:`CSF_MD_MIN`), ``WM`` (FA >= :data:`WM_FA_MIN` and
    MD < :data:`TISSUE_WM_MD_MAX`) and ``GM`` (the rest of the brain). Boolean, disjoint,
    inside ``brain_mask``. Diffusion alone cannot tell deep from cortical grey matter, so
    ``GM`` is grey matter as a whole; partial-volume voxels go to the class their MD and FA
    point to (measured against a phantom's truth in tests/test_experiments.py).
    """
    brain = np.asarray(brain_mask, bool)
    fa, md = np.asarray(fa, float), np.asarray(md, float)
    valid = brain & np.isfinite(fa) & np.isfinite(md) & (md > 0)
    csf = valid & (md >= CSF_MD_MIN)
    wm = valid & ~csf & (fa >= WM_FA_MIN) & (md < TISSUE_WM_MD_MAX)
    return {"WM": wm, "GM": valid & ~csf & ~wm, "CSF": csf}


def masked_stats(values: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean, median and count of the finite ``values`` inside ``mask``."""
    sel = np.asarray(values, float)[np.asarray(mask, bool)]
    sel = sel[np.isfinite(sel)]
    if sel.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "n_voxels": 0}
    return {"mean": float(sel.mean()), "median": float(np.median(sel)), "n_voxels": int(sel.size)}


def roi_stats(
    values: np.ndarray, labels: np.ndarray, names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """:func:`masked_stats` of ``values`` in each labelled ROI present in ``labels``."""
    labels = np.asarray(labels)
    return {
        name: masked_stats(values, labels == index)
        for index, name in names.items()
        if (labels == index).any()
    }


def cv_histogram(
    cv: np.ndarray, mask: np.ndarray, *, bins: int = 40, upper: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the voxelwise CV inside ``mask`` (the paper's Fig. 9, lower row).

    ``bins`` equal bins over [0, ``upper``]; CVs above ``upper`` go into the last bin so
    every finite voxel is counted. Returns ``(counts, edges)``.
    """
    sel = np.asarray(cv, float)[np.asarray(mask, bool)]
    sel = np.clip(sel[np.isfinite(sel)], 0, upper)
    return np.histogram(sel, bins=bins, range=(0.0, upper))


#: Kinds of noise floor: a rescan of the reference scan, or two halves of its directions.
FLOOR_KINDS = ("rescan", "halves")


def _full_scan_sd(first: np.ndarray, second: np.ndarray, kind: str) -> np.ndarray:
    """Voxelwise difference of the two repeats scaled to one full scan's noise (its RMS is
    the full scan's noise SD).

    Two full scans differ by noise of variance ``2 sigma^2``; two halves, each with half
    the measurements (twice the variance of a full scan), by ``4 sigma^2``.
    """
    if kind not in FLOOR_KINDS:
        raise ValueError(f"floor kind must be one of {FLOOR_KINDS}; got {kind!r}.")
    return (np.asarray(first, float) - np.asarray(second, float)) / (
        2.0 if kind == "halves" else np.sqrt(2.0)
    )


def noise_floor(
    first: np.ndarray,
    second: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    kind: str = "halves",
) -> float:
    """The NRMSE-to-reference no harmonization can beat: the reference scan's own noise.

    A harmonized map made independently of the reference scan's noise (a test subject)
    differs from that scan's raw fit by at least that noise: even a perfect harmonization,
    one that outputs the true map, has NRMSE ``sigma / mean|ref|``, ``sigma`` being a full
    scan's noise SD. Estimated from two repeats: ``kind="rescan"``, two full scans, differ by
    variance ``2 sigma^2``, so ``sigma = RMS(first - second) / sqrt(2)``; ``kind="halves"``,
    two interleaved halves of one scan's directions, each averaging half the measurements
    (variance ``2 sigma^2`` each), differ by ``4 sigma^2``: ``sigma = RMS(first - second) / 2``,
    i.e. ``/ sqrt(2)`` for the two independent halves and ``/ sqrt(2)`` again for the halved
    averaging. Normalised by the mean absolute ``reference`` as in :func:`nrmse`. The
    ``1 / N`` variance scaling holds to first order for a least-squares fit; fits of halves
    are a little noisier still, so the floor errs high (``benchmarks/noise_floor.py``).
    """
    sd = _full_scan_sd(first, second, kind)
    ref = np.asarray(reference, float)
    sel = np.isfinite(sd) & np.isfinite(ref)
    if mask is not None:
        sel &= np.asarray(mask, bool)
    if not sel.any():
        raise ValueError("noise floor over an empty set of voxels")
    return float(np.sqrt(np.mean(sd[sel] ** 2)) / np.mean(np.abs(ref[sel])))


def cv_floor(
    first: np.ndarray,
    second: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    *,
    n_scanners: int,
    kind: str = "halves",
    ddof: int = 1,
) -> float:
    """Mean voxelwise inter-scanner CV of ``n_scanners`` scans that differ by noise only.

    The CV that noise alone gives raw fits as noisy as the reference scan (a harmonization
    that also denoises can go below it). Per voxel the full-scan noise SD is estimated from
    the two repeats, unbiased for Gaussian noise: ``sigma = |d| sqrt(pi / 2)`` with ``d`` the
    difference scaled to one full scan's noise (see :func:`noise_floor`); the sample SD of
    ``n`` such scans averages ``c(n) sigma`` (``c4`` for ``ddof=1``); divided by the
    reference value.
    """
    from math import exp, lgamma, pi, sqrt

    n = int(n_scanners)
    if n < 2:
        raise ValueError(f"A CV needs at least 2 scanners; got {n}.")
    dof = n - ddof
    # E[sqrt(chi2_{n-1})] / sqrt(dof): the mean sample SD of n draws, in units of sigma
    c = sqrt(2.0 / dof) * exp(lgamma(n / 2.0) - lgamma((n - 1) / 2.0))
    sd = np.abs(_full_scan_sd(first, second, kind)) * sqrt(pi / 2.0)
    ref = np.asarray(reference, float)
    sel = np.asarray(mask, bool) & np.isfinite(sd) & np.isfinite(ref) & (ref > 0)
    if not sel.any():
        return float("nan")
    return float(c * np.mean(sd[sel] / ref[sel]))


def lesion_contrast(
    values: np.ndarray,
    lesion_mask: np.ndarray,
    wm_mask: np.ndarray,
    *,
    gap: int = 1,
    width: int = 3,
) -> dict[str, float]:
    """Contrast of a lesion against the normal white matter around it.

    ``contrast = mean(core) / mean(ring) - 1``, the core being the finite ``values`` in
    ``lesion_mask`` and the ring the finite ``values`` in ``wm_mask`` at ``gap`` + 1 to
    ``gap + width`` voxels from the lesion (26-connected dilations): normal-appearing white
    matter close enough to share the lesion's fibre layout, far enough to hold no partial
    volume of it. Harmonization keeps a lesion when the contrast in the harmonized map
    matches that in the reference scanner's own map (ratio near 1).

    Returns ``{"contrast", "core_mean", "ring_mean", "n_core", "n_ring"}``; raises
    ``ValueError`` when the core or the ring holds no voxel.
    """
    values = np.asarray(values, float)
    lesion = np.asarray(lesion_mask, bool)
    finite = np.isfinite(values)
    structure = ndimage.generate_binary_structure(3, 3)
    near = ndimage.binary_dilation(lesion, structure, iterations=gap) if gap > 0 else lesion
    outer = ndimage.binary_dilation(lesion, structure, iterations=gap + width)
    core = lesion & finite
    ring = outer & ~near & np.asarray(wm_mask, bool) & finite
    if not core.any():
        raise ValueError("lesion contrast: the lesion mask holds no finite voxel of the map")
    if not ring.any():
        raise ValueError(
            "lesion contrast: no white-matter voxel around the lesion; widen the ring "
            "(width) or check that the WM mask and the lesion mask share a grid"
        )
    core_mean, ring_mean = float(values[core].mean()), float(values[ring].mean())
    return {
        "contrast": core_mean / ring_mean - 1.0 if ring_mean != 0 else float("nan"),
        "core_mean": core_mean,
        "ring_mean": ring_mean,
        "n_core": int(core.sum()),
        "n_ring": int(ring.sum()),
    }
