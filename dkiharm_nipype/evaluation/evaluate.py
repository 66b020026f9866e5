"""Evaluation of a harmonization: inter-scanner CV, NRMSE-to-reference, scan-rescan NRMSE.

The paper's section 2.3 in plain functions over NIfTI files:

* every scan of a subject is registered (non-linearly, within subject) into the space of
  that subject's **reference scan** (first run on the reference scanner), the common space;
  one deformation per scan, computed on the FA of its raw fit, moves all of that scan's maps
  (raw fits and every harmonized version alike);
* **inter-scanner CV** (2.3.1): voxelwise SD/mean across the first runs of every scanner,
  summarised in white matter and in each WM ROI (``cv.tsv``, CV maps as NIfTI);
* **NRMSE-to-reference** (2.3.2): each scan's maps against the reference scan's raw fit
  (the network's label), in WM and in each ROI (``nrmse.tsv``);
* **scan-rescan NRMSE** (2.3.2): each repeated run against the first run of the same
  scanner (``scanrescan.tsv``).

``method`` is a free label for one version of the maps: ``before`` (raw IRLLS fits),
``dl`` (the network's ``desc-harmonized`` maps), ``combat``, ``rish``... White matter comes
from a user mask or, by default, from the reference fit (:func:`~dkiharm_nipype.evaluation.scores.
wm_mask_from_fit`); ROIs from a user atlas (label image + TSV) or the phantom's labels.

The tidy-table column names used here, by the report and by the experiments are defined
once below (``*_COLUMNS``).
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import DkiharmInputError
from ..registration import VOXEL_TOLERANCE_MM, register
from ..study import first_runs, run_key
from ..utils.io import atomic_copy
from .scores import (
    cv_floor,
    cv_histogram,
    cv_map,
    masked_stats,
    noise_floor,
    nrmse,
    wm_mask_from_fit,
)

LOGGER = logging.getLogger("dkiharm.evaluation")

#: The paper's parameters of interest (section 2.2).
EVAL_PARAMS = ("mk", "ak", "rk", "kfa")
#: The method label of the raw fits; the reference scan's raw fit is the reference.
BEFORE = "before"
#: The ``roi`` value of whole-white-matter rows.
WM = "WM"

# --------------------------------------------------------------------------- tidy tables
#: ``floor``: the score of scans that differ by the reference's noise only (:data:`FLOOR_COLUMNS`);
#: ``ratio_to_floor``: the score over it (1 is as good as the data allow).
CV_COLUMNS = (
    "method", "subject", "param", "roi", "cv_mean", "cv_median", "n_voxels", "floor",
    "ratio_to_floor",
)  # fmt: skip
NRMSE_COLUMNS = (
    "method", "subject", "scanner", "run", "param", "roi", "nrmse", "floor", "ratio_to_floor",
)  # fmt: skip
SCANRESCAN_COLUMNS = (
    "method", "subject", "scanner", "runs", "param", "roi", "nrmse", "floor", "ratio_to_floor",
)  # fmt: skip
#: The reference's own repeatability per subject (``kind``: ``rescan`` or ``halves``).
FLOOR_COLUMNS = ("subject", "param", "roi", "kind", "nrmse_floor", "cv_floor", "n_scanners")
#: Held-out NRMSE-to-reference of the networks (``dl``) against the linear baseline.
BASELINE_COLUMNS = (
    "scanner", "param", "source", "n", "nrmse_dl", "nrmse_linear", "nrmse_floor", "chosen",
    "dl_beats_linear",
)  # fmt: skip
EXCLUDED_COLUMNS = ("subject", "excluded_from", "missing", "reason")
CVHIST_COLUMNS = ("method", "subject", "param", "bin_lower", "bin_upper", "count")
MAPS_COLUMNS = ("kind", "method", "subject", "scanner", "run", "param", "path")
ROI_COLUMNS = ("index", "name", "abbreviation")

#: Experiment tables (written by the experiments, read by the report); ``metric`` is
#: ``cv`` or ``nrmse``.
TRAINSIZE_COLUMNS = (
    "n_train", "replicate", "train_subjects", "scanner", "param", "metric", "value",
)  # fmt: skip
LEAVEPOUT_COLUMNS = (
    "p", "replicate", "train_subjects", "test_subjects", "scanner", "param", "metric", "value",
)  # fmt: skip
TISSUE_COLUMNS = ("left_out", "tissue", "scanner", "param", "metric", "value")
SEEDS_COLUMNS = ("seed", "scanner", "param", "metric", "value")
#: ``left_out`` values of the leave-one-tissue-out experiment.
TISSUE_LEFT_OUT = ("none", "subcortical_gm", "csf")
#: Experiment name -> (file name, columns).
EXPERIMENTS = {
    "trainsize": ("experiment-trainsize.tsv", TRAINSIZE_COLUMNS),
    "leavepout": ("experiment-leavepout.tsv", LEAVEPOUT_COLUMNS),
    "tissue": ("experiment-tissue.tsv", TISSUE_COLUMNS),
    "seeds": ("experiment-seeds.tsv", SEEDS_COLUMNS),
}
#: File names of the evaluation tables.
TABLE_FILES = {
    "cv": "cv.tsv",
    "nrmse": "nrmse.tsv",
    "scanrescan": "scanrescan.tsv",
    "excluded": "excluded.tsv",
    "cvhist": "cvhist.tsv",
    "maps": "maps.tsv",
    "rois": "rois.tsv",
    "floor": "floor.tsv",
    "baseline": "baseline.tsv",
}
#: What was evaluated (reference scanner, scanners, methods, parameters, engine).
SUMMARY_FILE = "evaluation.json"


class EvaluationInputError(DkiharmInputError):
    """Maps, masks or atlases given to the evaluation cannot be used."""


def _fmt(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.6g}"
    return str(value)


def write_tsv(rows: Iterable[Mapping], columns: Iterable[str], path: str | Path) -> Path:
    """Write ``rows`` (dicts) as a tab-separated table with ``columns`` (header always)."""
    from ..utils.io import atomic_write_text

    columns = tuple(columns)
    lines = ["\t".join(columns)]
    lines += ["\t".join(_fmt(row.get(c, "")) for c in columns) for row in rows]
    atomic_write_text("\n".join(lines) + "\n", path)
    return Path(path)


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated table as dicts of strings (``[]`` if the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ScanMaps:
    """The maps of one scan, in its own (DWI) space.

    ``maps[method][param]`` is the path of one map: e.g. ``maps["before"]["mk"]`` (raw
    fit) and ``maps["dl"]["mk"]`` (harmonized). ``brain_mask`` (optional) restricts the
    registration metric.
    """

    subject: str
    scanner: str
    maps: Mapping[str, Mapping[str, str | Path]]
    run: str = "1"
    brain_mask: str | Path | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subject, self.scanner, str(self.run))


@dataclass
class EvaluationResult:
    """Paths of everything :func:`evaluate_study` wrote, and the rows of the tables."""

    out_dir: Path
    tables: dict[str, Path] = field(default_factory=dict)
    cv: list[dict] = field(default_factory=list)
    nrmse: list[dict] = field(default_factory=list)
    scanrescan: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    floor: list[dict] = field(default_factory=list)
    baseline: list[dict] = field(default_factory=list)


def read_roi_table(path: str | Path) -> dict[int, str]:
    """ROI index -> short name from a TSV with ``index`` and ``name`` (and optionally
    ``abbreviation``, preferred as the short name) columns."""
    path = Path(path)
    rows = read_tsv(path)
    if not rows or not {"index", "name"} <= set(rows[0]):
        raise EvaluationInputError(
            f"The ROI table {path} needs a header with 'index' and 'name' columns (and "
            "optionally 'abbreviation') and one row per label of the atlas."
        )
    try:
        return {
            int(r["index"]): (r.get("abbreviation") or r["name"]).strip()
            for r in rows
            if int(r["index"]) != 0
        }
    except ValueError:
        raise EvaluationInputError(
            f"The ROI table {path} has a non-integer 'index'; give each label's integer value."
        ) from None


def _same_grid(img: nb.spatialimages.SpatialImage, ref: nb.spatialimages.SpatialImage) -> bool:
    return img.shape[:3] == ref.shape[:3] and np.allclose(
        img.affine, ref.affine, atol=VOXEL_TOLERANCE_MM
    )


def _grid_error(what: str, path, ref_path, img, ref) -> EvaluationInputError:
    return EvaluationInputError(
        f"The {what} {path} ({img.shape[:3]} voxels) is not on the voxel grid of the "
        f"reference scan's map {ref_path} ({ref.shape[:3]} voxels, or another affine); "
        "resample it into the reference scan's space (the evaluation's common space) first."
    )


def check_wm_mask(path, ref_img, ref_path, brain: np.ndarray) -> np.ndarray:
    """The user's WM mask as a boolean array, checked against the reference scan."""
    img = nb.load(path)
    if not _same_grid(img, ref_img):
        raise _grid_error("white-matter mask", path, ref_path, img, ref_img)
    wm = np.asanyarray(img.dataobj) > 0
    n_wm = int(wm.sum())
    inside = int((wm & brain).sum())
    if n_wm == 0 or inside < 0.5 * n_wm:
        raise EvaluationInputError(
            f"The white-matter mask {path} has {inside} of its {n_wm} voxels inside the brain "
            f"of the reference scan {ref_path}; give a WM mask in that scan's space."
        )
    return wm & brain


