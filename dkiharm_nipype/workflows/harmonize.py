"""Group level: reference choice, label registration, one CNN per scanner, harmonized maps.

One Nipype graph iterates scanners and subjects (paper, Fig. 1):

1. every scan is preprocessed and fitted (the participant-level sub-workflows, so a group
   run reuses a participant run's cache in the same work directory);
2. ``reference`` reads every scan's SNR and picks the scanner with the highest mean
   white-matter SNR (or the one named with ``--reference-scanner``);
3. for each training subject and each of its scans, ``labels_*`` registers the reference
   scanner's IRLLS maps of that subject into the scan's DWI space (a scan of the reference
   scanner gets the subject's other run on that scanner with ``reference_labels='rescan'``,
   its own maps, unregistered, with ``'fit'`` or without a repeat);
4. ``train_<scanner>`` trains that scanner's network on its training scans;
5. ``harmonize_*`` turns every scan of every participant into harmonized maps;
6. ``evaluation_wf`` scores the test subjects before and after (CV, NRMSE, scan-rescan)
   and writes the HTML report (:mod:`dkiharm_nipype.workflows.evaluation`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import RunConfig
from ..dki.maps import ALL_METRICS
from ..interfaces.bids import DerivativesDataSink
from ..interfaces.harmonize import ApplyHarmonizer, TrainHarmonizer
from ..interfaces.registration import RegisterMaps
from ..study import StudyPlan, check_voxel_sizes, first_runs, plan_study, rescan_partner
from ..utils.bids import DWIScan
from .dki import init_scan_wf
from .evaluation import init_comparators_node, init_evaluation_wf

#: Sidecar description of the linear baseline's maps (``--comparators linear``).
LINEAR_DESC = (
    "linear baseline: per-map least-squares regression from the scan's own DKI map to the "
    "reference scanner's, fitted on the network's training voxels (dkiharm)"
)


def _node_name(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def _pick_reference(snr_files, override):
    """Nipype Function: the reference scanner from all scans' SNR tables."""
    import logging

    from dkiharm_nipype.study import choose_reference

    reference, table = choose_reference(snr_files, override or None)
    logging.getLogger("nipype.workflow").warning(
        "SNR table:\n%s\nreference scanner: %s", table, reference
    )
    return reference


def _select_moving(
    reference,
    scanner,
    own_fa,
    own_maps,
    own_mask,
    cand_scanners,
    cand_fa,
    cand_maps,
    cand_masks,
    engine,
    partner_fa=None,
    partner_maps=None,
    partner_mask=None,
):
    """Nipype Function: what to register into a training scan's space.

    For a scan of the reference scanner: the subject's other run on it (``partner_*``, given
    for ``rescan`` labels), else its own maps (engine ``none``). Otherwise the reference
    scanner's first-run maps of the same subject.
    """
    if scanner == reference:
        if partner_fa:
            return partner_fa, list(partner_maps), partner_mask, engine
        return own_fa, list(own_maps), own_mask, "none"
    idx = list(cand_scanners).index(reference)
    return cand_fa[idx], list(cand_maps[idx]), cand_masks[idx], engine


def _write_plan(plan_json, reference):
    """Nipype Function: the study design with the reference chosen at run time."""
    import json
    import os

    plan = json.loads(plan_json)
    plan["reference_scanner"] = reference
    out = os.path.abspath("harmonization.json")
    with open(out, "w") as fh:
        json.dump(plan, fh, indent=2)
    return out


def _plan_json(plan: StudyPlan, config: RunConfig, engine: str) -> str:
    return json.dumps(
        {
            "scanners": plan.scanners,
            "traveling_subjects": [f"sub-{s}" for s in plan.traveling],
            "training_subjects": [f"sub-{s}" for s in plan.training],
            "test_subjects": [f"sub-{s}" for s in plan.testing],
            "reference_rule": (
                "--reference-scanner"
                if plan.reference
                else "highest mean white-matter SNR (b0 mean / noise SD)"
            ),
            "registration": engine,
            "reference_labels": config.reference_labels,
            "epochs": config.epochs,
            "samples_per_epoch": config.samples_per_epoch,
            "kernel_size": config.kernel_size,
            "seed": config.seed,
        }
    )


