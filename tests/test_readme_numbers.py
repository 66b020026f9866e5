"""Every number in README's measured tables is in a committed benchmark record (#22.2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A number standing alone or as a factor ("x3.1", "3.1x"); not inside names like sub-01.
NUMBER = re.compile(r"(?<![A-Za-wyz0-9_.`/-])[-+]?\d+(?:\.\d+)?(?![A-Za-wyz0-9_`/])")


def _measured_tables() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def _recorded_values() -> list[float]:
    values = []
    for path in (ROOT / "docs" / "benchmarks").glob("*/*"):
        if path.suffix == ".json":
            text = json.dumps(json.loads(path.read_text()))
        elif path.suffix == ".tsv":
            text = path.read_text()
        else:
            continue
        values += [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]
    return values


def _shown_as(value: float, token: str) -> bool:
    """``token`` (as README prints it) is ``value`` rounded to the token's decimals."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    return round(value, decimals) == float(token)


def test_every_number_in_readme_measured_tables_is_recorded():
    rows = _measured_tables()
    assert rows, "README's Measured section has no table"
    recorded = _recorded_values()
    missing = []
    for row in rows:
        cells = [c for c in row.strip("|").split("|") if not set(c.strip()) <= set("-: ")]
        for cell in cells:
            plain = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)", "", cell)
            for token in NUMBER.findall(plain):
                if not any(_shown_as(v, token) for v in recorded):
                    missing.append((token, row.strip()))
    assert not missing, f"README numbers without a record: {missing[:10]}"


def test_the_check_catches_an_unrecorded_number():
    assert _shown_as(82.46, "82.5") and not _shown_as(82.46, "82.4")
    text = re.sub(r"`[^`]*`", "", "MK 82.5 % (x3.1, 2.0x) `--nprocs 2` sub-01 run-2")
    assert NUMBER.findall(text) == ["82.5", "3.1", "2.0"]