def check_atlas(path, names: Mapping[int, str], ref_img, ref_path) -> np.ndarray:
    """The ROI atlas as an integer array, checked against the reference scan and the table."""
    img = nb.load(path)
    if not _same_grid(img, ref_img):
        raise _grid_error("ROI atlas", path, ref_path, img, ref_img)
    labels = np.rint(np.asanyarray(img.dataobj)).astype(int)
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - set(names))
    if unknown:
        raise EvaluationInputError(
            f"The ROI atlas {path} has labels {unknown[:10]} that its ROI table does not name; "
            "add them to the table (index, name) or give the atlas that matches the table."
        )
    if not present:
        raise EvaluationInputError(f"The ROI atlas {path} has no labelled voxel.")
    return labels


def _per_subject(value, subject: str):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(subject) or value.get(f"sub-{subject}")
    return value


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(path).dataobj, dtype=np.float32)


# --------------------------------------------------------------------------- the study
def evaluate_study(
    scans: Iterable[ScanMaps],
    *,
    reference: str,
    out_dir: str | Path,
    params: Iterable[str] = EVAL_PARAMS,
    engine: str = "dipy-syn",
    wm_masks: Mapping[str, str | Path] | str | Path | None = None,
    atlases: Mapping[str, str | Path] | str | Path | None = None,
    roi_table: str | Path | Mapping[int, str] | None = None,
    register_param: str = "fa",
    reference_method: str = BEFORE,
    save_maps: bool = True,
    seed: int = 0,
    n_threads: int = 1,
    halves: Mapping[str, Sequence[Mapping[str, str | Path]]] | None = None,
    cards: Sequence[Mapping] = (),
    held_out: bool = True,
) -> EvaluationResult:
    """Evaluate every method on every subject; write the tidy tables and the CV maps.

    Parameters
    ----------
    scans
        One :class:`ScanMaps` per scan (every subject, scanner and run).
    reference
        The reference scanner; each subject's first run on it defines the common space and
        its ``reference_method`` maps are the reference of the NRMSEs.
    out_dir
        Where ``cv.tsv``, ``nrmse.tsv``, ``scanrescan.tsv``, ``excluded.tsv``,
        ``cvhist.tsv``, ``maps.tsv``, ``rois.tsv`` and ``sub-*/`` (CV maps, registered maps,
        WM masks, atlases; NIfTI) are written. Files appear only once everything has been
        computed.
    params
        Parameters evaluated (default: MK, AK, RK, KFA as in the paper).
    engine
        Registration engine of :func:`~dkiharm_nipype.registration.register` (``none`` when
        every scan of a subject is already on its reference scan's grid).
    wm_masks, atlases
        Per-subject paths (``{subject: path}``) or one path for all, in the reference scan's
        space. Without a WM mask, white matter is :func:`~dkiharm_nipype.evaluation.scores.
        wm_mask_from_fit` of the reference scan's raw fit (FA and MD needed).
    roi_table
        ``index``/``name``[/``abbreviation``] TSV of the atlas labels, or a dict.
    register_param
        The map driving the registration (FA of the raw fit by default).
    save_maps
        Also write the registered maps (the report's picture panels).
    halves
        Per subject, the raw-fit maps (``{param: path}``, on the reference scan's grid) of
        two interleaved halves of its reference scan's directions
        (:func:`~dkiharm_nipype.dki.halves.write_half_maps`): the noise floor of subjects
        without a rescan on the reference scanner (``floor.tsv``, and every score's
        ``floor``/``ratio_to_floor``; :func:`~dkiharm_nipype.evaluation.scores.noise_floor`).
    cards, held_out
        The networks' model cards (dicts) and whether the evaluated subjects were held out
        of training: ``baseline.tsv`` compares the networks with the linear baseline on the
        test subjects, or, when every subject trained (``held_out=False``), on the cards'
        held-out validation blocks (:func:`baseline_rows`).

    Subjects without a reference scan are skipped; subjects missing another scanner are
    kept for the NRMSEs but excluded from the CV. Both are logged as warnings and listed
    in ``excluded.tsv``.
    """
    scans = list(scans)
    params = tuple(params)
    out_dir = Path(out_dir)
    if not scans:
        raise EvaluationInputError("No scans to evaluate; give the maps of at least one scan.")
    scanners = sorted({s.scanner for s in scans})
    if reference not in scanners:
        raise EvaluationInputError(
            f"The reference scanner {reference!r} has no scan among the evaluated ones "
            f"({', '.join(scanners)}); name one of them."
        )
    names: dict[int, str] | None = None
    if atlases is not None:
        if roi_table is None:
            raise EvaluationInputError(
                "An ROI atlas was given without its ROI table; give the TSV (index, name) too."
            )
        names = dict(roi_table) if isinstance(roi_table, Mapping) else read_roi_table(roi_table)

    by_subject: dict[str, list[ScanMaps]] = defaultdict(list)
    for scan in scans:
        by_subject[scan.subject].append(scan)
    result = EvaluationResult(out_dir=out_dir)
    plans = []
    # validate everything first: an error leaves nothing behind
    for subject in sorted(by_subject):
        subject_scans = sorted(by_subject[subject], key=lambda s: (s.scanner, run_key(s.run)))
        refs = [s for s in subject_scans if s.scanner == reference]
        present = {s.scanner for s in subject_scans}
        if not refs:
            _exclude(result, subject, "all", [reference], "no scan on the reference scanner")
            continue
        missing = [sc for sc in scanners if sc not in present]
        if missing:
            _exclude(result, subject, "cv", missing, "not scanned on every scanner")
        ref_scan = refs[0]
        ref_maps = ref_scan.maps.get(reference_method, {})
        need = {*params, register_param}
        if _per_subject(wm_masks, subject) is None:
            need |= {"fa", "md"}
        lacking = sorted(need - set(ref_maps))
        if lacking:
            raise EvaluationInputError(
                f"The reference scan of sub-{subject} (scanner {reference}, run {ref_scan.run}) "
                f"has no '{reference_method}' map for {', '.join(lacking)}; give those maps."
            )
        ref_path = ref_maps[register_param]
        ref_img = nb.load(ref_path)
        brain = _brain(ref_scan, ref_img, ref_maps)
        wm_path = _per_subject(wm_masks, subject)
        if wm_path is not None:
            wm = check_wm_mask(wm_path, ref_img, ref_path, brain)
        else:
            wm = wm_mask_from_fit(_load(ref_maps["fa"]), _load(ref_maps["md"]), brain)
            if not wm.any():
                raise EvaluationInputError(
                    f"No white matter (FA >= 0.2, MD <= 1.5e-3) in the reference fit "
                    f"{ref_maps['fa']}; check the fit or give a WM mask (--wm-mask)."
                )
        atlas_path = _per_subject(atlases, subject)
        labels = None
        if atlas_path is not None:
            labels = check_atlas(atlas_path, names, ref_img, ref_path)
        elif atlases is not None:
            raise EvaluationInputError(
                f"No ROI atlas for sub-{subject}; give one per subject or one for all."
            )
        plans.append((subject, subject_scans, ref_scan, ref_img, wm, labels, not missing))

    with tempfile.TemporaryDirectory(prefix=".dkiharm-eval-", dir=_tmp_parent(out_dir)) as tmp:
        stage = Path(tmp)
        maps_rows: list[dict] = []
        hist_rows: list[dict] = []
        for subject, subject_scans, ref_scan, ref_img, wm, labels, complete in plans:
            aligned = _align_subject(
                subject_scans,
                ref_scan,
                ref_img,
                params,
                engine=engine,
                register_param=register_param,
                reference_method=reference_method,
                seed=seed,
                n_threads=n_threads,
            )
            rois = _roi_masks(wm, labels, names)
            ref_key = (reference_method, ref_scan.scanner, str(ref_scan.run))
            floors = _floor_rows(
                subject, aligned, ref_key, (halves or {}).get(subject), ref_img, params, rois,
                len(scanners),
            )  # fmt: skip
            result.floor += floors
            nrmse_rows = _nrmse_rows(subject, aligned, ref_key, params, rois)
            rescan_rows = _scanrescan_rows(subject, aligned, params, rois)
            result.nrmse += _with_floor(nrmse_rows, floors, "nrmse", "nrmse_floor")
            result.scanrescan += _with_floor(rescan_rows, floors, "nrmse", "nrmse_floor")
            written = _write_subject_maps(
                stage, subject, ref_img.affine, wm, labels, aligned if save_maps else {}
            )
            maps_rows += written
            if complete:
                cv_rows, hists, cv_maps = _cv_rows(subject, aligned, scanners, params, rois)
                result.cv += _with_floor(cv_rows, floors, "cv_mean", "cv_floor")
                hist_rows += hists
                for (method, param), cv in cv_maps.items():
                    name = f"cv/sub-{subject}_method-{method}_param-{param}_cvmap.nii.gz"
                    _save(cv, ref_img.affine, stage / f"sub-{subject}" / name)
                    maps_rows.append(_maprow("cv", subject, name, method=method, param=param))
        result.baseline = baseline_rows(
            result.nrmse, result.floor, reference=reference, cards=cards, held_out=held_out
        )
        _warn_baseline(result.baseline)
        tables = {
            "floor": (result.floor, FLOOR_COLUMNS),
            "baseline": (result.baseline, BASELINE_COLUMNS),
            "cv": (result.cv, CV_COLUMNS),
            "nrmse": (result.nrmse, NRMSE_COLUMNS),
            "scanrescan": (result.scanrescan, SCANRESCAN_COLUMNS),
            "excluded": (result.excluded, EXCLUDED_COLUMNS),
            "cvhist": (hist_rows, CVHIST_COLUMNS),
            "maps": (maps_rows, MAPS_COLUMNS),
            "rois": (
                [{"index": i, "name": n, "abbreviation": n} for i, n in (names or {}).items()],
                ROI_COLUMNS,
            ),
        }
        for key, (rows, columns) in tables.items():
            write_tsv(rows, columns, stage / TABLE_FILES[key])
        summary = {
            "reference": reference,
            "scanners": scanners,
            "params": list(params),
            "methods": sorted({r["method"] for r in result.nrmse}),
            "engine": engine,
            "reference_method": reference_method,
            "wm": "user mask"
            if wm_masks is not None
            else "reference fit (FA >= 0.2, MD <= 1.5e-3)",
        }
        (stage / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            atomic_copy(src, out_dir / src.relative_to(stage))
    result.tables = {k: out_dir / v for k, v in TABLE_FILES.items()}
    return result


def _floor_rows(subject, aligned, ref_key, halves, ref_img, params, rois, n_scanners):
    """The reference's repeatability in each ROI: its rescan's raw fit if it has one, else
    the two halves of its directions (``[]`` when neither is there)."""
    method, scanner, run = ref_key
    runs = sorted((r for m, s, r in aligned if m == method and s == scanner), key=run_key)
    if len(runs) > 1:
        kind, pair = "rescan", (aligned[(method, scanner, runs[1])], aligned[ref_key])
    elif halves:
        kind, pair = "halves", []
        for half in halves:
            arrays = {}
            for param in params:
                img = nb.load(half[param])
                if not _same_grid(img, ref_img):
                    raise _grid_error("half-scan map", half[param], ref_img.get_filename(),
                                      img, ref_img)  # fmt: skip
                arrays[param] = np.asanyarray(img.dataobj, dtype=np.float32)
            pair.append(arrays)
    else:
        return []
    reference = aligned[ref_key]
    rows = []
    for param in params:
        first, second = pair[0][param], pair[1][param]
        for roi, mask in rois:
            try:
                nfloor = noise_floor(first, second, reference[param], mask, kind=kind)
            except ValueError:
                nfloor = float("nan")
            cfloor = cv_floor(first, second, reference[param], mask, n_scanners=max(n_scanners, 2),
                              kind=kind)  # fmt: skip
            rows.append(
                {"subject": subject, "param": param, "roi": roi, "kind": kind,
                 "nrmse_floor": nfloor, "cv_floor": cfloor, "n_scanners": n_scanners}
            )  # fmt: skip
    return rows


def _with_floor(rows: list[dict], floors: list[dict], score: str, which: str) -> list[dict]:
    """``rows`` with their ``floor`` and ``ratio_to_floor`` (empty without a floor)."""
    by_key = {(f["param"], f["roi"]): f[which] for f in floors}
    for row in rows:
        floor = by_key.get((row["param"], row["roi"]))
        if floor is None:
            row["floor"] = row["ratio_to_floor"] = ""
            continue
        row["floor"] = floor
        value = float(row[score])
        row["ratio_to_floor"] = value / floor if floor > 0 else float("nan")
    return rows


def baseline_rows(
    nrmse_rows: Sequence[Mapping],
    floor_rows: Sequence[Mapping] = (),
    *,
    reference: str,
    cards: Sequence[Mapping] = (),
    held_out: bool = True,
    roi: str = WM,
) -> list[dict]:
    """Held-out NRMSE-to-reference of the networks (``dl``) and the linear baseline.

    With ``held_out`` (the evaluated subjects were not trained on): per target scanner
    and parameter, the mean over subjects of the first runs' NRMSE in ``roi``. Otherwise
    the cards' validation numbers (held-out spatial blocks of the training scans, all brain
    voxels). ``chosen`` is the card's model selection for that map.
    """
    choices = {}
    for card in cards:
        maps = (card.get("mapping") or {}).get("selection", {}).get("maps", {})
        for param, choice in maps.items():
            choices[(str(card.get("scanner")), param)] = choice
    floors = defaultdict(list)
    for f in floor_rows:
        if f["roi"] == roi and np.isfinite(float(f["nrmse_floor"])):
            floors[f["param"]].append(float(f["nrmse_floor"]))
    rows = []
    if held_out:
        firsts: dict[tuple[str, str], str] = {}
        for r in nrmse_rows:
            key = (r["subject"], r["scanner"])
            firsts[key] = min(firsts.get(key, r["run"]), r["run"], key=run_key)
        values = defaultdict(list)
        for r in nrmse_rows:
            if (r["roi"] == roi and r["scanner"] != reference and r["method"] in ("dl", "linear")
                    and r["run"] == firsts[(r["subject"], r["scanner"])]):  # fmt: skip
                values[(r["scanner"], r["param"], r["method"])].append(float(r["nrmse"]))
        for scanner, param in sorted({(k[0], k[1]) for k in values}):
            dl, lin = values.get((scanner, param, "dl")), values.get((scanner, param, "linear"))
            if not dl or not lin:
                continue
            choice = choices.get((scanner, param))
            rows.append(_baseline_row(scanner, param, f"test subjects ({roi})", len(dl),
                                      float(np.nanmean(dl)), float(np.nanmean(lin)),
                                      floors.get(param), choice))  # fmt: skip
    else:
        for (scanner, param), choice in sorted(choices.items()):
            if scanner == reference or "val_nrmse_network" not in choice:
                continue  # no held-out blocks scored (too few voxels): nothing to compare
            rows.append(_baseline_row(scanner, param, "held-out blocks of the training scans",
                                      1, choice["val_nrmse_network"], choice["val_nrmse_linear"],
                                      None, choice))  # fmt: skip
    return rows


def _baseline_row(scanner, param, source, n, dl, lin, floors, choice) -> dict:
    return {
        "scanner": scanner, "param": param, "source": source, "n": n, "nrmse_dl": dl,
        "nrmse_linear": lin, "nrmse_floor": float(np.mean(floors)) if floors else "",
        "chosen": choice["chosen"] if choice else "", "dl_beats_linear": str(bool(dl < lin)),
    }  # fmt: skip


def _warn_baseline(rows: Sequence[Mapping]) -> None:
    for r in rows:
        if r["dl_beats_linear"] != "True" or r["chosen"] == "linear":
            message = (
                f"the scanner-{r['scanner']} network does not beat the linear baseline for "
                f"{r['param'].upper()} ({r['source']}: NRMSE-to-reference {r['nrmse_dl']:.3g} vs "
                f"{r['nrmse_linear']:.3g} linear"
                + (
                    "; model selection uses the linear mapping)"
                    if r["chosen"] == "linear"
                    else ")"
                )
            )
            LOGGER.warning(message)
            warnings.warn(message, stacklevel=3)


def _nrmse_rows(subject, aligned, ref_key, params, rois) -> list[dict]:
    """NRMSE-to-reference of every scan and method (the reference scan's own raw fit,
    identical to the reference, is left out)."""
    reference = aligned[ref_key]
    rows = []
    for (method, scanner, run), arrays in sorted(aligned.items()):
        if (method, scanner, run) == ref_key:
            continue
        for param in params:
            for roi, mask in rois:
                value = _safe_nrmse(arrays[param], reference[param], mask)
                rows.append(
                    {"method": method, "subject": subject, "scanner": scanner, "run": run,
                     "param": param, "roi": roi, "nrmse": value}
                )  # fmt: skip
    return rows


def _scanrescan_rows(subject, aligned, params, rois) -> list[dict]:
    """NRMSE of every repeated run against the first run of the same scanner and method."""
    rows = []
    for (method, scanner, run), arrays in sorted(aligned.items()):
        first = _first_run(aligned, method, scanner)
        if run == first:
            continue
        for param in params:
            for roi, mask in rois:
                value = _safe_nrmse(arrays[param], aligned[(method, scanner, first)][param], mask)
                rows.append(
                    {"method": method, "subject": subject, "scanner": scanner,
                     "runs": f"{first}-{run}", "param": param, "roi": roi, "nrmse": value}
                )  # fmt: skip
    return rows


def _cv_rows(subject, aligned, scanners, params, rois):
    """Inter-scanner CV over the first run of every scanner, per method and parameter.

    Returns the ``cv.tsv`` rows, the ``cvhist.tsv`` rows (WM) and the CV maps.
    """
    rows, hists, maps = [], [], {}
    wm = rois[0][1]
    for method in sorted({m for m, _, _ in aligned}):
        firsts = [_first_run(aligned, method, sc) for sc in scanners]
        if any(f is None for f in firsts):
            LOGGER.warning("sub-%s: method %r lacks a scanner; no CV", subject, method)
            continue
        for param in params:
            stack = [
                aligned[(method, sc, f)][param] for sc, f in zip(scanners, firsts, strict=True)
            ]
            cv = maps[(method, param)] = cv_map(np.stack(stack))
            for roi, mask in rois:
                stats = masked_stats(cv, mask)
                rows.append(
                    {"method": method, "subject": subject, "param": param, "roi": roi,
                     "cv_mean": stats["mean"], "cv_median": stats["median"],
                     "n_voxels": stats["n_voxels"]}
                )  # fmt: skip
            counts, edges = cv_histogram(cv, wm)
            hists += [
                {"method": method, "subject": subject, "param": param,
                 "bin_lower": float(lo), "bin_upper": float(hi), "count": int(n)}
                for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)
            ]  # fmt: skip
    return rows, hists, maps


