"""Entry point of the ``dkiharm`` BIDS-App: options -> checks -> workflow -> run -> publish."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from ..config import RunConfig
from ..errors import DkiharmInputError
from .monitor import DATE_FORMAT, LOG_FORMAT, crash_reason, use_one_format

LOGGER = logging.getLogger("dkiharm")


def _setup_logging(verbose: int, work_dir: Path | None = None) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # INFO by default, DEBUG with -v
    logging.basicConfig(
        level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT, stream=sys.stdout, force=True
    )
    # node chatter only with -v; interface messages (training progress) by default
    levels = {
        "workflow_level": {0: "WARNING", 1: "INFO"}.get(verbose, "DEBUG"),
        "interface_level": "INFO" if verbose < 2 else "DEBUG",
    }
    from nipype import config as ncfg
    from nipype import logging as nlogging

    for key, value in levels.items():
        ncfg.set("logging", key, value)
    ncfg.set("execution", "check_version", "false")
    nlogging.update_logging(ncfg)
    # a crash is reported once, in one line, at the end; not as Nipype's traceback dumps
    use_one_format()
    # MultiProc workers start fresh interpreters that read nipype.cfg, not this process's
    # settings: give them the same levels through a config folder in the work directory
    if work_dir is not None and "NIPYPE_CONFIG_DIR" not in os.environ:
        cfg_dir = work_dir / ".nipype"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "[logging]",
            *(f"{k} = {v}" for k, v in levels.items()),
            "[execution]",
            "check_version = false",
            "",
        ]
        (cfg_dir / "nipype.cfg").write_text("\n".join(lines))
        os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)  # schema-path chatter
    # ... and the same record format, through the forkserver they are forked from
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["dkiharm_nipype.cli.worker_logging"]
    )


def _start_log_file(logs_dir: Path) -> Path:
    """Copy the console into ``output_dir/logs/dkiharm-<time>.log`` (workers included)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / f"dkiharm-{time.strftime('%Y%m%d-%H%M%S')}.log"
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "dkiharm_log", False)]:
        root.removeHandler(old)  # an earlier run in this process (main() called again)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d " + DATE_FORMAT))
    handler.dkiharm_log = True
    root.addHandler(handler)
    os.environ["DKIHARM_LOG_FILE"] = str(path)
    return path


def _scan_options(config: RunConfig, requested_preproc: str) -> dict:
    from ..utils.published import SCAN_OPTIONS

    options = {k: getattr(config, k) for k in SCAN_OPTIONS}
    options["preproc_requested"] = requested_preproc
    return options


def _dwi_sidecar(scan) -> Path:
    from ..interfaces.bids import derivative_name

    return derivative_name(scan.dwi, space="dwi", desc="preproc", suffix="dwi", extension=".json")


def _label(key: str) -> str:
    return key.replace("_", " ")


def _node_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", text)


def _units(scans, config: RunConfig) -> dict:
    """Top-level children of the run's workflow that the console follows."""
    from .monitor import Unit

    units = {}
    for scan in scans:
        tag = _node_name(scan.key)
        units[f"{tag}_wf"] = Unit(label=_label(scan.key), scan=scan.key)
        units[f"harmonize_{tag}_wf"] = Unit(_label(scan.key), scan.key, "harmonize")
        units[f"labels_{tag}_wf"] = Unit(_label(scan.key), scan.key, "register")
    for scanner in sorted({s.scanner for s in scans}):
        units[f"train_{_node_name(scanner)}"] = Unit(f"scanner {scanner}", None, "train")
    units["evaluation_wf"] = Unit("study", None, "evaluate")
    for name in config.experiments:
        units[f"experiment_{name}_wf"] = Unit("study", None, f"experiment {name}")
    return units


