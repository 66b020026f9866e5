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
from functools import lru_cache
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


#: Entities a derivative adds to its source's (BEP016 diffusion derivatives); ``model`` and
#: ``param`` are not in the released BIDS schema yet and go before ``label``/``desc``.
DERIVATIVE_ENTITIES = ("space", "model", "param", "label", "desc")

#: pybids entity names that are neither a schema name nor a file-name key.
_PYBIDS_ALIASES = {"staining": "stain"}

#: What pybids parses that is not an entity of the file name.
_NOT_ENTITIES = {"suffix", "extension", "datatype", "fmap", "scans"}


@lru_cache(maxsize=1)
def entity_order() -> tuple[str, ...]:
    """File-name keys of every BIDS entity in the schema's order, BEP016's model/param added.

    >>> order = entity_order()
    >>> order[:3], order.index("dir") < order.index("run") < order.index("echo")
    (('sub', 'tpl', 'ses'), True)
    >>> order[order.index("den") + 1:]
    ('model', 'param', 'label', 'desc')
    """
    from bidsschematools import schema

    bids_schema = schema.load_schema()
    keys = [bids_schema.objects.entities[name].name for name in bids_schema.rules.entities]
    at = keys.index("label")
    return (*keys[:at], "model", "param", *keys[at:])


@lru_cache(maxsize=1)
def _long_to_key() -> dict[str, str]:
    from bidsschematools import schema

    bids_schema = schema.load_schema()
    entities = bids_schema.objects.entities
    return {name: entities[name].name for name in bids_schema.rules.entities}


@lru_cache(maxsize=4096)
def source_entities(path: str | Path) -> dict[str, str]:
    """Every BIDS entity of a file name, by file-name key in BIDS order.

    Parsed with pybids (:func:`bids.layout.parse_file_entities`); an entity that pybids
    does not know but the BIDS schema does (``split``, ``tpl``, ...) is kept as written. A
    ``key-value`` part that is no BIDS entity at all raises :class:`BIDSInputError` naming
    the file and the entity.

    >>> source_entities("/d/sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_run-01_echo-2_dwi.nii.gz")
    {'sub': '01', 'ses': 'A', 'dir': 'PA', 'run': '01', 'echo': '2'}
    >>> source_entities("sub-01_foo-bar_dwi.nii.gz")
    Traceback (most recent call last):
    ...
    dkiharm_nipype.errors.BIDSInputError: sub-01_foo-bar_dwi.nii.gz has the entity 'foo', \
which is not a BIDS entity; rename the file or leave it out with --bids-filter-file.
    """
    from bids.layout import parse_file_entities

    name = Path(path).name
    parsed = parse_file_entities(name, config=["bids", "derivatives"])
    long_to_key = _long_to_key()
    found: dict[str, str] = {}
    for long_name, value in parsed.items():
        if long_name in _NOT_ENTITIES:
            continue
        key = _PYBIDS_ALIASES.get(long_name, long_to_key.get(long_name, long_name))
        found[key] = str(value)
    known = set(entity_order())
    for part in name.split(".")[0].split("_")[:-1]:  # BIDS grammar: key-value_..._suffix
        key, _, value = part.partition("-")
        if key not in known or not value:
            raise BIDSInputError(
                f"{name} has the entity '{key}', which is not a BIDS entity; rename the file "
                "or leave it out with --bids-filter-file."
            )
        found.setdefault(key, value)  # in the schema, unknown to pybids: kept as written
    return {key: found[key] for key in entity_order() if key in found}


