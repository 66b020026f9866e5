"""Following a Nipype run: progress lines, reused steps, failures, per-unit publishing.

:class:`RunMonitor` is Nipype's ``status_callback`` (called in the main process with each
node and ``"start"``, ``"end"`` or ``"exception"``). It groups the nodes of the flattened
graph into *units* (the top-level children of the run's workflow: one per scan, per
scanner's training, the evaluation ...) and *stages* (a unit's preprocessing, fit,
registration ...), prints one line whenever a stage of a unit finishes, counts the steps
Nipype found in its cache, remembers every failed node, and hands a unit's stored files to a
publisher as soon as every node of that unit has finished, so that a scan's derivatives
never wait for other scans.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger("dkiharm")

#: One line per record, one timestamp style, for dkiharm's and Nipype's loggers alike.
LOG_FORMAT = "%(asctime)s [%(name)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"

#: Nipype messages that repeat, as tracebacks, what the closing summary says in one line.
_CRASH_CHATTER = (
    "Saving crash info",
    "could not run node",
    "Node %s failed",
    "***",
    "crashfile:",
    "[Node] Error on",
    "Storing result file without outputs",
)


def quiet_crash_chatter(record: logging.LogRecord) -> bool:
    """Logging filter: drop Nipype's per-crash messages (the run reports each failure)."""
    return not str(record.msg).lstrip().startswith(_CRASH_CHATTER)


def use_one_format(log_file: str | None = None) -> None:
    """Route Nipype's records through the root logger's single-line format."""
    import sys

    logging.basicConfig(format=LOG_FORMAT, datefmt=DATE_FORMAT, stream=sys.stdout, force=True)
    from nipype import logging as _nipype_logging  # noqa: F401 - adds Nipype's own handler

    logging.getLogger("nipype").handlers.clear()
    logging.getLogger("nipype.workflow").addFilter(quiet_crash_chatter)
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d " + DATE_FORMAT))
        logging.getLogger().addHandler(handler)


#: Stage of a node inside a per-scan workflow, by the name of its sub-workflow.
SCAN_STAGES = {"dwi_preproc_wf": "preproc", "preprocessed_wf": "preproc", "dki_fit_wf": "fit"}


@dataclass
class Unit:
    """A top-level child of the run's workflow, as the console and the publisher see it."""

    label: str  # e.g. "sub-03 ses-B run-1" or "scanner A"
    scan: str | None = None  # scan key when the unit belongs to one scan
    stage: str | None = None  # the unit's one stage; None: stages from sub-workflows


@dataclass
class Failure:
    """One failed node, as written to ``failures.tsv``."""

    scan: str
    step: str
    reason: str
    crash_file: str
    node: str


@dataclass
class _Progress:
    nodes: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    busy: float = 0.0  # seconds its nodes ran, summed