class _Publisher:
    """Publishes each finished unit's stored files; records provenance of finished scans."""

    def __init__(self, staging: Path, config: RunConfig, scans, options: dict, deferred: bool):
        from ..utils.published import scan_provenance

        self.staging, self.output_dir = Path(staging), config.output_dir
        self.bids_dir = config.bids_dir
        self.deferred = deferred
        self.pending: list[tuple[str, dict]] = []
        self.count = 0
        self.scans = {f"{_node_name(s.key)}_wf": s for s in scans}
        self.provenance = {u: scan_provenance(s, options) for u, s in self.scans.items()}

    def __call__(self, unit: str, stored: dict[str, list[str]]) -> None:
        if self.deferred:
            self.pending.append((unit, stored))
        else:
            self.publish(unit, stored)

    def publish(self, unit: str, stored: dict[str, list[str]]) -> None:
        from ..utils.derivatives import publish_files
        from ..utils.published import record_provenance, relative_files

        files = [Path(p) for paths in stored.values() for p in paths]
        self.count += len(
            publish_files(files, self.staging, self.output_dir, bids_dir=self.bids_dir)
        )
        if unit in self.provenance and "ds_dwi" in stored:
            rel = relative_files(stored, self.staging)
            sidecar = (
                self.output_dir / Path(rel["ds_dwi"]).parent / _dwi_sidecar(self.scans[unit]).name
            )
            record_provenance(sidecar, self.provenance[unit], rel)

    def flush(self) -> None:
        for unit, stored in self.pending:
            self.publish(unit, stored)
        self.pending = []


def _execute(workflow, config: RunConfig, units: dict, publisher: _Publisher, *, in_group=False):
    """Run ``workflow``; returns its :class:`~.monitor.RunMonitor` (failures, reuse)."""
    from .monitor import RunMonitor

    # the group level runs two graphs (scans first, then harmonization): size each one's jobs
    _request_batch_resources(workflow, config, warn_unused_gpu=not in_group)

    monitor = RunMonitor(workflow, units, publisher)
    args = config.execution.nipype_plugin_args()
    graph_plugin = config.execution.plugin.endswith(("Graph", "DAGMan"))
    if not graph_plugin:
        args["status_callback"] = monitor
    workflow.config["execution"]["stop_on_first_crash"] = config.stop_on_first_crash
    try:
        workflow.run(plugin=config.execution.plugin, plugin_args=args)
    except Exception:  # Nipype re-raises the first failure once the others have run
        if config.stop_on_first_crash or graph_plugin or not monitor.failures:
            raise
    if graph_plugin:  # no callbacks: the whole run succeeded, publish what it staged
        from ..utils.derivatives import publish_derivatives

        publisher.count += len(
            publish_derivatives(publisher.staging, config.output_dir, bids_dir=config.bids_dir)
        )
    publisher.flush()
    monitor.fill_crash_details(config.output_dir / "logs" / "crash")
    skipped = [
        f"{units[u].stage or 'steps'} {units[u].label}"
        for u in monitor.skipped_units()
        if u in units
    ]
    if skipped and monitor.failures:
        LOGGER.warning("not run, as a step they need failed: %s", ", ".join(skipped))
    if monitor.reused:
        LOGGER.info(
            "%d of %d steps reused from the work directory %s",
            monitor.reused,
            monitor.reused + monitor.executed + len(monitor.failures),
            config.work_dir,
        )
    return monitor


def _record_failures(config: RunConfig, scans, failures) -> Path | None:
    """Merge this run's failures into ``output_dir/logs/failures.tsv`` (other jobs' rows kept)."""
    from .monitor import write_failures

    path = config.output_dir / "logs" / "failures.tsv"
    mine = {s.key for s in scans}
    kept = []
    if path.is_file():
        from .monitor import Failure

        for line in path.read_text().splitlines()[1:]:
            cells = (line.split("\t") + [""] * 4)[:4]
            if cells[0] not in mine:
                kept.append(Failure(*cells, node=""))
    rows = kept + list(failures)
    if not rows:
        path.unlink(missing_ok=True)
        return None
    return write_failures(rows, path)


def _run_participant(
    config: RunConfig, scans, options: dict, workflow=None, staging=None, *, in_group=False
):
    if workflow is None:
        from ..workflows.base import init_dkiharm_wf

        workflow, staging = init_dkiharm_wf(config=config, scans=scans)
    publisher = _Publisher(staging, config, scans, options, config.stop_on_first_crash)
    monitor = _execute(workflow, config, _units(scans, config), publisher, in_group=in_group)
    return monitor.failures, publisher.count


