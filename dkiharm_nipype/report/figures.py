"""The report's figures (the paper's Figs. 2-9), drawn with matplotlib's Agg canvas.

Each ``fig_*`` function takes plain tables (lists of dicts as read from the tidy TSVs of
:mod:`dkiharm_nipype.evaluation.evaluate`) and arrays, and returns a
:class:`matplotlib.figure.Figure`;
:func:`to_data_uri` turns one into an inline PNG so the report needs no other file.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

#: Scanner colours (tab10), stable across figures.
_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
#: ROIs of the paper's Fig. 5 (scan-rescan scatter), when the atlas has them.
SCATTER_ROIS = ("GCC", "PLIC", "ACR")


def color(index: int) -> str:
    return _COLORS[index % len(_COLORS)]


def to_data_uri(fig: Figure, *, dpi: int = 80) -> str:
    """``data:image/png;base64,...`` of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def best_slice(mask: np.ndarray) -> int:
    """The axial slice holding the most white-matter voxels."""
    counts = np.asarray(mask, bool).sum(axis=(0, 1))
    return int(np.argmax(counts)) if counts.any() else mask.shape[2] // 2


def _axial(data: np.ndarray, z: int) -> np.ndarray:
    return np.rot90(np.asarray(data)[:, :, z])


def _layout(fig: Figure) -> None:
    """Fixed margins (``tight_layout`` costs a full extra draw per figure)."""
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.17, top=0.88, wspace=0.35, hspace=0.45)


def _image_grid(n_rows: int, n_cols: int, shape, *, left: float, right: float, size=1.4):
    """A figure of ``n_rows x n_cols`` image panels sized to the slice (no empty margins)."""
    h = size * shape[0] / shape[1]
    width, height = n_cols * size * 1.04 + left + right, n_rows * h * 1.04 + 0.4
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - 0.3 / height, bottom=0.1 / height,
        wspace=0.04, hspace=0.04,
    )  # fmt: skip
    return fig, axes


def _hide(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _window(values: Sequence[np.ndarray], *, symmetric: bool = False) -> tuple[float, float]:
    """One grey window for a set of maps: 0 (or the 1st percentile when negative values
    matter) to the 99th percentile of the finite values; ``symmetric``: +-99th of |x|."""
    finite = np.concatenate([np.ravel(v) for v in values]) if values else np.zeros(0)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        top = float(np.percentile(np.abs(finite), 99)) or 1.0
        return -top, top
    lo = min(0.0, float(np.percentile(finite, 1)))
    hi = float(np.percentile(finite, 99))
    return lo, (hi if hi > lo else lo + 1.0)


def _record_windows(fig: Figure, groups: Mapping[str, Sequence]) -> None:
    """``fig.windows[label]``: the distinct (vmin, vmax) of every image drawn in the axes of
    ``groups[label]`` and of that label's colour bar (one pair when the window is shared)."""
    fig.windows = {}
    for label, axes in groups.items():
        clims = {
            tuple(round(float(v), 10) for v in im.get_clim()) for ax in axes for im in ax.images
        }
        fig.windows[label] = sorted(clims)


def _colorbar(fig: Figure, image, axes, label: str):
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.02, fraction=0.05)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return bar


def fig_maps(
    maps: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    *,
    scanners: Sequence[str],
    methods: Sequence[str],
    params: Sequence[str],
    wm: np.ndarray,
    reference: str | None = None,
) -> Figure:
    """Fig. 2 (and Fig. 9, top): one axial slice of every map, rows param x method,
    columns scanners. ``maps[(method, scanner)][param]``; the reference column is outlined.

    Every panel of one parameter (all methods, all scanners, the reference included) shares
    one grey window, shown by that parameter's colour bar, so a harmonized row can be read
    against the reference column; ``fig.windows[param]`` holds the window(s) drawn.
    """
    z = best_slice(wm)
    rows = [(p, m) for p in params for m in methods]
    fig, axes = _image_grid(len(rows), len(scanners), _axial(wm, z).shape, left=0.7, right=0.9)
    groups: dict[str, list] = defaultdict(list)
    for param in params:
        images = {k: _axial(v[param], z) for k, v in maps.items() if param in v}
        window = _window([v[param][wm] for v in maps.values() if param in v])
        _param_block(fig, axes, rows, scanners, param, images, groups, cmap="gray",
                     window=window, label=param.upper(), reference=reference)  # fmt: skip
    _record_windows(fig, groups)
    return fig


