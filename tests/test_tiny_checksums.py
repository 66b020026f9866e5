"""Behaviour unchanged by the workflow refactor (#19.5): the tiny example's group outputs.

``docs/benchmarks/layout/tiny_group_{before,after}.sha256`` are the checksum lists
(``tools/tiny_checksums.py``) of ``dkiharm tiny out group --nprocs 2`` before the group graph
was split into named pieces and after; they must list the same files with the same content.
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
    before = (LISTS / "tiny_group_before.sha256").read_text().splitlines()
    after = (LISTS / "tiny_group_after.sha256").read_text().splitlines()
    assert len(before) > 100  # every map, mask, model, table of the 12 scans
    assert any("desc-harmonized" in line for line in before)
    assert any(line.endswith("_harmonizer.safetensors") for line in before)
    assert _tool().compare(LISTS / "tiny_group_before.sha256",
                           LISTS / "tiny_group_after.sha256") == []  # fmt: skip
    assert before == after


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
