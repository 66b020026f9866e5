"""Study design rules: traveling subjects, training split, reference, voxel sizes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype.study import (
    StudyDesignError,
    check_voxel_sizes,
    choose_reference,
    first_runs,
    label_source,
    plan_study,
    rescan_partner,
)
from dkiharm_nipype.utils.bids import DWIScan


def _scan(sub: str, scanner: str, run: int = 1, dwi: Path | None = None) -> DWIScan:
    path = dwi or Path(f"/x/sub-{sub}_ses-{scanner}_run-{run}_dwi.nii.gz")
    return DWIScan(
        subject=sub,
        session=scanner,
        run=run,
        scanner=scanner,
        dwi=path,
        bval=path,
        bvec=path,
        sidecar=None,
    )


def _paper_design() -> list[DWIScan]:
    """Five subjects on four scanners, runs as in the paper's Table 1."""
    runs = {"A": 2, "B": 2, "C": 1, "D": 2}
    return [
        _scan(f"0{i}", sc, r)
        for i in range(1, 6)
        for sc, n in runs.items()
        for r in range(1, n + 1)
    ]


def test_default_split_is_forty_percent_seeded():
    plan = plan_study(_paper_design(), seed=3)
    assert plan.scanners == ("A", "B", "C", "D")
    assert len(plan.traveling) == 5 and len(plan.training) == 2 and len(plan.testing) == 3
    assert set(plan.training).isdisjoint(plan.testing)
    assert plan_study(_paper_design(), seed=3) == plan  # reproducible
    assert len({plan_study(_paper_design(), seed=s).training for s in range(10)}) > 1


def test_errors_name_the_problem():
    scans = _paper_design()
    with pytest.raises(StudyDesignError, match="reference scanner 'E' does not exist"):
        plan_study(scans, reference="E")
    with pytest.raises(StudyDesignError, match="no traveling subject"):
        plan_study([_scan("01", "A"), _scan("02", "B")])
    with pytest.raises(StudyDesignError, match="at least two scanners"):
        plan_study([_scan("01", "A"), _scan("02", "A")])
    partial = [s for s in scans if not (s.subject == "02" and s.scanner == "C")]
    with pytest.raises(StudyDesignError, match=r"sub-02 has no scan on scanner\(s\) C"):
        plan_study(partial, train_participants=("02",))
    # a subject missing a scanner is never drawn for training
    assert all("02" not in plan_study(partial, seed=s).training for s in range(10))


def test_reference_is_highest_snr(tmp_path):
    tsv = tmp_path / "snr.tsv"
    rows = ["participant_id\tscanner\tsnr_db"]
    table3 = {"A": [23.51, 23.32], "B": [24.28, 24.58], "C": [23.06, 23.66], "D": [30.21, 30.02]}
    for sc, values in table3.items():
        rows += [f"sub-0{i}\t{sc}\t{v}" for i, v in enumerate(values, 1)]
    tsv.write_text("\n".join(rows) + "\n")
    reference, table = choose_reference([tsv])
    assert reference == "D"
    assert "30.12" in table  # mean of scanner D
    assert choose_reference([tsv], "B")[0] == "B"


def test_voxel_sizes_must_match(tmp_path):
    paths = []
    for i, zoom in enumerate((2.0, 2.0, 2.4)):
        img = nb.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.diag([zoom] * 3 + [1]))
        paths.append(tmp_path / f"sub-0{i}_dwi.nii.gz")
        img.to_filename(paths[-1])
    scans = [_scan(f"0{i}", "A", dwi=p) for i, p in enumerate(paths)]
    assert check_voxel_sizes(scans[:2]) == (2.0, 2.0, 2.0)
    with pytest.raises(StudyDesignError, match="voxel sizes differ.*2.4x2.4x2.4 mm"):
        check_voxel_sizes(scans)


def test_rescan_partner_is_the_other_run():
    scans = _paper_design()

    def get(sub, scanner, run):
        return next(s for s in scans if (s.subject, s.scanner, s.run) == (sub, scanner, run))

    assert rescan_partner(get("01", "D", 1), scans) is get("01", "D", 2)
    assert rescan_partner(get("01", "D", 2), scans) is get("01", "D", 1)
    assert rescan_partner(get("03", "C", 1), scans) is None  # C: one run (Table 1)
    third = _scan("01", "D", 3)
    assert rescan_partner(third, [*scans, third]) is get("01", "D", 1)


def test_first_runs_order_runs_as_numbers_and_serve_every_record():
    """One rule for the scans, the evaluation tables and the report: run 2 before run 10."""
    scans = [_scan("01", "A", 10), _scan("01", "A", 2), _scan("01", "B", 1), _scan("02", "A", 3)]
    first = first_runs(scans)
    assert {k: s.run for k, s in first.items()} == {("01", "A"): 2, ("01", "B"): 1, ("02", "A"): 3}
    rows = [{"subject": "01", "scanner": "A", "run": r} for r in ("10", "2", "x")]
    by_row = first_runs(rows, group=lambda r: (r["subject"], r["scanner"]), run=lambda r: r["run"])
    assert by_row[("01", "A")]["run"] == "2"


def test_label_source_follows_the_paper():
    """Target scans: the subject's first reference-scanner run; reference-scanner scans: the
    other run with ``rescan`` labels, else (or with a single run) their own fit."""
    scans = _paper_design()

    def get(sub, scanner, run):
        return next(s for s in scans if (s.subject, s.scanner, s.run) == (sub, scanner, run))

    for scan in (get("02", "A", 2), get("02", "C", 1)):
        assert label_source(scan, scans, reference="D") is get("02", "D", 1)
    assert label_source(get("02", "D", 1), scans, reference="D") is get("02", "D", 2)
    assert label_source(get("02", "D", 2), scans, reference="D") is get("02", "D", 1)
    own = get("02", "D", 2)
    assert label_source(own, scans, reference="D", reference_labels="fit") is own
    assert label_source(get("03", "C", 1), scans, reference="C") is get("03", "C", 1)
    alone = _scan("09", "A")
    assert label_source(alone, [*scans, alone], reference="D") is None
