"""Voxelwise ComBat of DKI maps across scanners (the paper's first comparator).

ComBat (Johnson, Li & Rabinovic 2007, *Biostatistics* 8:118) models each feature as
``y = alpha + X beta + gamma_site + delta_site * e``: an additive (``gamma``) and a
multiplicative (``delta``) site effect on top of biological covariates ``X`` that are
kept. Site parameters are shrunk by parametric empirical Bayes, with priors pooled over
the features of each site, which is what makes ComBat usable voxelwise with few scans per
site (Fortin et al. 2017, *NeuroImage* 161:149, for DTI maps). Following the paper
(section 2.3.4), the DKI maps of all scans are registered non-linearly to a template
scan, each parameter is harmonized separately with site = scanner, and the results are
mapped back to each scan's own space.

The ComBat itself is **neuroCombat** 0.2.12 (Fortin's reference implementation, the
engine that neuroHarmonize wraps), not a re-implementation. neuroHarmonize 2.5.2 (the
issue's first choice) adds only ComBat-GAM on top of it but declares ``numpy<2`` and
``pandas<3``: installing it downgrades the numpy 2.4 / pandas 3.1 that torch, dipy and
nipype run on here. neuroCombat declares no pins and runs on numpy 2 / pandas 3; its
one numpy-2 incompatibility (``np.int`` on the reference-site path) is bridged by a
scoped alias. combatlearn 2.3 (maintained, numpy 2) was tried and rejected: its
parametric empirical Bayes takes the priors of each voxel across sites instead of
across the voxels of each site (Johnson's model), which under-corrects the scale
effect (measured on the synthetic data of ``tests/test_combat.py``: the ratio of
site noise SDs, 2.1 before, stays 1.65 with combatlearn and drops to 1.27 with
neuroCombat).

Going back to scan space
------------------------
For fixed site and covariates ComBat's adjustment is affine in the data,
``y* = a y + b`` per voxel, with ``a = 1 / sqrt(delta*)`` of the scan's site
(neuroCombat's ``delta.star``) and ``b = y* - a y``. By default (``backmap="affine"``)
``a`` and ``b`` are mapped to the scan's grid and applied to the scan's own map: the
result is ComBat's adjustment without the blur of resampling the maps twice.
``backmap="values"`` instead resamples the harmonized template-space maps back (the
paper's literal description). Voxels of a scan's mask that fall outside the voxels
shared by all scans keep their values (the adjustment fades to the identity at that
border).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from neuroCombat import neuroCombat

from ..errors import DkiharmInputError
from .commonspace import CommonSpace, build_common_space

#: Columns of ``participants.tsv`` used as covariates when present: (name, kind).
DEFAULT_COVARIATES = (("age", "continuous"), ("sex", "discrete"))


def _library(func) -> str:
    """``name version`` of the installed distribution that provides ``func``."""
    from importlib.metadata import PackageNotFoundError, version

    name = func.__module__.split(".")[0]
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return name


#: The ComBat implementation that runs (named in reports from the function itself).
COMBAT_LIBRARY = _library(neuroCombat)
#: Name of the site column handed to neuroCombat.
_SITE = "site"

#: How harmonized maps are taken back to scan space.
BACKMAPS = ("affine", "values")


class ComBatInputError(DkiharmInputError):
    """Data or options that ComBat cannot use."""


@dataclass
class ComBatResult:
    """Harmonized data with ComBat's per-value affine adjustment ``y* = scale * y + shift``.

    Arrays are (scans, features) like the input.
    """

    data: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    sites: list[str]
    covariates: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------- covariates
def read_participants(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Rows of a BIDS ``participants.tsv`` keyed by label without ``sub-``.

    ``path`` is the file or the BIDS root holding it. Missing files give ``{}``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "participants.tsv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and "participant_id" not in rows[0]:
        raise ComBatInputError(f"{path} has no participant_id column; add one (BIDS requires it).")
    return {row["participant_id"].removeprefix("sub-"): row for row in rows}


def participant_covariates(
    subjects: Sequence[str],
    participants: Mapping[str, Mapping[str, str]],
    *,
    columns: Sequence[tuple[str, str]] = DEFAULT_COVARIATES,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Continuous and discrete covariates of each scan's subject.

    A column is used when every subject has a value (not ``n/a``) and it varies across
    scans (a constant column is collinear with the site indicators).

    Returns
    -------
    continuous, discrete
        ``{name: values per scan}``.
    """
    continuous, discrete = {}, {}
    for name, kind in columns:
        values = [participants.get(str(s).removeprefix("sub-"), {}).get(name) for s in subjects]
        if any(v in (None, "", "n/a") for v in values) or len(set(values)) < 2:
            continue
        if kind == "continuous":
            try:
                continuous[name] = np.asarray(values, dtype=float)
            except ValueError:
                raise ComBatInputError(
                    f"participants.tsv column {name!r} holds non-numbers ({values}); "
                    "fix the column or leave it out of the covariates."
                ) from None
        else:
            discrete[name] = np.asarray(values, dtype=str)
    return continuous, discrete


