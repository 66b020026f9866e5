"""Finding the diffusion scans of a BIDS dataset and grouping them by scanner.

The default query (DWI NIfTI files with their ``.bval``/``.bvec`` and sidecar) is merged
with the user's ``--bids-filter-file`` in the way fMRIPrep's ``collect_data`` does: the
filter file is a JSON object keyed by data type (``{"dwi": {"acquisition": "multishell"}}``)
whose entries override or extend the default query.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BIDSInputError

DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    "dwi": {"datatype": "dwi", "suffix": "dwi", "extension": [".nii", ".nii.gz"]},
}

#: ``--scanner-entity`` values that name a BIDS entity (the rest name a sidecar field).
SCANNER_ENTITIES = {
    "ses": "session",
    "session": "session",
    "acq": "acquisition",
    "acquisition": "acquisition",
}


@dataclass(frozen=True)
class DWIScan:
    """One diffusion acquisition (one run) and everything needed to process it."""

    subject: str
    session: str | None
    run: int | None
    scanner: str
    dwi: Path
    bval: Path
    bvec: Path
    sidecar: Path | None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    fmap_epi: tuple[Path, ...] = ()
    fmap_metadata: tuple[dict[str, Any], ...] = field(default=(), hash=False, compare=False)
    entities: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: :class:`~dkiharm_nipype.utils.published.PreprocessedDWI` of ``--derivatives``, if any
    preprocessed: Any = field(default=None, hash=False, compare=False)
    #: :class:`~dkiharm_nipype.utils.published.PublishedScan` a group run builds on, if any
    published: Any = field(default=None, hash=False, compare=False)

    @property
    def key(self) -> str:
        """A readable identifier, e.g. ``sub-01_ses-A_run-1``."""
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        if self.entities.get("acquisition"):
            parts.append(f"acq-{self.entities['acquisition']}")
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)


def load_layout(bids_dir: Path, *, database_path: Path | None = None):
    """Index ``bids_dir`` with pybids, failing with a one-line message if it is not BIDS."""
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise BIDSInputError(
            f"{bids_dir} is not a BIDS dataset (no dataset_description.json); point bids_dir "
            "at the dataset root, or generate an example with "
            "'dkiharm-phantom DIR --preset tiny'."
        )
    try:
        json.loads((bids_dir / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BIDSInputError(
            f"{bids_dir / 'dataset_description.json'} is not valid JSON ({exc}); fix the file."
        ) from None
    try:
        return BIDSLayout(
            str(bids_dir),
            validate=False,
            derivatives=False,
            database_path=str(database_path) if database_path else None,
        )
    except OSError:  # pybids names no file when a sidecar is not JSON: find it
        _raise_on_bad_sidecar(bids_dir)
        raise


def _raise_on_bad_sidecar(bids_dir: Path) -> None:
    for sidecar in sorted(bids_dir.rglob("*.json")):
        if {"derivatives", "sourcedata", "code"} & set(sidecar.relative_to(bids_dir).parts):
            continue
        try:
            json.loads(sidecar.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BIDSInputError(
                f"sidecar {sidecar} is not valid JSON ({exc}); fix or regenerate it "
                "(e.g. with dcm2niix)."
            ) from None


def load_bids_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file`` (JSON keyed by data type)."""
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BIDSInputError(f"BIDS filter file {path} does not exist; check the path.") from None
    except json.JSONDecodeError as exc:
        raise BIDSInputError(
            f"BIDS filter file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            'write it like {"dwi": {"acquisition": "multishell"}}.'
        ) from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise BIDSInputError(
            f"BIDS filter file {path} must map data types to queries, "
            'e.g. {"dwi": {"acquisition": "multishell"}}.'
        )
    unknown = sorted(set(filters) - set(DEFAULT_QUERIES))
    if unknown:
        raise BIDSInputError(
            f"BIDS filter file {path} has unknown data type(s) {unknown}; "
            f"use one of {sorted(DEFAULT_QUERIES)}."
        )
    return filters


def _scanner_of(
    entities: dict[str, Any], metadata: dict[str, Any], scanner_entity: str, dwi: Path
) -> str:
    entity = SCANNER_ENTITIES.get(scanner_entity)
    if entity is not None:
        value = entities.get(entity)
        if value is None:
            raise BIDSInputError(
                f"{dwi.name} has no '{entity}' entity to identify its scanner; name scanners "
                f"in the file names or pass --scanner-entity with a sidecar field such as "
                "DeviceSerialNumber."
            )
        return str(value)
    value = metadata.get(scanner_entity)
    if value in (None, ""):
        raise BIDSInputError(
            f"the sidecar of {dwi.name} lacks the field '{scanner_entity}' used to identify "
            "scanners; add it or use --scanner-entity ses."
        )
    return "".join(ch for ch in str(value) if ch.isalnum()) or str(value)


