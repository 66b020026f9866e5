"""``--write-graph``: the participant and group workflow graphs as PNG and SVG.

Files, in ``output_dir/logs/``: ``graph_<level>_<style>.{dot,png,svg}`` with ``level`` in
``participant``/``group`` and ``style`` in ``hierarchical`` (black and white, one box per
sub-workflow) and ``colored`` (one colour per nesting level). A group-level call writes
both levels (the group graph contains the participant processing of every scan); a
participant-level call writes the participant graph. Each file is rendered in a temporary
folder and moved into place, so a failed rendering leaves no partial graph.

Example
-------
>>> import tempfile
>>> from nipype.pipeline import engine as pe
>>> from nipype.interfaces import utility as niu
>>> wf = pe.Workflow(name="demo_wf")
>>> a = pe.Node(niu.IdentityInterface(fields=["x"]), name="a")
>>> b = pe.Node(niu.IdentityInterface(fields=["x"]), name="b")
>>> wf.connect(a, "x", b, "x")
>>> out = write_workflow_graphs(wf, tempfile.mkdtemp(), level="participant")
>>> sorted(p.name for p in out)  # doctest: +NORMALIZE_WHITESPACE
['graph_participant_colored.png', 'graph_participant_colored.svg',
 'graph_participant_hierarchical.png', 'graph_participant_hierarchical.svg']
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

LOGGER = logging.getLogger("dkiharm")

GRAPH_STYLES = ("hierarchical", "colored")
GRAPH_FORMATS = ("png", "svg")


def write_workflow_graphs(workflow, logs_dir: str | os.PathLike, *, level: str) -> list[Path]:
    """Render ``workflow`` as ``graph_<level>_<style>.{png,svg}`` (and ``.dot``) in ``logs_dir``.

    Returns the PNG and SVG paths. Raises :class:`~dkiharm_nipype.utils.env.ToolNotFoundError`
    when Graphviz ``dot`` is not installed.
    """
    from ..utils.env import ToolNotFoundError

    if shutil.which("dot") is None:
        raise ToolNotFoundError(
            "--write-graph needs Graphviz's dot on PATH; install graphviz (apt-get install "
            "graphviz) or drop --write-graph."
        )
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=logs_dir, prefix=".graphs.tmp") as tmp:
        for style in GRAPH_STYLES:
            stem = f"graph_{level}_{style}"
            for fmt in GRAPH_FORMATS:
                workflow.write_graph(
                    dotfilename=str(Path(tmp) / f"{stem}.dot"),
                    graph2use=style,
                    format=fmt,
                    simple_form=True,
                )
                rendered = Path(tmp) / f"{stem}.{fmt}"
                if not rendered.is_file() or rendered.stat().st_size == 0:
                    raise RuntimeError(f"Graphviz could not render {rendered.name}")
            for ext in ("dot", *GRAPH_FORMATS):
                os.replace(Path(tmp) / f"{stem}.{ext}", logs_dir / f"{stem}.{ext}")
            written += [logs_dir / f"{stem}.{fmt}" for fmt in GRAPH_FORMATS]
    LOGGER.info("%s workflow graphs written to %s", level, logs_dir)
    return written


def write_graphs(config, scans, workflow, staging_dir: Path) -> list[Path]:
    """The graphs of one BIDS-App call (see the module docstring for what is written)."""
    logs = Path(config.output_dir) / "logs"
    written = []
    if config.analysis_level == "group":
        from ..workflows.base import init_participant_wf

        participant = init_participant_wf(scans=scans, staging_dir=staging_dir, config=config)
        written += write_workflow_graphs(participant, logs, level="participant")
    if workflow is not None:
        written += write_workflow_graphs(workflow, logs, level=config.analysis_level)
    return written
