#!/usr/bin/env python
"""Draw the import graph between dkiharm's subpackages (and top-level modules).

Usage::

    python tools/import_graph.py docs/images/imports_after.svg        # this checkout
    python tools/import_graph.py --root /tmp/old docs/images/imports_before.svg
    python tools/import_graph.py --edges                              # print the edges

Every ``import``/``from ... import`` of a ``dkiharm_nipype`` module, at any depth (imports
inside functions count: they are dependencies too), is read with :mod:`ast` and folded to its
*unit*: the first part below ``dkiharm_nipype`` (``registration`` for
``dkiharm_nipype.registration.engines``, ``study`` for ``dkiharm_nipype.study``;
``evaluation.scores`` is drawn on its own). The graph is laid out by graphviz ``dot`` from the
top (``cli``) down (``utils``); an edge that points up or sideways (against :data:`LAYERS`) is
drawn red; modules are notes, packages boxes. ``tests/test_layout.py`` checks the same map.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PKG = "dkiharm_nipype"
ROOT = Path(__file__).resolve().parents[1]

#: Layers from the top down: a unit may import units of its own layer's right-hand side
#: (see tests/test_layout.py for the exact rules) and of every layer below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("workflows",),
    ("interfaces",),
    ("report",),
    ("evaluation", "phantom"),
    ("comparators", "cnn"),
    ("study",),
    ("registration", "dki", "preproc", "evaluation.scores"),
    ("utils", "config"),
    ("errors", "__init__"),
    ("__about__",),
)


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(package_dir: Path) -> dict[str, set[str]]:
    """``{module: {imported dkiharm modules}}`` for every module under ``package_dir``.

    ``from . import x`` counts as importing ``package.x`` when that is a module, else the
    package itself.
    """
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    out: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != PKG:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in files else target)
        found.discard(name)
        out[name] = found
    return out


#: Modules drawn as units of their own: a leaf that the science packages share.
SPLIT = {"dkiharm_nipype.evaluation.scores": "evaluation.scores"}

#: Units of the layout before issue 19, placed on the layer of their new home.
ALIASES = {
    "harmonize": "comparators",
    "metrics": "evaluation.scores",
    "experiments": "evaluation",
    "denoise": "preproc",
}


def unit(module: str) -> str:
    """The subpackage or top-level module of ``dkiharm_nipype.<unit>...`` (or :data:`SPLIT`)."""
    if module in SPLIT:
        return SPLIT[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def unit_edges(package_dir: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """``{(unit, imported unit): [(module, imported module), ...]}`` between distinct units."""
    edges: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for module, imported in module_imports(package_dir).items():
        for target in imported:
            a, b = unit(module), unit(target)
            if a != b:
                edges[(a, b)].append((module, target))
    return dict(edges)


def layer(name: str) -> int:
    name = ALIASES.get(name, name)
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    return len(LAYERS) // 2


#: Imported by nearly every module; drawn without edges would say nothing, so left out.
HIDDEN = {"errors", "__init__", "__about__"}


def to_dot(edges, title: str, package_dir: Path = ROOT / PKG) -> str:
    units = sorted({u for e in edges for u in e} - HIDDEN)
    lines = [
        "digraph imports {",
        f'  label="{title}"; labelloc=t; fontname="Helvetica"; fontsize=16;',
        "  rankdir=TB; nodesep=0.25; ranksep=0.45;",
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="Helvetica"];',
        '  edge [color="#5a6f8f", arrowsize=0.6];',
    ]
    for i, names in enumerate(LAYERS):
        members = [n for n in units if ALIASES.get(n, n) in names]
        if members:
            quoted = "; ".join(f'"{n}"' for n in members)
            lines.append(f"  {{ rank=same; {quoted}; }}  // layer {i}")
    for u in units:
        kind = "module" if (package_dir / f"{u}.py").exists() else "package"
        shape = ', shape=note, fillcolor="#f7f3e8"' if kind == "module" else ""
        lines.append(f'  "{u}" [label="{u}"{shape}];')
    for (a, b), via in sorted(edges.items()):
        if a in units and b in units:
            up = layer(b) < layer(a) or (layer(b) == layer(a) and a != b)
            style = ' [color="#c0392b", penwidth=2]' if up else ""
            lines.append(f'  "{a}" -> "{b}"{style};  // {len(via)} import(s)')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="an .svg, .png or .dot file")
    parser.add_argument("--root", type=Path, default=ROOT, help="a checkout of the repository")
    parser.add_argument("--title", default=None)
    parser.add_argument("--edges", action="store_true", help="print the unit edges")
    args = parser.parse_args(argv)
    edges = unit_edges(args.root / PKG)
    if args.edges or args.out is None:
        for (a, b), via in sorted(edges.items()):
            print(f"{a:>12} -> {b:<12} {', '.join(sorted({m for m, _ in via}))}")
    if args.out is None:
        return 0
    title = args.title or f"dkiharm_nipype imports ({args.root.name})"
    note = "\\n(errors.py, imported by nearly every module, not drawn)"
    dot = to_dot(edges, title + note, args.root / PKG)
    if args.out.suffix == ".dot":
        args.out.write_text(dot)
        return 0
    if shutil.which("dot") is None:
        sys.exit("graphviz 'dot' is not on PATH; install graphviz or write a .dot file.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["dot", f"-T{args.out.suffix[1:]}", "-o", str(args.out)], input=dot, text=True, check=True
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