def _write_subject_maps(stage: Path, subject: str, affine, wm, labels, aligned) -> list[dict]:
    """WM mask, atlas and registered maps of one subject; returns their ``maps.tsv`` rows."""
    sub_dir = stage / f"sub-{subject}"
    rows = []
    name = f"sub-{subject}_desc-wm_mask.nii.gz"
    _save(wm.astype(np.uint8), affine, sub_dir / name)
    rows.append(_maprow("wm", subject, name))
    if labels is not None:
        name = f"sub-{subject}_desc-rois_dseg.nii.gz"
        _save(labels.astype(np.int16), affine, sub_dir / name)
        rows.append(_maprow("atlas", subject, name))
    for (method, scanner, run), arrays in sorted(aligned.items()):
        for param, data in arrays.items():
            name = (
                f"maps/sub-{subject}_scanner-{scanner}_run-{run}_method-{method}"
                f"_param-{param}_map.nii.gz"
            )
            _save(data, affine, sub_dir / name)
            rows.append(
                _maprow("map", subject, name, method=method, scanner=scanner, run=run, param=param)
            )
    return rows


# --------------------------------------------------------------------------- helpers
def _exclude(result: EvaluationResult, subject: str, scope: str, missing, reason: str) -> None:
    what = "the evaluation" if scope == "all" else "the inter-scanner CV"
    message = f"sub-{subject} is excluded from {what}: {reason} (missing: {', '.join(missing)})"
    LOGGER.warning(message)
    warnings.warn(message, stacklevel=3)
    result.excluded.append(
        {"subject": subject, "excluded_from": scope, "missing": ",".join(missing),
         "reason": reason}
    )  # fmt: skip


