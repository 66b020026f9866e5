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

LOGGER = logging.getLogger("dkiharm")


def _setup_logging(verbose: int, work_dir: Path | None = None) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # INFO by default, DEBUG with -v
    logging.basicConfig(
        level=level,
        format="%(asctime)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # node chatter only with -v; interface messages (training loss per epoch) by default
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


def run(config: RunConfig) -> int:
    """Run one BIDS-App call; returns the exit status."""
    from ..utils.bids import collect_scans, load_layout, summary_table

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

    from ..preproc.modes import resolved_preproc_mode
    from .checks import check_models, check_output_dir, check_plugin, preflight

    check_output_dir(config.output_dir)
    check_plugin(config.execution.plugin)
    # decide (and log) once whether FSL runs: "auto" becomes "fsl" or "mrtrix"
    config = replace(config, preproc=resolved_preproc_mode(config.preproc, config.denoiser))
    preflight(scans, b_max=config.b_max, run_fsl=config.preproc == "fsl")
    if config.models_dir is not None:
        check_models(scans, config.models_dir)

    from ..evaluation.scores import snr_table
    from ..utils.derivatives import aggregate_snr, publish_derivatives
    from ..workflows.base import init_dkiharm_wf

    workflow, staging = init_dkiharm_wf(config=config, scans=scans)
    _validate_input(config)
    from .boilerplate import write_citation
    from .parser import write_config

    write_config(config, config.output_dir / "logs" / "config.toml")

    write_citation(config, config.output_dir / "logs", scans=scans)
    if config.write_graph:
        from .graphs import write_graphs

        write_graphs(config, scans, workflow, staging)
    if config.boilerplate_only:
        LOGGER.info("methods text written to %s (--boilerplate-only)", config.output_dir / "logs")
        return 0
    if workflow is None:
        return 0
    _request_batch_resources(workflow, config)
    started = time.time()
    workflow.run(plugin=config.execution.plugin, plugin_args=config.execution.nipype_plugin_args())
    written = publish_derivatives(staging, config.output_dir, bids_dir=config.bids_dir)
    snr_rows = aggregate_snr(config.output_dir)
    if snr_rows:
        table, _ = snr_table(snr_rows)
        print(table, flush=True)
    _report_baseline(config.output_dir / "evaluation" / "baseline.tsv")
    LOGGER.info(
        "finished in %.0f s; %d derivative file(s) in %s",
        time.time() - started,
        len(written),
        config.output_dir,
    )
    return 0


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


def _request_batch_resources(workflow, config: RunConfig) -> None:
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
    if gpu and not with_gpu:
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
    # the innermost exception: the last "SomethingError: message" line of the traceback
    causes = [
        ln
        for ln in lines
        if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", ln)
        and "NodeExecutionError" not in ln
        and not ln.startswith("RuntimeError: Trace")
    ]
    cause = causes[-1].split(": ", 1)[1] if causes else (lines[-1] if lines else repr(exc))
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
        summary = _crash_summary(exc, config.work_dir / "crash")
        print(f"dkiharm: error: {summary}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
