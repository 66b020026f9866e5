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


def dataset_description(
    *,
    bids_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    pipeline_description: str | None = None,
) -> dict:
    """``dataset_description.json`` of the dkiharm derivatives.

    ``GeneratedBy`` names this version; with ``bids_dir``, ``DatasetLinks`` resolves the
    ``bids:raw:`` URIs of the sidecars' ``Sources`` and ``SourceDatasets`` names the raw
    dataset (a relative path when the derivatives sit inside it, else a ``file://`` URI).

    >>> desc = dataset_description(bids_dir="/data/study",
    ...                            output_dir="/data/study/derivatives/dkiharm")
    >>> desc["DatasetLinks"], desc["SourceDatasets"]
    ({'raw': '../..'}, [{'URL': '../..'}])
    >>> dataset_description(bids_dir="/data/study", output_dir="/out")["DatasetLinks"]
    {'raw': 'file:///data/study'}
    """
    description: dict = {
        "Name": "dkiharm derivatives",
        "BIDSVersion": "1.10.0",
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
    if bids_dir is not None:
        raw = Path(bids_dir).absolute()
        out = Path(output_dir).absolute() if output_dir is not None else None
        if out is not None and raw in out.parents:
            uri = "/".join([".."] * len(out.relative_to(raw).parts))
        else:
            uri = raw.as_uri()
        source = {"URL": uri}
        raw_description = _read_json(raw / "dataset_description.json")
        for key, field in (("DatasetDOI", "DOI"), ("Version", "Version")):
            if raw_description.get(key):
                source[field] = raw_description[key]
        description["SourceDatasets"] = [source]
        description["DatasetLinks"] = {"raw": uri}
    return description


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


#: Files whose BIDS-Derivatives rules the BIDS validator cannot check yet (its schema has
#: no rule for them); written to ``output_dir/.bidsignore`` so that a validation of the
#: output folder reports what it can check. ``docs/outputs.md`` explains each.
NOT_YET_VALIDATED = {
    "diffusion model maps (BEP016 draft, QSIRecon's naming)": ("*_dwimap.nii.gz", "*_dwimap.json"),
    "gradient tables of preprocessed DWIs (the schema allows them in raw data only)": (
        "*_desc-preproc_dwi.bval",
        "*_desc-preproc_dwi.bvec",
    ),
    "quality-control tables": ("*_qc.tsv", "/snr.tsv"),
    "group level: models, evaluation tables, report": (
        "/models/",
        "/evaluation/",
        "/experiments/",
        "/report*.html",
        "/sub-*.html",
        "/figures/",
    ),
}


def bidsignore_text() -> str:
    """``.bidsignore`` of the derivatives: :data:`NOT_YET_VALIDATED`, one comment per kind."""
    lines = []
    for what, patterns in NOT_YET_VALIDATED.items():
        lines += [f"# {what}", *patterns]
    return "\n".join(lines) + "\n"


def publish_derivatives(
    staging: Path | None, output_dir: Path, *, bids_dir: Path | None = None
) -> list[Path]:
    """Copy every file of ``staging`` into ``output_dir``; returns the published paths.

    ``dataset_description.json`` is rewritten every time, so ``GeneratedBy`` names the
    version that wrote the newest files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if staging is not None and Path(staging).is_dir():
        for src in sorted(p for p in Path(staging).rglob("*") if p.is_file()):
            dst = output_dir / src.relative_to(staging)
            atomic_copy(src, dst)
            written.append(dst)
    description = dataset_description(bids_dir=bids_dir, output_dir=output_dir)
    atomic_write_text(bidsignore_text(), output_dir / ".bidsignore")
    atomic_write_text(
        json.dumps(description, indent=2) + "\n", output_dir / "dataset_description.json"
    )
    return written


def publish_files(
    files, staging: Path, output_dir: Path, *, bids_dir: Path | None = None
) -> list[Path]:
    """Copy ``files`` (inside ``staging``) to the same relative paths in ``output_dir``.

    Files already published with the same content are left as they are, so that a rerun
    does not touch their modification times (later runs hash their inputs by time stamp).
    """
    import filecmp

    output_dir = Path(output_dir)
    written = []
    for src in sorted(Path(f) for f in files):
        dst = output_dir / src.relative_to(staging)
        if not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
            atomic_copy(src, dst)
        written.append(dst)
    if written:
        publish_derivatives(None, output_dir, bids_dir=bids_dir)  # dataset_description.json
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