def _brain(scan: ScanMaps, ref_img, ref_maps: Mapping[str, str | Path]) -> np.ndarray:
    """The reference scan's brain: its mask if given, else where its raw FA is positive."""
    if scan.brain_mask is not None:
        img = nb.load(scan.brain_mask)
        if not _same_grid(img, ref_img):
            raise _grid_error("brain mask", scan.brain_mask, ref_img.get_filename(), img, ref_img)
        return np.asanyarray(img.dataobj) > 0
    fa = np.asanyarray(ref_img.dataobj, dtype=np.float32)
    return np.isfinite(fa) & (fa > 0)


def _roi_masks(wm: np.ndarray, labels: np.ndarray | None, names) -> list[tuple[str, np.ndarray]]:
    rois = [(WM, wm)]
    if labels is not None:
        rois += [(name, labels == i) for i, name in names.items() if (labels == i).any()]
    return rois


def _align_subject(
    scans: list[ScanMaps],
    ref_scan: ScanMaps,
    ref_img,
    params: tuple[str, ...],
    *,
    engine: str,
    register_param: str,
    reference_method: str,
    seed: int,
    n_threads: int,
) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """Every scan's maps on the reference scan's grid: ``{(method, scanner, run): maps}``.

    One deformation per scan, estimated on its ``register_param`` map, moves all its maps.
    """
    out = {}
    for scan in scans:
        methods = {m: ms for m, ms in scan.maps.items() if set(params) <= set(ms)}
        for m in sorted(set(scan.maps) - set(methods)):
            LOGGER.warning(
                "sub-%s scanner %s run %s: method %r lacks some of %s; left out",
                scan.subject, scan.scanner, scan.run, m, ", ".join(params),
            )  # fmt: skip
        if scan.key == ref_scan.key:
            for method, ms in methods.items():
                arrays = {}
                for param in params:
                    img = nb.load(ms[param])
                    if not _same_grid(img, ref_img):
                        raise _grid_error(
                            f"'{method}' {param} map", ms[param], ref_img.get_filename(),
                            img, ref_img,
                        )  # fmt: skip
                    arrays[param] = np.asanyarray(img.dataobj, dtype=np.float32)
                out[(method, scan.scanner, str(scan.run))] = arrays
            continue
        driver = scan.maps.get(reference_method, {}).get(register_param) or next(
            (ms[register_param] for ms in scan.maps.values() if register_param in ms), None
        )
        if driver is None:
            raise EvaluationInputError(
                f"sub-{scan.subject} scanner {scan.scanner} run {scan.run} has no "
                f"{register_param} map to register with; give its raw-fit {register_param}."
            )
        reg = register(
            ref_img, driver, engine=engine, moving_mask=scan.brain_mask,
            seed=seed, n_threads=n_threads,
        )  # fmt: skip
        LOGGER.info(
            "sub-%s %s run %s -> reference: %s, correlation %.3f -> %.3f",
            scan.subject, scan.scanner, scan.run, reg.engine,
            reg.metrics["correlation_before"], reg.metrics["correlation_after"],
        )  # fmt: skip
        for method, ms in methods.items():
            out[(method, scan.scanner, str(scan.run))] = {
                param: reg.apply(ms[param]).get_fdata(dtype=np.float32) for param in params
            }
    return out


def _first_run(aligned, method: str, scanner: str) -> str | None:
    first = first_runs(aligned, group=lambda k: k[:2], run=lambda k: k[2]).get((method, scanner))
    return first[2] if first else None


def _safe_nrmse(estimate, reference, mask) -> float:
    try:
        return nrmse(estimate, reference, mask)
    except ValueError:
        return float("nan")


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = data.dtype if data.dtype.kind in "iu" else np.float32
    nb.Nifti1Image(np.asarray(data, dtype=dtype), affine).to_filename(path)


def _maprow(kind: str, subject: str, rel: str, **entities) -> dict:
    return {
        "kind": kind, "subject": subject, "path": f"sub-{subject}/{rel}",
        **{k: entities.get(k, "") for k in ("method", "scanner", "run", "param")},
    }  # fmt: skip


def _tmp_parent(out_dir: Path) -> Path:
    """A folder beside ``out_dir`` (same file system) for the staged outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir
