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
        written += write_methods_graph(workflow, logs)
    return written


# ------------------------------------------------------------------------- methods figure
#: What each step does, as a methods figure names it: by interface class, then by node name
#: (``niu.Function`` nodes). A callable receives the node. Steps not named here (input and
#: output nodes, sinks, list plumbing) are hidden and their edges joined through.
STEP_LABELS = {
    "DWIDenoise": "MP-PCA denoising (MRtrix3 dwidenoise)",
    "MPPCADenoise": "MP-PCA denoising (dkiharm, overlapping windows)",
    "MRDeGibbs": "Gibbs-ringing removal (MRtrix3 mrdegibbs)",
    "TopupEddyFiles": "TOPUP/Eddy acquisition files",
    "TOPUP": "Susceptibility field (FSL TOPUP)",
    "Eddy": "Motion and eddy-current correction (FSL Eddy)",
    "MeanB0": "Mean b=0 image",
    "DWI2Mask": "Brain mask (MRtrix3 dwi2mask)",
    "MedianOtsuMask": "Brain mask (dipy median_otsu)",
    "FitDKI": lambda node: f"DKI fit ({node.inputs.method.upper()}), eight maps",
    "ComputeSNR": "White-matter SNR",
    "RegisterMaps": "Reference maps registered into the scan",
    "FLIRT": "Affine registration (FSL FLIRT)",
    "FNIRT": "Non-linear registration (FSL FNIRT)",
    "ApplyWarp": "Maps resampled (FSL ApplyWarp)",
    "CheckRegistration": "Registration check",
    "TrainHarmonizer": lambda node: (
        f"3-D CNN training ({node.inputs.kernel_size}³ kernel, ≤ {node.inputs.epochs} epochs)"
    ),
    "ApplyHarmonizer": "Harmonized maps (the scanner's CNN)",
    "EvaluateHarmonization": "Evaluation: CV, NRMSE, scan-rescan",
    "HarmonizationReport": "HTML report",
    "RunExperiment": lambda node: f"Validation experiment ({node.inputs.experiment})",
    "reference": "Reference scanner (highest white-matter SNR)",
    "plan": "Study design (harmonization.json)",
    "select": "Label source (reference scan or rescan)",
    "comparators": "ComBat / RISH comparators",
}

_PLURAL = {"scan": "scans", "scanner": "scanners", "training scan": "training scans"}


def _folds(workflow, prefix: str = "") -> dict[str, str]:
    """Full workflow path -> what it is built once per (``__fold__``), for every sub-workflow."""
    from nipype.pipeline import engine as pe

    out = {}
    for node in workflow._graph.nodes:
        if isinstance(node, pe.Workflow):
            path = f"{prefix}{workflow.name}.{node.name}"
            fold = getattr(node, "__fold__", None)
            if fold:
                out[path] = fold
            out.update(_folds(node, prefix=f"{prefix}{workflow.name}."))
    return out


def _step_label(node) -> str | None:
    kind = type(node.interface).__name__
    label = STEP_LABELS.get(kind if kind != "Function" else node.name)
    if label is None and node.name.startswith("stage_"):
        return None
    return label(node) if callable(label) else label


