"""The docstring examples of the package run and pass (``doctest``, one test per module).

Every custom interface and every ``init_*_wf`` factory must show, in its docstring, how to
drop it into an existing Nipype pipeline (a node or workflow connected to others); the
examples build graphs and only run nodes where that takes well under a second. Factories
that need scans read them from ``bids_dir``, given here as the tiny phantom.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import tempfile
from pathlib import Path

import pytest
from nipype.interfaces.base import BaseInterface

import dkiharm_nipype

PACKAGE = Path(dkiharm_nipype.__file__).parent
#: Modules another engineer is writing now: their examples run, the reuse check waits.
REUSE_PENDING = {"comparators"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(
    _module_name(p) for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8")
)


@pytest.mark.parametrize("name", MODULES, ids=[m.removeprefix("dkiharm_nipype.") for m in MODULES])
def test_docstring_examples_pass(name, request, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # examples' mkdtemp() here
    globs = {}
    if "load_layout(bids_dir)" in inspect.getsource(module):
        globs["bids_dir"] = str(request.getfixturevalue("tiny_bids"))
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name, extraglobs=globs):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, "".join(report)


def _reuse_targets():
    for folder in ("interfaces", "workflows"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            if path.stem == "__init__" or path.stem in REUSE_PENDING:
                continue
            module = importlib.import_module(_module_name(path))
            for attr, obj in vars(module).items():
                if getattr(obj, "__module__", None) != module.__name__ or attr.startswith("_"):
                    continue
                if inspect.isclass(obj) and issubclass(obj, BaseInterface):
                    yield f"{module.__name__}.{attr}", obj, "pe.Node("
                elif inspect.isfunction(obj) and attr.startswith("init_") and attr.endswith("_wf"):
                    yield f"{module.__name__}.{attr}", obj, "pe.Workflow("


def test_every_interface_and_factory_shows_pipeline_reuse():
    targets = list(_reuse_targets())
    names = {name.rsplit(".", 1)[1] for name, _, _ in targets}
    # the package's own interfaces and factories are all found
    assert {
        "FitDKI",
        "DWI2Mask",
        "TrainHarmonizer",
        "RegisterMaps",
        "DerivativesDataSink",
    } <= names
    assert {"init_dwi_preproc_wf", "init_scan_wf", "init_group_wf", "init_apply_wf"} <= names
    missing = [
        name
        for name, obj, builds in targets
        if not (">>>" in (doc := obj.__doc__ or "") and builds in doc and ".connect(" in doc)
    ]
    assert not missing, f"no pipeline-reuse example in the docstring of: {missing}"
    assert len(targets) >= 20
