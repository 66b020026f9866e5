"""Nipype interfaces over :mod:`dkiharm_nipype.evaluation.evaluate` and
:mod:`dkiharm_nipype.report`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..evaluation.evaluate import EVAL_PARAMS, TABLE_FILES, ScanMaps, evaluate_study
from ..registration import ENGINES


class _EvaluateHarmonizationInputSpec(BaseInterfaceInputSpec):
    scans = traits.List(
        traits.Dict(),
        mandatory=True,
        desc="one dict per scan: subject, scanner, run, maps ({method: {param: path}}) and "
        "optionally brain_mask",
    )
    reference = traits.Str(mandatory=True, desc="the reference scanner")
    params = traits.List(
        traits.Str(), value=list(EVAL_PARAMS), usedefault=True, desc="parameters evaluated"
    )
    engine = traits.Enum(
        "dipy-syn", *[e for e in ENGINES if e not in ("dipy-syn", "fnirt", "auto")],
        usedefault=True, desc="within-subject registration engine ('none': already aligned)",
    )  # fmt: skip
    wm_mask = File(exists=True, desc="WM mask in the reference scan's space (all subjects)")
    wm_masks = traits.Dict(traits.Str(), File(exists=True), desc="per-subject WM masks")
    roi_atlas = File(exists=True, desc="ROI label image in the reference scan's space")
    roi_atlases = traits.Dict(traits.Str(), File(exists=True), desc="per-subject ROI atlases")
    roi_table = File(exists=True, desc="TSV naming the atlas labels (index, name[, abbreviation])")
    save_maps = traits.Bool(True, usedefault=True, desc="write the registered maps (report)")
    seed = traits.Int(0, usedefault=True, desc="seed of stochastic registration engines")
    num_threads = traits.Int(1, usedefault=True, desc="registration threads")
    halves = traits.Dict(
        traits.Str(),
        traits.List(traits.Dict(traits.Str(), File(exists=True))),
        desc="per subject, two {param: path} maps of interleaved halves of its reference scan "
        "(the noise floor of subjects without a reference rescan)",
    )
    card_files = traits.List(File(exists=True), desc="the networks' model cards (JSON)")
    held_out = traits.Bool(
        True,
        usedefault=True,
        desc="the evaluated subjects were held out of training (else the baseline comparison "
        "uses the cards' held-out validation blocks)",
    )


class _EvaluateHarmonizationOutputSpec(TraitedSpec):
    out_dir = Directory(desc="tables, CV maps, registered maps (evaluate_study's out_dir)")
    cv_tsv = File(desc="inter-scanner CV in WM and ROIs")
    nrmse_tsv = File(desc="NRMSE-to-reference in WM and ROIs")
    scanrescan_tsv = File(desc="scan-rescan NRMSE in WM and ROIs")
    excluded_tsv = File(desc="subjects left out of the CV or of the evaluation, and why")


class EvaluateHarmonization(SimpleInterface):
    """CV, NRMSE-to-reference and scan-rescan NRMSE of every method on every subject.

    Each entry of ``scans`` names one scan and its maps per method, e.g.
    ``{"subject": "01", "scanner": "A", "run": "1", "maps": {"before": {"fa": ..., "md":
    ..., "mk": ...}, "dl": {"mk": ...}}}`` (see :func:`~dkiharm_nipype.evaluation.evaluate.
    evaluate_study`).

    Examples
    --------
    >>> EvaluateHarmonization(reference="D", engine="none").inputs.engine
    'none'

    In an existing pipeline, the scans gathered by an upstream node, then the report:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> gather = pe.Node(niu.IdentityInterface(fields=["scans", "atlas"]), name="gather")
    >>> evaluate = pe.Node(EvaluateHarmonization(reference="D"), name="evaluate")
    >>> report = pe.Node(HarmonizationReport(), name="report")
    >>> wf.connect([(gather, evaluate, [("scans", "scans"), ("atlas", "roi_atlas")]),
    ...             (evaluate, report, [("out_dir", "tsv_dir")])])
    >>> sorted(wf.get_node("evaluate").inputs.get())[:4]
    ['card_files', 'engine', 'halves', 'held_out']
    """

    input_spec = _EvaluateHarmonizationInputSpec
    output_spec = _EvaluateHarmonizationOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        scans = [
            ScanMaps(
                subject=str(s["subject"]),
                scanner=str(s["scanner"]),
                maps=s["maps"],
                run=str(s.get("run", "1")),
                brain_mask=s.get("brain_mask"),
            )
            for s in inputs.scans
        ]

        def _either(one, many):
            if isdefined(many) and many:
                return dict(many)
            return one if isdefined(one) else None

        out_dir = os.path.join(runtime.cwd, "evaluation")
        evaluate_study(
            scans,
            reference=inputs.reference,
            out_dir=out_dir,
            params=inputs.params,
            engine=inputs.engine,
            wm_masks=_either(inputs.wm_mask, inputs.wm_masks),
            atlases=_either(inputs.roi_atlas, inputs.roi_atlases),
            roi_table=inputs.roi_table if isdefined(inputs.roi_table) else None,
            save_maps=inputs.save_maps,
            seed=inputs.seed,
            n_threads=inputs.num_threads,
            halves=dict(inputs.halves) if isdefined(inputs.halves) else None,
            cards=[json.loads(Path(f).read_text()) for f in inputs.card_files]
            if isdefined(inputs.card_files)
            else [],
            held_out=inputs.held_out,
        )
        self._results["out_dir"] = out_dir
        for key in ("cv", "nrmse", "scanrescan", "excluded"):
            self._results[f"{key}_tsv"] = os.path.join(out_dir, TABLE_FILES[key])
        return runtime


class _HarmonizationReportInputSpec(BaseInterfaceInputSpec):
    tsv_dir = Directory(exists=True, mandatory=True, desc="EvaluateHarmonization's out_dir")
    snr_tsv = File(exists=True, desc="SNR table (snr.tsv) for Table 3")
    experiment_dir = Directory(exists=True, desc="folder of the experiment-*.tsv tables")
    representative = traits.Str(desc="subject shown in the group page's picture panels")
    training_logs = InputMultiObject(
        File(exists=True), desc="the networks' training logs (scanner-<label>_training.tsv)"
    )


class _HarmonizationReportOutputSpec(TraitedSpec):
    report = File(desc="the group page (report.html)")
    subject_pages = traits.List(File(), desc="one sub-<label>.html per subject")


class HarmonizationReport(SimpleInterface):
    """The self-contained HTML report (:func:`dkiharm_nipype.report.html.build_report`).

    Examples
    --------
    After the evaluation, with the SNR table of the participant level:

    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> wf = pe.Workflow(name="my_pipeline")
    >>> evaluate = pe.Node(EvaluateHarmonization(reference="D"), name="evaluate")
    >>> snr = pe.Node(niu.IdentityInterface(fields=["snr_tsv"]), name="snr")
    >>> report = pe.Node(HarmonizationReport(representative="01"), name="report")
    >>> wf.connect([(evaluate, report, [("out_dir", "tsv_dir")]),
    ...             (snr, report, [("snr_tsv", "snr_tsv")])])
    >>> report.inputs.representative
    '01'
    """

    input_spec = _HarmonizationReportInputSpec
    output_spec = _HarmonizationReportOutputSpec

    def _run_interface(self, runtime):
        from ..report.html import build_report

        inputs = self.inputs
        pages = build_report(
            inputs.tsv_dir,
            os.path.join(runtime.cwd, "report"),
            snr_tsv=inputs.snr_tsv if isdefined(inputs.snr_tsv) else None,
            experiment_dir=inputs.experiment_dir if isdefined(inputs.experiment_dir) else None,
            representative=inputs.representative if isdefined(inputs.representative) else None,
            training_logs=inputs.training_logs if isdefined(inputs.training_logs) else (),
        )
        self._results["report"] = str(pages[0])
        self._results["subject_pages"] = [str(p) for p in pages[1:]]
        return runtime