def collect_scans(
    layout,
    *,
    participant_label: tuple[str, ...] | list[str] = (),
    session_label: tuple[str, ...] | list[str] = (),
    bids_filters: dict[str, dict[str, Any]] | None = None,
    scanner_entity: str = "ses",
) -> list[DWIScan]:
    """All DWI scans selected by labels and filters, each with its gradients and fieldmaps."""
    bids_dir = Path(layout.root)
    subjects = layout.get_subjects()
    if not subjects:
        raise BIDSInputError(
            f"{bids_dir} has no sub-* folders with data; check that bids_dir is the dataset root."
        )
    wanted = [label.removeprefix("sub-") for label in participant_label]
    missing = sorted(set(wanted) - set(subjects))
    if missing:
        raise BIDSInputError(
            f"participant(s) {', '.join(missing)} not found in {bids_dir}; "
            f"available: {', '.join(sorted(subjects))}."
        )
    query = dict(DEFAULT_QUERIES["dwi"])
    query.update((bids_filters or {}).get("dwi", {}))
    if wanted:
        query["subject"] = wanted
    if session_label:
        sessions = [s.removeprefix("ses-") for s in session_label]
        unknown = sorted(set(sessions) - set(layout.get_sessions()))
        if unknown:
            raise BIDSInputError(
                f"session(s) {', '.join(unknown)} not found in {bids_dir}; "
                f"available: {', '.join(sorted(layout.get_sessions())) or 'none'}."
            )
        query["session"] = sessions

    scans = []
    for bids_file in layout.get(**query):
        dwi = Path(bids_file.path)
        entities = bids_file.get_entities()
        bval, bvec = (_companion(layout, dwi, ext) for ext in (".bval", ".bvec"))
        metadata = layout.get_metadata(str(dwi))
        sidecar = dwi.with_name(dwi.name.split(".nii")[0] + ".json")
        fmaps = tuple(
            Path(fm["epi"])
            for fm in layout.get_fieldmap(str(dwi), return_list=True)
            if fm.get("suffix") == "epi"
        )
        scans.append(
            DWIScan(
                subject=entities["subject"],
                session=entities.get("session"),
                run=entities.get("run"),
                scanner=_scanner_of(entities, metadata, scanner_entity, dwi),
                dwi=dwi,
                bval=bval,
                bvec=bvec,
                sidecar=sidecar if sidecar.is_file() else None,
                metadata=dict(metadata),
                fmap_epi=fmaps,
                fmap_metadata=tuple(dict(layout.get_metadata(str(fm))) for fm in fmaps),
                entities=dict(entities),
            )
        )
    if not scans:
        raise BIDSInputError(
            f"no DWI scans in {bids_dir} match the selection {_describe(query)}; "
            "check --participant-label, --session-label and --bids-filter-file."
        )
    return sorted(scans, key=lambda s: (s.subject, s.scanner, s.key))


def _companion(layout, dwi: Path, extension: str) -> Path:
    """The ``.bval``/``.bvec`` belonging to ``dwi`` (exact sibling or BIDS inheritance)."""
    sibling = dwi.with_name(dwi.name.split(".nii")[0] + extension)
    if sibling.is_file():
        return sibling
    try:
        found = layout.get_bval(str(dwi)) if extension == ".bval" else layout.get_bvec(str(dwi))
    except Exception:  # pybids raises a bare ValueError/IndexError when nothing matches
        found = None
    if not found:
        raise BIDSInputError(
            f"{dwi} has no {extension} file; add {sibling.name} next to it (BIDS requires "
            "gradient tables for every DWI)."
        )
    return Path(found)


def _describe(query: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in query.items() if k not in ("datatype", "extension"))


def scans_by_scanner(scans: list[DWIScan]) -> dict[str, list[DWIScan]]:
    """Scans grouped by scanner label, in sorted order."""
    groups: dict[str, list[DWIScan]] = defaultdict(list)
    for scan in scans:
        groups[scan.scanner].append(scan)
    return dict(sorted(groups.items()))


