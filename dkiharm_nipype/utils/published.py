"""What a participant run published, and whether a later run may build on it.

Every scan that the participant level finishes is published into ``output_dir`` with a
provenance block in its ``desc-preproc_dwi.json`` sidecar (key :data:`PROVENANCE_KEY`): the
dkiharm version, the options that shape a scan's outputs, size, modification time and SHA-1
of every input file, and the relative paths of the files published for the scan. The group
level (and a rerun) uses a scan's published files instead of recomputing them when that block
matches the current inputs, options and version, so participant jobs with separate work
directories followed by one group job recompute no preprocessing and no fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..__about__ import __version__

PROVENANCE_KEY = "DkiharmProvenance"

#: Options whose value changes a scan's published files (the run configuration's names).
SCAN_OPTIONS = ("preproc", "denoiser", "mask_method", "fit_method", "b_max")

#: Sink nodes of the per-scan workflow whose files the group level reads.
SCAN_SINKS = ("ds_dwi", "ds_bval", "ds_bvec", "ds_mask", "ds_snr")


@dataclass(frozen=True)
class PublishedScan:
    """The published derivatives of one scan (absolute paths)."""

    dwi: Path
    bval: Path
    bvec: Path
    mask: Path
    maps: tuple[Path, ...]  # in the order of the ``metrics`` they were found for
    snr: Path
    fa: Path


@dataclass(frozen=True)
class PreprocessedDWI:
    """A scan preprocessed by another pipeline (``--derivatives``, e.g. QSIPrep)."""

    dwi: Path
    bval: Path
    bvec: Path
    mask: Path
    pipeline: str  # e.g. "QSIPrep 1.0.0", from the dataset_description.json
    root: Path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, *, with_hash: bool = True) -> dict[str, Any]:
    """Size, modification time (ns) and SHA-1 of ``path``."""
    stat = Path(path).stat()
    record: dict[str, Any] = {
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if with_hash:
        record["sha1"] = _sha1(Path(path))
    return record


def _same_file(record: dict[str, Any]) -> bool:
    """Whether the file recorded is unchanged (size and mtime, else size and content)."""
    path = Path(record["path"])
    if not path.is_file():
        return False
    stat = path.stat()
    if stat.st_size != record.get("size"):
        return False
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return True
    return record.get("sha1") is not None and _sha1(path) == record["sha1"]


def scan_inputs(scan) -> dict[str, Any]:
    """The files a scan's outputs are computed from, as named in the provenance block."""
    pre = getattr(scan, "preprocessed", None)
    if pre is not None:
        files = {"dwi": pre.dwi, "bval": pre.bval, "bvec": pre.bvec, "mask": pre.mask}
    else:
        files = {"dwi": scan.dwi, "bval": scan.bval, "bvec": scan.bvec}
        files.update({f"fmap{i}": f for i, f in enumerate(scan.fmap_epi, 1)})
    return files


def scan_provenance(scan, options: dict[str, Any]) -> dict[str, Any]:
    """The provenance block of ``scan`` for a run with ``options`` (see :data:`SCAN_OPTIONS`)."""
    return {
        "Version": __version__,
        "Options": {k: options.get(k) for k in (*SCAN_OPTIONS, "preproc_requested")},
        "Inputs": {k: file_record(Path(v)) for k, v in scan_inputs(scan).items()},
    }


def record_provenance(sidecar: Path, provenance: dict[str, Any], files: dict[str, str]) -> None:
    """Add the provenance block (with the published ``files``) to a published sidecar."""
    from .io import atomic_write_text

    sidecar = Path(sidecar)
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    meta[PROVENANCE_KEY] = {**provenance, "Files": dict(sorted(files.items()))}
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", sidecar)


def _mismatch(stored: dict[str, Any], scan, options: dict[str, Any]) -> str | None:
    """Why ``stored`` provenance does not fit the current run (None: it fits)."""
    if stored.get("Version") != __version__:
        return f"made by dkiharm {stored.get('Version')}, this is {__version__}"
    old = stored.get("Options", {})
    for key in SCAN_OPTIONS:
        if (
            key == "preproc"
            and old.get("preproc_requested") == options.get("preproc_requested") == "auto"
        ):
            continue  # --preproc auto resolves per host; what it resolved to there stands
        if old.get(key) != options.get(key):
            flag = "--" + key.replace("_", "-")
            return f"made with {flag} {old.get(key)}, this run uses {options.get(key)}"
    inputs = {k: str(v) for k, v in scan_inputs(scan).items()}
    recorded = stored.get("Inputs", {})
    if {k: r.get("path") for k, r in recorded.items()} != inputs:
        return "made from other input files"
    for record in recorded.values():
        if not _same_file(record):
            return f"{Path(record['path']).name} changed since"
    return None


def find_published(
    scans, output_dir: Path, options: dict[str, Any], *, dwi_sidecar, metrics
) -> tuple[dict[str, PublishedScan], dict[str, str]]:
    """Published outputs usable for each scan, and why the others are not.

    ``dwi_sidecar(scan)`` gives the relative path of the scan's ``desc-preproc_dwi.json``;
    ``metrics`` names the maps (``ds_<metric>`` sinks) in the order the caller wants them.
    Returns ``({scan key: PublishedScan}, {scan key: reason})``.
    """
    usable: dict[str, PublishedScan] = {}
    reasons: dict[str, str] = {}
    for scan in scans:
        sidecar = Path(output_dir) / dwi_sidecar(scan)
        try:
            stored = json.loads(sidecar.read_text()).get(PROVENANCE_KEY)
        except (OSError, json.JSONDecodeError):
            stored = None
        if not stored:
            reasons[scan.key] = "not published yet"
            continue
        why = _mismatch(stored, scan, options)
        files = {k: Path(output_dir) / v for k, v in stored.get("Files", {}).items()}
        needed = (*SCAN_SINKS, "ds_fa", *(f"ds_{m}" for m in metrics))
        missing = [k for k in needed if k not in files or not files[k].is_file()]
        if why is None and missing:
            why = f"published file of {missing[0]} is missing"
        if why is not None:
            reasons[scan.key] = why
            continue
        usable[scan.key] = PublishedScan(
            dwi=files["ds_dwi"],
            bval=files["ds_bval"],
            bvec=files["ds_bvec"],
            mask=files["ds_mask"],
            maps=tuple(files[f"ds_{m}"] for m in metrics),
            snr=files["ds_snr"],
            fa=files["ds_fa"],
        )
    return usable, reasons


def relative_files(stored: dict[str, list[str]], staging: Path) -> dict[str, str]:
    """``{sink: path relative to the staging root}`` of a unit's stored data files."""
    out = {}
    for sink, paths in stored.items():
        data = [p for p in paths if not p.endswith(".json")] or paths
        if data:
            out[sink] = os.path.relpath(data[0], staging)
    return out
