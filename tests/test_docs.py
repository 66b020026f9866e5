"""The Sphinx site builds with warnings as errors, offline, with the API pages filled in."""

from __future__ import annotations

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from nipype.interfaces.base import BaseInterface

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = (
    "index",
    "installation",
    "usage",
    "cluster",
    "outputs",
    "method",
    "phantom",
    "preprocessing",
    "dki",
    "registration",
    "cnn",
    "workflows",
    "benchmarks",
    "layout",
    "api",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-5000:]}"
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-5000:]
    return out


def _interfaces() -> list[str]:
    names = []
    for path in sorted((DOCS.parent / "dkiharm_nipype" / "interfaces").glob("[!_]*.py")):
        module = importlib.import_module(f"dkiharm_nipype.interfaces.{path.stem}")
        names += [
            f"{module.__name__}.{name}"
            for name, obj in vars(module).items()
            if inspect.isclass(obj)
            and issubclass(obj, BaseInterface)
            and obj.__module__ == module.__name__
            and not name.startswith("_")
        ]
    return names


def _text(path: Path) -> str:
    """The page's text without markup (code blocks are split into highlighted spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_key_pages_are_built(site):
    for page in PAGES:
        assert (site / f"{page}.html").is_file(), page
    index = (site / "index.html").read_text()
    for page in PAGES[1:]:
        assert f'href="{page}.html"' in index, f"{page} not in the table of contents"
    install = _text(site / "installation.html")
    assert "bash tools/install.sh --test" in install and "dkiharm-phantom" in install
    usage = _text(site / "usage.html")
    assert "Participant level" in usage and "Group level" in usage
    bench = (site / "benchmarks.html").read_text()
    assert bench.count("<table") >= 4 and "dkiharm IRLLS + constraints" in bench
    outputs = _text(site / "outputs.html")
    assert "CITATION.bib" in outputs and "desc-harmonized" in outputs
    assert (site / "_images" / "graph_participant_colored.svg").is_file()
    pieces = _text(site / "workflows.html")
    assert "init_training_labels_wf" in pieces and "registered_maps" in pieces
    assert (site / "_images" / "graph_methods.png").is_file()
    assert (site / "workflows.html").read_text().count('<div class="workflow-graph"><svg') == 4


def test_autodoc_documents_every_interface_and_factory(site):
    api = (site / "api.html").read_text()
    interfaces = _interfaces()
    assert len(interfaces) >= 10
    missing = [name for name in interfaces if f'id="{name}"' not in api]
    assert not missing, f"interfaces without an API entry: {missing}"
    factories = set(re.findall(r'id="(dkiharm_nipype\.workflows\.\w+\.init_\w+_wf)"', api))
    for name in (
        "preproc.init_dwi_preproc_wf",
        "dki.init_scan_wf",
        "base.init_group_wf",
        "harmonize.init_training_wf",
        "registration.init_label_registration_wf",
        "base.init_dkiharm_wf",
    ):
        assert f"dkiharm_nipype.workflows.{name}" in factories, name
    for name in (
        "dkiharm_nipype.dki.fit.fit_dki",
        "dkiharm_nipype.cnn.model.HierarchicalDKINet",
        "dkiharm_nipype.evaluation.scores.nrmse",
        "dkiharm_nipype.cli.boilerplate.write_citation",
    ):
        assert f'id="{name}"' in api, name
    # the docstrings' ``.. workflow::`` graphs are drawn (inline SVG holding node names)
    assert api.count('<div class="workflow-graph"><svg') >= 3
    # the default denoiser's node (MP-PCA, dkiharm's interfaces.preproc) and the fit's
    assert "denoise (preproc)" in api and "fit (dki)" in api
    # the reuse examples are on the page
    assert api.count("my_pipeline") >= 15