def fig_differences(
    maps: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    *,
    reference_maps: Mapping[str, np.ndarray],
    scanners: Sequence[str],
    methods: Sequence[str],
    params: Sequence[str],
    brain: np.ndarray,
) -> Figure:
    """Where the maps still differ from the reference: ``map - reference`` (one axial slice,
    inside ``brain``), rows param x method, columns scanners. One symmetric window per
    parameter shared by its rows (before and after), with a colour bar."""
    z = best_slice(brain)
    rows = [(p, m) for p in params for m in methods]
    fig, axes = _image_grid(len(rows), len(scanners), _axial(brain, z).shape, left=0.7, right=0.9)
    groups: dict[str, list] = defaultdict(list)
    cmap = _masked_cmap("RdBu_r", "#bbbbbb")
    for param in params:
        ref = reference_maps[param]
        diffs = {
            key: np.where(brain, m[param] - ref, np.nan) for key, m in maps.items() if param in m
        }
        images = {k: _axial(d, z) for k, d in diffs.items()}
        window = _window([d[brain] for d in diffs.values()], symmetric=True)
        _param_block(fig, axes, rows, scanners, param, images, groups, cmap=cmap,
                     window=window, label=f"{param.upper()} - reference")  # fmt: skip
    _record_windows(fig, groups)
    return fig


def _param_block(
    fig, axes, rows, scanners, param, images, groups, *, cmap, window, label, reference=None
) -> None:
    """One parameter's rows of an image grid: ``images[(method, scanner)]`` (axial slices)
    drawn with one window, ``n/a`` where missing, the reference column outlined, one colour
    bar for the block; the block's axes are added to ``groups[param]``."""
    vmin, vmax = window
    image, block = None, []
    for i, (p, method) in enumerate(rows):
        if p != param:
            continue
        for j, scanner in enumerate(scanners):
            ax = axes[i, j]
            _hide(ax)
            block.append(ax)
            if (method, scanner) in images:
                image = ax.imshow(images[(method, scanner)], cmap=cmap, vmin=vmin, vmax=vmax)
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            if reference is not None and scanner == reference:
                for spine in ax.spines.values():
                    spine.set_edgecolor("#d62728")
                    spine.set_linewidth(2)
            if i == 0:
                ax.set_title(scanner + (" (ref)" if scanner == reference else ""))
            if j == 0:
                ax.set_ylabel(f"{param.upper()}\n{method}")
    groups[param].extend(block)
    if image is not None:
        _colorbar(fig, image, block, label)


