"""Nipype interfaces training and applying the CNN harmonizer (:mod:`dkiharm_nipype.cnn`).

The interfaces only read and write files; the science lives in :mod:`..cnn`:
:func:`..cnn.train.train_harmonizer`, :func:`..cnn.infer.harmonize_scan` and the model
files of :mod:`..cnn.modelio` (safetensors weights + JSON model card).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix, split_filename

from ..cnn.data import TrainingSubject, normalize_dwi
from ..cnn.infer import harmonize_scan, linear_maps
from ..cnn.model import OUTPUT_NAMES
from ..cnn.modelio import (
    check_fingerprint,
    direction_order,
    load_model,
    save_model,
    scan_fingerprint,
)
from ..cnn.ood import score_scan
from ..cnn.train import train_harmonizer
from ..config import NETWORK_INPUTS
from ..utils.env import resolve_device, torch_threads
from ..utils.io import load_mask, read_gradients

LOGGER = logging.getLogger("nipype.interface")
LOG_COLUMNS = ("epoch", "loss", "val_loss", "seconds")


class _TrainHarmonizerInputSpec(BaseInterfaceInputSpec):
    dwi_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="target-scanner DWIs, one per training subject"
    )
    bval_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-values of dwi_files")
    bvec_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-vectors of dwi_files")
    mask_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="brain masks in the space of dwi_files"
    )
    label_files = traits.List(
        traits.Either(File(exists=True), traits.List(File(exists=True), minlen=8, maxlen=8)),
        mandatory=True,
        desc="reference-scanner DKI labels registered to each DWI: a 4-D stack of 8 maps or a "
        "list of 8 3-D maps, in the order MD, AD, RD, FA, MK, AK, RK, KFA (diffusivities mm^2/s)",
    )
    fit_files = traits.List(
        traits.Either(File(exists=True), traits.List(File(exists=True), minlen=8, maxlen=8)),
        desc="each training scan's own IRLLS DKI maps, laid out like label_files (needed for "
        "network_input 'dwi+fit'; when given, the linear baseline is fitted beside the network "
        "and model selection runs)",
    )
    linear_inputs = traits.Enum(
        "own",
        "all",
        usedefault=True,
        desc="linear baseline: each map from the scan's own same map, or from all eight maps",
    )
    selection = traits.Enum(
        "auto",
        "network",
        "linear",
        usedefault=True,
        desc="per map, which mapping harmonizes: 'auto' the one with the lower held-out NRMSE",
    )
    weight_decay = traits.Float(0.0, usedefault=True, desc="Adam weight decay (L2 penalty)")
    network_input = traits.Enum(
        *NETWORK_INPUTS,
        usedefault=True,
        desc="'dwi': normalised DWIs (paper); 'dwi+fit': also the scan's own DKI maps, which "
        "the network corrects",
    )
    exclude_mask_files = InputMultiObject(
        File(exists=True), desc="per subject, voxels kept out of training (leave-one-tissue-out)"
    )
    label_mask_files = InputMultiObject(
        File(exists=True),
        desc="per subject, where its labels are valid (the label registration's support "
        "mask: interpolated from reference-brain voxels only); other voxels are not trained on",
    )
    sidecar_files = InputMultiObject(
        File(exists=True), desc="BIDS JSON sidecars of dwi_files, for EchoTime (seconds)"
    )
    echo_time = traits.Float(desc="echo time in ms, overriding the sidecars")
    subject_ids = traits.List(traits.Str, desc="names of the training subjects, for the card")
    scanner = traits.Str(mandatory=True, desc="name of the target scanner, for the card")
    hidden_channels = traits.Int(150, usedefault=True, desc="width of every hidden layer")
    num_shared_layers = traits.Int(2, usedefault=True, desc="1x1x1 layers shared by both heads")
    dropout = traits.Float(0.1, usedefault=True, desc="dropout before the output layers")
    kernel_size = traits.Int(
        3, usedefault=True, desc="edge of the first (spatial) convolution; odd, the paper's 3"
    )
    target_scaling = traits.Enum(
        "zscore", "units", usedefault=True, desc="how the eight target maps are scaled"
    )
    epochs = traits.Int(100, usedefault=True, desc="maximum number of epochs")
    learning_rate = traits.Float(1e-3, usedefault=True, desc="Adam learning rate")
    batch_size = traits.Int(1024, usedefault=True, desc="voxels per optimisation step")
    patience = traits.Int(10, usedefault=True, desc="epochs without improvement before stopping")
    min_delta = traits.Float(
        0.0,
        usedefault=True,
        desc="relative fall of the validation loss that counts as an improvement",
    )
    precision = traits.Enum(
        "fp32",
        "auto",
        "bf16",
        usedefault=True,
        desc="arithmetic of the training passes: auto is bfloat16 autocast where the device "
        "computes it natively, else float32",
    )
    val_fraction = traits.Float(0.1, usedefault=True, desc="fraction of blocks for validation")
    loss = traits.Enum("mse", "l1", usedefault=True, desc="loss on the scaled targets")
    samples_per_epoch = traits.Int(
        0, usedefault=True, desc="voxels drawn per epoch (0: all training voxels)"
    )
    seed = traits.Int(0, usedefault=True, desc="seed of the split, initial weights and batches")
    device = traits.Str(
        "auto",
        usedefault=True,
        desc="torch device: auto (a GPU if the host running the node has one), cpu, cuda, "
        "cuda:N",
    )
    num_threads = traits.Int(
        0, usedefault=True, nohash=True, desc="torch CPU threads (0: torch's default)"
    )
    out_name = traits.Str("harmonizer", usedefault=True, desc="stem of the output file names")


class _TrainHarmonizerOutputSpec(TraitedSpec):
    weights_file = File(exists=True, desc="network weights (safetensors)")
    card_file = File(exists=True, desc="model card (JSON)")
    log_file = File(exists=True, desc="training log: epoch, loss, val_loss, seconds (TSV)")


class TrainHarmonizer(SimpleInterface):
    """Train the CNN harmonizer of one target scanner on traveling subjects.

    All subjects must share the target scanner's protocol, which is recorded in the card.

    Examples
    --------
    >>> train = TrainHarmonizer(scanner="A", epochs=50, seed=1)
    >>> train.inputs.hidden_channels, train.inputs.target_scaling
    (150, 'zscore')

    In an existing pipeline: the training scans of one scanner and the reference maps
    registered into each of them come in as lists (``label_files``: one list of eight maps
    per scan), e.g. from ``Merge`` nodes; the outputs feed :class:`ApplyHarmonizer`.

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> scans = pe.Node(niu.IdentityInterface(fields=["dwis", "bvals", "bvecs", "masks",
    ...                                               "labels"]), name="scans")
    >>> train_a = pe.Node(TrainHarmonizer(scanner="A", epochs=30, device="cpu",
    ...                                   samples_per_epoch=50_000), name="train_a")
    >>> apply_a = pe.Node(ApplyHarmonizer(), name="apply_a")
    >>> wf.connect([
    ...     (scans, train_a, [("dwis", "dwi_files"), ("bvals", "bval_files"),
    ...                       ("bvecs", "bvec_files"), ("masks", "mask_files"),
    ...                       ("labels", "label_files")]),
    ...     (train_a, apply_a, [("weights_file", "weights_file"), ("card_file", "card_file")]),
    ... ])
    >>> sorted({"weights_file", "card_file", "dwi_file"} & set(wf.inputs.apply_a.get()))
    ['dwi_file']
    """

    input_spec = _TrainHarmonizerInputSpec
    output_spec = _TrainHarmonizerOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        n = len(inputs.dwi_files)
        lists = {"bval_files": inputs.bval_files, "bvec_files": inputs.bvec_files}
        lists.update(mask_files=inputs.mask_files, label_files=inputs.label_files)
        if inputs.network_input == "dwi+fit" and not isdefined(inputs.fit_files):
            raise ValueError(
                "TrainHarmonizer: network_input 'dwi+fit' needs fit_files (each training "
                "scan's own DKI maps); connect them or use network_input 'dwi'."
            )
        optional = (
            "exclude_mask_files",
            "label_mask_files",
            "sidecar_files",
            "subject_ids",
            "fit_files",
        )
        for trait in optional:
            if isdefined(getattr(inputs, trait)):
                lists[trait] = getattr(inputs, trait)
        for trait, values in lists.items():
            if len(values) != n:
                raise ValueError(f"{trait} has {len(values)} entries for {n} dwi_files.")
        subjects, protocol = [], None
        for i, dwi_file in enumerate(inputs.dwi_files):
            img, dwi, bvals, bvecs = _load_dwi(
                dwi_file, inputs.bval_files[i], inputs.bvec_files[i]
            )
            sidecar = inputs.sidecar_files[i] if "sidecar_files" in lists else None
            fp = _fingerprint(img, bvals, bvecs, sidecar, inputs.echo_time)
            if protocol is None:
                protocol = fp
            else:  # training subjects must share the protocol the harmonizer is made for
                check_fingerprint(protocol, fp)
                dwi, bvals = _in_trained_order(protocol, fp, dwi, bvals)
            exclude = label_mask = None
            if "exclude_mask_files" in lists:
                exclude = load_mask(lists["exclude_mask_files"][i])
            if "label_mask_files" in lists:
                label_mask = load_mask(lists["label_mask_files"][i])
            subjects.append(
                TrainingSubject(
                    dwi=normalize_dwi(dwi, bvals),
                    labels=_load_labels(inputs.label_files[i]),
                    mask=load_mask(inputs.mask_files[i]),
                    exclude=exclude,
                    label_mask=label_mask,
                    name=lists["subject_ids"][i]
                    if "subject_ids" in lists
                    else Path(dwi_file).name,
                    fit=_load_labels(lists["fit_files"][i]) if "fit_files" in lists else None,
                )
            )
            del dwi
        with torch_threads(inputs.num_threads):
            model, card, result = train_harmonizer(
                subjects,
                scanner=inputs.scanner,
                protocol=protocol,
                hidden_channels=inputs.hidden_channels,
                num_shared_layers=inputs.num_shared_layers,
                dropout=inputs.dropout,
                kernel_size=inputs.kernel_size,
                target_scaling=inputs.target_scaling,
                val_fraction=inputs.val_fraction,
                epochs=inputs.epochs,
                lr=inputs.learning_rate,
                batch_size=inputs.batch_size,
                patience=inputs.patience,
                min_delta=inputs.min_delta,
                precision=inputs.precision,
                loss=inputs.loss,
                samples_per_epoch=inputs.samples_per_epoch or None,
                network_input=inputs.network_input,
                weight_decay=inputs.weight_decay,
                linear_inputs=inputs.linear_inputs,
                selection=inputs.selection,
                seed=inputs.seed,
                device=resolve_device(inputs.device),  # on the host running this node
                log=_every(LOG_EVERY, f"scanner {inputs.scanner}"),
            )
        seconds = sum(rec["seconds"] for rec in result.history)
        LOGGER.info(
            "training scanner %s: best epoch %d of %d, %s loss %.4g, %.1f s",
            inputs.scanner,
            result.best_epoch,
            len(result.history),
            "validation"
            if result.history and result.history[-1]["val_loss"] is not None
            else "training",
            result.best_loss,
            seconds,
        )
        weights, card_path, log_path = (
            fname_presuffix(inputs.out_name, suffix=suffix, newpath=runtime.cwd, use_ext=False)
            for suffix in (".safetensors", "_card.json", "_log.tsv")
        )
        save_model(model, card, weights, card_path)
        for name, choice in card.mapping.get("selection", {}).get("maps", {}).items():
            if choice["chosen"] == "linear":
                LOGGER.warning(
                    "TrainHarmonizer %s: the network does not beat the linear baseline for %s on "
                    "held-out blocks (NRMSE %.3g vs %.3g): the linear mapping harmonizes it",
                    inputs.scanner, name.upper(), choice["val_nrmse_network"],
                    choice["val_nrmse_linear"],
                )  # fmt: skip
        with open(log_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, LOG_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            for rec in result.history:
                writer.writerow({k: "n/a" if rec[k] is None else rec[k] for k in LOG_COLUMNS})
        self._results.update(weights_file=weights, card_file=card_path, log_file=log_path)
        return runtime


class _ApplyHarmonizerInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="preprocessed target-scanner DWI")
    bval_file = File(exists=True, mandatory=True, desc="b-values of dwi_file")
    bvec_file = File(exists=True, mandatory=True, desc="b-vectors of dwi_file")
    mask_file = File(exists=True, mandatory=True, desc="brain mask; maps are computed inside it")
    weights_file = File(exists=True, mandatory=True, desc="harmonizer weights (safetensors)")
    card_file = File(exists=True, mandatory=True, desc="model card written with weights_file")
    fit_files = InputMultiObject(
        File(exists=True),
        desc="the scan's own IRLLS DKI maps: 8 maps (MD, AD, RD, FA, MK, AK, RK, KFA) or one "
        "4-D stack; needed by networks trained with network_input 'dwi+fit' or whose model "
        "selection chose the linear mapping for a map; with them the linear baseline's maps are "
        "written too (linear_files)",
    )
    sidecar_file = File(exists=True, desc="BIDS JSON sidecar of dwi_file, for EchoTime")
    echo_time = traits.Float(desc="echo time in ms, overriding the sidecar")
    mc_samples = traits.Int(
        0, usedefault=True, desc="MC-dropout passes (0: off, >= 2: also write std maps)"
    )
    batch_voxels = traits.Int(4096, usedefault=True, desc="voxels per chunk (bounds memory)")
    device = traits.Str(
        "auto",
        usedefault=True,
        desc="torch device: auto (a GPU if the host running the node has one), cpu, cuda, "
        "cuda:N",
    )
    num_threads = traits.Int(
        0, usedefault=True, nohash=True, desc="torch CPU threads (0: torch's default)"
    )
    seed = traits.Int(0, usedefault=True, desc="seed of the MC-dropout masks")
    ood = traits.Bool(
        True, usedefault=True, desc="write the voxelwise out-of-distribution mask and distance"
    )


class _ApplyHarmonizerOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(
        File(exists=True),
        desc="the eight harmonized maps, in the order " + ", ".join(OUTPUT_NAMES),
    )
    std_files = OutputMultiObject(
        File(exists=True), desc="MC-dropout standard deviation of each map (mc_samples >= 2)"
    )
    linear_files = OutputMultiObject(
        File(exists=True),
        desc="the linear baseline's eight maps (desc-linear), when the card holds one and "
        "fit_files are given",
    )
    ood_mask_file = File(desc="voxels whose input is unlike the training data (desc-ood_mask)")
    ood_distance_file = File(desc="OOD distance of each voxel (desc-ooddistance_dwimap)")
    for _name in OUTPUT_NAMES:
        locals()[f"out_{_name}"] = File(exists=True, desc=f"harmonized {_name.upper()} map")
        locals()[f"std_{_name}"] = File(desc=f"MC-dropout standard deviation of {_name.upper()}")
    del _name


class ApplyHarmonizer(SimpleInterface):
    """Harmonized DKI maps of one target-scanner scan with a trained harmonizer.

    The scan's protocol is checked against the model card: a different protocol is
    refused, a near match (TE within 5 ms, b-values within 2.5 %, other matrix) warns.

    Examples
    --------
    >>> apply = ApplyHarmonizer(mc_samples=20)
    >>> apply.inputs.mc_samples, apply.inputs.device
    (20, 'auto')
    >>> sorted(apply.output_spec().get())[:4]  # with the OOD mask, on by default
    ['linear_files', 'ood_distance_file', 'ood_mask_file', 'out_ad']

    In an existing pipeline, with a network trained by a group-level run (its
    ``models/`` folder) and any preprocessing of a scan of that scanner:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> preproc = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec", "mask"]),
    ...                   name="preproc")
    >>> harmonize = pe.Node(ApplyHarmonizer(mc_samples=10), name="harmonize")
    >>> wf.connect([(preproc, harmonize, [("dwi", "dwi_file"), ("bval", "bval_file"),
    ...                                   ("bvec", "bvec_file"), ("mask", "mask_file")])])
    >>> sorted(k for k in wf.inputs.harmonize.get() if k.endswith("_file"))  # still to set
    ['card_file', 'sidecar_file', 'weights_file']
    """

    input_spec = _ApplyHarmonizerInputSpec
    output_spec = _ApplyHarmonizerOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        device = resolve_device(inputs.device)  # on the host running this node
        model, card = load_model(inputs.weights_file, inputs.card_file, device=device)
        img, dwi, bvals, bvecs = _load_dwi(inputs.dwi_file, inputs.bval_file, inputs.bvec_file)
        sidecar = inputs.sidecar_file if isdefined(inputs.sidecar_file) else None
        fp = _fingerprint(img, bvals, bvecs, sidecar, inputs.echo_time)
        check_fingerprint(card, fp)
        dwi, bvals = _in_trained_order(card.protocol, fp, dwi, bvals)
        fit_maps = None
        if model.residual_channels and not isdefined(inputs.fit_files):
            raise ValueError(
                f"{inputs.card_file} was trained with the scan's own DKI maps as input "
                "(network_input 'dwi+fit'): give ApplyHarmonizer the scan's fitted maps "
                "(fit_files)."
            )
        if isdefined(inputs.fit_files):
            files = inputs.fit_files
            fit_maps = _load_labels(files[0] if len(files) == 1 else list(files))
        with torch_threads(inputs.num_threads):
            maps, std = harmonize_scan(
                model,
                card,
                dwi,
                bvals,
                load_mask(inputs.mask_file),
                device=device,
                batch_voxels=inputs.batch_voxels,
                mc_samples=inputs.mc_samples,
                seed=inputs.seed,
                fit_maps=fit_maps,
            )
        linear = (
            None if fit_maps is None else linear_maps(card, fit_maps, load_mask(inputs.mask_file))
        )
        _, stem, _ = split_filename(inputs.dwi_file)
        stem = stem.removesuffix("_dwi")
        descs = {"out": "harmonized", "std": "harmonizedstd", "linear": "linear"}
        for kind, data in (("out", maps), ("std", std), ("linear", linear)):
            if data is None:
                continue
            files = []
            for i, name in enumerate(OUTPUT_NAMES):
                path = fname_presuffix(
                    f"{stem}_desc-{descs[kind]}_param-{name}_dwimap.nii.gz", newpath=runtime.cwd
                )
                _save_map(data[..., i], img, path)
                if kind != "linear":
                    self._results[f"{kind}_{name}"] = path
                files.append(path)
            self._results[f"{kind}_files"] = files
        if inputs.ood:
            self._write_ood(card, dwi, bvals, img, stem, runtime.cwd)
        return runtime

    def _write_ood(self, card, dwi, bvals, img, stem: str, cwd: str) -> None:
        model = card.training.get("ood") or {}
        if "threshold" not in model:
            LOGGER.info(
                "ApplyHarmonizer: %s has no out-of-distribution model (%s); no desc-ood_mask "
                "written.",
                self.inputs.card_file,
                model.get("skipped", "trained before it existed"),
            )
            return
        distance, flagged = score_scan(
            model, dwi, bvals, load_mask(self.inputs.mask_file), normalization=card.normalization
        )
        for key, name, data in (
            ("ood_mask_file", f"{stem}_desc-ood_mask.nii.gz", flagged.astype(np.uint8)),
            ("ood_distance_file", f"{stem}_desc-ooddistance_dwimap.nii.gz", distance),
        ):
            path = fname_presuffix(name, newpath=cwd)
            header = img.header.copy()
            header.set_data_dtype(data.dtype)
            nb.Nifti1Image(data, img.affine, header).to_filename(path)
            self._results[key] = path


def _load_dwi(dwi_file: str, bval_file: str, bvec_file: str):
    img = nb.load(dwi_file)
    dwi = np.asarray(img.dataobj, dtype=np.float32)
    bvals, bvecs = read_gradients(bval_file, bvec_file)
    if dwi.ndim != 4 or dwi.shape[-1] != bvals.size:
        raise ValueError(
            f"{dwi_file} has shape {dwi.shape}; {bval_file} lists {bvals.size} b-values."
        )
    if bvecs.shape != (bvals.size, 3):
        raise ValueError(f"{bvec_file} has shape {bvecs.shape}; expected 3 x {bvals.size}.")
    return img, dwi, bvals, bvecs


def _in_trained_order(trained: dict, fp: dict, dwi: np.ndarray, bvals: np.ndarray):
    """Volumes re-ordered to the trained gradient order when only their order differs."""
    if "gradients" not in trained or "gradients" not in fp:
        return dwi, bvals
    order, _ = direction_order(trained, fp)
    if order is None:
        return dwi, bvals
    return dwi[..., order], bvals[order]


def _fingerprint(img, bvals, bvecs, sidecar: str | None, echo_time) -> dict:
    te = echo_time if isdefined(echo_time) else None
    if te is None and sidecar is not None:
        seconds = json.loads(Path(sidecar).read_text()).get("EchoTime")
        te = None if seconds is None else 1000.0 * float(seconds)
    return scan_fingerprint(
        bvals,
        voxel_size=img.header.get_zooms()[:3],
        matrix=img.shape[:3],
        echo_time=te,
        bvecs=bvecs,
    )


def _load_labels(labels) -> np.ndarray:
    if isinstance(labels, (str, Path)):
        data = np.asarray(nb.load(labels).dataobj, dtype=np.float32)
        if data.ndim != 4 or data.shape[-1] != len(OUTPUT_NAMES):
            raise ValueError(
                f"Label stack {labels} has shape {data.shape}; expected (X, Y, Z, 8) in the "
                f"order {', '.join(OUTPUT_NAMES)}."
            )
        return data
    return np.stack([np.asarray(nb.load(f).dataobj, dtype=np.float32) for f in labels], -1)


def _save_map(data: np.ndarray, ref: nb.Nifti1Image, path: str) -> None:
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    out = nb.Nifti1Image(data.astype(np.float32), ref.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    out.to_filename(path)


#: Training progress is logged on the first epoch and every ``LOG_EVERY`` epochs.
LOG_EVERY = 10


def _every(n: int, what: str):
    """Training-log callback: one compact line every ``n`` epochs."""

    def log(rec: dict) -> None:
        if rec["epoch"] == 1 or rec["epoch"] % n == 0:
            LOGGER.info("training %s: %s", what, _format_record(rec))

    return log


def _format_record(rec: dict) -> str:
    val = "n/a" if rec["val_loss"] is None else f"{rec['val_loss']:.4g}"
    return f"epoch {rec['epoch']}: loss {rec['loss']:.4g}, val {val}, {rec['seconds']:.1f} s"