# ------------------------------------------------------------------------------ ComBat
def combat(
    data: np.ndarray,
    sites: Sequence[str],
    *,
    continuous: Mapping[str, Sequence[float]] | None = None,
    discrete: Mapping[str, Sequence[str]] | None = None,
    reference_site: str | None = None,
    parametric: bool = True,
    mean_only: bool = False,
) -> ComBatResult:
    """ComBat of ``data`` (scans x features) with site = scanner, keeping covariates.

    Parameters
    ----------
    data
        One row per scan, one column per feature (e.g. voxel of one DKI parameter).
    sites
        Scanner of each scan; at least two scanners with two scans each.
    continuous, discrete
        Covariates to keep (e.g. age; sex), one value per scan.
    reference_site
        Leave this scanner's data unchanged and move the others onto it (default: the
        pooled mean of all scanners, standard ComBat).
    parametric, mean_only
        Parametric empirical Bayes priors (the paper's choice); adjust only the mean.
    """
    data = np.asarray(data, dtype=np.float64)
    sites = [str(s) for s in sites]
    if data.ndim != 2 or data.shape[0] != len(sites):
        raise ComBatInputError(
            f"ComBat needs one row per scan: data has shape {data.shape} for {len(sites)} "
            "site labels; stack the scans' maps as (scans, voxels)."
        )
    if not np.isfinite(data).all():
        raise ComBatInputError(
            f"ComBat data hold {int((~np.isfinite(data)).sum())} NaN/inf values; "
            "restrict the voxels to those finite in every scan."
        )
    levels, counts = np.unique(sites, return_counts=True)
    if levels.size < 2:
        raise ComBatInputError(
            f"ComBat needs scans from at least two scanners but all {len(sites)} are from "
            f"{str(levels[0])!r}; add the other scanners' scans."
        )
    if counts.min() < 2:
        raise ComBatInputError(
            f"Scanner {str(levels[np.argmin(counts)])!r} has a single scan; ComBat estimates a "
            "variance per scanner and needs at least two scans of each."
        )
    if reference_site is not None and str(reference_site) not in levels:
        raise ComBatInputError(
            f"reference_site={reference_site!r} is not one of the scanners {', '.join(levels)}."
        )
    n = len(sites)
    cont = _frame(continuous, n, "continuous")
    disc = _frame(discrete, n, "discrete")
    columns = levels.size + (0 if cont is None else cont.shape[1])
    columns += 0 if disc is None else sum(disc[c].nunique() - 1 for c in disc.columns)
    if n <= columns:
        raise ComBatInputError(
            f"ComBat's design (sites + covariates) has {columns} columns for {n} scans, "
            "leaving no residual to estimate the variances; drop covariates or add scans."
        )
    covars = pd.DataFrame({_SITE: sites})
    for frame in (cont, disc):
        if frame is not None:
            covars = pd.concat([covars, frame.reset_index(drop=True)], axis=1)
    # With a reference site its own priors can be degenerate (two scans: every voxel's
    # standardized variance is exactly 2); neuroCombat then divides by zero, but those
    # estimates are discarded (the reference data are copied through).
    quiet = np.errstate(divide="ignore", invalid="ignore")
    with _numpy_int_alias(), quiet, contextlib.redirect_stdout(io.StringIO()):
        result = neuroCombat(
            data.T,
            covars,
            _SITE,
            categorical_cols=list(disc.columns) if disc is not None else None,
            continuous_cols=list(cont.columns) if cont is not None else None,
            eb=True,
            parametric=parametric,
            mean_only=mean_only,
            ref_batch=None if reference_site is None else str(reference_site),
        )
    out = np.asarray(result["data"], dtype=np.float64).T
    delta = np.asarray(result["estimates"]["delta.star"], dtype=np.float64)
    # neuroCombat orders the sites' rows of delta.star as np.unique does (sorted labels)
    row = {str(level): i for i, level in enumerate(levels)}
    scale = np.stack([1.0 / np.sqrt(delta[row[site]]) for site in sites])
    if reference_site is not None:  # its data are copied through unchanged
        scale[np.asarray(sites) == str(reference_site)] = 1.0
    shift = out - scale * data
    names = list(cont.columns) if cont is not None else []
    names += list(disc.columns) if disc is not None else []
    return ComBatResult(out, scale, shift, sites, names)


@contextlib.contextmanager
def _numpy_int_alias():
    """``np.int`` (removed in numpy 1.24) for neuroCombat 0.2.12's reference-site path."""
    added = "int" not in np.__dict__
    if added:
        np.int = int  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.int


def _frame(columns: Mapping[str, Sequence] | None, n: int, kind: str):
    if not columns:
        return None
    frame = pd.DataFrame({k: np.asarray(v) for k, v in columns.items()})
    if len(frame) != n:
        raise ComBatInputError(
            f"The {kind} covariates have {len(frame)} values for {n} scans; give one per scan."
        )
    return frame


# ---------------------------------------------------------------- maps in common space
@dataclass
class ComBatMaps:
    """Harmonized maps in each scan's space, and how they were made."""

    maps: dict[str, list[np.ndarray]]
    space: CommonSpace
    covariates: list[str]
    n_voxels: int
    coverage: list[float]