def init_group_wf(
    *, scans: list[DWIScan], staging_dir: Path, config: RunConfig, name: str = "dkiharm_wf"
) -> pe.Workflow:
    """Build the whole harmonization graph for the selected scans.

    Parameters
    ----------
    scans : list of DWIScan
        Every selected scan of every participant and scanner.
    staging_dir : Path
        Derivatives root the sinks write into (published when the run succeeds).
    config : RunConfig
        The run's options (only this factory and :mod:`.base` read it).
    name : str
        Workflow name; the same as the participant level's so caches are shared.

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> from dkiharm_nipype.config import RunConfig
    >>> scans = collect_scans(load_layout(bids_dir), session_label=["C", "D"])
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="group", work_dir=Path("work"), preproc="mrtrix",
    ...                    registration="dipy-syn", epochs=20, reference_scanner="D",
    ...                    kernel_size=5)
    >>> group_wf = init_group_wf(scans=scans, staging_dir=Path("staging"), config=config)
    >>> names = group_wf.list_node_names()
    >>> sorted(n for n in names if n in ("reference", "plan", "train_C", "train_D"))
    ['plan', 'reference', 'train_C', 'train_D']
    >>> train_c = group_wf.get_node("train_C").inputs
    >>> train_c.epochs, train_c.kernel_size
    (20, 5)

    Nested in a larger workflow, a step of your own can wait for a trained network:

    >>> wf = pe.Workflow(name="my_study")
    >>> notify = pe.Node(niu.IdentityInterface(fields=["weights"]), name="notify")
    >>> wf.connect(group_wf, "train_C.weights_file", notify, "weights")
    >>> "notify" in wf.list_node_names()
    True
    """
    from ..registration import resolve_engine

    check_voxel_sizes(scans)
    engine = resolve_engine(config.registration)
    plan = plan_study(
        scans,
        reference=config.reference_scanner,
        train_participants=config.train_participants,
        seed=config.seed,
    )
    workflow = pe.Workflow(name=name)
    omp = config.execution.omp_nthreads

    scan_wfs = {}
    for scan in scans:
        scan_wfs[scan.key] = init_scan_wf(
            scan=scan,
            staging_dir=staging_dir,
            preproc=config.preproc,
            denoiser=config.denoiser,
            mask_method=config.mask_method,
            fit_method=config.fit_method,
            b_max=config.b_max,
            snr_roi=config.snr_roi,
            omp_nthreads=omp,
            name=_node_name(f"{scan.key}_wf"),
        )

    merge_snr = pe.Node(niu.Merge(len(scans)), name="merge_snr", run_without_submitting=True)
    reference = pe.Node(
        niu.Function(
            function=_pick_reference,
            input_names=["snr_files", "override"],
            output_names=["reference"],
        ),
        name="reference",
    )
    reference.inputs.override = config.reference_scanner or ""
    workflow.connect(
        [
            (scan_wfs[s.key], merge_snr, [("outputnode.snr_tsv", f"in{i}")])
            for i, s in enumerate(scans, 1)
        ]
    )
    workflow.connect(merge_snr, "out", reference, "snr_files")

    plan_node = pe.Node(
        niu.Function(
            function=_write_plan, input_names=["plan_json", "reference"], output_names=["out_file"]
        ),
        name="plan",
    )
    plan_node.inputs.plan_json = _plan_json(plan, config, engine)
    ds_plan = pe.Node(
        DerivativesDataSink(base_directory=str(staging_dir), rel_path="models/harmonization.json"),
        name="ds_plan",
        run_without_submitting=True,
    )
    workflow.connect(
        [
            (reference, plan_node, [("reference", "reference")]),
            (plan_node, ds_plan, [("out_file", "in_file")]),
        ]
    )

    # --- labels: reference maps registered into every training scan --------------------
    firsts = first_runs(scans)
    training_scans = [s for s in scans if s.subject in plan.training]
    labels: dict[str, pe.Workflow] = {}
    for scan in training_scans:
        cands = [firsts[scan.subject, sc] for sc in plan.scanners]
        tag = _node_name(scan.key)
        merge_fa = pe.Node(
            niu.Merge(len(cands)), name=f"cand_fa_{tag}", run_without_submitting=True
        )
        merge_maps = pe.Node(
            niu.Merge(len(cands), no_flatten=True),
            name=f"cand_maps_{tag}",
            run_without_submitting=True,
        )
        merge_masks = pe.Node(
            niu.Merge(len(cands)), name=f"cand_masks_{tag}", run_without_submitting=True
        )
        select = pe.Node(
            niu.Function(
                function=_select_moving,
                input_names=[
                    "reference",
                    "scanner",
                    "own_fa",
                    "own_maps",
                    "own_mask",
                    "cand_scanners",
                    "cand_fa",
                    "cand_maps",
                    "cand_masks",
                    "engine",
                    "partner_fa",
                    "partner_maps",
                    "partner_mask",
                ],
                output_names=["moving_fa", "moving_maps", "moving_mask", "engine"],
            ),
            name=f"select_{tag}",
            run_without_submitting=True,
        )
        partner = rescan_partner(scan, scans) if config.reference_labels == "rescan" else None
        if partner is not None:  # used only if this scan's scanner turns out the reference
            workflow.connect(
                [
                    (
                        scan_wfs[partner.key],
                        select,
                        [
                            ("outputnode.fa_file", "partner_fa"),
                            ("outputnode.maps", "partner_maps"),
                            ("outputnode.mask_file", "partner_mask"),
                        ],
                    )
                ]
            )
        select.inputs.scanner = scan.scanner
        select.inputs.cand_scanners = list(plan.scanners)
        select.inputs.engine = engine
        register = init_labels_wf(
            engine=engine, omp_nthreads=omp, seed=config.seed, name=f"labels_{tag}_wf"
        )
        labels[scan.key] = register
        for i, cand in enumerate(cands, 1):
            workflow.connect(
                [
                    (scan_wfs[cand.key], merge_fa, [("outputnode.fa_file", f"in{i}")]),
                    (scan_wfs[cand.key], merge_maps, [("outputnode.maps", f"in{i}")]),
                    (scan_wfs[cand.key], merge_masks, [("outputnode.mask_file", f"in{i}")]),
                ]
            )
        workflow.connect(
            [
                (reference, select, [("reference", "reference")]),
                (
                    scan_wfs[scan.key],
                    select,
                    [
                        ("outputnode.fa_file", "own_fa"),
                        ("outputnode.maps", "own_maps"),
                        ("outputnode.mask_file", "own_mask"),
                    ],
                ),
                (merge_fa, select, [("out", "cand_fa")]),
                (merge_maps, select, [("out", "cand_maps")]),
                (merge_masks, select, [("out", "cand_masks")]),
                (
                    select,
                    register,
                    [
                        ("moving_fa", "inputnode.moving_image"),
                        ("moving_maps", "inputnode.moving_maps"),
                        ("moving_mask", "inputnode.moving_mask"),
                        ("engine", "inputnode.engine"),
                    ],
                ),
                (scan_wfs[scan.key], register, [("outputnode.fa_file", "inputnode.fixed_image")]),
            ]
        )

    # --- one network per scanner ----------------------------------------------------------
    models = {}
    for scanner in plan.scanners:
        train_scans = [s for s in training_scans if s.scanner == scanner]
        n = len(train_scans)
        # every scan's own fit: the dwi+fit input and the linear baseline (model selection)
        keys = ("dwi", "bval", "bvec", "mask", "labels", "support", "fit")
        fields = {
            k: pe.Node(
                niu.Merge(n, no_flatten=(k in ("labels", "fit"))),
                name=f"train_{k}_{_node_name(scanner)}",
                run_without_submitting=True,
            )
            for k in keys
        }
        train = pe.Node(
            TrainHarmonizer(
                scanner=scanner,
                epochs=config.epochs,
                seed=config.seed,
                device=config.device,
                samples_per_epoch=config.samples_per_epoch,
                network_input=config.network_input,
                kernel_size=config.kernel_size,
                out_name=f"scanner-{scanner}",
                subject_ids=[s.key for s in train_scans],
                num_threads=omp,
            ),
            name=f"train_{_node_name(scanner)}",
            n_procs=omp,
            mem_gb=4,
        )
        if all(s.sidecar for s in train_scans):  # echo times for the protocol fingerprint
            train.inputs.sidecar_files = [str(s.sidecar) for s in train_scans]
        models[scanner] = train
        for i, scan in enumerate(train_scans, 1):
            workflow.connect(
                [
                    (scan_wfs[scan.key], fields["dwi"], [("outputnode.dwi_file", f"in{i}")]),
                    (scan_wfs[scan.key], fields["bval"], [("outputnode.bval_file", f"in{i}")]),
                    (scan_wfs[scan.key], fields["bvec"], [("outputnode.bvec_file", f"in{i}")]),
                    (scan_wfs[scan.key], fields["mask"], [("outputnode.mask_file", f"in{i}")]),
                    (
                        labels[scan.key],
                        fields["labels"],
                        [("outputnode.registered_maps", f"in{i}")],
                    ),
                    (
                        labels[scan.key],
                        fields["support"],
                        [("outputnode.support_mask", f"in{i}")],
                    ),
                ]
            )
            workflow.connect(scan_wfs[scan.key], "outputnode.maps", fields["fit"], f"in{i}")
        workflow.connect(
            [
                (fields["dwi"], train, [("out", "dwi_files")]),
                (fields["bval"], train, [("out", "bval_files")]),
                (fields["bvec"], train, [("out", "bvec_files")]),
                (fields["mask"], train, [("out", "mask_files")]),
                (fields["labels"], train, [("out", "label_files")]),
                (fields["support"], train, [("out", "label_mask_files")]),
                (fields["fit"], train, [("out", "fit_files")]),
            ]
        )
        for kind, rel in (
            ("weights_file", f"models/scanner-{scanner}_harmonizer.safetensors"),
            ("card_file", f"models/scanner-{scanner}_harmonizer.json"),
            ("log_file", f"models/scanner-{scanner}_training.tsv"),
        ):
            ds = pe.Node(
                DerivativesDataSink(base_directory=str(staging_dir), rel_path=rel),
                name=f"ds_{kind.split('_')[0]}_{_node_name(scanner)}",
                run_without_submitting=True,
            )
            workflow.connect(train, kind, ds, "in_file")

    # --- harmonized maps of every scan ---------------------------------------------------
    applied = {}
    for scan in scans:
        apply = applied[scan.key] = init_apply_wf(
            scan=scan,
            staging_dir=staging_dir,
            config=config,
            name=f"harmonize_{_node_name(scan.key)}_wf",
        )
        workflow.connect(
            [
                (
                    scan_wfs[scan.key],
                    apply,
                    [
                        ("outputnode.dwi_file", "inputnode.dwi_file"),
                        ("outputnode.bval_file", "inputnode.bval_file"),
                        ("outputnode.bvec_file", "inputnode.bvec_file"),
                        ("outputnode.mask_file", "inputnode.mask_file"),
                        ("outputnode.maps", "inputnode.fit_files"),
                    ],
                ),
                (
                    models[scan.scanner],
                    apply,
                    [
                        ("weights_file", "inputnode.weights_file"),
                        ("card_file", "inputnode.card_file"),
                    ],
                ),
            ]
        )

    # --- evaluation of the test subjects and the HTML report ------------------------------
    evaluated = [s for s in scans if s.subject in plan.testing] or scans
    evaluation = init_evaluation_wf(
        scans=evaluated, staging_dir=staging_dir, config=config, engine=engine,
        held_out=bool(plan.testing),
    )  # fmt: skip
    n = len(evaluated)
    flat = ("masks", "dwis", "bvals", "bvecs")
    gathered = {
        key: pe.Node(
            niu.Merge(n, no_flatten=key not in flat),
            name=f"eval_{key}",
            run_without_submitting=True,
        )
        for key in ("before", "dl", "linear", *flat)
    }
    own = {"before": "maps", "masks": "mask_file", "dwis": "dwi_file", "bvals": "bval_file",
           "bvecs": "bvec_file"}  # fmt: skip
    for i, scan in enumerate(evaluated, 1):
        workflow.connect(
            [(scan_wfs[scan.key], gathered[k], [(f"outputnode.{o}", f"in{i}")])
             for k, o in own.items()]
            + [(applied[scan.key], gathered[k], [(f"outputnode.{k2}", f"in{i}")])
               for k, k2 in (("dl", "maps"), ("linear", "linear"))]
        )  # fmt: skip
    cards = pe.Node(niu.Merge(len(models)), name="eval_cards", run_without_submitting=True)
    workflow.connect(
        [(train, cards, [("card_file", f"in{i}")]) for i, train in enumerate(models.values(), 1)]
        + [(cards, evaluation, [("out", "inputnode.cards")])]
    )
    workflow.connect(
        [(gathered[k], evaluation, [("out", f"inputnode.{k}")]) for k in gathered]
        + [
            (reference, evaluation, [("reference", "inputnode.reference")]),
            (merge_snr, evaluation, [("out", "inputnode.snr_files")]),
        ]
    )
    if config.experiments:
        _add_experiments(workflow, scans, scan_wfs, plan, reference, evaluation, staging_dir,
                         config, engine)  # fmt: skip
    if set(config.comparators) & {"combat", "rish"}:
        compare = init_comparators_node(
            scans=scans, evaluated=evaluated, config=config, engine=engine, training=plan.training
        )
        everything = {
            key: pe.Node(
                niu.Merge(len(scans), no_flatten=key == "maps"),
                name=f"all_{key}",
                run_without_submitting=True,
            )
            for key in ("dwis", "bvals", "bvecs", "masks", "maps")
        }
        outputs = {"dwis": "dwi_file", "bvals": "bval_file", "bvecs": "bvec_file",
                   "masks": "mask_file", "maps": "maps"}  # fmt: skip
        for i, scan in enumerate(scans, 1):
            workflow.connect(
                [(scan_wfs[scan.key], everything[k], [(f"outputnode.{o}", f"in{i}")])
                 for k, o in outputs.items()]
            )  # fmt: skip
        workflow.connect(
            [(everything[k], compare, [("out", k)]) for k in everything]
            + [
                (reference, compare, [("reference", "reference")]),
                (compare, evaluation, [("combat", "inputnode.combat"),
                                       ("rish", "inputnode.rish")]),
            ]
        )  # fmt: skip
    return workflow