def derivative_path(
    source_file: str | Path,
    *,
    suffix: str,
    extension: str = ".nii.gz",
    datatype: str = "dwi",
    **entities: str | None,
) -> Path:
    """Relative BIDS-Derivatives path of an output derived from ``source_file``.

    Every entity of the source is kept (:func:`source_entities`) and ``entities``
    (``space``, ``model``, ``param``, ``desc``, ...) are added, all in BIDS order, through a
    pybids path pattern (:func:`bids.layout.writing.build_path`).

    >>> str(derivative_path("/raw/sub-01_ses-A_dir-AP_run-1_dwi.nii.gz", space="dwi",
    ...                     model="dki", param="mk", suffix="dwimap"))
    'sub-01/ses-A/dwi/sub-01_ses-A_dir-AP_run-1_space-dwi_model-dki_param-mk_dwimap.nii.gz'
    """
    from bids.layout.writing import build_path

    found = dict(source_entities(source_file))
    if "sub" not in found:
        raise BIDSInputError(
            f"{source_file} is not a BIDS file name (no sub- entity); name it sub-<label>_..."
        )
    unknown = sorted(set(entities) - set(entity_order()))
    if unknown:
        raise ValueError(f"{unknown} are not BIDS entities; use some of {DERIVATIVE_ENTITIES}.")
    found.update({key: value for key, value in entities.items() if value})
    found.update(suffix=suffix, extension=extension, datatype=datatype)
    path = build_path(found, [_path_pattern()], strict=False)
    if path is None:  # pragma: no cover - the pattern has every entity as optional
        raise ValueError(f"cannot name a derivative of {source_file} with {entities}")
    return Path(path)


@lru_cache(maxsize=1)
def _path_pattern() -> str:
    optional = "".join(f"[_{key}-{{{key}}}]" for key in entity_order() if key != "sub")
    return f"sub-{{sub}}[/ses-{{ses}}]/{{datatype}}/sub-{{sub}}{optional}_{{suffix}}{{extension}}"


def scan_key(path: str | Path) -> str:
    """The entities of a scan joined as in its file name, e.g. ``sub-01_ses-A_dir-AP_run-1``.

    Entities a derivative adds (:data:`DERIVATIVE_ENTITIES`) are left out, so a map names
    the scan it was made from:

    >>> scan_key("/raw/sub-01/ses-A/dwi/sub-01_ses-A_acq-hi_dir-PA_run-1_dwi.nii.gz")
    'sub-01_ses-A_acq-hi_dir-PA_run-1'
    >>> scan_key("sub-01_ses-A_echo-2_space-dwi_model-dki_param-fa_dwimap.nii.gz")
    'sub-01_ses-A_echo-2'
    """
    return "_".join(
        f"{key}-{value}"
        for key, value in source_entities(path).items()
        if key not in DERIVATIVE_ENTITIES
    )


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
    #: every entity of the DWI's file name, by key in BIDS order (:func:`source_entities`)
    entities: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    #: :class:`~dkiharm_nipype.utils.published.PreprocessedDWI` of ``--derivatives``, if any
    preprocessed: Any = field(default=None, hash=False, compare=False)
    #: :class:`~dkiharm_nipype.utils.published.PublishedScan` a group run builds on, if any
    published: Any = field(default=None, hash=False, compare=False)

    @property
    def key(self) -> str:
        """Every entity of the scan, e.g. ``sub-01_ses-A_dir-AP_run-1``: unique per scan."""
        if self.entities:
            return "_".join(f"{key}-{value}" for key, value in self.entities.items())
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        if self.run is not None:
            parts.append(f"run-{self.run}")
        return "_".join(parts)


#: How many of the validator's errors a failed validation prints (one line each).
VALIDATOR_FIRST_MESSAGES = 5


