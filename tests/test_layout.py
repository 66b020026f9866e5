"""The package layout (issue 19): dependencies point down, each rule has one home, and no
file still names a module that the layout refactor moved.

The import map is read with :mod:`ast` by ``tools/import_graph.py`` (the script that draws
``docs/images/imports_after.svg``); the old -> new module map is ``tools/reimport.py``'s.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dkiharm_nipype

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dkiharm_nipype"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRAPH = _tool("import_graph")
REIMPORT = _tool("reimport")

#: Units from the top down (``tools/import_graph.py`` draws them so); a unit may import only
#: units of lower layers. ``evaluation.scores`` is a leaf of plain scores that the science
#: packages share, below ``evaluation``.
LAYERS = GRAPH.LAYERS
SCIENCE = ("dki", "preproc", "registration", "cnn", "comparators", "evaluation", "phantom")


_unit = GRAPH.unit


def _layer(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


@pytest.fixture(scope="module")
def imports() -> dict[str, set[str]]:
    return GRAPH.module_imports(PACKAGE)


def test_every_unit_has_a_layer(imports):
    units = {_unit(m) for m in imports} | {_unit(t) for ts in imports.values() for t in ts}
    assert units <= {u for names in LAYERS for u in names}, "add a new subpackage to LAYERS"


def test_dependencies_point_down(imports):
    upward = sorted(
        f"{module} imports {target} ({_unit(module)} -> {_unit(target)})"
        for module, targets in imports.items()
        for target in targets
        if _unit(module) != _unit(target) and _layer(_unit(target)) <= _layer(_unit(module))
    )
    assert upward == []


def test_named_directions(imports):
    """The rules of the style guide, spelled out (a subset of the layers above)."""

    def users_of(units, targets):
        return sorted(
            (m, t)
            for m, ts in imports.items()
            for t in ts
            if _unit(m).split(".")[0] in units and _unit(t).split(".")[0] in targets
        )

    assert users_of(("utils",), set(SCIENCE) | {"interfaces", "workflows", "cli", "study"}) == []
    assert users_of(SCIENCE + ("study",), ("interfaces", "workflows", "cli", "report")) == []
    assert users_of(("interfaces",), ("workflows", "cli")) == []
    assert users_of(("workflows",), ("cli",)) == []
    assert not any(_unit(m) == "config" for m, ts in imports.items() if ts)


#: Each rule of the study and each file format, defined once: (function, its module).
ONE_HOME = {
    "first_runs": "dkiharm_nipype.study",
    "run_key": "dkiharm_nipype.study",
    "rescan_partner": "dkiharm_nipype.study",
    "label_source": "dkiharm_nipype.study",
    "choose_reference": "dkiharm_nipype.study",
    "resolve_preproc": "dkiharm_nipype.preproc.modes",
    "resolved_preproc_mode": "dkiharm_nipype.preproc.modes",
    "read_bvals": "dkiharm_nipype.utils.io",
    "read_gradients": "dkiharm_nipype.utils.io",
    "load_mask": "dkiharm_nipype.utils.io",
    "check_nifti": "dkiharm_nipype.utils.io",
    "atomic_copy": "dkiharm_nipype.utils.io",
    "atomic_write_text": "dkiharm_nipype.utils.io",
    "truth_deformation": "dkiharm_nipype.phantom.truth",
}


def _definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = GRAPH.module_name(path, PACKAGE)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                found.setdefault(node.name, []).append(module)
    return found


def test_each_rule_has_one_definition():
    defs = _definitions()
    assert {name: defs.get(name) for name in ONE_HOME} == {
        name: [module] for name, module in ONE_HOME.items()
    }
    # no private copies under another name (``_first_runs``, ``_read_gradients``, ...)
    copies = {
        name: modules
        for name, modules in defs.items()
        if name.lstrip("_") in {"first_runs", "read_gradients", "load_mask", "resolved_preproc"}
        and name not in ONE_HOME
    }
    assert copies == {}
    # one class per name among the package's data classes (DWIScan vs the RISH scan)
    assert defs["DWIScan"] == ["dkiharm_nipype.utils.bids"]


def test_gradient_files_are_read_in_one_place():
    """``np.loadtxt`` of a b-value/b-vector file appears only in ``utils/io.py``."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "utils" / "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("loadtxt", "genfromtxt")
                and "bv" in ast.unparse(node.args[0] if node.args else node).lower()
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_no_file_names_a_moved_module():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.cfg", "*.toml", "*.txt", "*.sh"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    mapping = ("tools/reimport.py", "tests/test_layout.py")  # they spell the old paths
    files = [REPO / f for f in tracked if f not in mapping and (REPO / f).is_file()]
    stale = [str(f.relative_to(REPO)) for f in files if REIMPORT.rewrite(f) != f.read_text()]
    assert stale == [], "run: python tools/reimport.py " + " ".join(stale)
    for old in REIMPORT.MODULES:
        if old != REIMPORT.MODULES[old] and not REIMPORT.exists(old):
            with pytest.raises(ImportError):
                importlib.import_module(old)


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(dkiharm_nipype.__path__, "dkiharm_nipype.")]
    for name in names:
        importlib.import_module(name)
    assert len(names) > 60


def test_reimport_rewrites_old_imports(tmp_path):
    """``tools/reimport.py`` on a file written against the old layout (absolute and relative
    imports, moved names, dotted references in text), then once more: nothing left to do."""
    old = (
        "from dkiharm_nipype.metrics import nrmse\n"
        "from ..harmonize.rish import DWIScan, train_rish\n"
        "from ..interfaces.bids import DerivativesDataSink, atomic_copy\n"
        "from dkiharm_nipype import evaluation\n"
        "from dkiharm_nipype.registration import register, truth_deformation\n"
        '"""See dkiharm_nipype.experiments.run_experiment and dkiharm_nipype/denoise.py."""\n'
    )
    path = PACKAGE / "workflows" / "_reimport_probe.py"
    path.write_text(old)
    try:
        new = REIMPORT.rewrite(path)
        path.write_text(new)
        again = REIMPORT.rewrite(path)
    finally:
        path.unlink()
    assert new.splitlines() == [
        "from dkiharm_nipype.evaluation.scores import nrmse",
        "from ..comparators.rish import RISHScan, train_rish",
        "from ..interfaces.bids import DerivativesDataSink",
        "from ..utils.io import atomic_copy",
        "from dkiharm_nipype.evaluation import evaluate as evaluation",
        "from dkiharm_nipype.registration import register",
        "from dkiharm_nipype.phantom.truth import truth_deformation",
        '"""See dkiharm_nipype.evaluation.experiments.run_experiment and '
        'dkiharm_nipype/preproc/denoise.py."""',
    ]
    assert again == new
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "reimport.py"), "--check", str(tmp_path / "x.md")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0