def init_labels_wf(
    *, engine: str = "auto", omp_nthreads: int = 1, seed: int = 0, name: str = "labels_wf"
) -> pe.Workflow:
    """Register reference DKI maps into a target scan's DWI space (training labels).

    With an open engine the pair's engine comes in through ``inputnode.engine``, so that a
    reference-scanner scan labelled with its own fit skips registration (``none``); with
    FNIRT the FSL graph of :func:`.registration.init_label_registration_wf` is used.

    Inputs
    ------
    fixed_image
        The target scan's FA map (defines the label grid).
    moving_image, moving_maps, moving_mask
        The reference scan's FA, its eight maps and brain mask.
    engine
        Registration engine for this pair (``none``: keep the maps as they are).

    Outputs
    -------
    registered_maps
        The eight maps on the fixed grid, in ``ALL_METRICS`` order.
    support_mask
        Where those maps were interpolated from reference-brain voxels only (the voxels
        the network may be trained on).

    Examples
    --------
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> pair = pe.Node(niu.IdentityInterface(fields=["target_fa", "ref_fa", "ref_maps",
    ...                                              "ref_mask"]), name="pair")
    >>> labels_wf = init_labels_wf(engine="dipy-syn")
    >>> labels_wf.inputs.inputnode.engine = "dipy-syn"
    >>> wf.connect([(pair, labels_wf, [
    ...     ("target_fa", "inputnode.fixed_image"), ("ref_fa", "inputnode.moving_image"),
    ...     ("ref_maps", "inputnode.moving_maps"), ("ref_mask", "inputnode.moving_mask")])])
    >>> sorted(labels_wf.list_node_names())
    ['inputnode', 'outputnode', 'register']
    """
    from ..registration import resolve_engine
    from .registration import init_label_registration_wf

    engine = resolve_engine(engine)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["fixed_image", "moving_image", "moving_maps", "moving_mask", "engine"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["registered_maps", "support_mask"]), name="outputnode"
    )
    if engine == "fnirt":
        register = init_label_registration_wf(
            engine="fnirt", omp_nthreads=omp_nthreads, seed=seed, name="fnirt_wf"
        )
        workflow.connect(
            [
                (
                    inputnode,
                    register,
                    [
                        (f, f"inputnode.{f}")
                        for f in ("fixed_image", "moving_image", "moving_maps", "moving_mask")
                    ],
                ),
                (
                    register,
                    outputnode,
                    [
                        ("outputnode.registered_maps", "registered_maps"),
                        ("outputnode.support_mask", "support_mask"),
                    ],
                ),
            ]
        )
        return workflow
    register = pe.Node(
        RegisterMaps(num_threads=omp_nthreads, seed=seed),
        name="register",
        n_procs=omp_nthreads,
        mem_gb=2,
    )
    workflow.connect(
        [
            (
                inputnode,
                register,
                [
                    ("fixed_image", "fixed_image"),
                    ("moving_image", "moving_image"),
                    ("moving_maps", "moving_maps"),
                    ("moving_mask", "moving_mask"),
                    ("engine", "engine"),
                ],
            ),
            (
                register,
                outputnode,
                [
                    ("registered_maps", "registered_maps"),
                    ("support_mask", "support_mask"),
                ],
            ),
        ]
    )
    return workflow


