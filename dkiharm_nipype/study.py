"""The traveling-subject study design: scanners, traveling subjects, reference and split.

Rules (paper, sections 2.1-2.2):

* a scanner is a group of scans sharing a label (session label by default);
* a *traveling subject* was scanned on two or more scanners; the networks are trained on
  traveling subjects scanned on *every* scanner (so labels exist for every target);
* by default 40 % of the traveling subjects train the networks (two of five in the paper),
  drawn with the run's seed; the others are test subjects;
* the reference scanner is the one with the highest white-matter SNR unless named;
* all scanners must share the voxel size, the method's one requirement on protocols.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nibabel as nb
import numpy as np

from .errors import DkiharmInputError
from .evaluation.scores import snr_table

#: Share of the traveling subjects used for training by default (paper: 40 %).
TRAIN_FRACTION = 0.4
#: Voxel sizes (mm) closer than this count as equal.
VOXEL_TOLERANCE = 0.01

T = TypeVar("T")


class StudyDesignError(DkiharmInputError):
    """The dataset cannot be harmonized as selected."""


@dataclass(frozen=True)
class StudyPlan:
    """Who is scanned where, who trains the networks, and the reference (if fixed)."""

    scanners: tuple[str, ...]
    traveling: tuple[str, ...]
    training: tuple[str, ...]
    testing: tuple[str, ...]
    reference: str | None

    def describe(self) -> str:
        ref = self.reference or "chosen by SNR at run time"
        return (
            f"scanners: {', '.join(self.scanners)}; reference: {ref}; traveling subjects: "
            f"{len(self.traveling)}; training: {', '.join(self.training)}; testing: "
            f"{', '.join(self.testing) or 'none'}"
        )


def check_voxel_sizes(scans) -> tuple[float, float, float]:
    """Return the common voxel size, or stop naming two scans that differ."""
    first, first_zooms = None, None
    for scan in scans:
        zooms = tuple(float(z) for z in nb.load(str(scan.dwi)).header.get_zooms()[:3])
        if first is None:
            first, first_zooms = scan, zooms
        elif np.max(np.abs(np.subtract(zooms, first_zooms))) > VOXEL_TOLERANCE:
            raise StudyDesignError(
                f"voxel sizes differ between scanners: {scan.dwi.name} has "
                f"{'x'.join(f'{z:g}' for z in zooms)} mm but {first.dwi.name} has "
                f"{'x'.join(f'{z:g}' for z in first_zooms)} mm; the harmonization needs one "
                "voxel size on every scanner (reslice or select matching scans)."
            )
    return first_zooms


def plan_study(
    scans,
    *,
    reference: str | None = None,
    train_participants=(),
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
) -> StudyPlan:
    """Check the design and split the traveling subjects into training and testing."""
    by_subject: dict[str, set[str]] = defaultdict(set)
    for scan in scans:
        by_subject[scan.subject].add(scan.scanner)
    scanners = tuple(sorted({s.scanner for s in scans}))
    if len(scanners) < 2:
        raise StudyDesignError(
            f"harmonization needs scans from at least two scanners, but the selection has only "
            f"{', '.join(scanners)}; check --session-label/--scanner-entity."
        )
    if reference is not None and reference not in scanners:
        raise StudyDesignError(
            f"reference scanner '{reference}' does not exist; scanners in the dataset: "
            f"{', '.join(scanners)}."
        )
    traveling = tuple(sorted(s for s, sc in by_subject.items() if len(sc) >= 2))
    if not traveling:
        raise StudyDesignError(
            "no traveling subject: every participant was scanned on a single scanner, but the "
            "networks learn from subjects scanned on two or more scanners."
        )
    complete = [s for s in traveling if set(scanners) <= by_subject[s]]
    if train_participants:
        for sub in train_participants:
            if sub not in by_subject:
                raise StudyDesignError(
                    f"training participant sub-{sub} is not in the selection; choose among "
                    f"{', '.join('sub-' + s for s in sorted(by_subject))}."
                )
            missing = sorted(set(scanners) - by_subject[sub])
            if missing:
                raise StudyDesignError(
                    f"training participant sub-{sub} has no scan on scanner(s) "
                    f"{', '.join(missing)}; train on subjects scanned on every scanner "
                    f"({', '.join('sub-' + s for s in complete) or 'none'})."
                )
        training = tuple(sorted(train_participants))
    else:
        if not complete:
            raise StudyDesignError(
                f"no traveling subject was scanned on every scanner ({', '.join(scanners)}); "
                "select fewer scanners with --session-label or name --train-participants."
            )
        n_train = max(1, round(train_fraction * len(traveling)))
        if n_train >= len(complete) and len(complete) > 1:
            n_train = len(complete) - 1  # keep at least one complete subject for testing
        training = tuple(sorted(random.Random(seed).sample(complete, min(n_train, len(complete)))))
    testing = tuple(s for s in traveling if s not in training)
    return StudyPlan(
        scanners=scanners,
        traveling=traveling,
        training=training,
        testing=testing,
        reference=reference,
    )


def read_snr_rows(tsv_files) -> list[dict]:
    """Rows of per-scan SNR tables written by the participant level."""
    rows = []
    for tsv in tsv_files:
        with open(tsv, newline="") as fh:
            rows.extend(csv.DictReader(fh, delimiter="\t"))
    return rows


def choose_reference(snr_files, override: str | None = None) -> tuple[str, str]:
    """The reference scanner (highest mean WM SNR, or ``override``) and the SNR table."""
    table, best = snr_table(read_snr_rows(snr_files))
    if not (override or best):
        raise StudyDesignError(
            "No scan has a measurable SNR (every SNR is n/a: no white matter in the automatic "
            "ROI), so no reference scanner can be chosen; give --snr-roi FILE or "
            "--reference-scanner LABEL."
        )
    return (override or best), table


def run_key(run) -> tuple:
    """Sort key of run labels: none first, numbers in numeric order (``2`` before ``10``), then
    text."""
    if run is None or run == "":
        return (0, 0, "")
    return (0, int(run), "") if str(run).isdigit() else (1, 0, str(run))


def _subject_scanner(item) -> tuple[str, str]:
    return (item.subject, item.scanner)


def first_runs(
    items: Iterable[T],
    *,
    group: Callable[[T], Hashable] = _subject_scanner,
    run: Callable[[T], object] = lambda item: item.run,
) -> dict[Hashable, T]:
    """The first run of every subject on every scanner: the scans that provide reference
    labels, enter the inter-scanner CV and ComBat, and that later runs are compared with.

    ``items`` are scans by default (``.subject``, ``.scanner``, ``.run``); ``group`` and
    ``run`` read other records (table rows, ``(method, scanner, run)`` keys). Runs sort by
    :func:`run_key`; equal runs keep the order of their scan keys, else of ``items``.

    >>> rows = [{"sub": "01", "run": "10"}, {"sub": "01", "run": "2"}, {"sub": "02", "run": "1"}]
    >>> first = first_runs(rows, group=lambda r: r["sub"], run=lambda r: r["run"])
    >>> {sub: row["run"] for sub, row in sorted(first.items())}
    {'01': '2', '02': '1'}
    """
    ranked = sorted(items, key=lambda item: (run_key(run(item)), str(getattr(item, "key", ""))))
    out: dict[Hashable, T] = {}
    for item in ranked:
        out.setdefault(group(item), item)
    return out


def rescan_partner(scan, scans, *, order=None):
    """The scan whose maps label ``scan`` of the reference scanner under ``rescan`` labels.

    The same subject's first run on the same scanner when ``scan`` is a repeat, else its
    second run; ``None`` when the subject has a single run there. ``order`` sorts runs
    (default: by run number, as :func:`first_runs`).
    """
    order = order or (lambda s: (run_key(s.run), str(getattr(s, "key", ""))))
    same = sorted(
        (s for s in scans if s.subject == scan.subject and s.scanner == scan.scanner), key=order
    )
    if len(same) < 2:
        return None
    return same[1] if same[0] is scan else same[0]


def label_source(scan, scans, *, reference: str, reference_labels: str = "rescan"):
    """The scan whose raw-fit DKI maps, registered into ``scan``, are its training labels.

    The paper (2.2): a target scanner's scan is labelled by the same subject's first run on
    the ``reference`` scanner. A reference-scanner scan is labelled, with
    ``reference_labels='rescan'``, by the subject's other run there (:func:`rescan_partner`),
    else (``'fit'``, or a single run) by itself (its own fit, no registration). ``None``
    when the subject has no scan on the reference scanner.
    """
    if scan.scanner != reference:
        return first_runs(s for s in scans if s.subject == scan.subject).get(
            (scan.subject, reference)
        )
    if reference_labels == "rescan":
        return rescan_partner(scan, scans) or scan
    return scan


def write_plan(plan: StudyPlan, path: Path) -> None:
    """Record the design next to the models (JSON)."""
    import json

    Path(path).write_text(
        json.dumps(
            {
                "scanners": plan.scanners,
                "traveling_subjects": plan.traveling,
                "training_subjects": plan.training,
                "test_subjects": plan.testing,
                "reference_scanner": plan.reference,
            },
            indent=2,
        )
        + "\n"
    )
