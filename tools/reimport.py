#!/usr/bin/env python
"""Rewrite imports of modules that the layout refactor (issue 19) moved.

Usage::

    python tools/reimport.py FILE [FILE ...]      # rewrite in place
    python tools/reimport.py --check FILE ...     # list what would change, exit 1 if anything

Run it on the files you changed or added after merging ``main`` into a branch that was started
before the layout refactor. It rewrites

* absolute imports (``from dkiharm_nipype.metrics import nrmse``),
* relative imports inside the package (``from ..metrics import nrmse``), also in a module that
  itself moved (an edit to ``evaluation.py`` that git carried into ``evaluation/evaluate.py``:
  a relative import that does not resolve from the new place is read from the old one),
* names that moved between modules (``atomic_copy`` from ``interfaces.bids`` to ``utils.io``),
* dotted references in text (docstrings, docs pages, monkeypatch strings:
  ``dkiharm_nipype.metrics.nrmse``) and file paths (``dkiharm_nipype/metrics.py``).

It is idempotent: a second run changes nothing. Attribute uses through a module alias
(``reg.truth_deformation``) are not rewritten; ``python -c 'import ...'`` or the tests show them.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

PKG = "dkiharm_nipype"
ROOT = Path(__file__).resolve().parents[1]

#: old module -> new module. A package entry also maps its submodules (prefix).
MODULES: dict[str, str] = {
    "dkiharm_nipype.harmonize": "dkiharm_nipype.comparators",
    "dkiharm_nipype.metrics": "dkiharm_nipype.evaluation.scores",
    "dkiharm_nipype.evaluation": "dkiharm_nipype.evaluation.evaluate",
    "dkiharm_nipype.experiments": "dkiharm_nipype.evaluation.experiments",
    "dkiharm_nipype.denoise": "dkiharm_nipype.preproc.denoise",
    "dkiharm_nipype.dki.metrics": "dkiharm_nipype.dki.maps",
    "dkiharm_nipype.utils.checks": "dkiharm_nipype.cli.checks",
    "dkiharm_nipype.interfaces.metrics": "dkiharm_nipype.interfaces.scores",
}

#: (module, name) -> the module that now defines ``name`` (after MODULES is applied).
NAMES: dict[tuple[str, str], str] = {
    ("dkiharm_nipype.interfaces.bids", "atomic_copy"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.interfaces.bids", "atomic_write_text"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.utils.checks", "read_gradients"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.cli.checks", "read_gradients"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.utils.checks", "check_nifti"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.cli.checks", "check_nifti"): "dkiharm_nipype.utils.io",
    ("dkiharm_nipype.utils.dwi", "median_otsu_mask"): "dkiharm_nipype.preproc.masks",
    ("dkiharm_nipype.registration", "truth_deformation"): "dkiharm_nipype.phantom.truth",
    ("dkiharm_nipype.registration.engines", "truth_deformation"): "dkiharm_nipype.phantom.truth",
    ("dkiharm_nipype.comparators.rish", "DWIScan"): "dkiharm_nipype.comparators.rish",
    ("dkiharm_nipype.workflows.preproc", "resolve_preproc"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "resolved_preproc_mode"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "PREPROC_MODES"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "DENOISERS"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "MASK_METHODS"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "PreprocMode"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "MaskMethod"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.workflows.preproc", "Denoiser"): "dkiharm_nipype.preproc.modes",
    ("dkiharm_nipype.evaluation.evaluate", "run_key"): "dkiharm_nipype.study",
}

#: names renamed in place: (module, old name) -> new name.
RENAMES: dict[tuple[str, str], str] = {
    ("dkiharm_nipype.comparators.rish", "DWIScan"): "RISHScan",
}

#: new file -> old file, for relative imports in edits that git carried into a moved file.
FILES: dict[str, str] = {
    "dkiharm_nipype/comparators/__init__.py": "dkiharm_nipype/harmonize/__init__.py",
    "dkiharm_nipype/comparators/combat.py": "dkiharm_nipype/harmonize/combat.py",
    "dkiharm_nipype/comparators/commonspace.py": "dkiharm_nipype/harmonize/commonspace.py",
    "dkiharm_nipype/comparators/compare.py": "dkiharm_nipype/harmonize/compare.py",
    "dkiharm_nipype/comparators/rish.py": "dkiharm_nipype/harmonize/rish.py",
    "dkiharm_nipype/evaluation/scores.py": "dkiharm_nipype/metrics.py",
    "dkiharm_nipype/evaluation/evaluate.py": "dkiharm_nipype/evaluation.py",
    "dkiharm_nipype/evaluation/experiments.py": "dkiharm_nipype/experiments.py",
    "dkiharm_nipype/registration/engines.py": "dkiharm_nipype/registration.py",
    "dkiharm_nipype/preproc/denoise.py": "dkiharm_nipype/denoise.py",
    "dkiharm_nipype/dki/maps.py": "dkiharm_nipype/dki/metrics.py",
    "dkiharm_nipype/cli/checks.py": "dkiharm_nipype/utils/checks.py",
    "dkiharm_nipype/interfaces/scores.py": "dkiharm_nipype/interfaces/metrics.py",
}


# ----------------------------------------------------------------------------- modules
def exists(module: str) -> bool:
    """Whether ``module`` is a module or package of the current checkout."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def map_module(module: str, names: list[str] | None = None) -> str:
    """The new name of ``module``; ``names`` imported from it decide a file-now-package case.

    ``dkiharm_nipype.evaluation`` was a module and is now a package: ``from
    dkiharm_nipype.evaluation import scores`` (a submodule) is new code and stays, ``from
    dkiharm_nipype.evaluation import evaluate_study`` is old code and moves.
    """
    for old in sorted(MODULES, key=len, reverse=True):
        new = MODULES[old]
        if module == old:
            if names and all(exists(f"{module}.{n}") for n in names):
                return module
            if old != new and exists(old) and names is None:
                return module  # a bare reference to what is now a package
            return new
        if module.startswith(old + "."):
            rest = module[len(old) + 1 :]
            head = rest.split(".")[0]
            if exists(f"{old}.{head}") and not exists(f"{new}.{head}"):
                return module  # a child of the new package, e.g. evaluation.scores
            if old == new:
                return module
            return f"{new}.{rest}"
    return module


