"""Behaviour unchanged by the workflow refactor (#19.5): the tiny example's group outputs.

``docs/benchmarks/layout/tiny_group_<run>_{before,after}.sha256`` are the checksum lists
(``tools/tiny_checksums.py``) of ``dkiharm tiny out group --nprocs 2 [options]`` on main
before the group graph was split into named pieces and on this branch after; every pair
must list the same files with the same content (see ``docs/workflows.md``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTS = ROOT / "docs" / "benchmarks" / "layout"


def _tool():
    spec = importlib.util.spec_from_file_location(
        "tiny_checksums", ROOT / "tools" / "tiny_checksums.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_before_and_after_lists_are_identical():
    pairs = [
        (before, before.with_name(before.name.replace("_before", "_after")))
        for before in sorted(LISTS.glob("tiny_group*_before.sha256"))
    ]
    pairs = [(b, a) for b, a in pairs if a.is_file()]
    assert pairs, "no before/after pair of checksum lists"
    for before, after in pairs:
        lines = before.read_text().splitlines()
        assert len(lines) > 500  # every map, mask, model and table of the 12 scans
        assert any("desc-harmonized" in line for line in lines)
        assert any(line.endswith("_harmonizer.safetensors") for line in lines)
        assert _tool().compare(before, after) == [], after.name
        assert lines == after.read_text().splitlines()


def test_checksums_ignore_times_not_content(tmp_path):
    tool = _tool()
    for run, (seconds, value) in {"a": (1.0, b"x"), "b": (9.0, b"x"), "c": (1.0, b"y")}.items():
        root = tmp_path / run
        (root / "models").mkdir(parents=True)
        (root / "logs").mkdir()
        (root / "logs" / "CITATION.md").write_text(f"run {run}")  # skipped
        (root / "models" / "scanner-A_harmonizer.json").write_text(
            json.dumps({"training": {"seconds": seconds, "epochs_run": 3}})
        )
        with gzip.GzipFile(root / "map.nii.gz", "wb", mtime=seconds) as fh:
            fh.write(value)
        (tmp_path / f"{run}.sha256").write_text("\n".join(tool.checksums(root)))
    assert tool.compare(tmp_path / "a.sha256", tmp_path / "b.sha256") == []
    assert len(tool.compare(tmp_path / "a.sha256", tmp_path / "c.sha256")) == 2