def _published_scans(config: RunConfig, scans, options: dict):
    from ..dki.maps import ALL_METRICS
    from ..utils.published import find_published

    return find_published(
        scans, config.output_dir, options, dwi_sidecar=_dwi_sidecar, metrics=ALL_METRICS
    )


def _run_group(config: RunConfig, scans, options: dict):
    """Participant processing of the scans not yet published, then harmonization from what
    is published (failed scans are left out with a note)."""
    from ..study import StudyDesignError
    from ..workflows.base import init_dkiharm_wf

    usable, reasons = _published_scans(config, scans, options)
    failures, count = [], 0
    todo = [s for s in scans if s.key not in usable]
    if usable:
        LOGGER.info(
            "%d of %d scans use their published participant outputs (no preprocessing or fit)",
            len(usable),
            len(scans),
        )
    if todo:
        shown = ", ".join(f"{_label(s.key)} ({reasons[s.key]})" for s in todo[:3])
        more = f" and {len(todo) - 3} more" if len(todo) > 3 else ""
        LOGGER.info("processing %d scan(s) first: %s%s", len(todo), shown, more)
        participant = replace(config, analysis_level="participant", models_dir=None)
        failures, count = _run_participant(participant, todo, options, in_group=True)
        usable, reasons = _published_scans(config, scans, options)
    good = [replace(s, published=usable[s.key]) for s in scans if s.key in usable]
    left_out = [s for s in scans if s.key not in usable]
    if left_out:
        LOGGER.warning(
            "left out of training and evaluation (failed): %s",
            ", ".join(_label(s.key) for s in left_out),
        )
    _log_snr(config, [s.published.snr for s in good])
    try:
        workflow, staging = init_dkiharm_wf(config=config, scans=good)
    except StudyDesignError as exc:
        if not left_out:
            raise
        _record_failures(config, scans, failures)
        raise StudyDesignError(
            f"{exc} (after leaving out {len(left_out)} failed scan(s), listed in "
            f"{config.output_dir / 'logs' / 'failures.tsv'})"
        ) from None
    if workflow is None:
        return failures, count
    publisher = _Publisher(staging, config, [], options, config.stop_on_first_crash)
    monitor = _execute(workflow, config, _units(good, config), publisher)
    from ..utils.derivatives import publish_derivatives

    # what the graph staged outside per-scan sinks (report, tables): every node that made it ran
    count += publisher.count + len(
        publish_derivatives(staging, config.output_dir, bids_dir=config.bids_dir)
    )
    return failures + monitor.failures, count


def _log_snr(config: RunConfig, snr_files=None) -> None:
    """The SNR table (and so the reference scanner) once, at INFO; also writes snr.tsv."""
    from ..evaluation.scores import snr_table
    from ..study import read_snr_rows
    from ..utils.derivatives import aggregate_snr

    rows = aggregate_snr(config.output_dir)
    if snr_files is not None:  # the group level: the scans it harmonizes, as its graph sees
        rows = read_snr_rows(snr_files)
    if rows:
        table, best = snr_table(rows)
        LOGGER.info("white-matter SNR of the published scans:\n%s", table)
        if config.reference_scanner and config.reference_scanner != best:
            LOGGER.info("reference scanner: %s (--reference-scanner)", config.reference_scanner)


def _summary(config: RunConfig, started: float, count: int, failures, log_file) -> str:
    """The closing lines: where the outputs are, the report, the CV table, failures."""
    from .monitor import format_duration

    out = config.output_dir
    lines = [
        f"dkiharm {config.analysis_level} level finished in "
        f"{format_duration(time.time() - started)}: {count} file(s) published in {out}"
    ]
    if config.analysis_level == "group" and (out / "report.html").is_file():
        lines.append(f"  report: {out / 'report.html'}")
        cv = _cv_table(out / "evaluation" / "cv.tsv")
        if cv:
            lines.append(cv)
    if failures:
        lines.append(
            f"  {len(failures)} step(s) failed (listed in {out / 'logs' / 'failures.tsv'}):"
        )
        lines += [f"    {_label(f.scan)}: {f.step}: {f.reason}" for f in failures]
    lines.append(f"  log: {log_file}")
    return "\n".join(lines)