def summary_table(scans: list[DWIScan]) -> str:
    """A subjects x scanners table of run counts, as printed by the BIDS-App."""
    scanners = sorted({s.scanner for s in scans})
    subjects = sorted({s.subject for s in scans})
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for scan in scans:
        counts[scan.subject, scan.scanner] += 1
    width = max([len("subject")] + [len(f"sub-{s}") for s in subjects]) + 2
    col = max([6] + [len(s) + 2 for s in scanners])
    lines = ["subject".ljust(width) + "".join(s.rjust(col) for s in scanners)]
    for sub in subjects:
        lines.append(
            f"sub-{sub}".ljust(width)
            + "".join(str(counts.get((sub, sc), "-")).rjust(col) for sc in scanners)
        )
    traveling = [s for s in subjects if sum((s, sc) in counts for sc in scanners) >= 2]
    lines.append(
        f"{len(subjects)} subject(s) x {len(scanners)} scanner(s), {len(scans)} DWI run(s); "
        f"{len(traveling)} traveling subject(s) scanned on 2 or more scanners."
    )
    return "\n".join(lines)


#: Entities of a preprocessed series that do not identify its raw scan.
_DERIVATIVE_ONLY = {"space", "desc", "suffix", "extension", "datatype", "res", "den"}


def _pipeline_name(root: Path) -> str:
    try:
        gen = json.loads((root / "dataset_description.json").read_text())["GeneratedBy"][0]
        return f"{gen['Name']} {gen.get('Version', '')}".strip()
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return f"the pipeline that wrote {root}"


def attach_preprocessed(scans: list[DWIScan], roots) -> list[DWIScan]:
    """Give each scan the preprocessed series found for it in ``--derivatives`` folders.

    A QSIPrep-style series is ``*_desc-preproc_dwi.nii.gz`` with ``.bval``/``.bvec`` beside
    it and a brain mask ``*_desc-brain_mask.nii.gz``; it belongs to the raw scan whose
    entities include all of its own (``space``/``desc`` aside). Scans without one keep
    dkiharm's preprocessing.
    """
    from dataclasses import replace

    from bids.layout import parse_file_entities

    from .io import check_nifti, read_gradients
    from .published import PreprocessedDWI

    found: dict[str, tuple[int, Path, Path, str]] = {}
    for root in (Path(r) for r in roots):
        if not root.is_dir():
            raise BIDSInputError(f"--derivatives {root} is not a folder; give a QSIPrep output.")
        pipeline = _pipeline_name(root)
        for dwi in sorted(root.glob("sub-*/**/dwi/*_desc-preproc_dwi.nii*")):
            ents = {
                k: str(v)
                for k, v in parse_file_entities(str(dwi)).items()
                if k not in _DERIVATIVE_ONLY
            }
            owners = [
                s for s in scans if all(str(s.entities.get(k)) == v for k, v in ents.items())
            ]
            if len(owners) > 1:
                raise BIDSInputError(
                    f"preprocessed series {dwi} matches {len(owners)} raw scans "
                    f"({', '.join(s.key for s in owners)}); give one series per run "
                    "(QSIPrep: --separate-all-dwis)."
                )
            for scan in owners:
                previous = found.get(scan.key)
                if previous is not None and previous[0] == len(ents):
                    raise BIDSInputError(
                        f"two preprocessed series match {scan.key}: {previous[1]} and {dwi}; "
                        "keep one (e.g. one output space) in the --derivatives folder."
                    )
                if previous is None or previous[0] < len(ents):
                    found[scan.key] = (len(ents), dwi, root, pipeline)
    out = []
    for scan in scans:
        if scan.key not in found:
            out.append(scan)
            continue
        _, dwi, root, pipeline = found[scan.key]
        stem = dwi.name.split(".nii")[0]
        mask = dwi.with_name(stem.replace("_desc-preproc_dwi", "_desc-brain_mask") + ".nii.gz")
        files = {ext: dwi.with_name(stem + ext) for ext in (".bval", ".bvec")}
        for path in (*files.values(), mask):
            if not path.is_file():
                raise BIDSInputError(
                    f"preprocessed series {dwi} has no {path.name}; QSIPrep writes it beside "
                    "the series: copy it there or leave the series out of --derivatives."
                )
        check_nifti(dwi)
        check_nifti(mask, min_ndim=3)
        read_gradients(files[".bval"], files[".bvec"])
        pre = PreprocessedDWI(
            dwi=dwi, bval=files[".bval"], bvec=files[".bvec"], mask=mask, pipeline=pipeline,
            root=root,
        )
        out.append(replace(scan, preprocessed=pre))
    return out
