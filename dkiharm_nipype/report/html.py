"""The self-contained HTML report: ``report.html`` (group) and one ``sub-<label>.html`` each.

Everything a page shows is inside the page: figures are inline PNGs (``data:`` URIs), the
style sheet is inline, there is no script, font or remote resource. Inputs are the tidy
tables of :func:`dkiharm_nipype.evaluation.evaluate.evaluate_study` (with ``maps.tsv`` pointing at
the registered maps, CV maps, WM masks and atlases), the SNR table (``snr.tsv``, see
:func:`dkiharm_nipype.utils.derivatives.aggregate_snr`) and the experiment tables
(``experiment-*.tsv``); a figure whose data are absent shows a labelled box instead.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from ..evaluation.evaluate import (
    BEFORE,
    EVAL_PARAMS,
    EXPERIMENTS,
    SUMMARY_FILE,
    TABLE_FILES,
    WM,
    read_tsv,
)
from ..evaluation.scores import snr_matrix
from ..study import first_runs, run_key
from ..utils.io import atomic_write_text
from . import figures as F

#: Figure ids of the group page (the test checks each renders).
GROUP_FIGURES = (
    "fig-maps", "fig-diff", "fig-cv", "fig-roi-nrmse", "fig-scanrescan", "fig-training",
    "fig-trainsize", "fig-leavepout", "fig-tissue", "fig-methods", "fig-cvhist", "fig-seeds",
)  # fmt: skip
#: Figure ids of a subject page.
SUBJECT_FIGURES = ("fig-maps", "fig-diff", "fig-cv", "fig-roi-nrmse", "fig-scanrescan")
#: Table ids of the group page.
GROUP_TABLES = ("table-snr", "table-baseline", "table-cv", "table-nrmse", "table-scanrescan")

_CSS = """
body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
figure{margin:1em 0}figure img{max-width:100%;height:auto}
figcaption,.intro{color:#444;font-size:0.95em}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}th{background:#eee}
.not-run{border:2px dashed #c33;background:#fff4f4;padding:1.5em;color:#a00;font-weight:bold}
.note{color:#666;font-size:0.85em}
.warning{border:2px solid #c60;background:#fff8ec;padding:0.8em;color:#840;font-weight:bold}
"""

_INTRO = {
    "fig-maps": (
        "Fig. 2 - maps before and after harmonization",
        "One axial slice of each DKI map for every scanner, all registered into the "
        "reference scan's space; the reference scanner (outlined) gives the labels the "
        "networks learn. Every panel of a parameter shares one grey scale (its colour bar): "
        "harmonized maps should look like the reference column.",
    ),
    "fig-diff": (
        "Differences from the reference",
        "Each scanner's map minus the reference scan's raw fit (same slice, inside the brain), "
        "before and after harmonization, one colour scale per parameter: what harmonization "
        "leaves is where the after row is not white.",
    ),
    "fig-training": (
        "Training curves",
        "Loss and validation loss per epoch of each scanner's network (log scale); the star "
        "marks the epoch whose weights were kept.",
    ),
    "fig-cv": (
        "Fig. 3 - inter-scanner CV maps",
        "Voxelwise coefficient of variation (SD / mean) across the first run of every "
        "scanner, inside the white-matter mask the CV table averages over. Lower is better.",
    ),
    "fig-roi-nrmse": (
        "Fig. 4 - NRMSE-to-reference in the WM ROIs",
        "Circular diagrams of the NRMSE between each scanner's maps and the reference scan's "
        "raw fit in each white-matter ROI: light bars before, dark bars after harmonization.",
    ),
    "fig-scanrescan": (
        "Fig. 5 - scan-rescan scatter per ROI",
        "Voxel values of the repeated run against the first run of the same scanner; a "
        "reliable scanner keeps its points on the line of equality.",
    ),
    "fig-trainsize": (
        "Fig. 6 - training-size curves",
        "NRMSE-to-reference on the held-out subject against the number of training "
        "subjects (mean and SD over training combinations).",
    ),
    "fig-leavepout": (
        "Fig. 7 - leave-p-subjects-out",
        "Each row is one training set (grey: training subjects); coloured squares give the "
        "NRMSE-to-reference, averaged over the DKI parameters, of each test subject.",
    ),
    "fig-tissue": (
        "Fig. 8 - leave-one-tissue-out",
        "NRMSE-to-reference per tissue for networks trained on the whole brain, without "
        "subcortical GM and without CSF (mean and standard error over repeats).",
    ),
    "fig-methods": (
        "Fig. 9 - method comparison (maps)",
        "The raw and harmonized maps of every method for every scanner.",
    ),
    "fig-cvhist": (
        "Fig. 9 - method comparison (CV histograms)",
        "Distribution of the voxelwise inter-scanner CV in white matter for each method; a "
        "distribution shifted to the left means less scanner variability.",
    ),
    "fig-ood": (
        "Inputs unlike the training data",
        "Red: voxels whose harmonizer input is out of the training distribution (desc-ood_mask:"
        " OOD distance above the 99.5th percentile of held-out training voxels'); their "
        "harmonized values are extrapolations. About 0.5-1.5 % of healthy tissue is flagged by "
        "chance; a compact red cluster (a lesion) is not.",
    ),
    "fig-seeds": (
        "Training-seed stability",
        "The metric of networks trained with different seeds; a small spread means the "
        "result does not hinge on the initialization.",
    ),
}


# --------------------------------------------------------------------------- data
class _Study:
    """The evaluation tables and the maps index of one ``tsv_dir``."""

    def __init__(self, tsv_dir: Path, snr_tsv: Path | None, experiment_dir: Path):
        self.root = tsv_dir
        self.tables = {k: read_tsv(tsv_dir / v) for k, v in TABLE_FILES.items()}
        snr = snr_tsv if snr_tsv is not None else tsv_dir / "snr.tsv"
        self.snr = read_tsv(snr)
        self.experiments = {
            name: read_tsv(experiment_dir / fname) for name, (fname, _) in EXPERIMENTS.items()
        }
        rows = [r for k in ("nrmse", "cv", "scanrescan") for r in self.tables[k]]
        self.params = [p for p in EVAL_PARAMS if any(r["param"] == p for r in rows)] or sorted(
            {r["param"] for r in rows}
        )
        self.methods = sorted({r["method"] for r in rows}, key=lambda m: (m != BEFORE, m))
        maps = self.tables["maps"]
        self.subjects = sorted({r["subject"] for r in maps} | {r["subject"] for r in rows})
        self.scanners = sorted({r["scanner"] for r in maps + self.tables["nrmse"] if r["scanner"]})
        summary = tsv_dir / SUMMARY_FILE
        self.summary = json.loads(summary.read_text()) if summary.is_file() else {}
        self.reference = self.summary.get("reference")
        self.rois = [r["abbreviation"] or r["name"] for r in self.tables["rois"]]

    def paths(self, kind: str, subject: str, **match) -> dict[tuple, Path]:
        out = {}
        for r in self.tables["maps"]:
            if r["kind"] == kind and r["subject"] == subject:
                if all(r[k] == v for k, v in match.items()):
                    out[(r["method"], r["scanner"], r["run"], r["param"])] = self.root / r["path"]
        return out

    def image(self, kind: str, subject: str) -> np.ndarray | None:
        found = list(self.paths(kind, subject).values())
        return np.asanyarray(nb.load(found[0]).dataobj) if found else None


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj, dtype=np.float32)


# --------------------------------------------------------------------------- html bits
def _figure(fig_id: str, fig) -> str:
    """A titled figure; its shared intensity windows / axis limits (``fig.windows``,
    ``fig.limits``, as drawn) ride along in ``data-windows`` for readers and tests."""
    title, intro = _INTRO[fig_id]
    uri = F.to_data_uri(fig)
    drawn = getattr(fig, "windows", None) or getattr(fig, "limits", None)
    data = f" data-windows='{html.escape(json.dumps(drawn))}'" if drawn else ""
    return (
        f'<section><h2>{html.escape(title)}</h2><p class="intro">{html.escape(intro)}</p>'
        f'<figure><img id="{fig_id}" alt="{html.escape(title)}"{data} src="{uri}"></figure>'
        "</section>"
    )


def _missing(fig_id: str, why: str) -> str:
    title, intro = _INTRO[fig_id]
    return (
        f'<section><h2>{html.escape(title)}</h2><p class="intro">{html.escape(intro)}</p>'
        f'<div class="not-run" id="{fig_id}">{html.escape(why)}</div></section>'
    )


def _not_run(fig_id: str, experiment: str) -> str:
    return _missing(fig_id, f"not run \u2014 use --experiment {experiment}")


def _table(table_id: str, title: str, intro: str, header: Sequence[str], body) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    return (
        f'<section><h2>{html.escape(title)}</h2><p class="intro">{html.escape(intro)}</p>'
        f'<table id="{table_id}"><tr>{head}</tr>{rows}</table></section>'
    )


def _num(value: float, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


# --------------------------------------------------------------------------- tables
def table_snr(study: _Study) -> str:
    title = "Table 3 - SNR (dB) of every scan"
    intro = (
        "Mean b0 signal over the noise SD in a white-matter ROI, 20 log10, runs averaged; "
        "the scanner with the highest mean SNR is the reference."
    )
    if not study.snr:
        return (
            f'<section><h2>{html.escape(title)}</h2><div class="not-run" id="table-snr">'
            "no SNR table (snr.tsv) was found</div></section>"
        )
    cells, means, reference = snr_matrix(study.snr)
    scanners = sorted(means)
    subjects = sorted({p for p, _ in cells})
    body = [
        [sub] + [_num(np.mean(cells[(sub, sc)])) if (sub, sc) in cells else "-" for sc in scanners]
        for sub in subjects
    ]
    body.append(["mean"] + [_num(means[sc]) for sc in scanners])
    return _table(
        "table-snr",
        title,
        intro + f" Reference: {reference or 'n/a'}.",
        ["subject", *scanners],
        body,
    )


def _mean_by(rows, keys, value: str) -> dict[tuple, float]:
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        acc[tuple(r[k] for k in keys)].append(float(r[value]))
    return {k: float(np.nanmean(v)) for k, v in acc.items()}


def _ratios(rows, keys) -> dict[tuple, float]:
    """Mean ``ratio_to_floor`` of ``rows`` by ``keys`` (rows without a floor left out)."""
    return _mean_by([r for r in rows if r.get("ratio_to_floor")], keys, "ratio_to_floor")


def _with_ratio(text: str, ratio: float | None) -> str:
    return text if ratio is None or not np.isfinite(ratio) else f"{text} ({ratio:.1f}x)"


_FLOOR_NOTE = (
    " In brackets: the score over the noise floor, the score of scans that differ by the "
    "reference scan's own noise only (its rescan, or two halves of its directions scaled to "
    "full scans; floor.tsv); 1x is as good as the data allow."
)


def table_baseline(study: _Study) -> str:
    """The networks against the linear baseline (held-out), with a warning where they lose."""
    rows = study.tables["baseline"]
    title = "Networks against the linear baseline (held-out NRMSE-to-reference)"
    if not rows:
        return (
            f'<section><h2>{html.escape(title)}</h2><div class="not-run" id="table-baseline">'
            "no linear baseline was evaluated (networks trained without the scans' own "
            "fits)</div></section>"
        )
    losing = [
        f"{r['param'].upper()} on {r['scanner']}"
        for r in rows
        if r["dl_beats_linear"] != "True" or r["chosen"] == "linear"
    ]
    body = [
        [r["scanner"], r["param"].upper(), _num(float(r["nrmse_dl"]), 3),
         _num(float(r["nrmse_linear"]), 3),
         _num(float(r["nrmse_floor"]), 3) if r["nrmse_floor"] else "-", r["chosen"] or "-",
         "yes" if r["dl_beats_linear"] == "True" else "NO"]
        for r in rows
    ]  # fmt: skip
    table = _table(
        "table-baseline", title,
        f"Source: {rows[0]['source']}. dl: the harmonized maps (after model selection); "
        "linear: per-map regression from the scan's own map, fitted on the same training "
        "voxels; chosen: the mapping the held-out validation blocks selected for that map.",
        ["scanner", "param", "dl", "linear", "floor", "chosen", "dl beats linear"], body,
    )  # fmt: skip
    if not losing:
        return table
    warning = (
        '<p class="warning">Warning: the network does not beat the linear baseline for '
        f"{html.escape(', '.join(losing))}; where model selection chose the linear mapping it "
        "harmonizes that map.</p>"
    )
    return table.replace("</h2>", "</h2>" + warning, 1)


def table_cv(study: _Study, subjects: Sequence[str]) -> str:
    rows = [r for r in study.tables["cv"] if r["roi"] == WM and r["subject"] in subjects]
    values = _mean_by(rows, ("param", "method"), "cv_mean")
    ratios = _ratios(rows, ("param", "method"))
    body = [
        [p.upper()]
        + [
            _with_ratio(_num(100 * values.get((p, m), np.nan), 1), ratios.get((p, m)))
            for m in study.methods
        ]
        for p in study.params
    ]
    return _table(
        "table-cv",
        "Inter-scanner CV in white matter (%)",
        "Mean voxelwise CV across scanners in WM, averaged over "
        f"{len({r['subject'] for r in rows})} subject(s) scanned on every scanner." + _FLOOR_NOTE,
        ["param", *study.methods],
        body,
    )


def _by_scanner_method(study: _Study, rows, table_id, title, intro, subjects) -> str:
    values = _mean_by(rows, ("param", "subject", "scanner", "method"), "nrmse")
    ratios = _ratios(rows, ("param", "subject", "scanner", "method"))
    cols = [(s, m) for s in study.scanners for m in study.methods]
    cols = [c for c in cols if any(k[2:] == c for k in values)]
    body = [
        [p.upper(), sub]
        + [
            _with_ratio(_num(values.get((p, sub, s, m), np.nan)), ratios.get((p, sub, s, m)))
            for s, m in cols
        ]
        for p in study.params
        for sub in subjects
        if any(k[:2] == (p, sub) for k in values)
    ]
    header = ["param", "subject", *(f"{s} {m}" for s, m in cols)]
    return _table(table_id, title, intro, header, body)


def table_nrmse(study: _Study, subjects: Sequence[str]) -> str:
    first = first_runs(
        study.tables["nrmse"], group=lambda r: (r["subject"], r["scanner"]), run=lambda r: r["run"]
    )
    rows = [
        r
        for r in study.tables["nrmse"]
        if r["roi"] == WM
        and r["subject"] in subjects
        and r["run"] == first[(r["subject"], r["scanner"])]["run"]
    ]
    return _by_scanner_method(
        study, rows, "table-nrmse", "Table 4 - NRMSE-to-reference in white matter",
        "NRMSE between each scanner's first run and the reference scan's raw fit, in WM."
        + _FLOOR_NOTE,
        subjects,
    )  # fmt: skip


def table_scanrescan(study: _Study, subjects: Sequence[str]) -> str:
    rows = [r for r in study.tables["scanrescan"] if r["roi"] == WM and r["subject"] in subjects]
    if not rows:
        return (
            '<section><h2>Table 5 - scan-rescan NRMSE</h2><div class="not-run" '
            'id="table-scanrescan">no scanner has repeated runs</div></section>'
        )
    return _by_scanner_method(
        study, rows, "table-scanrescan", "Table 5 - scan-rescan NRMSE in white matter",
        "NRMSE between a repeated run and the first run of the same scanner, in WM.",
        subjects,
    )  # fmt: skip


# --------------------------------------------------------------------------- figures
def _after_method(study: _Study, after: str | None) -> str | None:
    if after is not None:
        return after
    others = [m for m in study.methods if m != BEFORE]
    return "dl" if "dl" in others else (others[0] if others else None)


def figure_maps(study: _Study, subject: str, methods: Sequence[str], fig_id="fig-maps") -> str:
    wm = study.image("wm", subject)
    paths = study.paths("map", subject)
    if wm is None or not paths:
        return _missing(fig_id, f"no registered maps of sub-{subject} (evaluation save_maps)")
    first = _first_map_runs(paths)
    maps = defaultdict(dict)
    for (method, scanner, run, param), path in paths.items():
        if run == first[(method, scanner)] and method in methods:
            maps[(method, scanner)][param] = _load(path)
    scanners = sorted({s for _, s in maps})
    fig = F.fig_maps(
        maps, scanners=scanners, methods=[m for m in methods if any(k[0] == m for k in maps)],
        params=study.params, wm=wm > 0, reference=study.reference,
    )  # fmt: skip
    return _figure(fig_id, fig)


def figure_differences(study: _Study, subject: str, methods: Sequence[str]) -> str:
    """Each scanner's first run minus the reference scanner's raw first run."""
    paths = study.paths("map", subject)
    first = _first_map_runs(paths)
    ref_key = (BEFORE, study.reference)
    if ref_key not in first:
        return _missing("fig-diff", f"no raw map of sub-{subject} on the reference scanner")
    maps = defaultdict(dict)
    for (method, scanner, run, param), path in paths.items():
        if run == first[(method, scanner)] and method in methods and scanner != study.reference:
            maps[(method, scanner)][param] = _load(path)
    if not maps:
        return _missing("fig-diff", f"sub-{subject} has no scan on another scanner")
    reference = {
        param: _load(path)
        for (method, scanner, run, param), path in paths.items()
        if (method, scanner) == ref_key and run == first[ref_key]
    }
    brain = np.all([m != 0 for m in reference.values()], axis=0) if reference else None
    wm = study.image("wm", subject)
    brain = brain if brain is not None and brain.any() else wm > 0
    fig = F.fig_differences(
        maps, reference_maps=reference, scanners=sorted({s for _, s in maps}),
        methods=[m for m in methods if any(k[0] == m for k in maps)],
        params=[p for p in study.params if p in reference], brain=brain,
    )  # fmt: skip
    return _figure("fig-diff", fig)


def _first_map_runs(paths) -> dict[tuple[str, str], str]:
    """(method, scanner) -> the first run among ``paths``' keys."""
    first = first_runs(paths, group=lambda k: k[:2], run=lambda k: k[2])
    return {group: key[2] for group, key in first.items()}


def figure_training(logs: dict[str, list[dict]]) -> str:
    if not logs:
        return _missing("fig-training", "no training log was given (networks not trained here)")
    return _figure("fig-training", F.fig_training(logs))


def figure_ood(scans: dict[str, tuple[str | Path, str | Path, str | Path]]) -> str:
    """The OOD section from files: per scan ``label -> (map, brain mask, desc-ood_mask)``."""
    if not scans:
        return _missing("fig-ood", "no desc-ood_mask (models trained without an OOD model)")
    return _figure("fig-ood", F.fig_ood({k: tuple(map(_load, v)) for k, v in scans.items()}))


def read_training_logs(files: Sequence[str | Path]) -> dict[str, list[dict]]:
    """Training logs by scanner (named from ``scanner-<label>`` in the file name)."""
    import re

    logs = {}
    for path in map(Path, files):
        found = re.search(r"scanner-([A-Za-z0-9]+)", path.name)
        logs[found.group(1) if found else path.name.split("_")[0]] = read_tsv(path)
    return logs


def figure_cv(study: _Study, subject: str) -> str:
    paths = study.paths("cv", subject)
    wm = study.image("wm", subject)
    if not paths or wm is None:
        return _missing("fig-cv", f"no CV maps of sub-{subject} (not scanned on every scanner)")
    cv = {(m, p): _load(path) for (m, _, _, p), path in paths.items()}
    methods = [m for m in study.methods if any(k[0] == m for k in cv)]
    return _figure("fig-cv", F.fig_cv_maps(cv, methods=methods, params=study.params, wm=wm > 0))


def figure_roi_nrmse(study: _Study, subject: str, after: str | None) -> str:
    rows = [r for r in study.tables["nrmse"] if r["subject"] == subject and r["roi"] != WM]
    if not rows:
        return _missing("fig-roi-nrmse", "no ROI atlas was given to the evaluation")
    run_one = first_runs(rows, group=lambda r: (r["method"], r["scanner"]), run=lambda r: r["run"])
    rows = [r for r in rows if r["run"] == run_one[(r["method"], r["scanner"])]["run"]]
    rois = [roi for roi in study.rois if any(r["roi"] == roi for r in rows)]
    fig = F.fig_roi_nrmse(
        rows, scanners=study.scanners, params=study.params, rois=rois, before=BEFORE, after=after
    )
    return _figure("fig-roi-nrmse", fig)


def figure_scanrescan(study: _Study, subject: str, after: str | None) -> str:
    paths = study.paths("map", subject)
    repeated = {}
    for method, scanner, run, _ in paths:
        repeated.setdefault((method, scanner), set()).add(run)
    pairs = {k: sorted(v, key=run_key)[:2] for k, v in repeated.items() if len(v) > 1}
    if not pairs:
        return _missing("fig-scanrescan", f"no scanner has repeated runs of sub-{subject}")
    labels = study.image("atlas", subject)
    wm = study.image("wm", subject)
    names = {int(r["index"]): r["abbreviation"] or r["name"] for r in study.tables["rois"]}
    if labels is not None:
        chosen = [i for i, n in names.items() if n in F.SCATTER_ROIS and (labels == i).any()]
        chosen = chosen or [i for i in names if (labels == i).any()][:3]
        masks = {names[i]: labels == i for i in chosen}
    else:
        masks = {WM: wm > 0}
    methods = [m for m in (BEFORE, after) if m is not None]
    values = {}
    for (method, scanner), (r1, r2) in pairs.items():
        if method not in methods:
            continue
        for param in study.params:
            a = _load(paths[(method, scanner, r1, param)])
            b = _load(paths[(method, scanner, r2, param)])
            for roi, mask in masks.items():
                values[(method, scanner, param, roi)] = (a[mask], b[mask])
    scanners = sorted({s for _, s in pairs})
    fig = F.fig_scanrescan(
        values, scanners=scanners, methods=methods, params=study.params, rois=list(masks)
    )
    return _figure("fig-scanrescan", fig)


def figure_methods(study: _Study, subject: str, after: str | None = None) -> list[str]:
    if len(study.methods) < 2:
        why = "only one method was evaluated; add ComBat/RISH/DL maps to compare"
        return [_missing("fig-methods", why), _missing("fig-cvhist", why)]
    if set(study.methods) <= {BEFORE, after}:  # Fig. 2 already shows exactly these maps
        why = (
            f"Fig. 2 already shows every evaluated method ({', '.join(study.methods)}); "
            "comparators (--comparators combat rish) add their maps here"
        )
        out = [_missing("fig-methods", why)]
    else:
        out = [figure_maps(study, subject, study.methods, fig_id="fig-methods")]
    hist = [r for r in study.tables["cvhist"] if r["subject"] == subject]
    if hist:
        fig = F.fig_cv_histograms(hist, methods=study.methods, params=study.params)
        out.append(_figure("fig-cvhist", fig))
    else:
        out.append(_missing("fig-cvhist", f"no CV of sub-{subject} (not on every scanner)"))
    return out


# --------------------------------------------------------------------------- pages
def build_report(
    tsv_dir: str | Path,
    out_dir: str | Path,
    *,
    snr_tsv: str | Path | None = None,
    experiment_dir: str | Path | None = None,
    representative: str | None = None,
    after: str | None = None,
    training_logs: Sequence[str | Path] = (),
    title: str = "dkiharm - harmonization report",
) -> list[Path]:
    """Write ``report.html`` and one ``sub-<label>.html`` per subject into ``out_dir``.

    Parameters
    ----------
    tsv_dir
        The ``out_dir`` of :func:`~dkiharm_nipype.evaluation.evaluate.evaluate_study`.
    snr_tsv
        The SNR table (Table 3); default ``tsv_dir/snr.tsv``.
    experiment_dir
        Where the ``experiment-*.tsv`` tables are; default ``tsv_dir``.
    representative
        Subject shown in the group page's picture panels (Figs. 2-5, 9); default: the first
        subject scanned on every scanner.
    after
        The method shown as "after" in Figs. 4-5 (default ``dl`` if evaluated).
    training_logs
        The networks' training logs (``scanner-<label>_training.tsv``: epoch, loss,
        val_loss), drawn as training curves on the group page.

    Returns the written pages (group page first). Pages are written only once all are built.
    """
    tsv_dir, out_dir = Path(tsv_dir), Path(out_dir)
    study = _Study(
        tsv_dir,
        Path(snr_tsv) if snr_tsv else None,
        Path(experiment_dir) if experiment_dir else tsv_dir,
    )
    after = _after_method(study, after)
    complete = sorted({r["subject"] for r in study.tables["cv"]})
    rep = representative or (complete[0] if complete else (study.subjects or [None])[0])
    rep = rep.removeprefix("sub-") if rep else rep
    panels = {s: _subject_panels(study, s, after) for s in study.subjects}
    training = figure_training(read_training_logs(training_logs))
    body = _group_body(study, rep, after, panels.get(rep), training)
    pages = {"report.html": _page(title, body)}
    for subject in study.subjects:
        pages[f"sub-{subject}.html"] = _page(
            f"{title}: sub-{subject}", _subject_body(study, subject, panels[subject])
        )
    written = []
    for name, text in pages.items():
        atomic_write_text(text, out_dir / name)
        written.append(out_dir / name)
    return written


def _summary(study: _Study) -> str:
    excluded = study.tables["excluded"]
    items = "".join(
        f"<li>sub-{html.escape(r['subject'])} excluded from {html.escape(r['excluded_from'])}: "
        f"{html.escape(r['reason'])} (missing {html.escape(r['missing'])})</li>"
        for r in excluded
    )
    return (
        f'<p class="note">Scanners: {", ".join(study.scanners)}; reference: '
        f"{study.reference or '?'}; methods: {', '.join(study.methods)}; parameters: "
        f"{', '.join(p.upper() for p in study.params)}.</p>"
        + (f"<ul>{items}</ul>" if items else "")
    )


def _group_body(
    study: _Study, rep: str | None, after: str | None, panels=None, training: str = ""
) -> str:
    links = " ".join(f'<a href="sub-{s}.html">sub-{s}</a>' for s in study.subjects)
    parts = [_summary(study), f"<p>Subject pages: {links}</p>"]
    parts += [
        table_snr(study),
        table_baseline(study),
        table_cv(study, study.subjects),
        table_nrmse(study, study.subjects),
        table_scanrescan(study, study.subjects),
    ]
    if rep is not None:
        parts.append(f"<p class='note'>Figures 2-5 and 9 show sub-{html.escape(rep)}.</p>")
        parts += panels or _subject_panels(study, rep, after)
    parts.append(training or figure_training({}))
    exp = study.experiments
    parts.append(
        _figure("fig-trainsize", F.fig_trainsize(exp["trainsize"], params=study.params))
        if exp["trainsize"]
        else _not_run("fig-trainsize", "trainsize")
    )
    parts.append(
        _figure("fig-leavepout", F.fig_leavepout(exp["leavepout"]))
        if exp["leavepout"]
        else _not_run("fig-leavepout", "leavepout")
    )
    parts.append(
        _figure("fig-tissue", F.fig_tissue(exp["tissue"], params=study.params))
        if exp["tissue"]
        else _not_run("fig-tissue", "tissue")
    )
    if rep is not None:
        parts += figure_methods(study, rep, after)
    parts.append(
        _figure("fig-seeds", F.fig_seeds(exp["seeds"], params=study.params))
        if exp["seeds"]
        else _not_run("fig-seeds", "seeds")
    )
    return "".join(parts)


def _subject_panels(study: _Study, subject: str, after: str | None) -> list[str]:
    """Figs. 2-5 of one subject (drawn once, shown on its page and maybe the group page)."""
    shown = [m for m in (BEFORE, after) if m]
    return [
        figure_maps(study, subject, shown),
        figure_differences(study, subject, shown),
        figure_cv(study, subject),
        figure_roi_nrmse(study, subject, after),
        figure_scanrescan(study, subject, after),
    ]


def _subject_body(study: _Study, subject: str, panels: list[str]) -> str:
    parts = [
        '<p><a href="report.html">back to the group report</a></p>',
        table_cv(study, [subject]),
        table_nrmse(study, [subject]),
        table_scanrescan(study, [subject]),
        *panels,
    ]
    return "".join(parts)
