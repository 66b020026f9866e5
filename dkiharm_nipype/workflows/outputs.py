"""Every derivative the pipeline writes, gathered as ``init_*_derivatives_wf`` sinks.

As in fMRIPrep's ``outputs.py``, the processing factories only compute; these factories
store their results with :class:`~dkiharm_nipype.interfaces.bids.DerivativesDataSink`
nodes named ``ds_<what>``, into the run's staging folder (published into ``output_dir``
once the run succeeds). The names follow the BIDS diffusion-derivatives convention
(``..._space-dwi_model-dki_param-mk_dwimap.nii.gz``, see ``docs/outputs.md``).
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..dki.maps import ALL_METRICS
from ..interfaces.bids import DerivativesDataSink, OptionalDerivativesDataSink

#: Participant-level outputs of one scan: inputnode field -> sink name and BIDS entities.
SCAN_OUTPUTS = {
    "dwi_file": ("ds_dwi", {"space": "dwi", "desc": "preproc", "suffix": "dwi"}),
    "bval_file": ("ds_bval", {"space": "dwi", "desc": "preproc", "suffix": "dwi",
                              "extension": ".bval"}),
    "bvec_file": ("ds_bvec", {"space": "dwi", "desc": "preproc", "suffix": "dwi",
                              "extension": ".bvec"}),
    "mask_file": ("ds_mask", {"space": "dwi", "desc": "brain", "suffix": "mask",
                              "meta_dict": {"Type": "Brain"}}),
    "snr_tsv": ("ds_snr", {"desc": "snr", "suffix": "qc", "extension": ".tsv"}),
    "outlier_fraction_file": ("ds_outlierfraction", {"space": "dwi", "model": "dki",
                                                     "param": "outlierfraction"}),
    **{f"{m}_file": (f"ds_{m}", {"space": "dwi", "model": "dki", "param": m})
       for m in ALL_METRICS},
}  # fmt: skip

#: Group-level files of one scanner's network, relative to the derivatives root.
MODEL_OUTPUTS = {
    "weights_file": ("ds_weights", "models/scanner-{scanner}_harmonizer.safetensors"),
    "card_file": ("ds_card", "models/scanner-{scanner}_harmonizer.json"),
    "log_file": ("ds_log", "models/scanner-{scanner}_training.tsv"),
}


def _sinks(workflow, inputnode, specs: dict[str, tuple[str, dict]], **common) -> None:
    """One ``ds_*`` sink per ``inputnode`` field of ``specs``."""
    for field, (name, entities) in specs.items():
        ds = pe.Node(
            DerivativesDataSink(**common, **entities), name=name, run_without_submitting=True
        )
        workflow.connect(inputnode, field, ds, "in_file")


def init_scan_derivatives_wf(
    *,
    source_file: str,
    staging_dir: Path,
    dwi_meta: dict | None = None,
    name: str = "scan_derivatives_wf",
) -> pe.Workflow:
    """Store one scan's preprocessed series, mask, SNR row and DKI maps.

    Parameters
    ----------
    source_file : str
        The raw DWI the outputs derive from (names them).
    staging_dir : Path
        Derivatives root the sinks write into.
    dwi_meta : dict, optional
        Sidecar of the preprocessed series (acquisition fields and what was done).
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file, bval_file, bvec_file, mask_file
        Preprocessed series, gradient table and brain mask.
    md_file, ad_file, rd_file, fa_file, mk_file, ak_file, rk_file, kfa_file
        The eight DKI maps.
    outlier_fraction_file, snr_tsv
        IRLLS outlier fraction map and the scan's SNR row.

    Examples
    --------
    Store the maps of a fit of your own under BIDS names:

    >>> ds_wf = init_scan_derivatives_wf(source_file="sub-01_ses-A_dwi.nii.gz",
    ...                                  staging_dir=Path("derivatives"))
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fit = pe.Node(niu.IdentityInterface(fields=["mk", "fa"]), name="fit")
    >>> wf.connect([(fit, ds_wf, [("mk", "inputnode.mk_file"), ("fa", "inputnode.fa_file")])])
    >>> sorted(n for n in ds_wf.list_node_names() if n.startswith("ds_"))[:4]
    ['ds_ad', 'ds_ak', 'ds_bval', 'ds_bvec']
    """
    specs = dict(SCAN_OUTPUTS)
    if dwi_meta:
        name_, entities = specs["dwi_file"]
        specs["dwi_file"] = (name_, {**entities, "meta_dict": dwi_meta})
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(SCAN_OUTPUTS)), name="inputnode")
    _sinks(workflow, inputnode, specs, base_directory=str(staging_dir),
           source_file=source_file)  # fmt: skip
    return workflow


#: Sidecar description of the linear baseline's maps (``--comparators linear``).
LINEAR_DESC = (
    "linear baseline: per-map least-squares regression from the scan's own DKI map to the "
    "reference scanner's, fitted on the network's training voxels (dkiharm)"
)


def init_harmonized_derivatives_wf(
    *,
    source_file: str,
    scanner: str,
    staging_dir: Path,
    mc_samples: int = 0,
    linear: bool = False,
    name: str = "harmonized_derivatives_wf",
) -> pe.Workflow:
    """Store one scan's harmonized maps (and, with MC dropout, their standard deviations).

    With ``linear``, also the linear baseline's maps (``desc-linear``, ``--comparators
    linear``), whose sidecars name the baseline as their fit method.

    Inputs
    ------
    out_<param>, std_<param>
        Per map of ``ALL_METRICS``, the harmonized map and (``mc_samples > 0``) its SD.
    linear_files
        (``linear`` only) the linear baseline's eight maps, in ``ALL_METRICS`` order.

    Examples
    --------
    >>> ds_wf = init_harmonized_derivatives_wf(source_file="sub-01_ses-A_dwi.nii.gz",
    ...                                        scanner="A", staging_dir=Path("d"),
    ...                                        mc_samples=10)
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> cnn = pe.Node(niu.IdentityInterface(fields=["mk"]), name="cnn")
    >>> wf.connect(cnn, "mk", ds_wf, "inputnode.out_mk")
    >>> sinks = [n for n in ds_wf.list_node_names() if n.startswith("ds_")]
    >>> len(sinks), sorted(sinks)[:2]  # 8 maps, with MC dropout 8 SDs, and the OOD flag's 2
    (18, ['ds_harmonized_ad', 'ds_harmonized_ak'])

    >>> ds_wf = init_harmonized_derivatives_wf(source_file="sub-01_ses-A_dwi.nii.gz",
    ...                                        scanner="A", staging_dir=Path("d"), linear=True)
    >>> ds_wf.get_node("ds_linear_mk").inputs.meta_dict["Model"]["FitMethod"]
    'linear baseline (per-map least squares)'
    """
    kinds = [("out", "harmonized")] + ([("std", "harmonizedstd")] if mc_samples else [])
    model = {  # BEP016 Model object: the network stands in for the reference scanner's fit
        "Description": "DKI map harmonized to the reference scanner: predicted from this "
        "scan by the scanner's 3-D hierarchical CNN, or, for a map where the CNN did not beat "
        "it on held-out blocks, by the linear baseline (the model card says which; dkiharm)",
        "FitMethod": "CNN harmonizer",
        "Parameters": {"Scanner": scanner, "MCDropoutSamples": mc_samples},
    }
    specs = {
        f"{kind}_{param}": (f"ds_{desc}_{param}", {
            "param": param, "desc": desc,
            "meta_dict": harmonized_sidecar(param, model, std=kind == "std")})
        for kind, desc in kinds
        for param in ALL_METRICS
    }  # fmt: skip
    linear_model = {**model, "Description": LINEAR_DESC,
                    "FitMethod": "linear baseline (per-map least squares)"}  # fmt: skip
    linear_specs = {
        f"linear_{param}": (f"ds_linear_{param}", {
            "param": param, "desc": "linear",
            "meta_dict": {**harmonized_sidecar(param, linear_model),
                          "Description": LINEAR_DESC}})
        for param in (ALL_METRICS if linear else ())
    }  # fmt: skip
    workflow = pe.Workflow(name=name)
    ood = list(OOD_OUTPUTS)
    fields = list(specs) + (["linear_files"] if linear else []) + ood
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    _sinks(workflow, inputnode, specs, base_directory=str(staging_dir), source_file=source_file,
           space="dwi", model="dki")  # fmt: skip
    # the out-of-distribution flag (absent for cards without an OOD model: nothing stored)
    for field, (sink, entities) in OOD_OUTPUTS.items():
        ds = pe.Node(OptionalDerivativesDataSink(base_directory=str(staging_dir),
                                                 source_file=source_file, **entities),
                     name=sink, run_without_submitting=True)  # fmt: skip
        workflow.connect(inputnode, field, ds, "in_file")
    if linear:
        split = pe.Node(niu.IdentityInterface(fields=list(linear_specs)), name="split_linear")
        for i, field in enumerate(linear_specs):
            workflow.connect(inputnode, ("linear_files", _pick, i), split, field)
        _sinks(workflow, split, linear_specs, base_directory=str(staging_dir),
               source_file=source_file, space="dwi", model="dki")  # fmt: skip
    return workflow


#: ApplyHarmonizer's OOD outputs: inputnode field -> sink name and BIDS entities.
OOD_OUTPUTS = {
    "ood_mask_file": ("ds_ood_mask", {"space": "dwi", "desc": "ood", "suffix": "mask",
                                      "meta_dict": {"Description": "voxels whose network "
                                                    "input is unlike the training data"}}),
    "ood_distance_file": ("ds_ood_distance", {"space": "dwi", "desc": "ooddistance",
                                              "suffix": "dwimap"}),
}  # fmt: skip


def _pick(files, index):
    """Nipype connection function: one file of a list."""
    return files[index]


def init_model_derivatives_wf(
    *, scanner: str, staging_dir: Path, name: str = "model_derivatives_wf"
) -> pe.Workflow:
    """Store one scanner's trained network: weights, model card and training log.

    Inputs
    ------
    weights_file, card_file, log_file
        :class:`~dkiharm_nipype.interfaces.harmonize.TrainHarmonizer`'s outputs.

    Examples
    --------
    >>> ds_wf = init_model_derivatives_wf(scanner="C", staging_dir=Path("d"))
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> model = pe.Node(niu.IdentityInterface(fields=["weights"]), name="model")
    >>> wf.connect(model, "weights", ds_wf, "inputnode.weights_file")
    >>> ds_wf.get_node("ds_weights").inputs.rel_path
    'models/scanner-C_harmonizer.safetensors'
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(MODEL_OUTPUTS)), name="inputnode")
    specs = {
        field: (sink, {"rel_path": rel.format(scanner=scanner)})
        for field, (sink, rel) in MODEL_OUTPUTS.items()
    }
    _sinks(workflow, inputnode, specs, base_directory=str(staging_dir))
    return workflow


