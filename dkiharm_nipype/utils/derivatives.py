"""Publishing a finished run: staged derivatives are copied into ``output_dir`` atomically.

Workflows write their outputs into a staging folder inside the work directory. Only when the
whole graph has run cleanly are the files copied into ``output_dir`` (each through a temporary
name and an atomic rename), so a failed or interrupted run never leaves partial derivatives,
and a rerun that reuses Nipype's cache still publishes everything.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..__about__ import __version__
from .io import atomic_copy, atomic_write_text


def dataset_description(*, pipeline_description: str | None = None) -> dict:
    """``dataset_description.json`` of the dkiharm derivatives."""
    return {
        "Name": "dkiharm derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "dkiharm",
                "Version": __version__,
                "Description": pipeline_description
                or (
                    "DKI fitting and deep-learning harmonization of diffusion kurtosis imaging "
                    "across scanners"
                ),
                "CodeURL": "https://pypi.org/project/dkiharm/",
            }
        ],
    }


def publish_derivatives(staging: Path | None, output_dir: Path) -> list[Path]:
    """Copy every file of ``staging`` into ``output_dir``; returns the published paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if staging is not None and Path(staging).is_dir():
        for src in sorted(p for p in Path(staging).rglob("*") if p.is_file()):
            dst = output_dir / src.relative_to(staging)
            atomic_copy(src, dst)
            written.append(dst)
    description = output_dir / "dataset_description.json"
    if not description.exists():
        atomic_write_text(json.dumps(dataset_description(), indent=2) + "\n", description)
    return written


def aggregate_snr(output_dir: Path) -> list[dict]:
    """Merge every scan's ``*_desc-snr_qc.tsv`` into ``output_dir/snr.tsv``; returns rows."""
    import csv

    output_dir = Path(output_dir)
    rows: list[dict] = []
    fields: list[str] = []
    for tsv in sorted(output_dir.glob("sub-*/**/*_desc-snr_qc.tsv")):
        with open(tsv, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            fields = fields or list(reader.fieldnames or [])
            rows.extend(reader)
    if rows:
        lines = ["\t".join(fields)] + ["\t".join(r.get(f, "") for f in fields) for r in rows]
        atomic_write_text("\n".join(lines) + "\n", output_dir / "snr.tsv")
    return rows