def format_duration(seconds: float) -> str:
    """``4.1 s``, ``1 min 02 s``, ``1 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def flat_node_names(workflow) -> list[str]:
    """Full names of the nodes Nipype will execute (identity nodes are removed by Nipype)."""
    from nipype.interfaces.utility import IdentityInterface

    names = []
    for node in workflow._create_flat_graph().nodes():
        if isinstance(node.interface, IdentityInterface) and not getattr(node, "joinsource", None):
            continue
        names.append(node.fullname)
    return names


class RunMonitor:
    """Nipype ``status_callback`` that reports progress and isolates failures.

    Parameters
    ----------
    workflow
        The workflow about to run (its flat graph defines units and stages).
    units
        Top-level child name -> :class:`Unit`; children not named are followed silently.
    on_unit_done
        Called with the unit name and ``{sink name: stored files}`` once every node of the
        unit finished without error.
    """

    def __init__(
        self,
        workflow,
        units: dict[str, Unit],
        on_unit_done: Callable[[str, dict[str, list[str]]], None] | None = None,
    ) -> None:
        self.units = units
        self.on_unit_done = on_unit_done
        self.started = time.time()
        self.failures: list[Failure] = []
        self.reused = 0
        self.executed = 0
        self.failed_units: set[str] = set()
        self.completed_units: set[str] = set()
        self._unit_nodes: dict[str, set[str]] = {}
        self._stages: dict[tuple[str, str], _Progress] = {}
        self._started: dict[str, float] = {}
        self._finished: set[str] = set()
        self._stored: dict[str, dict[str, list[str]]] = {}
        self._stages_done = 0
        for name in flat_node_names(workflow):
            unit = self.unit_of(name)
            self._unit_nodes.setdefault(unit, set()).add(name)
            stage = self.stage_of(name)
            if stage is not None:
                self._stages.setdefault((unit, stage), _Progress()).nodes.add(name)
        self.total_nodes = sum(len(v) for v in self._unit_nodes.values())

    # --- classification --------------------------------------------------------------
    @staticmethod
    def unit_of(fullname: str) -> str:
        parts = fullname.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    def stage_of(self, fullname: str) -> str | None:
        unit = self.units.get(self.unit_of(fullname))
        if unit is None:
            return None
        if unit.stage is not None:
            return unit.stage
        parts = fullname.split(".")
        return SCAN_STAGES.get(parts[2]) if len(parts) > 3 else None

    def scan_of(self, fullname: str) -> str:
        unit = self.units.get(self.unit_of(fullname))
        if unit is None:
            return ""
        return unit.scan or unit.label

    # --- the callback --------------------------------------------------------------------
    def __call__(self, node, status: str) -> None:
        try:
            self._handle(node, status)
        except Exception:  # a console problem must never stop the run
            LOGGER.debug("progress callback failed", exc_info=True)

    def _handle(self, node, status: str) -> None:
        name = node.fullname
        unit = self.unit_of(name)
        if status == "start":
            self._started[name] = time.time()
            return
        if name in self._finished:  # Nipype reports a failed in-process node as ended too
            return
        self._finished.add(name)
        if status == "exception":
            self.failed_units.add(unit)
            self.failures.append(
                Failure(
                    scan=self.scan_of(name) or unit,
                    step=self._step_name(name),
                    reason="",
                    crash_file="",
                    node=name,
                )
            )
            shown = self.units[unit].label if unit in self.units else unit
            LOGGER.warning("failed: %s of %s (details at the end)", self._step_name(name), shown)
            return
        if status != "end":
            return
        if self._was_reused(node):
            self.reused += 1
        else:
            self.executed += 1
        if name.rsplit(".", 1)[-1].startswith("ds_"):
            self._remember_stored(unit, node)
        stage_name = self.stage_of(name)
        stage = self._stages.get((unit, stage_name or ""))
        if stage is not None and name in stage.nodes:
            stage.done.add(name)
            stage.busy += time.time() - self._started.get(name, time.time())
            if stage.done == stage.nodes:
                self._stage_line(unit, stage_name, stage)
        nodes = self._unit_nodes.get(unit, set())
        if (
            unit not in self.failed_units
            and unit not in self.completed_units
            and nodes <= self._finished
        ):
            self.completed_units.add(unit)
            if self.on_unit_done is not None:
                self.on_unit_done(unit, self._stored.get(unit, {}))

    def _was_reused(self, node) -> bool:
        """Whether Nipype took the node from its cache (its result predates this run)."""
        try:
            result = Path(node.output_dir()) / f"result_{node.name}.pklz"
            return result.is_file() and result.stat().st_mtime < self.started
        except Exception:
            return False

    def _remember_stored(self, unit: str, node) -> None:
        outputs = node.result.outputs
        files = [
            str(getattr(outputs, key))
            for key in ("out_file", "out_meta")
            if isinstance(getattr(outputs, key, None), str)
        ]
        self._stored.setdefault(unit, {})[node.name] = files

    def _step_name(self, fullname: str) -> str:
        stage = self.stage_of(fullname)
        return stage or fullname.split(".", 1)[-1]

    def _stage_line(self, unit: str, stage_name: str, stage: _Progress) -> None:
        self._stages_done += 1
        now = time.time()
        took = stage.busy
        elapsed = now - self.started
        lost = sum(1 for (u, _), st in self._stages.items() if u in self.failed_units
                   and st.done != st.nodes)  # fmt: skip
        total = len(self._stages) - lost
        left = elapsed / self._stages_done * (total - self._stages_done)
        eta = f", ~{format_duration(left)} left" if self._stages_done < total else ""
        LOGGER.info(
            "[%d/%d] %s %s (%s; %s elapsed%s)",
            self._stages_done,
            total,
            stage_name,
            self.units[unit].label,
            format_duration(took),
            format_duration(elapsed),
            eta,
        )

    # --- after the run ---------------------------------------------------------------------
    def skipped_units(self) -> list[str]:
        """Units that did not fail themselves but could not run because of a failure."""
        return sorted(
            u
            for u in self._unit_nodes
            if u not in self.completed_units and u not in self.failed_units
        )

    def fill_crash_details(self, crash_dir: Path) -> None:
        """Attach each failure's crash file and its one-line reason."""
        crash_dir = Path(crash_dir)
        crashes = sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime)
        crashes = [c for c in crashes if c.stat().st_mtime >= self.started - 1]
        for failure in self.failures:
            node_id = failure.node.rsplit(".", 1)[-1]
            for crash in reversed(crashes):
                text = crash.read_text(errors="replace")
                if re.search(rf"^Node: {re.escape(failure.node)}$", text, re.M) or (
                    f"-{node_id}-" in crash.name and not failure.crash_file
                ):
                    failure.crash_file = str(crash)
                    failure.reason = crash_reason(text)
                    break
            failure.reason = failure.reason or "see the log"


def crash_reason(text: str) -> str:
    """The innermost error of a Nipype crash file (or traceback), as one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # the innermost exception: the last "SomethingError: message" line of the traceback
    causes = [
        ln
        for ln in lines
        if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", ln)
        and "NodeExecutionError" not in ln
        and not ln.startswith("RuntimeError: Trace")
    ]
    if causes:
        return causes[-1].split(": ", 1)[1]
    return lines[-1] if lines else "unknown error"


def write_failures(failures: list[Failure], path: Path) -> Path:
    """``failures.tsv``: scan, step, one-line reason, crash file."""
    from ..utils.io import atomic_write_text

    def clean(text: str) -> str:
        return " ".join(str(text).split()).replace("\t", " ")

    rows = ["scan\tstep\treason\tcrash_file"] + [
        "\t".join(clean(v) for v in (f.scan, f.step, f.reason, f.crash_file)) for f in failures
    ]
    atomic_write_text("\n".join(rows) + "\n", path)
    return path