def _cv_table(path: Path) -> str:
    """White-matter CV before and after harmonization, one row per map (cv.tsv means)."""
    import csv
    from collections import defaultdict

    if not path.is_file():
        return ""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("roi", "WM") != "WM":
            continue
        try:
            values[row["param"], row["method"]].append(float(row["cv_mean"]))
        except (KeyError, ValueError):
            continue
    metrics = list(dict.fromkeys(m for m, _ in values))
    if not metrics:
        return ""
    lines = ["  WM CV (%)   before   after  (mean over the evaluated subjects)"]
    for metric in metrics:
        before, after = values.get((metric, "before")), values.get((metric, "dl"))
        if before and after:
            b, a = 100 * sum(before) / len(before), 100 * sum(after) / len(after)
            lines.append(f"  {metric.upper():<10}{b:8.2f}{a:8.2f}")
    return "\n".join(lines) if len(lines) > 1 else ""


def run(config: RunConfig) -> int:
    """Run one BIDS-App call; returns the exit status."""
    from ..utils.bids import attach_preprocessed, collect_scans, load_layout, summary_table

    os.environ.setdefault("MRTRIX_QUIET", "1")
    LOGGER.info("indexing %s", config.bids_dir)
    layout = load_layout(config.bids_dir, database_path=config.bids_database_dir)
    scans = collect_scans(
        layout,
        participant_label=config.participant_label,
        session_label=config.session_label,
        bids_filters=config.bids_filters,
        scanner_entity=config.scanner_entity,
    )
    print(f"dkiharm found in {config.bids_dir}:\n{summary_table(scans)}", flush=True)
    if config.derivatives:
        scans = attach_preprocessed(scans, config.derivatives)
        n_pre = sum(s.preprocessed is not None for s in scans)
        LOGGER.info(
            "%d of %d scans come preprocessed (--derivatives): their preprocessing is skipped",
            n_pre,
            len(scans),
        )

    from ..preproc.modes import resolved_preproc_mode
    from .checks import check_models, check_output_dir, check_plugin, check_work_dir, preflight

    check_output_dir(config.output_dir)
    check_work_dir(config.work_dir)
    check_plugin(config.execution.plugin)
    requested_preproc = config.preproc
    # decide (and log) once whether FSL runs: "auto" becomes "fsl" or "mrtrix"
    config = replace(config, preproc=resolved_preproc_mode(config.preproc, config.denoiser))
    preflight(scans, b_max=config.b_max, run_fsl=config.preproc == "fsl")
    if config.models_dir is not None:
        check_models(scans, config.models_dir)

    from ..workflows.base import init_dkiharm_wf
    from .boilerplate import write_citation
    from .parser import write_config

    # the whole graph is built before anything is written: a design the group level cannot
    # run (one scanner, an unknown reference) stops here, before any processing
    workflow, staging = init_dkiharm_wf(config=config, scans=scans)
    _validate_input(config)
    write_config(config, config.output_dir / "logs" / "config.toml")
    log_file = _start_log_file(config.output_dir / "logs")  # the input checks passed
    write_citation(config, config.output_dir / "logs", scans=scans, workflow=workflow)
    if config.write_graph:
        from .graphs import write_graphs

        write_graphs(config, scans, workflow, staging)
    if config.boilerplate_only:
        LOGGER.info("methods text written to %s (--boilerplate-only)", config.output_dir / "logs")
        return 0
    if workflow is None:
        return 0
    started = time.time()
    options = _scan_options(config, requested_preproc)
    if config.analysis_level == "group":
        failures, count = _run_group(config, scans, options)
        _report_baseline(config.output_dir / "evaluation" / "baseline.tsv")
    else:
        failures, count = _run_participant(config, scans, options, workflow, staging)
        _log_snr(config)
    _record_failures(config, scans, failures)
    print(_summary(config, started, count, failures, log_file), flush=True)
    for failure in failures:
        where = f" (crash file: {failure.crash_file})" if failure.crash_file else ""
        print(f"dkiharm: error: node {failure.node} failed: {failure.reason}{where}",
              file=sys.stderr)  # fmt: skip
    return 1 if failures else 0