def map_dotted(ref: str) -> str:
    """Rewrite a dotted reference ``module[.attr...]`` found in text."""
    parts = ref.split(".")
    for i in range(len(parts), 1, -1):
        module, rest = ".".join(parts[:i]), parts[i:]
        if not (module in MODULES or exists(module) or exists(map_module(module))):
            continue
        new = map_module(module, [rest[0]] if rest else None)
        if rest and (new, rest[0]) in NAMES:
            target = NAMES[(new, rest[0])]
            rest = [RENAMES.get((new, rest[0]), rest[0]), *rest[1:]]
            new = target
        return ".".join([new, *rest])
    return ref


# ----------------------------------------------------------------------------- imports
def module_of(path: Path) -> str | None:
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] != PKG or rel.suffix != ".py":
        return None
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(package: str, level: int, module: str | None) -> str:
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _relative(target: str, package: str) -> str:
    """``target`` as a relative import from inside ``package``."""
    t, p = target.split("."), package.split(".")
    common = 0
    while common < min(len(t), len(p)) and t[common] == p[common]:
        common += 1
    return "." * (len(p) - common + 1) + ".".join(t[common:])


def _alias(a: ast.alias) -> str:
    return a.name + (f" as {a.asname}" if a.asname else "")


def _render(indent: str, module: str, names: list[str], suffix: str) -> str:
    line = f"{indent}from {module} import {', '.join(names)}"
    if len(line) + len(suffix.rstrip("\n")) <= 99:
        return line + suffix
    body = "".join(f"{indent}    {n},\n" for n in names)
    return f"{indent}from {module} import (\n{body}{indent}){suffix}"


def _module_alias(new: str, a: ast.alias) -> tuple[str, list[str]]:
    """``from parent import leaf [as name]`` for a moved module imported as a name."""
    parent, _, leaf = new.rpartition(".")
    name = a.asname or a.name
    return parent, [leaf if leaf == name else f"{leaf} as {name}"]


