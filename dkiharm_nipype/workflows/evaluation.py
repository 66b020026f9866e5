"""Group level, last step: evaluate the harmonization and write the HTML report.

The test subjects' scans (all scans when every traveling subject was used for training)
are compared within subject after non-linear registration into the subject's reference
scan (:func:`dkiharm_nipype.evaluation.evaluate.evaluate_study`): inter-scanner CV, NRMSE to the
reference and scan-rescan NRMSE, before (the scans' own IRLLS fits) and after (the
networks' harmonized maps), plus any comparator (ComBat, RISH). The tables land in
``output_dir/evaluation/``, the report in ``output_dir/report.html`` and one
``output_dir/sub-<label>.html`` per subject.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dki.maps import ALL_METRICS
from ..interfaces.evaluation import EvaluateHarmonization, HarmonizationReport
from ..utils.bids import DWIScan
from .literate import LiterateWorkflow

#: Methods whose maps the evaluation receives, in ``inputnode`` field order.
METHODS = ("before", "dl", "linear", "combat", "rish")

#: Methods text of the evaluation: every score beside the reference scan's own noise.
FLOOR_DESC = (
    " Every evaluation score is reported beside a noise floor, the reference scan's own "
    "noise level (from its rescan, or, without one, from two interleaved halves of its "
    "directions fitted alike and scaled to a full scan)."
)


def _gather(meta, masks, reference, method_maps, bids_dir, wm_mask, roi_atlas, params):
    """Nipype Function: EvaluateHarmonization's scan records, WM masks and atlases.

    ``method_maps`` maps a method to one list of map files (``params`` order) per scan;
    ``wm_mask``/``roi_atlas`` are user paths (``{subject}`` expanded) or empty; without a
    user atlas the phantom's per-scan ROI labels of the reference scans are used when the
    dataset has them.
    """
    from pathlib import Path

    scans = []
    for i, m in enumerate(meta):
        maps = {
            method: dict(zip(params, files[i], strict=True))
            for method, files in method_maps.items()
            if files and files[i]  # a comparator may skip scans (ComBat: repeated runs)
        }
        scans.append({**m, "maps": maps, "brain_mask": masks[i]})
    subjects = sorted({m["subject"] for m in meta})

    def per_subject(pattern):
        if not pattern:
            return {}
        return {s: str(Path(pattern.replace("{subject}", s)).absolute()) for s in subjects}

    wm_masks, atlases = per_subject(wm_mask), per_subject(roi_atlas)
    truth = Path(bids_dir) / "derivatives" / "phantom-truth"
    if not roi_atlas and (truth / "desc-wmrois_dseg.tsv").is_file():
        for s in subjects:
            runs = sorted(
                (truth / f"sub-{s}" / f"ses-{reference}" / "dwi").glob(
                    f"sub-{s}_ses-{reference}_run-*_space-dwi_desc-wmrois_dseg.nii.gz"
                )
            )
            if runs:
                atlases[s] = str(runs[0])
    missing = [p for p in (*wm_masks.values(), *atlases.values()) if not Path(p).is_file()]
    if missing:
        from dkiharm_nipype.evaluation.evaluate import EvaluationInputError

        raise EvaluationInputError(
            f"{missing[0]} does not exist; give --wm-mask/--roi-atlas paths that exist for "
            "every evaluated subject ('{subject}' stands for the label)."
        )
    return scans, wm_masks, atlases


def _fit_halves(meta, dwis, bvals, bvecs, masks, reference, fit_method, b_max, n_threads):
    """Nipype Function: two interleaved halves of each subject's reference scan, fitted
    (the noise floor; subjects with a rescan on the reference scanner use that instead)."""
    import os

    from dkiharm_nipype.dki.halves import write_half_maps
    from dkiharm_nipype.dki.maps import ALL_METRICS
    from dkiharm_nipype.study import run_key

    on_ref = {}
    for i, m in enumerate(meta):
        if m["scanner"] == reference:
            on_ref.setdefault(m["subject"], []).append(i)
    out = {}
    for subject, idx in sorted(on_ref.items()):
        if len(idx) > 1:  # a rescan is the floor
            continue
        i = min(idx, key=lambda j: run_key(meta[j]["run"]))
        stem = os.path.abspath(f"sub-{subject}_ses-{reference}_run-{meta[i]['run']}")
        try:
            files = write_half_maps(
                dwis[i],
                bvals[i],
                bvecs[i],
                masks[i],
                stem,
                method=fit_method,
                b_max=b_max or None,
                n_threads=n_threads,
            )
        except ValueError as err:  # too few directions for a DKI fit of a half
            import logging

            logging.getLogger("nipype.workflow").warning(
                "sub-%s: no half-split noise floor (%s)", subject, err
            )
            continue
        out[subject] = [dict(zip(ALL_METRICS, half, strict=True)) for half in files]
    return out


def _merge_snr(snr_files):
    """Nipype Function: one SNR table (the paper's Table 3) from every scan's TSV."""
    import csv
    import os

    rows, fields = [], []
    for path in snr_files:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            fields = fields or list(reader.fieldnames or [])
            rows.extend(reader)
    out = os.path.abspath("snr.tsv")
    with open(out, "w") as fh:
        fh.write("\t".join(fields) + "\n")
        for row in rows:
            fh.write("\t".join(row.get(f, "") for f in fields) + "\n")
    return out


def _experiment_dir(tsv_files):
    """Nipype Function: a folder holding the experiments' TSVs (for the report)."""
    import os
    import shutil

    out = os.path.abspath("experiments")
    os.makedirs(out, exist_ok=True)
    for path in tsv_files or []:
        shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
    return out


def _stage(paths, staging_dir, rel):
    """Nipype Function: copy files, or the files of folders, into ``staging_dir/rel``."""
    from pathlib import Path

    from dkiharm_nipype.utils.io import atomic_copy

    dst = Path(staging_dir) / rel
    written = []
    for item in [paths] if isinstance(paths, str) else paths:
        item = Path(item)
        files = sorted(f for f in item.rglob("*") if f.is_file()) if item.is_dir() else [item]
        for f in files:
            target = dst / (f.relative_to(item) if item.is_dir() else f.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(f, target)
            written.append(str(target))
    return written


def init_evaluation_wf(
    *,
    scans: list[DWIScan],
    staging_dir: Path,
    bids_dir: Path,
    engine: str,
    seed: int = 0,
    omp_nthreads: int = 1,
    wm_mask: str | None = None,
    roi_atlas: str | None = None,
    roi_table: Path | None = None,
    held_out: bool = True,
    fit_method: str = "irlls",
    b_max: float | None = None,
    name: str = "evaluation_wf",
) -> pe.Workflow:
    """Evaluation tables and the HTML report of the evaluated ``scans``.

    Parameters
    ----------
    scans : list of DWIScan
        The evaluated scans (the test subjects').
    staging_dir : Path
        Derivatives root (tables in ``evaluation/``, the report at the top).
    bids_dir : Path
        The dataset (the phantom's ROI atlas and table are used when it has them).
    engine : str
        Label-registration engine; the evaluation registers with it, FNIRT excepted.
    seed, omp_nthreads : int
        Seed and threads of the within-subject registration.
    wm_mask, roi_atlas, roi_table
        ``--wm-mask``, ``--roi-atlas`` (``{subject}`` expanded) and ``--roi-table``.
    held_out : bool
        The scans' subjects were not trained on (else the networks are compared with the
        linear baseline on their cards' held-out blocks).
    fit_method, b_max
        The DKI fit of the reference scan's two halves (the noise floor), as the scans'.
    name : str
        Workflow name.

    Inputs
    ------
    reference
        The reference scanner (chosen at run time).
    masks
        Brain masks of ``scans``.
    before, dl, linear, combat, rish
        Per scan, the eight maps (``ALL_METRICS`` order) of each method; ``linear``,
        ``combat`` and ``rish`` may stay empty.
    dwis, bvals, bvecs
        The preprocessed series of ``scans``: a reference scan without a rescan is split in
        two halves for the noise floor (may stay empty: no floor then).
    cards
        The networks' model cards (the baseline comparison when ``held_out`` is off).
    snr_files
        Every scan's SNR table (Table 3).
    experiment_tsvs
        Tables of the ``--experiment`` runs (may stay empty).

    Examples
    --------
    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), participant_label=["03"])
    >>> eval_wf = init_evaluation_wf(scans=scans, staging_dir=Path("staging"),
    ...                              bids_dir=Path(bids_dir), engine="dipy-syn")
    >>> wf = pe.Workflow(name="my_study")
    >>> ref = pe.Node(niu.IdentityInterface(fields=["scanner"]), name="ref")
    >>> ref.inputs.scanner = "D"
    >>> wf.connect(ref, "scanner", eval_wf, "inputnode.reference")
    >>> names = sorted(n for n in eval_wf.list_node_names() if not n.startswith("stage"))
    >>> names[:4]
    ['evaluate', 'experiment_dir', 'gather', 'halves']
    >>> names[4:]
    ['inputnode', 'merge_snr', 'methods', 'report']
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = FLOOR_DESC
    fields = ["reference", "masks", *METHODS, "snr_files", "experiment_tsvs", "training_logs",
              "dwis", "bvals", "bvecs", "cards"]  # fmt: skip
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    for empty in ("linear", "combat", "rish", "experiment_tsvs", "training_logs", "dwis",
                  "bvals", "bvecs", "cards"):  # fmt: skip
        setattr(inputnode.inputs, empty, [])

    gather = _gather_node(scans, bids_dir=bids_dir, wm_mask=wm_mask, roi_atlas=roi_atlas)
    methods = pe.Node(niu.Function(function=_as_dict, input_names=list(METHODS),
                                   output_names=["out"]), name="methods",
                      run_without_submitting=True)  # fmt: skip
    # Within-subject registration for the evaluation: FNIRT is the label engine only.
    eval_engine = "dipy-syn" if engine in ("fnirt", "auto") else engine
    evaluate = pe.Node(
        EvaluateHarmonization(engine=eval_engine, seed=seed, num_threads=omp_nthreads),
        name="evaluate",
        n_procs=omp_nthreads,
        mem_gb=2,
    )
    evaluate.inputs.held_out = held_out
    halves = pe.Node(
        niu.Function(function=_fit_halves, output_names=["halves"],
                     input_names=["meta", "dwis", "bvals", "bvecs", "masks", "reference",
                                  "fit_method", "b_max", "n_threads"]),
        name="halves", n_procs=omp_nthreads, mem_gb=2,
    )  # fmt: skip
    halves.inputs.meta = gather.inputs.meta
    halves.inputs.fit_method = fit_method
    halves.inputs.b_max = b_max or 0.0
    halves.inputs.n_threads = omp_nthreads
    if roi_table:
        evaluate.inputs.roi_table = str(roi_table)
    else:
        table = Path(bids_dir) / "derivatives" / "phantom-truth" / "desc-wmrois_dseg.tsv"
        if table.is_file():
            evaluate.inputs.roi_table = str(table)
    merge_snr = pe.Node(
        niu.Function(function=_merge_snr, input_names=["snr_files"], output_names=["out"]),
        name="merge_snr",
        run_without_submitting=True,
    )
    experiment_dir = pe.Node(
        niu.Function(function=_experiment_dir, input_names=["tsv_files"], output_names=["out"]),
        name="experiment_dir",
        run_without_submitting=True,
    )
    # Folder inputs are hashed by path, not content: rebuild the report and restage the
    # tables on every run, so that a rerun never publishes a stale evaluation.
    report = pe.Node(HarmonizationReport(), name="report", mem_gb=1, overwrite=True)
    stages = _stage_nodes(staging_dir)
    workflow.connect(
        [
            (inputnode, methods, [(m, m) for m in METHODS]),
            (methods, gather, [("out", "method_maps")]),
            (inputnode, gather, [("masks", "masks"), ("reference", "reference")]),
            (inputnode, evaluate, [("reference", "reference"), ("cards", "card_files")]),
            (inputnode, halves, [("dwis", "dwis"), ("bvals", "bvals"), ("bvecs", "bvecs"),
                                 ("masks", "masks"), ("reference", "reference")]),
            (halves, evaluate, [("halves", "halves")]),
            (gather, evaluate, [("scans", "scans"), ("wm_masks", "wm_masks"),
                                ("atlases", "roi_atlases")]),
            (inputnode, merge_snr, [("snr_files", "snr_files")]),
            (inputnode, experiment_dir, [("experiment_tsvs", "tsv_files")]),
            (evaluate, report, [("out_dir", "tsv_dir")]),
            (merge_snr, report, [("out", "snr_tsv")]),
            (experiment_dir, report, [("out", "experiment_dir")]),
            (inputnode, report, [("training_logs", "training_logs")]),
            (evaluate, stages["tables"], [("out_dir", "paths")]),
            (report, stages["report"], [("report", "paths")]),
            (report, stages["pages"], [("subject_pages", "paths")]),
        ]
    )  # fmt: skip
    return workflow


def _gather_node(scans, *, bids_dir, wm_mask, roi_atlas) -> pe.Node:
    """The ``gather`` node of :func:`init_evaluation_wf` (see :func:`_gather`)."""
    gather = pe.Node(
        niu.Function(
            function=_gather,
            input_names=[
                "meta",
                "masks",
                "reference",
                "method_maps",
                "bids_dir",
                "wm_mask",
                "roi_atlas",
                "params",
            ],
            output_names=["scans", "wm_masks", "atlases"],
        ),
        name="gather",
        run_without_submitting=True,
    )
    gather.inputs.meta = [
        {"subject": s.subject, "scanner": s.scanner, "run": str(s.run or 1)} for s in scans
    ]
    gather.inputs.bids_dir = str(bids_dir)
    gather.inputs.wm_mask = wm_mask or ""
    gather.inputs.roi_atlas = roi_atlas or ""
    gather.inputs.params = list(ALL_METRICS)
    return gather


def _stage_nodes(staging_dir) -> dict[str, pe.Node]:
    """``stage_*`` nodes copying the tables, the report and the subject pages."""
    stages = {
        key: pe.Node(
            niu.Function(
                function=_stage, input_names=["paths", "staging_dir", "rel"], output_names=["out"]
            ),
            name=f"stage_{key}",
            run_without_submitting=True,
            overwrite=True,
        )
        for key in ("tables", "report", "pages")
    }
    for key, rel in (("tables", "evaluation"), ("report", ""), ("pages", "")):
        stages[key].inputs.staging_dir = str(staging_dir)
        stages[key].inputs.rel = rel

    return stages


def _as_dict(before, dl, linear, combat, rish):
    """Nipype Function: the methods' map lists keyed by method name."""
    return {"before": before, "dl": dl, "linear": linear, "combat": combat, "rish": rish}


def _run_comparators(
    methods, meta, dwis, bvals, bvecs, masks, maps, reference, training, evaluated,
    participants_file, fit_method, engine, n_threads,
):  # fmt: skip
    """Nipype Function: ComBat / RISH maps of the evaluated scans (see ``run_comparators``)."""
    import os

    from dkiharm_nipype.comparators.compare import run_comparators

    scans = [
        dict(m, dwi=d, bval=b, bvec=v, mask=k, maps=list(mp))
        for m, d, b, v, k, mp in zip(meta, dwis, bvals, bvecs, masks, maps, strict=True)
    ]
    res = run_comparators(
        methods, scans=scans, reference=reference, training=training, evaluated=evaluated,
        participants_file=participants_file or None, fit_method=fit_method, engine=engine,
        n_threads=n_threads, out_dir=os.getcwd(),
    )  # fmt: skip
    return res.get("combat", []), res.get("rish", [])


def _comparators_desc(methods) -> str:
    parts = []
    if "combat" in methods:
        parts.append(
            "ComBat [@fortin2017; @fortin2018] applied voxelwise to the DKI maps with "
            "neuroHarmonize [@pomponio2020]"
        )
    if "rish" in methods:
        parts.append(
            "rotation-invariant spherical harmonic (RISH) feature scaling of the DWI signal "
            "[@mirzaalian2016] before the DKI fit"
        )
    if not parts:
        return ""
    return (
        "\n\nFor comparison, the maps were also harmonized with " + " and with ".join(parts) + "."
    )


def init_comparators_wf(
    *,
    methods: list[str],
    scans: list[DWIScan],
    evaluated: list[DWIScan],
    training: list[str],
    bids_dir: Path,
    fit_method: str = "irlls",
    engine: str = "dipy-syn",
    omp_nthreads: int = 1,
    name: str = "comparators_wf",
) -> pe.Workflow:
    """ComBat / RISH maps of the evaluated scans (``--comparators``).

    Parameters
    ----------
    methods : list of {"combat", "rish"}
        The comparators to run.
    scans, evaluated : list of DWIScan
        Every scan (the ``inputnode`` lists follow its order) and the evaluated ones.
    training : list of str
        Training subjects (RISH learns its scale maps on them).
    bids_dir : Path
        The dataset (its ``participants.tsv`` gives ComBat's covariates).
    fit_method, engine, omp_nthreads
        DKI fit of the RISH-harmonized DWIs, registration engine, threads.

    Inputs
    ------
    dwis, bvals, bvecs, masks, maps
        One entry per scan of ``scans`` (``maps``: its eight maps).
    reference
        The reference scanner.

    Outputs
    -------
    combat, rish
        Per evaluated scan, the eight maps of each comparator (empty if not run).

    Examples
    --------
    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> scans = collect_scans(load_layout(bids_dir), participant_label=["01", "02"])
    >>> comparators_wf = init_comparators_wf(methods=["combat"], scans=scans,
    ...                                      evaluated=scans[:2], training=["01"],
    ...                                      bids_dir=Path(bids_dir))
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fits = pe.Node(niu.IdentityInterface(fields=["maps", "masks"]), name="fits")
    >>> wf.connect([(fits, comparators_wf, [("maps", "inputnode.maps"),
    ...                                     ("masks", "inputnode.masks")])])
    >>> comparators_wf.get_node("comparators").inputs.evaluated
    [0, 1]
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = _comparators_desc([m.lower() for m in methods])
    fields = ["dwis", "bvals", "bvecs", "masks", "maps", "reference"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["combat", "rish"]), name="outputnode")
    names = ["methods", "meta", *fields, "training", "evaluated", "participants_file",
             "fit_method", "engine", "n_threads"]  # fmt: skip
    node = pe.Node(
        niu.Function(function=_run_comparators, input_names=names,
                     output_names=["combat", "rish"]),
        name="comparators",
        n_procs=omp_nthreads,
        mem_gb=4,
    )  # fmt: skip
    node.inputs.methods = list(methods)
    node.inputs.meta = [
        {"subject": s.subject, "scanner": s.scanner, "run": str(s.run or 1)} for s in scans
    ]
    node.inputs.training = list(training)
    keys = [s.key for s in scans]
    node.inputs.evaluated = [keys.index(s.key) for s in evaluated]
    participants = Path(bids_dir) / "participants.tsv"
    node.inputs.participants_file = str(participants) if participants.is_file() else ""
    node.inputs.fit_method = fit_method
    node.inputs.engine = "dipy-syn" if engine in ("fnirt", "auto") else engine
    node.inputs.n_threads = omp_nthreads
    workflow.connect([
        (inputnode, node, [(f, f) for f in fields]),
        (node, outputnode, [("combat", "combat"), ("rish", "rish")]),
    ])  # fmt: skip
    return workflow
