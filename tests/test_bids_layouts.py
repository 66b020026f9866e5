"""BIDS layouts beyond sub/ses/run: every entity kept, input validation, pybids database.

The datasets are written by the tests from the tiny phantom: two runs of one session are
renamed into a reversed phase-encoding pair (``dir-AP``/``dir-PA``) and, for another
subject, into a multi-echo pair (``echo-1``/``echo-2``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype.dki.maps import ALL_METRICS
from dkiharm_nipype.errors import BIDSInputError
from dkiharm_nipype.utils.bids import (
    collect_scans,
    derivative_path,
    load_layout,
    scan_key,
    source_entities,
    validate_bids,
)

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]

#: (subject, new entities of run-1, new entities of run-2, sidecar change per run)
PAIRS = {
    "01": (
        ("dir-AP", {"PhaseEncodingDirection": "j-"}),
        ("dir-PA", {"PhaseEncodingDirection": "j"}),
    ),
    "02": (("echo-1", {"EchoTime": 0.08}), ("echo-2", {"EchoTime": 0.11})),
}


@pytest.mark.parametrize(
    ("name", "key", "map_name"),
    [
        (
            "sub-01_ses-A_dir-PA_dwi.nii.gz",
            "sub-01_ses-A_dir-PA",
            "sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_space-dwi_model-dki_param-mk_dwimap.nii.gz",
        ),
        (  # every raw-DWI entity, written out of order: BIDS order comes back
            "sub-01_ses-A_run-02_part-mag_echo-2_dir-AP_rec-x_ce-gd_acq-hi_dwi.nii.gz",
            "sub-01_ses-A_acq-hi_ce-gd_rec-x_dir-AP_run-02_echo-2_part-mag",
            "sub-01/ses-A/dwi/sub-01_ses-A_acq-hi_ce-gd_rec-x_dir-AP_run-02_echo-2_part-mag_"
            "space-dwi_model-dki_param-mk_dwimap.nii.gz",
        ),
        (  # chunk (pybids knows it), split (only the schema does); space goes before both
            "sub-3_chunk-1_split-2_dwi.nii",
            "sub-3_split-2_chunk-1",
            "sub-3/dwi/sub-3_space-dwi_split-2_chunk-1_model-dki_param-mk_dwimap.nii.gz",
        ),
    ],
)
def test_every_entity_is_kept_in_keys_and_names(name, key, map_name):
    assert scan_key(f"/raw/{name}") == key
    path = derivative_path(f"/raw/{name}", space="dwi", model="dki", param="mk", suffix="dwimap")
    assert str(path) == map_name


def test_entity_that_bids_does_not_have_is_one_line():
    with pytest.raises(BIDSInputError, match=r"^sub-01_foo-x_dwi.nii.gz has the entity 'foo'"):
        source_entities("/raw/sub-01_foo-x_dwi.nii.gz")


@pytest.fixture(scope="module")
def pairs_bids(tiny_bids, tmp_path_factory) -> Path:
    """sub-01 ses-A as an AP/PA pair, sub-02 ses-A as an echo pair (other scans dropped)."""
    root = tmp_path_factory.mktemp("pairs") / "bids"
    root.mkdir()
    for top in ("dataset_description.json", "participants.tsv", "README"):
        if (tiny_bids / top).exists():
            shutil.copy(tiny_bids / top, root / top)
    for sub, runs in PAIRS.items():
        dwi_dir = root / f"sub-{sub}" / "ses-A" / "dwi"
        dwi_dir.mkdir(parents=True)
        for run, (entity, meta) in enumerate(runs, 1):
            src = tiny_bids / f"sub-{sub}" / "ses-A" / "dwi" / f"sub-{sub}_ses-A_run-{run}_dwi"
            dst = dwi_dir / f"sub-{sub}_ses-A_{entity}_dwi"
            for ext in (".nii.gz", ".bval", ".bvec"):
                shutil.copy(f"{src}{ext}", f"{dst}{ext}")
            sidecar = json.loads(Path(f"{src}.json").read_text())
            Path(f"{dst}.json").write_text(json.dumps({**sidecar, **meta}))
    return root


def test_pairs_are_told_apart_when_collected(pairs_bids):
    scans = collect_scans(load_layout(pairs_bids))
    assert [s.key for s in scans] == [
        "sub-01_ses-A_dir-AP",
        "sub-01_ses-A_dir-PA",
        "sub-02_ses-A_echo-1",
        "sub-02_ses-A_echo-2",
    ]


@pytest.fixture(scope="module")
def pairs_run(pairs_bids, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_run")
    out, work = root / "out", root / "work"
    proc = subprocess.run(
        [*DKIHARM, str(pairs_bids), str(out), "participant", "-w", str(work),
         "--preproc", "none", "--skip-bids-validation", "--nprocs", "2", "--omp-nthreads", "1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, work


@pytest.mark.parametrize("sub", sorted(PAIRS))
def test_pairs_give_two_sets_of_maps_with_the_entity_in_their_names(pairs_run, sub):
    out, work = pairs_run
    folder = out / f"sub-{sub}" / "ses-A" / "dwi"
    stems = [f"sub-{sub}_ses-A_{entity}" for entity, _ in PAIRS[sub]]
    for stem in stems:
        for param in (*ALL_METRICS, "outlierfraction"):
            assert (folder / f"{stem}_space-dwi_model-dki_param-{param}_dwimap.nii.gz").is_file()
        assert (folder / f"{stem}_space-dwi_desc-brain_mask.nii.gz").is_file()
        meta = json.loads((folder / f"{stem}_space-dwi_desc-preproc_dwi.json").read_text())
        assert meta["Sources"] == [f"bids:raw:sub-{sub}/ses-A/dwi/{stem}_dwi.nii.gz"]
        assert (work / "dkiharm_wf" / f"{stem.replace('-', '_')}_wf").is_dir()
    # the two scans are two acquisitions (independent noise): their maps differ
    mk = [
        nb.load(folder / f"{stem}_space-dwi_model-dki_param-mk_dwimap.nii.gz").get_fdata()
        for stem in stems
    ]
    brain = (mk[0] > 0) & (mk[1] > 0)
    assert brain.sum() > 1000
    print(
        f"sub-{sub}: mean |MK difference| {np.mean(np.abs(mk[0] - mk[1])[brain]):.4f}, "
        f"MK ratio {mk[0][brain].mean() / mk[1][brain].mean():.4f}, {brain.sum()} voxels"
    )
    assert np.mean(np.abs(mk[0] - mk[1])[brain]) > 0.01
    # and agree in the mean (same subject, same scanner): within 5 %
    assert abs(mk[0][brain].mean() / mk[1][brain].mean() - 1) < 0.05
    # the raw sidecar's own fields travel with the preprocessed series
    metas = [
        json.loads((folder / f"{stem}_space-dwi_desc-preproc_dwi.json").read_text())
        for stem in stems
    ]
    changed = next(iter(PAIRS[sub][0][1]))
    assert metas[0][changed] != metas[1][changed]


def test_invalid_input_stops_with_the_validators_first_messages(pairs_bids, tmp_path):
    proc = subprocess.run(
        [*DKIHARM, str(pairs_bids), str(tmp_path / "out"), "participant",
         "-w", str(tmp_path / "work"), "--preproc", "none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"dkiharm: error: {pairs_bids} is not valid BIDS")
    assert "--skip-bids-validation" in lines[0]
    # echo- is not an entity of raw DWIs in BIDS: each offending file on its own line
    assert any("sub-02_ses-A_echo-1_dwi" in line for line in lines[1:]), proc.stderr
    assert 2 <= len(lines) <= 7
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "dkiharm_wf").exists()


def test_validation_checks_only_the_selected_participants(pairs_bids):
    with pytest.raises(BIDSInputError, match="ENTITY_NOT_IN_RULE: /sub-02/ses-A/dwi/"):
        validate_bids(pairs_bids)
    warnings = validate_bids(pairs_bids, participant_label=["sub-01"])  # sub-02 not selected
    assert not any("/sub-02/" in line for line in warnings)


def test_valid_input_passes_and_its_warnings_are_returned(tiny_bids):
    warnings = validate_bids(tiny_bids)
    assert warnings and all(len(line.splitlines()) == 1 for line in warnings)
    assert any(line.startswith("TOO_FEW_AUTHORS") for line in warnings)


def test_bids_database_dir_is_made_and_reused(tiny_bids, tmp_path):
    database = tmp_path / "pybids_db"
    first = collect_scans(load_layout(tiny_bids, database_path=database))
    assert list(database.glob("*.sqlite"))
    again = collect_scans(load_layout(tiny_bids, database_path=database))
    assert [s.key for s in again] == [s.key for s in first]