def combat_maps(
    maps: Mapping[str, Sequence],
    masks: Sequence,
    sites: Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    participants: Mapping[str, Mapping[str, str]] | None = None,
    registration_param: str = "fa",
    template: int = 0,
    reference_site: str | None = None,
    backmap: str = "affine",
    engine: str = "auto",
    space: CommonSpace | None = None,
    n_threads: int = 1,
    n_jobs: int = 1,
    work_dir: str | os.PathLike | None = None,
) -> ComBatMaps:
    """ComBat of DKI maps of several scans, through a template scan's space.

    Parameters
    ----------
    maps
        ``{param: [one 3-D image or path per scan]}``, e.g. the eight DKI maps; each
        parameter is harmonized separately.
    masks
        Brain mask of each scan (on its maps' grid).
    sites
        Scanner of each scan.
    subjects, participants
        Subject of each scan and the rows of ``participants.tsv``
        (:func:`read_participants`): age and sex are kept as covariates when present.
    registration_param
        The map that drives the registration (FA by default).
    template
        Index of the template scan.
    reference_site, backmap
        See :func:`combat` and the module notes (``affine`` or ``values``).
    engine, n_threads, n_jobs, work_dir
        Registration options (:func:`~dkiharm_nipype.registration.register`; ``n_jobs``
        scans at once).
    space
        A :class:`CommonSpace` already built for these scans (skips registration).

    Returns
    -------
    ComBatMaps
        ``maps[param][i]`` on scan ``i``'s grid (0 outside its mask).
    """
    if backmap not in BACKMAPS:
        raise ComBatInputError(f"backmap={backmap!r}; choose one of {', '.join(BACKMAPS)}.")
    if registration_param not in maps:
        raise ComBatInputError(
            f"registration_param={registration_param!r} is not among the maps "
            f"({', '.join(maps)}); give its maps or pick another parameter."
        )
    n = len(sites)
    images = {}
    for param, files in maps.items():
        if len(files) != n:
            raise ComBatInputError(
                f"{len(files)} {param} maps for {n} scans; give one map per scan."
            )
        images[param] = [_load(f) for f in files]
    if len(masks) != n:
        raise ComBatInputError(f"{len(masks)} masks for {n} scans; give one mask per scan.")
    masks = [_load(m) for m in masks]
    for i in range(n):
        for param in maps:
            _check_grid(images[param][i], masks[i], param)
    continuous, discrete = {}, {}
    if subjects is not None and participants:
        if len(subjects) != n:
            raise ComBatInputError(f"{len(subjects)} subjects for {n} scans; give one per scan.")
        continuous, discrete = participant_covariates(subjects, participants)

    if space is None:
        space = build_common_space(
            images[registration_param],
            masks,
            template=template,
            engine=engine,
            n_threads=n_threads,
            n_jobs=n_jobs,
            work_dir=work_dir,
        )
    common = space.common_mask
    scan_masks = [np.asanyarray(m.dataobj) > 0 for m in masks]
    # Scan voxels whose template position lies in the shared voxels (nearest neighbour).
    covered = [
        scan_masks[i] & (space.to_scan_space(i, common.astype(np.uint8), label=True) > 0)
        for i in range(n)
    ]
    out: dict[str, list[np.ndarray]] = {}
    names: list[str] = []
    for param, imgs in images.items():
        own = [np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float64) for img in imgs]
        stacked = np.stack(
            [space.to_template_space(i, own[i].astype(np.float32)) for i in range(n)]
        )
        result = combat(
            stacked[:, common],
            sites,
            continuous=continuous,
            discrete=discrete,
            reference_site=reference_site,
        )
        names = result.covariates
        out[param] = []
        for i in range(n):
            if backmap == "affine":
                scale = np.ones(space.shape, np.float32)
                shift = np.zeros(space.shape, np.float32)
                scale[common], shift[common] = result.scale[i], result.shift[i]
                a = space.to_scan_space(i, scale)
                b = space.to_scan_space(i, shift)
                # outside the template grid the resampling gives 0: use the identity there
                outside = space.to_scan_space(i, np.ones(space.shape, np.float32)) < 1e-3
                a[outside], b[outside] = 1.0, 0.0
                harmonized = a * own[i] + b
            else:
                full = np.zeros(space.shape, np.float32)
                full[common] = result.data[i]
                harmonized = np.where(covered[i], space.to_scan_space(i, full), own[i])
            out[param].append(np.where(scan_masks[i], harmonized, 0.0).astype(np.float32))
    coverage = [float(c.sum() / max(m.sum(), 1)) for c, m in zip(covered, scan_masks, strict=True)]
    return ComBatMaps(out, space, names, int(common.sum()), coverage)


def _load(img) -> nb.Nifti1Image:
    return img if isinstance(img, nb.spatialimages.SpatialImage) else nb.load(img)


def _check_grid(img: nb.Nifti1Image, mask: nb.Nifti1Image, param: str) -> None:
    from ..registration import check_same_grid

    check_same_grid(img, mask, names=(f"{param} map", "brain mask"))