def rewrite_from(node: ast.ImportFrom, path: Path, indent: str, suffix: str) -> str | None:
    """The new text of one ``from ... import ...`` statement, or None when unchanged."""
    here = module_of(path)
    relative = node.level > 0
    if relative:
        if here is None:
            return None
        package = _package(here, path)
        absolute = _resolve(package, node.level, node.module)
        probe = absolute if node.module else f"{absolute}.{node.names[0].name}"
        old_file = FILES.get(path.resolve().relative_to(ROOT).as_posix())
        if not exists(probe) and not exists(absolute + ".__init__") and old_file:
            old_module = old_file.removesuffix(".py").replace("/", ".")
            old_package = _package(old_module, Path(old_file))
            absolute = _resolve(old_package, node.level, node.module)
    else:
        absolute = node.module or ""
        if not absolute.startswith(PKG):
            return None
    names = [a.name for a in node.names]
    # ``from pkg import metrics`` (a moved module imported as a name)
    groups: dict[str, list[str]] = {}
    for a in node.names:
        full = f"{absolute}.{a.name}"
        if full in MODULES and MODULES[full] != full and not exists(full + ".__init__"):
            parent, names_ = _module_alias(MODULES[full], a)
            groups.setdefault(parent, []).extend(names_)
            continue
        if (
            full in MODULES
            and MODULES[full] != full
            and exists(full)
            and not exists(f"{MODULES[full]}.{a.name}")
        ):
            # e.g. ``from dkiharm_nipype import evaluation`` meaning the old module
            parent, names_ = _module_alias(MODULES[full], a)
            groups.setdefault(parent, []).extend(names_)
            continue
        new_module = map_module(absolute, names)
        target = NAMES.get((new_module, a.name)) or NAMES.get((absolute, a.name)) or new_module
        renamed = RENAMES.get((target, a.name))
        text = _alias(a)
        if renamed:
            text = renamed + (f" as {a.asname}" if a.asname else "")
            print(f"{path}: {a.name} is now {renamed}; rename its uses", file=sys.stderr)
        groups.setdefault(target, []).append(text)
    lines = []
    for target, group in groups.items():
        shown = target
        if relative:
            shown = _relative(target, _package(here, path))
        lines.append(_render(indent, shown, group, suffix if not lines else "\n"))
    new_text = "".join(lines) if len(lines) == 1 else "".join(lines[:-1]) + lines[-1]
    return new_text


def rewrite_import(node: ast.Import, indent: str, suffix: str) -> str | None:
    parts = []
    for a in node.names:
        new = map_module(a.name) if a.name.startswith(PKG) else a.name
        parts.append(new + (f" as {a.asname}" if a.asname else ""))
    return f"{indent}import {', '.join(parts)}{suffix}"


_DOTTED = re.compile(r"\b(?<![./\w])dkiharm_nipype(?:\.[A-Za-z_]\w*)+")
_PATHS = re.compile(r"\bdkiharm_nipype/[\w/]+\.py\b")


def _map_path(match: re.Match) -> str:
    path = match.group(0)
    for new, old in FILES.items():
        if path == old:
            return new
    if path.startswith("dkiharm_nipype/harmonize/"):
        return path.replace("dkiharm_nipype/harmonize/", "dkiharm_nipype/comparators/", 1)
    return path


def rewrite_text(text: str) -> str:
    text = _DOTTED.sub(lambda m: map_dotted(m.group(0)), text)
    return _PATHS.sub(_map_path, text)


def rewrite(path: Path) -> str:
    """The new content of ``path``."""
    source = path.read_text()
    if path.suffix != ".py":
        return rewrite_text(source)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return rewrite_text(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        if lines[first][: node.col_offset].strip():
            continue  # ``x; from a import b``: leave alone
        suffix = lines[last][node.end_col_offset :]
        if isinstance(node, ast.ImportFrom):
            new = rewrite_from(node, path, indent, suffix)
        else:
            new = rewrite_import(node, indent, suffix)
        old = "".join(lines[first : last + 1])
        edits.append((first, last, old if new is None else new))  # imports: no text pass
    out, pos = [], 0
    for first, last, new in sorted(edits):
        out.append(rewrite_text("".join(lines[pos:first])))
        out.append(new)
        pos = last + 1
    out.append(rewrite_text("".join(lines[pos:])))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="report, do not write")
    args = parser.parse_args(argv)
    changed = 0
    for path in args.files:
        if not path.is_file():
            continue
        old = path.read_text()
        new = rewrite(path)
        if new != old:
            changed += 1
            print(f"{'would rewrite' if args.check else 'rewrote'} {path}")
            if not args.check:
                path.write_text(new)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
