"""Nipype interfaces of the comparators: voxelwise ComBat and RISH (paper section 2.3.4).

The interfaces only read and write files; the science is in
:mod:`dkiharm_nipype.comparators.combat` and :mod:`dkiharm_nipype.comparators.rish`.
Outputs are named like those of :class:`~.harmonize.ApplyHarmonizer`, with
``desc-combat`` / ``desc-rish`` in place of ``desc-harmonized``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from ..comparators.combat import (
    BACKMAPS,
    COMBAT_LIBRARY,
    ComBatInputError,
    combat_maps,
    read_participants,
)
from ..comparators.rish import (
    B_TOLERANCE,
    RISHInputError,
    RISHModel,
    RISHScan,
    harmonize_dwi,
    train_rish,
)
from ..dki.maps import ALL_METRICS
from ..errors import BIDSInputError
from ..registration import ENGINES
from ..utils.bids import scan_key
from .harmonize import _save_map

_SUBJECT = re.compile(r"sub-([a-zA-Z0-9]+)")
_OPEN_ENGINES = tuple(e for e in ENGINES if e not in ("fnirt", "none"))


def source_stem(path: str) -> str:
    """The entities of the scan a BIDS file derives from (all but space/model/param/desc).

    >>> source_stem("/d/sub-01_ses-A_dir-AP_run-1_space-dwi_model-dki_param-fa_dwimap.nii.gz")
    'sub-01_ses-A_dir-AP_run-1'
    """
    try:
        return scan_key(path) or Path(path).name.split(".")[0]
    except BIDSInputError:
        return Path(path).name.split(".")[0]


# ----------------------------------------------------------------------------- ComBat
class _ComBatHarmonizeInputSpec(BaseInterfaceInputSpec):
    map_files = traits.List(
        traits.List(File(exists=True), minlen=1),
        mandatory=True,
        desc="per scan, its DKI maps in the order of params (all on the scan's grid)",
    )
    params = traits.List(
        traits.Str, value=list(ALL_METRICS), usedefault=True, desc="names of the maps"
    )
    mask_files = InputMultiObject(File(exists=True), mandatory=True, desc="brain mask per scan")
    sites = traits.List(traits.Str, mandatory=True, desc="scanner of each scan (site = scanner)")
    subjects = traits.List(
        traits.Str, desc="subject of each scan, for the covariates (default: the sub- entity)"
    )
    participants_file = File(
        exists=True, desc="BIDS participants.tsv: age and sex are kept as covariates if present"
    )
    reference_site = traits.Str(desc="scanner left unchanged (default: pooled ComBat)")
    registration_param = traits.Str(
        "fa", usedefault=True, desc="map driving the registration to the template"
    )
    template_index = traits.Int(0, usedefault=True, desc="index of the template scan")
    backmap = traits.Enum(
        *BACKMAPS,
        usedefault=True,
        desc="affine: ComBat's per-voxel adjustment applied in scan "
        "space; values: harmonized template maps resampled back",
    )
    engine = traits.Enum(*_OPEN_ENGINES, usedefault=True, desc="registration engine")
    num_threads = traits.Int(1, usedefault=True, desc="scans registered in parallel")


class _ComBatHarmonizeOutputSpec(TraitedSpec):
    out_files = traits.List(
        traits.List(File(exists=True)), desc="per scan, the harmonized maps in params order"
    )
    report_file = File(exists=True, desc="JSON: sites, covariates, voxels, coverage")


class ComBatHarmonize(SimpleInterface):
    """Voxelwise ComBat of DKI maps across scanners, through a template scan's space.

    >>> combat = ComBatHarmonize(sites=["A", "A", "D", "D"], reference_site="D")
    >>> combat.inputs.params[:4], combat.inputs.backmap, combat.inputs.engine
    (['md', 'ad', 'rd', 'fa'], 'affine', 'auto')

    Outputs are named ``<sub>_<ses>_<run>_desc-combat_param-<map>_dwimap.nii.gz``. In an
    existing pipeline, after the DKI fits of all scans:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> fits = pe.Node(niu.IdentityInterface(fields=["maps", "masks"]), name="fits")
    >>> combat = pe.Node(ComBatHarmonize(sites=["A", "A", "D", "D"]), name="combat")
    >>> wf.connect([(fits, combat, [("maps", "map_files"), ("masks", "mask_files")])])
    >>> "participants_file" in wf.inputs.combat.get()
    True
    """

    input_spec = _ComBatHarmonizeInputSpec
    output_spec = _ComBatHarmonizeOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        n = len(inputs.map_files)
        params = list(inputs.params)
        for i, files in enumerate(inputs.map_files):
            if len(files) != len(params):
                raise ComBatInputError(
                    f"Scan {i} ({Path(files[0]).name}) has {len(files)} maps for params "
                    f"{params}; give one map per parameter, in that order."
                )
        maps = {p: [files[k] for files in inputs.map_files] for k, p in enumerate(params)}
        if isdefined(inputs.subjects):
            subjects = list(inputs.subjects)
        else:
            found = [_SUBJECT.search(Path(f[0]).name) for f in inputs.map_files]
            subjects = [m.group(1) if m else None for m in found]
        participants = (
            read_participants(inputs.participants_file)
            if isdefined(inputs.participants_file)
            else None
        )
        if len(inputs.sites) != n:
            raise ComBatInputError(f"{len(inputs.sites)} sites for {n} scans; give one per scan.")
        result = combat_maps(
            maps,
            list(inputs.mask_files),
            list(inputs.sites),
            subjects=subjects,
            participants=participants,
            registration_param=inputs.registration_param,
            template=inputs.template_index,
            reference_site=inputs.reference_site if isdefined(inputs.reference_site) else None,
            backmap=inputs.backmap,
            engine=inputs.engine,
            n_jobs=inputs.num_threads,
            work_dir=runtime.cwd,
        )
        out_files = []
        for i, files in enumerate(inputs.map_files):
            stem, ref = source_stem(files[0]), nb.load(files[0])
            scan_files = []
            for p in params:
                path = fname_presuffix(
                    f"{stem}_desc-combat_param-{p}_dwimap.nii.gz", newpath=runtime.cwd
                )
                _save_map(result.maps[p][i], ref, path)
                scan_files.append(path)
            out_files.append(scan_files)
        report = fname_presuffix("combat_report.json", newpath=runtime.cwd)
        Path(report).write_text(
            json.dumps(
                {
                    "Method": f"ComBat ({COMBAT_LIBRARY}, parametric empirical Bayes)",
                    "Sites": list(inputs.sites),
                    "ReferenceSite": inputs.reference_site
                    if isdefined(inputs.reference_site)
                    else None,
                    "Covariates": result.covariates,
                    "TemplateScan": Path(inputs.map_files[inputs.template_index][0]).name,
                    "TemplateVoxels": result.n_voxels,
                    "Coverage": result.coverage,
                    "Backmap": inputs.backmap,
                },
                indent=2,
            )
            + "\n"
        )
        self._results.update(out_files=out_files, report_file=report)
        return runtime


# ------------------------------------------------------------------------------- RISH
class _RISHScansInputSpec(BaseInterfaceInputSpec):
    b_tolerance = traits.Float(
        B_TOLERANCE, usedefault=True, desc="shells match within this many s/mm^2"
    )
    engine = traits.Enum(*_OPEN_ENGINES, usedefault=True, desc="registration engine")
    num_threads = traits.Int(
        1, usedefault=True, desc="scans registered in parallel (TrainRISH), engine threads"
    )


class _TrainRISHInputSpec(_RISHScansInputSpec):
    target_dwi_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="target-scanner DWIs, one per training subject"
    )
    target_bval_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-values")
    target_bvec_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-vectors")
    target_mask_files = InputMultiObject(File(exists=True), mandatory=True, desc="brain masks")
    target_fa_files = InputMultiObject(
        File(exists=True),
        desc="FA maps driving the registration (default: DTI of b0 + lowest shell)",
    )
    reference_dwi_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="reference-scanner DWIs of the same subjects"
    )
    reference_bval_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-values")
    reference_bvec_files = InputMultiObject(File(exists=True), mandatory=True, desc="b-vectors")
    reference_mask_files = InputMultiObject(File(exists=True), mandatory=True, desc="masks")
    reference_fa_files = InputMultiObject(File(exists=True), desc="FA maps for registration")
    smoothing_mm = traits.Float(2.0, usedefault=True, desc="Gaussian sigma of the mean RISH")
    max_scale = traits.Float(4.0, usedefault=True, desc="scale maps clipped to [1/x, x]")
    lmax = traits.Int(0, usedefault=True, desc="SH order (0: from the direction count)")
    out_name = traits.Str("rish", usedefault=True, desc="stem of the output file names")


class _TrainRISHOutputSpec(TraitedSpec):
    scales_file = File(exists=True, desc="scale maps (template grid, X x Y x Z x shell x order)")
    template_file = File(exists=True, desc="template registration image and mask (2 volumes)")
    card_file = File(exists=True, desc="JSON: shells, SH orders, options")


def _scans(inputs, prefix: str) -> list[RISHScan]:
    files = [getattr(inputs, f"{prefix}_{k}_files") for k in ("dwi", "bval", "bvec", "mask")]
    fa = getattr(inputs, f"{prefix}_fa_files")
    fa = list(fa) if isdefined(fa) else [None] * len(files[0])
    if any(len(f) != len(files[0]) for f in (*files, fa)):
        raise RISHInputError(
            f"The {prefix}_* file lists have different lengths "
            f"({', '.join(str(len(f)) for f in (*files, fa))}); give one of each per subject."
        )
    return [RISHScan.from_files(*args) for args in zip(*files, fa, strict=True)]


class TrainRISH(SimpleInterface):
    """Learn RISH scale maps from a target to the reference scanner (traveling subjects).

    >>> train = TrainRISH(smoothing_mm=3.0)
    >>> train.inputs.max_scale, train.inputs.b_tolerance, train.inputs.lmax
    (4.0, 100.0, 0)

    In an existing pipeline, with the preprocessed DWIs of the training subjects:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> scans = pe.Node(niu.IdentityInterface(fields=["dwi", "bval", "bvec", "mask"]),
    ...                 name="scans")
    >>> train_rish = pe.Node(TrainRISH(), name="train_rish")
    >>> wf.connect([(scans, train_rish, [
    ...     ("dwi", "target_dwi_files"), ("bval", "target_bval_files"),
    ...     ("bvec", "target_bvec_files"), ("mask", "target_mask_files")])])
    >>> wf.inputs.train_rish.smoothing_mm
    2.0
    """

    input_spec = _TrainRISHInputSpec
    output_spec = _TrainRISHOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        model = train_rish(
            _scans(inputs, "target"),
            _scans(inputs, "reference"),
            tolerance=inputs.b_tolerance,
            smoothing_mm=inputs.smoothing_mm,
            max_scale=inputs.max_scale,
            lmax=inputs.lmax or None,
            engine=inputs.engine,
            n_jobs=inputs.num_threads,
            work_dir=runtime.cwd,
        )
        paths = [
            fname_presuffix(inputs.out_name + suffix, newpath=runtime.cwd)
            for suffix in ("_scales.nii.gz", "_template.nii.gz", "_card.json")
        ]
        model.save(*paths)
        self._results.update(scales_file=paths[0], template_file=paths[1], card_file=paths[2])
        return runtime


class _ApplyRISHInputSpec(_RISHScansInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="target-scanner DWI to harmonize")
    bval_file = File(exists=True, mandatory=True, desc="b-values of dwi_file")
    bvec_file = File(exists=True, mandatory=True, desc="b-vectors of dwi_file")
    mask_file = File(exists=True, mandatory=True, desc="brain mask of dwi_file")
    fa_file = File(exists=True, desc="FA map driving the registration (default: DTI)")
    scales_file = File(exists=True, mandatory=True, desc="scale maps written by TrainRISH")
    template_file = File(exists=True, mandatory=True, desc="template written by TrainRISH")
    card_file = File(exists=True, mandatory=True, desc="card written by TrainRISH")
    keep_residual = traits.Bool(
        True, usedefault=True, desc="keep the signal the SH fit does not represent"
    )


class _ApplyRISHOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized DWI: b0s and the trained shells")
    out_bval = File(exists=True, desc="b-values of out_file")
    out_bvec = File(exists=True, desc="b-vectors of out_file")


class ApplyRISH(SimpleInterface):
    """RISH-harmonize one target-scanner DWI; refit DKI on ``out_file`` afterwards.

    >>> apply = ApplyRISH(keep_residual=False)
    >>> apply.inputs.keep_residual, apply.inputs.engine
    (False, 'auto')

    Outputs are named ``<sub>_<ses>_<run>_desc-rish_dwi.nii.gz`` (+ ``.bval``/``.bvec``).
    In an existing pipeline, before the DKI fit of the harmonized series:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> from dkiharm_nipype.interfaces.dki import FitDKI
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> apply_rish = pe.Node(ApplyRISH(), name="apply_rish")
    >>> fit = pe.Node(FitDKI(), name="fit")
    >>> wf.connect([(apply_rish, fit, [("out_file", "dwi_file"), ("out_bval", "bval_file"),
    ...                                ("out_bvec", "bvec_file")])])
    >>> sorted(wf.inputs.apply_rish.get())[:2]
    ['b_tolerance', 'bval_file']
    """

    input_spec = _ApplyRISHInputSpec
    output_spec = _ApplyRISHOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        model = RISHModel.load(inputs.scales_file, inputs.template_file, inputs.card_file)
        if not np.isclose(model.options.get("b_tolerance", B_TOLERANCE), inputs.b_tolerance):
            model.options["b_tolerance"] = inputs.b_tolerance
        fa = inputs.fa_file if isdefined(inputs.fa_file) else None
        scan = RISHScan.from_files(
            inputs.dwi_file, inputs.bval_file, inputs.bvec_file, inputs.mask_file, fa
        )
        dwi, bvals, bvecs = harmonize_dwi(
            model,
            scan,
            keep_residual=inputs.keep_residual,
            engine=inputs.engine,
            n_threads=inputs.num_threads,
            work_dir=runtime.cwd,
        )
        stem = source_stem(inputs.dwi_file)
        out = fname_presuffix(f"{stem}_desc-rish_dwi.nii.gz", newpath=runtime.cwd)
        ref = nb.load(inputs.dwi_file)
        _save_map(dwi, ref, out)
        bval = out.replace(".nii.gz", ".bval")
        bvec = out.replace(".nii.gz", ".bvec")
        np.savetxt(bval, bvals[None], fmt="%g")
        np.savetxt(bvec, bvecs.T, fmt="%.6f")
        self._results.update(out_file=out, out_bval=bval, out_bvec=bvec)
        return runtime