def init_plan_derivatives_wf(*, staging_dir: Path, name: str = "plan_derivatives_wf"):
    """Store the study design with the reference chosen at run time.

    Inputs
    ------
    plan_file
        ``harmonization.json`` (scanners, training and test subjects, reference, options).

    Examples
    --------
    >>> ds_wf = init_plan_derivatives_wf(staging_dir=Path("d"))
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> design = pe.Node(niu.IdentityInterface(fields=["json"]), name="design")
    >>> wf.connect(design, "json", ds_wf, "inputnode.plan_file")
    >>> ds_wf.get_node("ds_plan").inputs.rel_path
    'models/harmonization.json'
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["plan_file"]), name="inputnode")
    specs = {"plan_file": ("ds_plan", {"rel_path": "models/harmonization.json"})}
    _sinks(workflow, inputnode, specs, base_directory=str(staging_dir))
    return workflow


def harmonized_sidecar(param: str, model: dict, *, std: bool = False) -> dict:
    """Sidecar of a harmonized map (or of its MC-dropout standard deviation)."""
    from ..dki.provenance import MAP_DESCRIPTIONS, MAP_UNITS

    what = MAP_DESCRIPTIONS[param] + ", harmonized to the reference scanner"
    return {
        "Description": f"MC-dropout standard deviation of the {what}" if std else what,
        "Units": MAP_UNITS.get(param, "dimensionless"),
        "Model": model,
    }