def init_apply_wf(
    *, scan: DWIScan, staging_dir: Path, config: RunConfig, name: str = "harmonize_wf"
) -> pe.Workflow:
    """Harmonized maps (and MC-dropout standard deviations) of one scan, stored as BIDS.

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask_file
        The preprocessed scan.
    weights_file, card_file
        The scanner's trained network.

    Examples
    --------
    ``bids_dir`` is the root of a BIDS dataset, e.g. ``dkiharm-phantom DIR --preset tiny``:

    >>> from dkiharm_nipype.utils.bids import collect_scans, load_layout
    >>> from dkiharm_nipype.config import RunConfig
    >>> scan = collect_scans(load_layout(bids_dir), participant_label=["02"],
    ...                      session_label=["C"])[0]
    >>> config = RunConfig(bids_dir=Path(bids_dir), output_dir=Path("out"),
    ...                    analysis_level="participant", work_dir=Path("work"), mc_samples=10)
    >>> apply_wf = init_apply_wf(scan=scan, staging_dir=Path("staging"), config=config)
    >>> apply_wf.inputs.inputnode.weights_file = "models/scanner-C_harmonizer.safetensors"
    >>> apply_wf.inputs.inputnode.card_file = "models/scanner-C_harmonizer.json"
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> preproc = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec", "mask"]),
    ...                   name="preproc")
    >>> wf.connect([(preproc, apply_wf, [
    ...     ("dwi", "inputnode.dwi_file"), ("bval", "inputnode.bval_file"),
    ...     ("bvec", "inputnode.bvec_file"), ("mask", "inputnode.mask_file")])])
    >>> sinks = [n for n in apply_wf.list_node_names() if n.startswith("ds_")]
    >>> len(sinks), sorted(sinks)[:2]  # eight maps and, with MC dropout, eight std maps
    (16, ['ds_harmonized_ad', 'ds_harmonized_ak'])
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "dwi_file",
                "bval_file",
                "bvec_file",
                "mask_file",
                "fit_files",
                "weights_file",
                "card_file",
            ]
        ),
        name="inputnode",
    )
    apply = pe.Node(
        ApplyHarmonizer(
            mc_samples=config.mc_samples,
            device=config.device,
            seed=config.seed,
            num_threads=config.execution.omp_nthreads,
        ),
        name="apply",
        n_procs=config.execution.omp_nthreads,
        mem_gb=2,
    )
    if scan.sidecar:
        apply.inputs.sidecar_file = str(scan.sidecar)
    model = {  # BEP016 Model object: the network stands in for the reference scanner's fit
        "Description": "DKI map harmonized to the reference scanner: predicted from this "
        "scan by the scanner's 3-D hierarchical CNN, or, for a map where the CNN did not beat "
        "it on held-out blocks, by the linear baseline (the model card says which; dkiharm)",
        "FitMethod": "CNN harmonizer",
        "Parameters": {"Scanner": scan.scanner, "MCDropoutSamples": config.mc_samples},
    }
    workflow.connect(
        [
            (
                inputnode,
                apply,
                [
                    ("dwi_file", "dwi_file"),
                    ("bval_file", "bval_file"),
                    ("bvec_file", "bvec_file"),
                    ("mask_file", "mask_file"),
                    ("fit_files", "fit_files"),
                    ("weights_file", "weights_file"),
                    ("card_file", "card_file"),
                ],
            )
        ]
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["maps", "linear"]), name="outputnode")
    merge = pe.Node(niu.Merge(len(ALL_METRICS)), name="merge_maps", run_without_submitting=True)
    workflow.connect(
        [(apply, merge, [(f"out_{p}", f"in{i}") for i, p in enumerate(ALL_METRICS, 1)]),
         (merge, outputnode, [("out", "maps")]),
         (apply, outputnode, [("linear_files", "linear")])]
    )  # fmt: skip
    descs = [("out", "harmonized")] + ([("std", "harmonizedstd")] if config.mc_samples else [])
    descs += [("linear", "linear")] if "linear" in config.comparators else []
    for kind, desc in descs:
        for i, param in enumerate(ALL_METRICS):
            ds = pe.Node(
                DerivativesDataSink(
                    base_directory=str(staging_dir),
                    source_file=str(scan.dwi),
                    space="dwi",
                    model="dki",
                    param=param,
                    desc=desc,
                    meta_dict=harmonized_sidecar(param, model, std=kind == "std")
                    if kind != "linear"
                    else {
                        **harmonized_sidecar(param, model),
                        "Description": LINEAR_DESC,
                        "Model": {
                            **model,
                            "Description": LINEAR_DESC,
                            "FitMethod": "linear baseline (per-map least squares)",
                        },
                    },  # fmt: skip
                ),
                name=f"ds_{desc}_{param}",
                run_without_submitting=True,
            )
            if kind == "linear":
                workflow.connect(apply, ("linear_files", _pick, i), ds, "in_file")
            else:
                workflow.connect(apply, f"{kind}_{param}", ds, "in_file")
    return workflow


def _pick(files, index):
    """Nipype connection function: one file of a list."""
    return files[index]


def _add_experiments(workflow, scans, scan_wfs, plan, reference, evaluation, staging_dir,
                     config, engine) -> None:  # fmt: skip
    """The ``--experiment`` runs on the traveling subjects; their tables feed the report."""
    from ..evaluation.experiments import find_tissue_files
    from ..study import StudyDesignError
    from .experiments import init_experiment_wf

    exp_scans = [s for s in scans if s.subject in plan.traveling]
    n = len(exp_scans)
    fields = {"dwi_files": "dwi_file", "bval_files": "bval_file", "mask_files": "mask_file",
              "map_files": "maps"}  # fmt: skip
    merges = {
        k: pe.Node(
            niu.Merge(n, no_flatten=k == "map_files"),
            name=f"exp_{k}",
            run_without_submitting=True,
        )
        for k in fields
    }
    for i, scan in enumerate(exp_scans, 1):
        workflow.connect(
            [(scan_wfs[scan.key], merges[k], [(f"outputnode.{o}", f"in{i}")])
             for k, o in fields.items()]
        )  # fmt: skip
    tables = pe.Node(
        niu.Merge(len(config.experiments)), name="exp_tables", run_without_submitting=True
    )
    for j, name in enumerate(config.experiments, 1):
        exp_wf = init_experiment_wf(
            experiment=name,
            engine=engine,
            seed=config.seed,
            epochs=config.epochs,
            samples_per_epoch=config.samples_per_epoch,
            device=config.device,
            network_input=config.network_input,
            kernel_size=config.kernel_size,
            reference_labels=config.reference_labels,
            omp_nthreads=config.execution.omp_nthreads,
            staging_dir=staging_dir,
            rel_dir="evaluation",
            name=f"experiment_{name}_wf",
        )
        exp_wf.inputs.inputnode.subjects = [s.subject for s in exp_scans]
        exp_wf.inputs.inputnode.scanners = [s.scanner for s in exp_scans]
        exp_wf.inputs.inputnode.runs = [
            str(s.run) if s.run is not None else "1" for s in exp_scans
        ]
        if name == "tissue" and config.tissue_maps:  # else each scan's own segmentation
            source = config.tissue_maps
            tissues = [find_tissue_files(source, s.subject, s.session, s.run) for s in exp_scans]
            lacking = [s for s, t in zip(exp_scans, tissues, strict=True) if not t]
            if lacking:
                raise StudyDesignError(
                    f"--tissue-maps {source} has no SGM (or GM) and CSF probability map of "
                    f"{lacking[0].dwi.name} ({len(lacking)} scan(s) lack them); give one "
                    "*_label-SGM|GM|CSF_probseg.nii.gz per scan, in its DWI space."
                )
            exp_wf.inputs.inputnode.sgm_files = [str(t["SGM"]) for t in tissues]
            exp_wf.inputs.inputnode.csf_files = [str(t["CSF"]) for t in tissues]
        workflow.connect(
            [(merges[k], exp_wf, [("out", f"inputnode.{k}")]) for k in merges]
            + [
                (reference, exp_wf, [("reference", "inputnode.reference")]),
                (exp_wf, tables, [("outputnode.tsv", f"in{j}")]),
            ]
        )
    workflow.connect(tables, "out", evaluation, "inputnode.experiment_tsvs")


def harmonized_sidecar(param: str, model: dict, *, std: bool = False) -> dict:
    """Sidecar of a harmonized map (or of its MC-dropout standard deviation)."""
    from ..dki.provenance import MAP_DESCRIPTIONS, MAP_UNITS

    what = MAP_DESCRIPTIONS[param] + ", harmonized to the reference scanner"
    return {
        "Description": f"MC-dropout standard deviation of the {what}" if std else what,
        "Units": MAP_UNITS.get(param, "dimensionless"),
        "Model": model,
    }
