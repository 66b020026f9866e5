"""``--write-graph``: participant and group graphs, hierarchical and colored, PNG and SVG."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import hide_tools
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from dkiharm_nipype.cli.graphs import write_workflow_graphs
from dkiharm_nipype.utils.env import ToolNotFoundError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NS = "{http://www.w3.org/2000/svg}"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _svg_labels(path: Path) -> set[str]:
    root = ET.parse(path).getroot()  # well-formed XML or this raises
    assert root.tag == f"{SVG_NS}svg"
    return {"".join(t.itertext()).strip() for t in root.iter(f"{SVG_NS}text")}


def _svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    return ["".join(t.itertext()).strip() for t in root.iter(f"{SVG_NS}text")]


def _svg_fills(path: Path) -> set[str]:
    root = ET.parse(path).getroot()
    return {
        el.get("fill")
        for el in root.iter()
        if el.get("fill") not in (None, "none", "white", "black", "#ffffff", "#000000")
    }


def _run(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dkiharm_nipype.cli.run", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_group_call_writes_both_levels_without_running(tiny_bids, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run(
        tiny_bids,
        out,
        "group",
        "--participant-label",
        "01",
        "02",
        "--session-label",
        "C",
        "D",
        "-w",
        work,
        "--write-graph",
        "--boilerplate-only",
    )
    assert proc.returncode == 0, proc.stderr
    logs = out / "logs"
    assert sorted(p.name for p in out.iterdir()) == ["logs"]  # no derivatives, no models
    assert not list(work.rglob("result_*.pklz"))  # nothing ran
    assert not list(logs.glob(".graphs.tmp*"))  # temporary rendering folder removed
    labels = {}
    for level in ("participant", "group"):
        for style in ("hierarchical", "colored"):
            width, height = _png_size(logs / f"graph_{level}_{style}.png")
            assert width > 100 and height > 100
            labels[level, style] = _svg_labels(logs / f"graph_{level}_{style}.svg")
    for style in ("hierarchical", "colored"):
        part, group = labels["participant", style], labels["group", style]
        # the participant processing of each of the 4 scans, in both graphs
        for node in ("denoise (mrtrix3)", "degibbs (mrtrix3)", "fit (dki)", "ds_mk (bids)"):
            assert node in part and node in group, (style, node)
        assert {"sub_02_ses_C_run_1_wf", "sub_01_ses_D_run_1_wf"} <= part
        # the harmonization only in the group graph: SNR-based reference, one network each
        only_group = {
            "reference (utility)",
            "train (harmonize)",
            "apply (harmonize)",
            "ds_plan (bids)",
        }
        assert only_group <= group and not only_group & part
        assert {"train_C_wf", "train_D_wf", "reference_wf"} <= group  # one piece each
    # the methods figure: a page wide, one node per step, repetitions folded with their count
    width, height = _png_size(logs / "graph_methods.png")
    assert 300 < width <= 2000 and height > 300
    texts = _svg_texts(logs / "graph_methods.svg")
    for step, count in (
        ("MP-PCA denoising (MRtrix3 dwidenoise)", "× 4 scans"),
        ("DKI fit (IRLLS), eight maps", "× 4 scans"),
        ("3-D CNN training (3³ kernel, ≤ 100 epochs)", "× 2 scanners"),
        ("Harmonized maps (the scanner's CNN)", "× 4 scans"),
        ("Reference scanner (highest white-matter SNR)", None),
    ):
        assert texts.count(step) == 1, step
        following = texts[texts.index(step) + 1]
        assert following == count if count else not following.startswith("×"), (step, following)
    assert not [t for t in texts if t.startswith("ds_") or "inputnode" in t or "merge" in t]
    # "colored" fills the sub-workflow clusters; "hierarchical" is black and white
    assert len(_svg_fills(logs / "graph_group_colored.svg")) >= 3
    assert not _svg_fills(logs / "graph_group_hierarchical.svg")


def test_participant_call_writes_participant_graph(tiny_bids, tmp_path):
    out = tmp_path / "out"
    proc = _run(
        tiny_bids,
        out,
        "participant",
        "--participant-label",
        "03",
        "--session-label",
        "D",
        "-w",
        tmp_path / "work",
        "--write-graph",
        "--boilerplate-only",
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (out / "logs").glob("graph_*"))
    assert names == ["graph_methods.png", "graph_methods.svg"] + [
        f"graph_participant_{style}.{ext}"
        for style in ("colored", "hierarchical")
        for ext in ("dot", "png", "svg")
    ]
    methods = _svg_texts(out / "logs" / "graph_methods.svg")
    assert "DKI fit (IRLLS), eight maps" in methods and "× 1 scan" in methods
    labels = _svg_labels(out / "logs" / "graph_participant_colored.svg")
    assert "sub_03_ses_D_run_1_wf" in labels and "fit (dki)" in labels
    assert not any("sub_01" in label for label in labels)


def test_missing_graphviz_is_one_clear_error(tmp_path, monkeypatch):
    wf = pe.Workflow(name="demo_wf")
    wf.add_nodes([pe.Node(niu.IdentityInterface(fields=["x"]), name="a")])
    hide_tools(monkeypatch, ("dot",))
    with pytest.raises(ToolNotFoundError, match="needs Graphviz's dot on PATH; install graphviz"):
        write_workflow_graphs(wf, tmp_path / "logs", level="participant")
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
