"""Benchmark records: every figure a benchmark prints is written to a file that README and
docs/benchmarks.md can quote, with what produced it.

``write_record(name, tables=..., options=..., wall_s=...)`` writes, under
``docs/benchmarks/<name>/``, one TSV per table and ``record.json``: the commit (and whether
the tree had uncommitted changes), the versions of the packages and tools that compute the
numbers, the machine, the options and the wall times. ``tests/test_readme_numbers.py``
checks that every number in README's measured summary is in one of these files.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "benchmarks"
#: Distributions whose versions change the numbers (constraints-benchmarks.txt pins them).
PACKAGES = (
    "dkiharm", "numpy", "scipy", "dipy", "torch", "nipype", "nibabel", "pybids",
    "neuroCombat", "pandas", "safetensors", "matplotlib",
)  # fmt: skip


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def _tool_version(cmd: str) -> str | None:
    try:
        out = subprocess.run([cmd, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip("= ").strip() if first else None


def environment() -> dict:
    """Commit, package and tool versions, machine: what a reader needs to rerun a table."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "packages": versions,
        "tools": {"mrtrix3": _tool_version("dwidenoise")},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }


def write_tsv(rows: Sequence[Mapping], path: Path) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def write_record(
    name: str,
    *,
    tables: Mapping[str, Sequence[Mapping]],
    options: Mapping | None = None,
    wall_s: Mapping[str, float] | None = None,
    command: str | None = None,
    notes: str | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Write ``tables`` (``{table: rows}``) as TSVs and ``record.json`` into
    ``docs/benchmarks/<name>/`` (or ``out_dir``); returns the JSON path."""
    folder = Path(out_dir) if out_dir is not None else RECORDS / name
    files = {t: write_tsv(rows, folder / f"{t}.tsv").name for t, rows in tables.items()}
    record = {
        "benchmark": name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "options": dict(options or {}),
        "wall_s": {k: round(float(v), 1) for k, v in (wall_s or {}).items()},
        "tables": files,
        "results": {t: list(rows) for t, rows in tables.items()},
        "notes": notes,
        **environment(),
    }
    path = folder / "record.json"
    tmp = path.with_name("record.json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