def _masked_cmap(name: str, bad: str):
    """A copy of colormap ``name`` drawing NaN (outside the mask) in ``bad``."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=bad)


def fig_cv_maps(
    cv: Mapping[tuple[str, str], np.ndarray],
    *,
    methods: Sequence[str],
    params: Sequence[str],
    wm: np.ndarray,
    vmax: float = 0.5,
) -> Figure:
    """Fig. 3: inter-scanner CV maps (one axial slice), rows method, columns param, drawn
    inside the evaluation's white-matter mask only (the brain edge's CV, where partial
    volume with CSF dominates, is not what the CV table measures) with one shared window."""
    z = best_slice(wm)
    fig, axes = _image_grid(len(methods), len(params), _axial(wm, z).shape, left=0.5, right=1.2)
    cmap = _masked_cmap("hot", "black")
    image = None
    for i, method in enumerate(methods):
        for j, param in enumerate(params):
            ax = axes[i, j]
            _hide(ax)
            if (method, param) in cv:
                shown = np.where(wm, cv[(method, param)], np.nan)
                image = ax.imshow(_axial(shown, z), cmap=cmap, vmin=0, vmax=vmax)
                ax.set_facecolor("black")
            if i == 0:
                ax.set_title(param.upper())
            if j == 0:
                ax.set_ylabel(method)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="CV", pad=0.02)
    _record_windows(fig, {"cv": list(axes.ravel())})
    return fig


def fig_roi_nrmse(
    rows: Sequence[Mapping],
    *,
    scanners: Sequence[str],
    params: Sequence[str],
    rois: Sequence[str],
    before: str,
    after: str | None,
) -> Figure:
    """Fig. 4: circular bar diagrams of the NRMSE-to-reference in each ROI, one per param;
    each scanner in its colour, ``before`` light and ``after`` dark."""
    value = {(r["method"], r["scanner"], r["param"], r["roi"]): float(r["nrmse"]) for r in rows}
    fig = Figure(figsize=(4.0 * len(params), 4.4))
    n_roi = len(rois)
    theta = np.linspace(0, 2 * np.pi, n_roi, endpoint=False)
    width = 2 * np.pi / n_roi / max(len(scanners), 1)
    for k, param in enumerate(params):
        ax = fig.add_subplot(1, len(params), k + 1, projection="polar")
        for s, scanner in enumerate(scanners):
            offset = theta + (s - (len(scanners) - 1) / 2) * width
            for method, alpha in ((before, 0.35), (after, 1.0)):
                if method is None:
                    continue
                heights = [value.get((method, scanner, param, roi), np.nan) for roi in rois]
                if not np.isfinite(heights).any():  # e.g. the reference scan's own raw fit
                    continue
                ax.bar(
                    offset, np.nan_to_num(heights), width=width * 0.9, color=color(s),
                    alpha=alpha, label=f"{scanner} {method}" if k == 0 else None,
                )  # fmt: skip
        ax.set_xticks(theta)
        ax.set_xticklabels(rois, fontsize=7)
        ax.tick_params(axis="x", pad=4)
        top = ax.get_ylim()[1]
        ax.set_yticks(np.round(np.linspace(0, top, 4)[1:], 2))  # three radial rings
        ax.set_rlabel_position(90.0 / max(n_roi, 1))  # between the first two ROI spokes
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(param.upper(), pad=18)
    fig.legend(loc="lower center", ncol=max(len(scanners), 1), fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.18, top=0.84, wspace=0.6)
    return fig


def fig_scanrescan(
    values: Mapping[tuple[str, str, str, str], tuple[np.ndarray, np.ndarray]],
    *,
    scanners: Sequence[str],
    methods: Sequence[str],
    params: Sequence[str],
    rois: Sequence[str],
) -> Figure:
    """Fig. 5: voxel values of the first vs the repeated run in a few ROIs, coloured by
    scanner, with the line of equality. ``values[(method, scanner, param, roi)]``.

    All panels of one parameter (every ROI and method) share their axes, so the raw and the
    harmonized scatter are drawn at the same scale; ``fig.limits[param]`` records them.
    """
    cols = [(roi, m) for roi in rois for m in methods]
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * len(params)))
    axes = fig.subplots(len(params), len(cols), squeeze=False)
    fig.limits = {}
    for i, param in enumerate(params):
        pairs = [v for k, v in values.items() if k[2] == param]
        both = np.concatenate([np.r_[x, y] for x, y in pairs]) if pairs else np.zeros(0)
        both = both[np.isfinite(both)]
        lo, hi = (
            (min(0.0, float(np.percentile(both, 0.1))), float(np.percentile(both, 99.9)))
            if both.size
            else (0.0, 1.0)
        )
        for j, (roi, method) in enumerate(cols):
            ax = axes[i, j]
            for s, scanner in enumerate(scanners):
                pair = values.get((method, scanner, param, roi))
                if pair is not None:
                    ax.scatter(*pair, s=3, color=color(s), alpha=0.6, label=scanner)
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal", adjustable="box")
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(f"{roi} - {method}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{param.upper()} run 2", fontsize=8)
            if i == len(params) - 1:
                ax.set_xlabel("run 1", fontsize=8)
        fig.limits[param] = sorted(
            {(*axes[i, j].get_xlim(), *axes[i, j].get_ylim()) for j in range(len(cols))}
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7, markerscale=3)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.92, wspace=0.3, hspace=0.3)
    return fig


def fig_ood(scans: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Figure:
    """Where the OOD flag fired: per scan ``label -> (map, brain mask, OOD mask)``, the axial
    slice holding most flagged voxels (the brain's widest when none is), the map in grey and
    flagged voxels in red; each title gives the flagged fraction of the brain.
    ``fig.fractions[label]`` holds those fractions."""
    first = next(iter(scans.values()))[0]
    fig, axes = _image_grid(1, len(scans), first.shape[1::-1], left=0.1, right=0.1, size=1.8)
    fig.fractions = {}
    for ax, (label, (data, brain, flagged)) in zip(axes[0], scans.items(), strict=True):
        brain, flagged = (
            np.asarray(brain, bool),
            np.asarray(flagged, bool) & np.asarray(brain, bool),
        )
        z = best_slice(flagged) if flagged.any() else best_slice(brain)
        lo, hi = _window([np.asarray(data)[brain]])
        ax.imshow(_axial(np.where(brain, data, np.nan), z), cmap="gray", vmin=lo, vmax=hi)
        red = ListedColormap(["#e00000"])
        ax.imshow(_axial(np.where(flagged, 1.0, np.nan), z), cmap=red, vmin=0, vmax=1)
        fig.fractions[label] = float(flagged.sum() / max(brain.sum(), 1))
        ax.set_title(f"{label}: {100 * fig.fractions[label]:.1f} % flagged", fontsize=7)
        _hide(ax)
    return fig


def fig_training(logs: Mapping[str, Sequence[Mapping]]) -> Figure:
    """Training curves: loss and validation loss per epoch, one panel per scanner, the best
    epoch (lowest validation loss, else lowest loss) marked. ``logs[scanner]`` holds the rows
    of a training log (``epoch``, ``loss``, ``val_loss``)."""
    scanners = sorted(logs)
    fig = Figure(figsize=(3.0 * max(len(scanners), 1), 2.6))
    axes = fig.subplots(1, max(len(scanners), 1), squeeze=False)[0]
    for ax, scanner in zip(axes, scanners, strict=False):
        rows = logs[scanner]
        epoch = np.array([float(r["epoch"]) for r in rows])
        loss = np.array([_float(r.get("loss")) for r in rows])
        val = np.array([_float(r.get("val_loss")) for r in rows])
        ax.plot(epoch, loss, color=color(0), label="training loss")
        watched = val if np.isfinite(val).any() else loss
        if np.isfinite(val).any():
            ax.plot(epoch, val, color=color(1), label="validation loss")
        best = int(np.nanargmin(watched))
        ax.axvline(epoch[best], color="k", lw=0.8, ls="--")
        ax.plot(epoch[best], watched[best], "k*", ms=8, label=f"best epoch {int(epoch[best])}")
        ax.set_yscale("log")
        ax.set_title(f"scanner {scanner}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("loss (scaled units)")
    _layout(fig)
    return fig


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _groups(rows, keys, metric: str = "nrmse") -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("metric", metric) == metric:
            out[tuple(r[k] for k in keys)].append(float(r["value"]))
    return out


def fig_trainsize(rows: Sequence[Mapping], *, params: Sequence[str]) -> Figure:
    """Fig. 6: NRMSE-to-reference against the number of training subjects, mean and SD
    over the training combinations, one line per scanner."""
    groups = _groups(rows, ("scanner", "param", "n_train"))
    scanners = sorted({k[0] for k in groups})
    fig = Figure(figsize=(3.0 * len(params), 2.8))
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=True):
        for s, scanner in enumerate(scanners):
            ns = sorted({int(k[2]) for k in groups if k[:2] == (scanner, param)})
            stats = [groups[(scanner, param, str(n))] for n in ns]
            ax.errorbar(
                ns, [np.mean(v) for v in stats], yerr=[np.std(v) for v in stats],
                marker="o", capsize=3, color=color(s), label=scanner,
            )  # fmt: skip
        ax.set_title(param.upper())
        ax.set_xlabel("training subjects")
    axes[0].set_ylabel("NRMSE-to-reference")
    axes[0].legend(fontsize=7)
    _layout(fig)
    return fig


def fig_leavepout(rows: Sequence[Mapping]) -> Figure:
    """Fig. 7: one square per subject and training set (row), grey for the training
    subjects, coloured by the NRMSE-to-reference averaged over the parameters; one panel
    per scanner (rows) and p (columns)."""
    nrmse_rows = [r for r in rows if r.get("metric", "nrmse") == "nrmse"]
    scanners = sorted({r["scanner"] for r in nrmse_rows})
    ps = sorted({int(r["p"]) for r in nrmse_rows})
    subjects = sorted(
        {s for r in nrmse_rows for k in ("train_subjects", "test_subjects") for s in _split(r[k])}
    )
    values = [float(r["value"]) for r in nrmse_rows]
    vmin, vmax = (min(values), max(values)) if values else (0, 1)
    fig = Figure(figsize=(2.6 * len(ps) + 1.2, 1.8 * len(scanners) + 0.4))
    axes = fig.subplots(len(scanners), len(ps), squeeze=False)
    image = None
    for i, scanner in enumerate(scanners):
        for j, p in enumerate(ps):
            ax = axes[i, j]
            sel = [r for r in nrmse_rows if r["scanner"] == scanner and int(r["p"]) == p]
            reps = sorted({r["replicate"] for r in sel}, key=_natural)
            grid = np.full((len(reps), len(subjects)), np.nan)
            train = np.zeros_like(grid, dtype=bool)
            for a, rep in enumerate(reps):
                acc: dict[str, list[float]] = defaultdict(list)
                for r in (r for r in sel if r["replicate"] == rep):
                    for sub in _split(r["test_subjects"]):
                        acc[sub].append(float(r["value"]))
                    for sub in _split(r["train_subjects"]):
                        train[a, subjects.index(sub)] = True
                for sub, v in acc.items():
                    grid[a, subjects.index(sub)] = np.mean(v)
            ax.imshow(np.where(train, 1, np.nan), cmap="Greys", vmin=0, vmax=2, aspect="auto")
            image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(subjects)))
            ax.set_xticklabels(subjects, fontsize=7)
            ax.set_yticks(range(len(reps)))
            ax.set_yticklabels(reps, fontsize=6)
            if i == 0:
                ax.set_title(f"leave-{p}-out")
            if j == 0:
                ax.set_ylabel(f"scanner {scanner}\ntraining set")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="mean NRMSE-to-reference")
    return fig


def fig_tissue(rows: Sequence[Mapping], *, params: Sequence[str]) -> Figure:
    """Fig. 8: NRMSE-to-reference (and CV) per tissue for the trainings with the whole
    brain, without subcortical GM and without CSF; mean and standard error over repeats
    and scanners."""
    metrics = [m for m in ("nrmse", "cv") if any(r["metric"] == m for r in rows)]
    tissues = sorted({r["tissue"] for r in rows})
    left = [x for x in ("none", "subcortical_gm", "csf") if any(r["left_out"] == x for r in rows)]
    shades = {"none": "white", "subcortical_gm": "lightgrey", "csf": "dimgrey"}
    fig = Figure(figsize=(3.0 * len(params), 2.6 * len(metrics)))
    axes = fig.subplots(len(metrics), len(params), squeeze=False)
    width = 0.8 / max(len(left), 1)
    for i, metric in enumerate(metrics):
        groups = _groups(rows, ("left_out", "tissue", "param"), metric)
        for j, param in enumerate(params):
            ax = axes[i, j]
            for k, lo in enumerate(left):
                vals = [groups.get((lo, t, param), []) for t in tissues]
                ax.bar(
                    np.arange(len(tissues)) + (k - (len(left) - 1) / 2) * width,
                    [np.mean(v) if v else 0 for v in vals],
                    yerr=[np.std(v) / np.sqrt(len(v)) if len(v) > 1 else 0 for v in vals],
                    width=width, color=shades.get(lo, "grey"), edgecolor="k", capsize=2,
                    label=f"without {lo}" if lo != "none" else "whole brain",
                )  # fmt: skip
            ax.set_xticks(range(len(tissues)))
            ax.set_xticklabels(tissues)
            if i == 0:
                ax.set_title(param.upper())
            if j == 0:
                ax.set_ylabel(metric.upper())
    axes[0, 0].legend(fontsize=7)
    _layout(fig)
    return fig


def fig_cv_histograms(
    rows: Sequence[Mapping], *, methods: Sequence[str], params: Sequence[str]
) -> Figure:
    """Fig. 9, lower row: histograms of the voxelwise inter-scanner CV in white matter,
    one line per method."""
    fig = Figure(figsize=(3.0 * len(params), 2.6))
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=True):
        for k, method in enumerate(methods):
            sel = [r for r in rows if r["method"] == method and r["param"] == param]
            if not sel:
                continue
            centres = [(float(r["bin_lower"]) + float(r["bin_upper"])) / 2 for r in sel]
            counts = np.array([float(r["count"]) for r in sel])
            ax.plot(centres, counts / max(counts.sum(), 1), color=color(k), label=method)
        ax.set_title(param.upper())
        ax.set_xlabel("inter-scanner CV (WM)")
    axes[0].set_ylabel("fraction of WM voxels")
    axes[0].legend(fontsize=7)
    _layout(fig)
    return fig


def fig_seeds(rows: Sequence[Mapping], *, params: Sequence[str]) -> Figure:
    """Training-seed stability: the metric of each seed (dots) per scanner and parameter."""
    metrics = [m for m in ("nrmse", "cv") if any(r["metric"] == m for r in rows)]
    scanners = sorted({r["scanner"] for r in rows})
    fig = Figure(figsize=(3.0 * len(params), 2.4 * len(metrics)))
    axes = fig.subplots(len(metrics), len(params), squeeze=False)
    for i, metric in enumerate(metrics):
        groups = _groups(rows, ("scanner", "param"), metric)
        for j, param in enumerate(params):
            ax = axes[i, j]
            for s, scanner in enumerate(scanners):
                v = groups.get((scanner, param), [])
                ax.scatter(np.full(len(v), s), v, color=color(s), s=12)
                if v:
                    ax.errorbar(s + 0.2, np.mean(v), yerr=np.std(v), fmt="k_", capsize=3)
            ax.set_xticks(range(len(scanners)))
            ax.set_xticklabels(scanners)
            if i == 0:
                ax.set_title(param.upper())
            if j == 0:
                ax.set_ylabel(metric.upper())
    _layout(fig)
    return fig


def _split(value: str) -> list[str]:
    parts = str(value).replace(";", ",").split(",")
    return [s.strip().removeprefix("sub-") for s in parts if s.strip()]


def _natural(value: str):
    return (0, int(value)) if str(value).isdigit() else (1, str(value))