def methods_graph(workflow) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """The steps of ``workflow`` for a methods figure: ``{key: label}`` and edges.

    Every node of a repeated sub-workflow (``__fold__``: once per scan, scanner or training
    scan) is folded with its copies into one step labelled with the count; hidden nodes
    (see :data:`STEP_LABELS`) are bypassed, so an edge joins two named steps when data flow
    from one to the other through plumbing only.
    """
    import networkx as nx

    folds = _folds(workflow)
    flat = workflow._create_flat_graph()
    key_of, labels, members = {}, {}, {}
    for node in flat.nodes:
        label = _step_label(node)
        if label is None:
            continue
        parts = f"{node._hierarchy}.{node.name}".split(".")
        key, fold, instance = node.fullname, None, None
        for i in range(1, len(parts)):
            path = ".".join(parts[: i + 1])
            if path in folds:
                fold, instance = folds[path], path
                key = f"{fold}:{'.'.join(parts[i + 1:])}"
                break
        key_of[node] = key
        labels[key] = (label, fold)
        members.setdefault(key, set()).add(instance)
    steps = {}
    for key, (label, fold) in labels.items():
        n = len(members[key])
        what = _PLURAL.get(fold, fold) if n != 1 else fold
        steps[key] = f"{label}\n× {n} {what}" if fold else label
    edges = set()
    for node in key_of:
        # follow data field by field through identity nodes, wholesale through other plumbing
        stack = [(nxt, d) for _, nxt, d in flat.out_edges(node, data=True)]
        seen = set()
        while stack:
            nxt, data = stack.pop()
            fields = tuple(dst for _, dst in data.get("connect", []))
            if (nxt, fields) in seen:
                continue
            seen.add((nxt, fields))
            if nxt in key_of:
                if key_of[nxt] != key_of[node]:
                    edges.add((key_of[node], key_of[nxt]))
                continue
            identity = type(nxt.interface).__name__ == "IdentityInterface"
            for _, after, d in flat.out_edges(nxt, data=True):
                kept = [c for c in d.get("connect", []) if not identity or c[0] in fields]
                if kept:
                    stack.append((after, {"connect": kept}))
    # keep the figure readable: drop edges implied by longer paths
    graph = nx.DiGraph(list(edges))
    graph.add_nodes_from(steps)
    if nx.is_directed_acyclic_graph(graph):
        graph = nx.transitive_reduction(graph)
    return steps, set(graph.edges)


def _dot(steps: dict[str, str], edges) -> str:
    ids = {key: f"n{i}" for i, key in enumerate(sorted(steps))}

    def quote(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = [
        "digraph methods {",
        # 2,000 px at 150 dpi: Graphviz scales the drawing down to fit 13.3 inches
        '  graph [rankdir=TB, dpi=150, size="13.3,30", nodesep=0.25, ranksep=0.35, '
        'fontname="Helvetica"];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#4a6fa5", '
        'fontname="Helvetica", fontsize=11];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]
    for key, label in sorted(steps.items()):
        group = key.startswith(("scanner:", "training")) or ":" not in key
        fill = ' fillcolor="#fdf1e3", color="#b36b00"' if group else ""
        lines.append(f"  {ids[key]} [label={quote(label)}{fill}];")
    lines += [f"  {ids[a]} -> {ids[b]};" for a, b in sorted(edges)]
    return "\n".join([*lines, "}", ""])


def write_methods_graph(workflow, logs_dir: str | os.PathLike) -> list[Path]:
    """``graph_methods.{svg,png}`` in ``logs_dir``: the steps of ``workflow``, folded.

    One representative of every repeated sub-workflow (per scan, scanner, training scan)
    is drawn, labelled with the count; input/output nodes, sinks and list plumbing are
    hidden; steps are named by what they do (:data:`STEP_LABELS`). The PNG is at most
    2,000 px wide (150 dpi), a page of a paper. Rendered in a temporary folder and moved.
    """
    import subprocess

    from ..utils.env import ToolNotFoundError

    if shutil.which("dot") is None:
        raise ToolNotFoundError(
            "--write-graph needs Graphviz's dot on PATH; install graphviz (apt-get install "
            "graphviz) or drop --write-graph."
        )
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    dot = _dot(*methods_graph(workflow))
    written = []
    with tempfile.TemporaryDirectory(dir=logs_dir, prefix=".graphs.tmp") as tmp:
        for fmt in GRAPH_FORMATS:
            out = Path(tmp) / f"graph_methods.{fmt}"
            subprocess.run(["dot", f"-T{fmt}", "-o", str(out)], input=dot, text=True,
                           check=True, capture_output=True)  # fmt: skip
            if not out.is_file() or out.stat().st_size == 0:
                raise RuntimeError(f"Graphviz could not render {out.name}")
        for fmt in GRAPH_FORMATS:
            os.replace(Path(tmp) / f"graph_methods.{fmt}", logs_dir / f"graph_methods.{fmt}")
            written.append(logs_dir / f"graph_methods.{fmt}")
    LOGGER.info("methods graph written to %s", logs_dir / "graph_methods.png")
    return written
