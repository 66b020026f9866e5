"""Checksum list of a group run's outputs, and the comparison of two such lists (#19.5).

    python tools/tiny_checksums.py OUTPUT_DIR > list.sha256      # one "sha256  path" a line
    python tools/tiny_checksums.py --compare before.sha256 after.sha256

Listed: every file under OUTPUT_DIR except those that legitimately hold times, paths or
run-specific text: ``logs/`` (CITATION with versions, graphs), ``*.html`` (the report:
run date and paths), ``dataset_description.json`` (GeneratedBy with the version) and the
``models/*_harmonizer.json`` cards' and ``*_training.tsv`` logs' wall-clock fields, which are
hashed with those fields removed. ``.gz`` files are hashed decompressed (the gzip header
holds a modification time). ``.safetensors`` files are hashed with their JSON header's keys
sorted: the safetensors writer orders the ``__metadata__`` keys at random per process (two
runs of the same training give the same tensors, byte for byte, in files that differ), so
the cards' ``weights_sha256`` (a hash of those file bytes) is left out too. Exit status 1
when a comparison finds a difference.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

SKIP_DIRS = ("logs",)
SKIP_NAMES = ("dataset_description.json",)
SKIP_SUFFIXES = (".html",)
#: JSON keys whose values are times or durations (removed before hashing, at any depth).
TIME_KEYS = {"created", "date", "timestamp", "train_seconds", "seconds", "elapsed",
             "wall_time_s", "duration_s", "time_s", "weights_sha256"}  # fmt: skip


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k.lower() not in TIME_KEYS}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _content(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".safetensors":  # header (keys sorted) + the tensors' bytes
        size = int.from_bytes(data[:8], "little")
        header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True).encode()
        return header + data[8 + size :]
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".json" and path.parent.name == "models":
        return json.dumps(_strip_times(json.loads(data)), sort_keys=True).encode()
    if path.name.endswith("_training.tsv"):  # per-epoch wall-clock seconds column dropped
        rows = [line.split("\t") for line in data.decode().splitlines()]
        drop = [i for i, name in enumerate(rows[0]) if "second" in name or name == "time"]
        return "\n".join("\t".join(c for i, c in enumerate(r) if i not in drop)
                         for r in rows).encode()  # fmt: skip
    return data


def checksums(root: Path) -> list[str]:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP_DIRS or path.name in SKIP_NAMES or path.suffix in SKIP_SUFFIXES:
            continue
        lines.append(f"{hashlib.sha256(_content(path)).hexdigest()}  {rel}")
    return lines


def compare(before: Path, after: Path) -> list[str]:
    """Lines that differ between two checksum lists (empty when identical)."""
    a, b = before.read_text().splitlines(), after.read_text().splitlines()
    return sorted(set(a) ^ set(b))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compare"]:
        diff = compare(Path(argv[1]), Path(argv[2]))
        n = len(Path(argv[1]).read_text().splitlines())
        print("\n".join(diff) if diff else f"identical: {n} files")
        return 1 if diff else 0
    print("\n".join(checksums(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