def validator_command() -> list[str] | None:
    """The ``bids-validator-deno`` command (PyPI package of the maintained validator)."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("bids-validator-deno")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("bids-validator-deno")
    return [found] if found else None


def run_validator(bids_dir: Path, *, extra_args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Issues of the BIDS validator on ``bids_dir`` (a list of its JSON issue objects).

    Raises :class:`BIDSInputError` when the validator is not installed or gives no
    answer it can read.
    """
    import subprocess

    command = validator_command()
    if command is None:
        raise BIDSInputError(
            "the BIDS validator is not installed; pip install bids-validator-deno, or pass "
            "--skip-bids-validation."
        )
    proc = subprocess.run(
        [*command, str(bids_dir), "--format", "json", *extra_args],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return list(json.loads(proc.stdout)["issues"]["issues"])
    except (ValueError, KeyError, TypeError):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BIDSInputError(
            f"the BIDS validator could not check {bids_dir} (exit {proc.returncode}: {last}); "
            "pass --skip-bids-validation to go on without it."
        ) from None


def issue_line(issue: dict[str, Any]) -> str:
    """One line for a validator issue: code, file, and what is wrong.

    >>> issue_line({"code": "SIDECAR_KEY_REQUIRED", "subCode": "RepetitionTime",
    ...             "location": "/sub-01/func/sub-01_task-x_bold.nii.gz",
    ...             "issueMessage": "Field description: ..."})
    'SIDECAR_KEY_REQUIRED: /sub-01/func/sub-01_task-x_bold.nii.gz (RepetitionTime)'
    """
    what = issue.get("subCode") or (issue.get("issueMessage") or "").strip().split("\n")[0]
    where = issue.get("location") or "dataset"
    return f"{issue.get('code', '?')}: {where}" + (f" ({what[:120]})" if what else "")


def validate_bids(
    bids_dir: Path, *, participant_label: tuple[str, ...] | list[str] = (), logger=None
) -> list[str]:
    """Validate the raw dataset before processing, as fMRIPrep does.

    Errors raise :class:`BIDSInputError` whose message gives the validator's first
    :data:`VALIDATOR_FIRST_MESSAGES` errors, one line each; warnings are logged (one line
    per code, with a count) and returned. With ``participant_label``, issues in other
    subjects' folders are left out (as fMRIPrep validates only the selected subjects).
    """
    others = [f"/sub-{s.removeprefix('sub-')}/" for s in participant_label]
    issues = [
        issue
        for issue in run_validator(bids_dir)
        if not others
        or not str(issue.get("location", "")).startswith("/sub-")
        or any(str(issue["location"]).startswith(prefix) for prefix in others)
    ]
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        lines = [issue_line(i) for i in errors[:VALIDATOR_FIRST_MESSAGES]]
        more = len(errors) - len(lines)
        raise BIDSInputError(
            f"{bids_dir} is not valid BIDS ({len(errors)} error(s) from bids-validator-deno); "
            "fix them, or pass --skip-bids-validation to process it anyway:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {more} more" if more else "")
        )
    by_code: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for issue in issues:
        if issue.get("severity") == "warning":
            by_code[issue.get("code", "?")].append(issue)
    warnings = [
        f"{issue_line(found[0])}" + (f" and {len(found) - 1} more" if len(found) > 1 else "")
        for found in by_code.values()
    ]
    for line in warnings:
        if logger is not None:
            logger.warning("BIDS validator: %s", line)
    return warnings


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
    if database_path is not None:
        Path(database_path).mkdir(parents=True, exist_ok=True)  # reused by later runs
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
                entities=dict(source_entities(dwi)),
            )
        )
    if not scans:
        raise BIDSInputError(
            f"no DWI scans in {bids_dir} match the selection {_describe(query)}; "
            "check --participant-label, --session-label and --bids-filter-file."
        )
    _raise_on_same_key(scans)
    return sorted(scans, key=lambda s: (s.subject, s.scanner, s.key))


def _raise_on_same_key(scans: list[DWIScan]) -> None:
    """Two files with the same entities (``.nii`` beside ``.nii.gz``) would share outputs."""
    seen: dict[str, Path] = {}
    for scan in scans:
        other = seen.setdefault(scan.key, scan.dwi)
        if other != scan.dwi:
            raise BIDSInputError(
                f"{scan.dwi} and {other.name} have the same entities ({scan.key}); keep one "
                "of them, or tell them apart with an entity such as acq-, run- or echo-."
            )


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
_DERIVATIVE_ONLY = {"space", "desc", "res", "den", "model", "param", "label"}


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

    from .io import check_nifti, read_gradients
    from .published import PreprocessedDWI

    found: dict[str, tuple[int, Path, Path, str]] = {}
    for root in (Path(r) for r in roots):
        if not root.is_dir():
            raise BIDSInputError(f"--derivatives {root} is not a folder; give a QSIPrep output.")
        pipeline = _pipeline_name(root)
        for dwi in sorted(root.glob("sub-*/**/dwi/*_desc-preproc_dwi.nii*")):
            ents = {k: v for k, v in source_entities(dwi).items() if k not in _DERIVATIVE_ONLY}
            owners = [s for s in scans if all(s.entities.get(k) == v for k, v in ents.items())]
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
            dwi=dwi,
            bval=files[".bval"],
            bvec=files[".bvec"],
            mask=mask,
            pipeline=pipeline,
            root=root,
        )
        out.append(replace(scan, preprocessed=pre))
    return out