def _report_baseline(path: Path) -> None:
    """The networks against the linear baseline (held out), a warning where one loses."""
    from ..evaluation.evaluate import read_tsv

    for r in read_tsv(path):
        line = (
            f"scanner {r['scanner']} {r['param'].upper()}: held-out NRMSE-to-reference network "
            f"{float(r['nrmse_dl']):.3f}, linear baseline {float(r['nrmse_linear']):.3f}"
            + (f", noise floor {float(r['nrmse_floor']):.3f}" if r["nrmse_floor"] else "")
            + f" ({r['source']})"
        )
        if r["dl_beats_linear"] == "True" and r["chosen"] != "linear":
            LOGGER.info(line)
        else:
            LOGGER.warning("WARNING: the network does not beat the linear baseline: %s", line)


def _validate_input(config: RunConfig) -> None:
    """The BIDS validator on the input, after dkiharm's own checks and before processing."""
    from ..utils.bids import validate_bids

    if config.skip_bids_validation:
        LOGGER.info("BIDS validation of %s skipped (--skip-bids-validation)", config.bids_dir)
        return
    warnings = validate_bids(
        config.bids_dir, participant_label=config.participant_label, logger=LOGGER
    )
    LOGGER.info("%s passed the BIDS validator (%d kind(s) of warning)", config.bids_dir,
                len(warnings))  # fmt: skip


def _request_batch_resources(workflow, config: RunConfig, *, warn_unused_gpu=True) -> None:
    """Batch plugins: each node's job asks for its own CPUs, memory and, if it can use one,
    the GPU of ``--gpu-plugin-args`` (MultiProc and Linear are left as they are)."""
    from ..utils.resources import apply_batch_resources

    execution = config.execution
    applied = apply_batch_resources(
        workflow, execution.plugin, execution.plugin_args, execution.gpu_plugin_args
    )
    gpu = execution.gpu_plugin_args
    with_gpu = sum(1 for _, args in applied if gpu and args.endswith(gpu))
    if applied:
        LOGGER.info(
            "%s: per-node CPUs/memory on %d job(s), '%s' on %d",
            execution.plugin,
            len(applied),
            gpu,
            with_gpu,
        )
    if gpu and not with_gpu and warn_unused_gpu:
        LOGGER.warning(
            "--gpu-plugin-args '%s' asked for no job: no node of this run can use a GPU "
            "(training and inference run at the group level or with --models)",
            gpu,
        )


def _crash_summary(exc: BaseException, crash_dir: Path) -> str:
    """One line naming the failed node and the cause, read from Nipype's newest crash file."""
    crashes = sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime)
    text = crashes[-1].read_text(errors="replace") if crashes else str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    node = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Node:")), None)
    if node is None:
        found = re.search(r"executing Node ([\w.]+)", text)
        node = found.group(1) if found else "?"
    cause = crash_reason(text) if lines else repr(exc)
    where = f" (crash file: {crashes[-1]})" if crashes else ""
    return f"node {node} failed: {cause}{where}"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    from .parser import parse_args

    config = parse_args(argv)
    _setup_logging(config.verbose, config.work_dir)
    if not config.verbose:
        # numerical warnings of the tools (also in MultiProc workers) are noise for users
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        warnings.simplefilter("ignore")
    try:
        status = run(config)
    except DkiharmInputError as exc:
        print(f"dkiharm: error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(
            "dkiharm: interrupted; rerun the same command to resume from the work directory",
            file=sys.stderr,
        )
        status = 130
    except RuntimeError as exc:
        summary = _crash_summary(exc, config.output_dir / "logs" / "crash")
        print(f"dkiharm: error: {summary}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
