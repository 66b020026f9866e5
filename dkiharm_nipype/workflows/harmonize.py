"""Group level, in named pieces: reference, training labels, training, harmonized maps.

:func:`dkiharm_nipype.workflows.base.init_group_wf` joins them (paper, Fig. 1):

1. every scan is preprocessed and fitted (:func:`~.dki.init_scan_wf`, shared with the
   participant level, so a group run reuses a participant run's cache);
2. :func:`init_reference_wf` reads every scan's SNR and picks the reference scanner (the
   highest mean white-matter SNR, or ``--reference-scanner``) and writes the study design;
3. :func:`init_training_labels_wf`, once per training scan, registers the reference
   scanner's maps of the same subject into the scan's DWI space;
4. :func:`init_training_wf`, once per scanner, trains that scanner's network;
5. :func:`init_apply_wf`, once per scan, turns the scan into harmonized maps;
6. :func:`~.evaluation.init_evaluation_wf` scores the test subjects and writes the report.

Each factory sets its own ``__desc__`` (the methods text of what it was built to do).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dki.maps import ALL_METRICS
from ..interfaces.harmonize import ApplyHarmonizer, TrainHarmonizer
from ..interfaces.registration import RegisterMaps
from ..study import TRAIN_FRACTION
from .literate import LiterateWorkflow
from .outputs import init_harmonized_derivatives_wf, init_model_derivatives_wf

#: How each label-registration engine is named in the methods text.
ENGINE_TEXT = {
    "fnirt": "FSL FLIRT (12 degrees of freedom) followed by FNIRT [@andersson2007; "
    "@jenkinson2012], as in the original method",
    "dipy-syn": "an affine registration followed by symmetric normalization (SyN) with a "
    "local cross-correlation metric [@avants2008] as implemented in dipy [@dipy]",
    "mrtrix": "MRtrix3 mrregister (rigid, affine then symmetric diffeomorphic "
    "non-linear registration) [@raffelt2011; @tournier2019]",
    "ants": "ANTs SyN [@avants2011]",
}

#: The selector's inputs: the scan's own maps, the same subject's first run on every scanner
#: (``cand_*``, in ``cand_scanners`` order) and its rescan partner (``partner_*``).
SELECT_INPUTS = [
    "reference", "scanner", "own_fa", "own_maps", "own_mask", "cand_scanners", "cand_fa",
    "cand_maps", "cand_masks", "engine", "partner_fa", "partner_maps", "partner_mask",
]  # fmt: skip


def node_name(text: str) -> str:
    """``text`` with every character Nipype refuses in a node name replaced by ``_``."""
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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


def _split_sentence(plan: dict, chosen: bool) -> str:
    training, traveling, seed = plan["training_subjects"], plan["traveling_subjects"], plan["seed"]
    verb = "was" if len(training) == 1 else "were"
    if chosen:
        return (
            f"{_count(len(training), 'traveling subject')} ({', '.join(training)}) {verb} "
            "used for training"
        )
    if traveling:
        return (
            f"{len(training)} of the {len(traveling)} traveling subjects "
            f"({', '.join(training)}, drawn at random with seed {seed}) {verb} used for training"
        )
    return (
        f"{TRAIN_FRACTION * 100:g} % of the traveling subjects (participants scanned on every "
        f"scanner), drawn at random with seed {seed}, were used for training"
    )


def init_reference_wf(
    *, plan: dict, override: str | None = None, chosen: bool = False, name: str = "reference_wf"
) -> pe.Workflow:
    """Choose the reference scanner from every scan's SNR and write the study design.

    Parameters
    ----------
    plan : dict
        The study design (scanners, traveling, training and test subjects, options), as
        written to ``models/harmonization.json`` with the reference added at run time.
    override : str, optional
        ``--reference-scanner``: this scanner, whatever the SNR.
    chosen : bool
        Whether the training subjects were named (``--train-participants``) rather than
        drawn with the seed (methods text).
    name : str
        Workflow name.

    Inputs
    ------
    snr_files
        Every scan's one-row SNR table.

    Outputs
    -------
    reference
        The reference scanner.
    plan_file
        ``harmonization.json``.

    Examples
    --------
    >>> plan = {"training_subjects": ["sub-01"], "traveling_subjects": ["sub-01", "sub-02"],
    ...         "seed": 0}
    >>> reference_wf = init_reference_wf(plan=plan)
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> qc = pe.Node(niu.IdentityInterface(fields=["snr_tables"]), name="qc")
    >>> wf.connect(qc, "snr_tables", reference_wf, "inputnode.snr_files")
    >>> sorted(reference_wf.list_node_names())
    ['inputnode', 'outputnode', 'plan', 'reference']
    >>> "highest mean white-matter SNR" in reference_wf.__desc__
    True
    """
    import json

    workflow = LiterateWorkflow(name=name)
    ref = (
        f"Scanner {override} was chosen as the reference scanner."
        if override
        else "The scanner with the highest mean white-matter SNR was chosen as the reference "
        "scanner [@tong2020]."
    )
    split = _split_sentence(plan, chosen)
    workflow.__desc__ = (
        "\n\nDKI maps were harmonized across scanners with the deep-learning method of "
        f"@tong2020. {ref} {split[0].upper() + split[1:]}, the others serving as test subjects."
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["snr_files"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["reference", "plan_file"]), name="outputnode"
    )
    reference = pe.Node(
        niu.Function(function=_pick_reference, input_names=["snr_files", "override"],
                     output_names=["reference"]),
        name="reference",
    )  # fmt: skip
    reference.inputs.override = override or ""
    plan_node = pe.Node(
        niu.Function(function=_write_plan, input_names=["plan_json", "reference"],
                     output_names=["out_file"]),
        name="plan",
    )  # fmt: skip
    plan_node.inputs.plan_json = json.dumps(plan)
    workflow.connect([
        (inputnode, reference, [("snr_files", "snr_files")]),
        (reference, plan_node, [("reference", "reference")]),
        (reference, outputnode, [("reference", "reference")]),
        (plan_node, outputnode, [("out_file", "plan_file")]),
    ])  # fmt: skip
    return workflow


def _labels_desc(engine: str, reference_labels: str) -> str:
    if reference_labels == "rescan":
        own = (
            "each scan of the reference scanner was labelled with the same subject's other "
            "run on that scanner, so that its network, too, learned the maps from "
            "independently noisy labels rather than to reproduce its input [@lehtinen2018] "
            "(scans without a repeat kept their own maps)"
        )
    else:
        own = "the reference scanner's own scans kept their own maps"
    if engine == "none":
        return (
            " The scans were already aligned on one voxel grid, so the reference maps were "
            f"used as labels without registration; {own}."
        )
    return (
        " The reference scanner's IRLLS DKI maps of each training subject were registered "
        "non-linearly into the DWI space of that subject's scans on every other scanner "
        f"with {ENGINE_TEXT[engine]}, giving voxel-aligned training labels; {own}. "
        "Voxels whose labels were interpolated partly from outside the reference brain "
        "mask were not trained on."
    )


def init_training_labels_wf(
    *,
    scanner: str,
    scanners: list[str],
    engine: str,
    reference_labels: str = "rescan",
    omp_nthreads: int = 1,
    seed: int = 0,
    name: str = "labels_wf",
) -> pe.Workflow:
    """The labels of one training scan: the reference scanner's maps in the scan's space.

    ``select`` decides, once the reference is known, what labels the scan: for a scan of
    another scanner, the reference scanner's first-run maps of the same subject, registered;
    for a scan of the reference scanner, its rescan partner's maps (``rescan`` labels,
    registered) or its own maps (unregistered). The registration is
    :class:`~dkiharm_nipype.interfaces.registration.RegisterMaps` (its engine given per
    pair, ``none`` for a scan's own maps) or, with ``engine="fnirt"``, FSL's graph of
    :func:`~dkiharm_nipype.workflows.registration.init_label_registration_wf`.

    Parameters
    ----------
    scanner : str
        The training scan's scanner.
    scanners : list of str
        Every scanner, the order of the ``cand_*`` inputs.
    engine : str
        Resolved registration engine (:func:`dkiharm_nipype.registration.resolve_engine`).
    reference_labels : {"rescan", "fit"}
        What labels a reference-scanner scan (methods text; the partner is wired by the
        caller only for ``rescan``).
    omp_nthreads, seed : int
        Threads and seed of the registration.
    name : str
        Workflow name.

    Inputs
    ------
    reference
        The reference scanner.
    own_fa, own_maps, own_mask
        The training scan's FA, eight maps and brain mask (``own_fa`` is the fixed image).
    cand_fa, cand_maps, cand_masks
        The same subject's first run on each of ``scanners``.
    partner_fa, partner_maps, partner_mask
        The subject's other run on the same scanner (``rescan`` labels; may stay empty).

    Outputs
    -------
    registered_maps
        The eight label maps on the scan's grid, in ``ALL_METRICS`` order.
    support_mask
        Voxels whose labels come from reference-brain voxels only (trained on).

    Examples
    --------
    >>> labels_wf = init_training_labels_wf(scanner="C", scanners=["C", "D"],
    ...                                     engine="dipy-syn")
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> scan = pe.Node(niu.IdentityInterface(fields=["fa", "maps", "mask"]), name="scan")
    >>> wf.connect([(scan, labels_wf, [("fa", "inputnode.own_fa"), ("maps", "inputnode.own_maps"),
    ...                                ("mask", "inputnode.own_mask")])])
    >>> sorted(labels_wf.list_node_names())
    ['inputnode', 'outputnode', 'register', 'select']
    >>> "symmetric normalization (SyN)" in labels_wf.__desc__
    True
    """
    from .registration import init_label_registration_wf

    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = _labels_desc(engine, reference_labels)
    workflow.__fold__ = "training scan"
    fields = [f for f in SELECT_INPUTS if f not in ("scanner", "cand_scanners", "engine")]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["registered_maps", "support_mask"]), name="outputnode"
    )
    select = pe.Node(
        niu.Function(function=_select_moving, input_names=SELECT_INPUTS,
                     output_names=["moving_fa", "moving_maps", "moving_mask", "engine"]),
        name="select",
        run_without_submitting=True,
    )  # fmt: skip
    select.inputs.scanner = scanner
    select.inputs.cand_scanners = list(scanners)
    select.inputs.engine = engine
    moving = [("moving_fa", "moving_image"), ("moving_maps", "moving_maps"),
              ("moving_mask", "moving_mask")]  # fmt: skip
    results = ["registered_maps", "support_mask"]
    if engine == "fnirt":
        register = init_label_registration_wf(
            engine="fnirt", omp_nthreads=omp_nthreads, seed=seed, name="register"
        )
        into_register = [(a, f"inputnode.{b}") for a, b in moving]
        fixed, out = "inputnode.fixed_image", [(f"outputnode.{f}", f) for f in results]
    else:
        register = pe.Node(RegisterMaps(num_threads=omp_nthreads, seed=seed), name="register",
                           n_procs=omp_nthreads, mem_gb=2)  # fmt: skip
        into_register = [*moving, ("engine", "engine")]
        fixed, out = "fixed_image", [(f, f) for f in results]
    workflow.connect([
        (inputnode, select, [(f, f) for f in fields]),
        (inputnode, register, [("own_fa", fixed)]),
        (select, register, into_register),
        (register, outputnode, out),
    ])  # fmt: skip
    return workflow


def network_sentence(kernel_size: int) -> str:
    """The network, as the methods text names it (hidden sizes from TrainHarmonizer)."""
    d = TrainHarmonizer().inputs
    k = kernel_size
    conv = f"a {k}×{k}×{k} convolution" + (" (the published network's is 3×3×3)" if k != 3 else "")
    return (
        "a three-dimensional hierarchical convolutional neural network [@li2019; @tong2020] "
        f"({conv} followed by 1×1×1 layers of {d.hidden_channels} channels "
        f"with ReLU activations and {d.dropout * 100:g} % dropout before the outputs; a "
        "shallow head predicting MD, AD and RD and a head one layer deeper predicting FA, MK, "
        "AK, RK and KFA)"
    )


def _training_desc(train: TrainHarmonizer) -> str:
    d = train.inputs
    loss = {"mse": "mean squared error", "l1": "mean absolute error"}[d.loss]
    scaling = "z-scored maps" if d.target_scaling == "zscore" else "maps in their units"
    device = "CPU" if d.device == "cpu" else f"GPU ({d.device})"
    fit_input = (
        ", together with the scan's own IRLLS maps (z-scored like the targets), which the "
        "network output plus a learned correction (a residual connection; an extension of "
        "the published network)"
        if d.network_input == "dwi+fit"
        else ""
    )
    return (
        " For each scanner, including the reference scanner, "
        f"{network_sentence(d.kernel_size)} was trained to map the scan's DWIs (divided by the "
        f"mean b=0 signal){fit_input} to the eight reference DKI maps. "
        f"Networks were trained in PyTorch {_version('torch')} [@paszke2019] on the {device} "
        f"with Adam (learning rate {d.learning_rate:g}), a {loss} loss on {scaling}, "
        f"{d.samples_per_epoch:,} training voxels per epoch and at most {d.epochs} "
        f"epochs, with early stopping on the {d.val_fraction * 100:g} % of voxel blocks "
        f"held out for validation (patience {d.patience} epochs) and seed {d.seed}."
        " Beside each network, a linear baseline (per map, a least-squares regression from "
        "the scan's own DKI map to the reference label) was fitted on the same training "
        "voxels; on the held-out validation blocks, each map was harmonized by the network "
        "only where its NRMSE was lower than the baseline's, else by the baseline."
    )


#: What a network trains on: inputnode field -> TrainHarmonizer input.
TRAINING_INPUTS = {
    "dwi_files": "dwi_files", "bval_files": "bval_files", "bvec_files": "bvec_files",
    "mask_files": "mask_files", "label_files": "label_files",
    "label_mask_files": "label_mask_files", "fit_files": "fit_files",
}  # fmt: skip


def init_training_wf(
    *,
    scanner: str,
    subject_ids: list[str],
    sidecar_files: list[str] | None = None,
    epochs: int = 100,
    samples_per_epoch: int = 200_000,
    network_input: str = "dwi",
    kernel_size: int = 3,
    device: str = "cpu",
    seed: int = 0,
    omp_nthreads: int = 1,
    staging_dir: Path | None = None,
    name: str = "train_wf",
) -> pe.Workflow:
    """Train one scanner's network on its training scans and store it.

    Parameters
    ----------
    scanner : str
        The scanner (names the model files ``models/scanner-<scanner>_harmonizer.*``).
    subject_ids : list of str
        The training scans' keys, in input order (recorded in the model card).
    sidecar_files : list of str, optional
        Their BIDS sidecars (echo times for the protocol fingerprint).
    epochs, samples_per_epoch, network_input, kernel_size, device, seed
        See :class:`~dkiharm_nipype.interfaces.harmonize.TrainHarmonizer`.
    omp_nthreads : int
        Torch threads (declared to the scheduler).
    staging_dir : Path, optional
        Derivatives root; the model is stored there
        (:func:`~.outputs.init_model_derivatives_wf`) when given.
    name : str
        Workflow name.

    Inputs
    ------
    dwi_files, bval_files, bvec_files, mask_files
        The training scans, preprocessed.
    label_files, label_mask_files
        Per scan, its eight label maps and where they may be trained on.
    fit_files
        Per scan, its own eight maps: the linear baseline's input (model selection) and,
        with ``network_input="dwi+fit"``, the network's.

    Outputs
    -------
    weights_file, card_file, log_file
        Weights (safetensors), model card (JSON) and training log (TSV).

    Examples
    --------
    >>> train_wf = init_training_wf(scanner="C", subject_ids=["sub-01_ses-C_run-1"],
    ...                             epochs=20, kernel_size=5)
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> data = pe.Node(niu.IdentityInterface(fields=["dwis", "labels"]), name="data")
    >>> wf.connect([(data, train_wf, [("dwis", "inputnode.dwi_files"),
    ...                               ("labels", "inputnode.label_files")])])
    >>> train_wf.get_node("train").inputs.epochs, "at most 20 epochs" in train_wf.__desc__
    (20, True)
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__fold__ = "scanner"
    inputnode = pe.Node(niu.IdentityInterface(fields=list(TRAINING_INPUTS)), name="inputnode")
    outputs = ["weights_file", "card_file", "log_file"]
    outputnode = pe.Node(niu.IdentityInterface(fields=outputs), name="outputnode")
    train = pe.Node(
        TrainHarmonizer(
            scanner=scanner, epochs=epochs, seed=seed, device=device,
            samples_per_epoch=samples_per_epoch, network_input=network_input,
            kernel_size=kernel_size, out_name=f"scanner-{scanner}",
            subject_ids=list(subject_ids), num_threads=omp_nthreads,
        ),
        name="train",
        n_procs=omp_nthreads,
        mem_gb=4,
    )  # fmt: skip
    if sidecar_files:
        train.inputs.sidecar_files = list(sidecar_files)
    workflow.__desc__ = _training_desc(train.interface)
    workflow.connect([
        (inputnode, train, [(f, TRAINING_INPUTS[f]) for f in TRAINING_INPUTS]),
        (train, outputnode, [(f, f) for f in outputs]),
    ])  # fmt: skip
    if staging_dir is not None:
        ds_model_wf = init_model_derivatives_wf(
            scanner=scanner, staging_dir=staging_dir, name="ds_model_wf"
        )
        workflow.connect(train, "weights_file", ds_model_wf, "inputnode.weights_file")
        workflow.connect(train, "card_file", ds_model_wf, "inputnode.card_file")
        workflow.connect(train, "log_file", ds_model_wf, "inputnode.log_file")
    return workflow


def _apply_desc(mc_samples: int, models_dir: Path | None, kernel_size: int) -> str:
    mc = (
        f" Voxelwise uncertainty was estimated as the standard deviation over "
        f"{mc_samples} Monte Carlo dropout passes [@gal2016]."
        if mc_samples
        else ""
    )
    if models_dir is None:
        return (
            " Every scan of every participant was then passed through its scanner's harmonizer "
            f"to obtain harmonized MD, AD, RD, FA, MK, AK, RK and KFA maps.{mc}"
        )
    return (
        "\n\nHarmonized DKI maps were computed with the per-scanner networks of a previous "
        f"group-level run ({Path(models_dir).name}): {network_sentence(kernel_size)}, trained "
        "to reproduce the reference scanner's IRLLS maps from each scanner's DWIs [@tong2020]; "
        "each model was used only for scans matching the protocol it was trained on. "
        f"Inference ran in PyTorch {_version('torch')} [@paszke2019].{mc}"
    )


def init_apply_wf(
    *,
    mc_samples: int = 0,
    device: str = "cpu",
    seed: int = 0,
    omp_nthreads: int = 1,
    sidecar_file: str | None = None,
    source_file: str | None = None,
    scanner: str = "",
    staging_dir: Path | None = None,
    models_dir: Path | None = None,
    kernel_size: int = 3,
    write_linear: bool = False,
    name: str = "harmonize_wf",
) -> pe.Workflow:
    """Harmonized maps (and MC-dropout standard deviations) of one scan, stored as BIDS.

    Parameters
    ----------
    mc_samples, device, seed, omp_nthreads
        See :class:`~dkiharm_nipype.interfaces.harmonize.ApplyHarmonizer`.
    sidecar_file : str, optional
        The scan's BIDS sidecar (checked against the model's protocol fingerprint).
    source_file, scanner, staging_dir
        The raw DWI, its scanner and the derivatives root: the maps are stored
        (:func:`~.outputs.init_harmonized_derivatives_wf`) when all are given.
    models_dir, kernel_size
        For the methods text: the models come from a previous run's ``models_dir`` (the
        participant level with ``--models``), with this kernel size.
    write_linear : bool
        Also store the linear baseline's maps (``desc-linear``; ``--comparators linear``).
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask_file
        The preprocessed scan.
    fit_files
        Its own eight maps (used by ``dwi+fit`` networks).
    weights_file, card_file
        The scanner's trained network.

    Outputs
    -------
    maps
        The eight harmonized maps, in ``ALL_METRICS`` order.
    linear
        The linear baseline's eight maps, in the same order.

    Examples
    --------
    >>> apply_wf = init_apply_wf(mc_samples=10, source_file="sub-02_ses-C_dwi.nii.gz",
    ...                          scanner="C", staging_dir=Path("staging"))
    >>> apply_wf.inputs.inputnode.weights_file = "models/scanner-C_harmonizer.safetensors"
    >>> apply_wf.inputs.inputnode.card_file = "models/scanner-C_harmonizer.json"
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> preproc = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec", "mask"]),
    ...                   name="preproc")
    >>> wf.connect([(preproc, apply_wf, [
    ...     ("dwi", "inputnode.dwi_file"), ("bval", "inputnode.bval_file"),
    ...     ("bvec", "inputnode.bvec_file"), ("mask", "inputnode.mask_file")])])
    >>> sinks = [n for n in apply_wf.list_node_names() if ".ds_" in n]
    >>> len(sinks)  # 8 maps, with MC dropout 8 SDs, and the OOD mask and distance
    18
    """
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = _apply_desc(mc_samples, models_dir, kernel_size)
    workflow.__fold__ = "scan"
    fields = ["dwi_file", "bval_file", "bvec_file", "mask_file", "fit_files", "weights_file",
              "card_file"]  # fmt: skip
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    apply = pe.Node(
        ApplyHarmonizer(mc_samples=mc_samples, device=device, seed=seed,
                        num_threads=omp_nthreads),
        name="apply",
        n_procs=omp_nthreads,
        mem_gb=2,
    )  # fmt: skip
    if sidecar_file:
        apply.inputs.sidecar_file = str(sidecar_file)
    outputnode = pe.Node(niu.IdentityInterface(fields=["maps", "linear"]), name="outputnode")
    merge = pe.Node(niu.Merge(len(ALL_METRICS)), name="merge_maps", run_without_submitting=True)
    workflow.connect([
        (inputnode, apply, [(f, f) for f in fields]),
        (apply, merge, [(f"out_{p}", f"in{i}") for i, p in enumerate(ALL_METRICS, 1)]),
        (merge, outputnode, [("out", "maps")]),
        (apply, outputnode, [("linear_files", "linear")]),
    ])  # fmt: skip
    if source_file and staging_dir is not None:
        ds_harmonized_wf = init_harmonized_derivatives_wf(
            source_file=str(source_file), scanner=scanner, staging_dir=staging_dir,
            mc_samples=mc_samples, linear=write_linear, name="ds_harmonized_wf",
        )  # fmt: skip
        kinds = ["out"] + (["std"] if mc_samples else [])
        fields = [f"{k}_{p}" for k in kinds for p in ALL_METRICS]
        fields += ["ood_mask_file", "ood_distance_file"]  # the OOD flag, stored when made
        workflow.connect([(apply, ds_harmonized_wf, [(f, f"inputnode.{f}") for f in fields])])
        if write_linear:
            workflow.connect(apply, "linear_files", ds_harmonized_wf, "inputnode.linear_files")
    return workflow
