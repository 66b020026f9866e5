"""Bad-input catalogue: the real CLI over many broken copies of the tiny phantom.

Each case copies a three-scan excerpt of the ``tiny`` phantom (sub-01 on scanners C and D,
sub-02 on D), breaks one thing, runs ``dkiharm`` in-process and checks the four properties
every bad input must have: a non-zero exit, ONE line on stderr naming the file (or value)
and the fix, no Python traceback, and no derivatives. Every case must also fail before any
Nipype node runs (no node folder in the work directory), i.e. in the preflight checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype.cli.run import main

KEEP = {("01", "C"), ("01", "D"), ("02", "D")}  # (subject, scanner); run 1 only


@pytest.fixture(scope="module")
def excerpt(tiny_bids, tmp_path_factory) -> Path:
    """Three run-1 scans of the tiny phantom: sub-01 on C and D, sub-02 on D only."""
    root = tmp_path_factory.mktemp("excerpt") / "bids"
    shutil.copytree(tiny_bids, root, ignore=shutil.ignore_patterns("derivatives", "sub-03"))
    for ses in root.glob("sub-*/ses-*"):
        if (ses.parent.name[4:], ses.name[4:]) not in KEEP:
            shutil.rmtree(ses)
    for extra in root.glob("sub-*/ses-*/dwi/*_run-[2-9]_*"):
        extra.unlink()
    return root


@dataclass
class Case:
    """A way to break the input; ``make(bids, tmp) -> (argv extras, expected fragments)``."""

    make: Callable[[Path, Path], tuple[list[str], list[str]]]
    level: str = "participant"


CASES: dict[str, Case] = {}


def case(name: str, level: str = "participant"):
    def register(make):
        CASES[name] = Case(make, level)
        return make

    return register


def _dwi(bids: Path, sub: str = "01", ses: str = "D") -> Path:
    return bids / f"sub-{sub}" / f"ses-{ses}" / "dwi" / f"sub-{sub}_ses-{ses}_run-1_dwi.nii.gz"


def _sib(dwi: Path, ext: str) -> Path:
    return dwi.with_name(dwi.name.replace(".nii.gz", ext))


def _rewrite_image(dwi: Path, change) -> None:
    img = nb.load(dwi)
    data, affine = change(img.get_fdata(dtype=np.float32), img.affine.copy())
    nb.Nifti1Image(data, affine).to_filename(dwi)


def _edit_bvals(bval: Path, change) -> None:
    np.savetxt(bval, change(np.loadtxt(bval))[None], fmt="%g")


# --- the dataset -------------------------------------------------------------------------


@case("not_a_bids_folder")
def _(bids, tmp):
    (bids / "dataset_description.json").unlink()
    return [], ["dataset_description.json", "is not a BIDS dataset", "dataset root"]


@case("dataset_description_not_json")
def _(bids, tmp):
    (bids / "dataset_description.json").write_text('{"Name": "x",')
    return [], ["dataset_description.json", "not valid JSON", "fix the file"]


@case("no_subject_folders")
def _(bids, tmp):
    for sub in bids.glob("sub-*"):
        shutil.rmtree(sub)
    return [], [str(bids), "no sub-* folders", "dataset root"]


@case("unknown_participant")
def _(bids, tmp):
    return ["--participant-label", "sub-07"], ["07 not found", "available: 01, 02"]


@case("unknown_session")
def _(bids, tmp):
    return ["--session-label", "Q"], ["session(s) Q not found", "available: C, D"]


@case("filter_selects_nothing")
def _(bids, tmp):
    filters = tmp / "filter.json"
    filters.write_text(json.dumps({"dwi": {"run": 5}}))
    return ["--bids-filter-file", str(filters)], ["run=5", "--bids-filter-file"]


@case("filter_file_not_json")
def _(bids, tmp):
    filters = tmp / "filter.json"
    filters.write_text("{dwi: run}")
    return ["--bids-filter-file", str(filters)], [str(filters), "not valid JSON", "write it"]


def _rename_scan(dwi: Path, new_stem: str) -> Path:
    """Rename a DWI and its .bval/.bvec/.json to ``new_stem`` (entities changed)."""
    for ext in (".nii.gz", ".bval", ".bvec", ".json"):
        _sib(dwi, ext).rename(dwi.with_name(new_stem + ext))
    return dwi.with_name(new_stem + ".nii.gz")


@case("entity_unknown_to_bids")
def _(bids, tmp):
    _rename_scan(_dwi(bids), "sub-01_ses-D_run-1_foo-bar_dwi")
    return [], ["sub-01_ses-D_run-1_foo-bar_dwi.nii.gz", "entity 'foo'", "rename the file"]


@case("two_files_with_the_same_entities")
def _(bids, tmp):
    dwi = _dwi(bids)
    nb.save(nb.load(dwi), dwi.with_suffix("").with_suffix(".nii"))  # .nii beside .nii.gz
    return [], ["same entities (sub-01_ses-D_run-1)", "keep one"]


@case("scanner_field_missing_in_sidecar")
def _(bids, tmp):
    sidecar = _sib(_dwi(bids), ".json")
    meta = json.loads(sidecar.read_text())
    del meta["DeviceSerialNumber"]
    sidecar.write_text(json.dumps(meta))
    extra = ["--scanner-entity", "DeviceSerialNumber"]
    return extra, [_dwi(bids).name, "DeviceSerialNumber", "--scanner-entity ses"]


@case("sidecar_not_json")
def _(bids, tmp):
    sidecar = _sib(_dwi(bids), ".json")
    sidecar.write_text('{"EchoTime": 0.07,,}')
    return [], [sidecar.name, "not valid JSON", "fix"]


# --- gradient tables ---------------------------------------------------------------------


@case("missing_bval")
def _(bids, tmp):
    _sib(_dwi(bids), ".bval").unlink()
    return [], [_dwi(bids).name, "no .bval", "add sub-01_ses-D_run-1_dwi.bval"]


@case("missing_bvec")
def _(bids, tmp):
    _sib(_dwi(bids), ".bvec").unlink()
    return [], [_dwi(bids).name, "no .bvec", "add sub-01_ses-D_run-1_dwi.bvec"]


@case("bval_not_numbers")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    bval.write_text("0 1000 b=2000\n")
    return [], [bval.name, "cannot be read as b-values", "one row of numbers"]


@case("bvec_two_rows")
def _(bids, tmp):
    bvec = _sib(_dwi(bids), ".bvec")
    np.savetxt(bvec, np.loadtxt(bvec)[:2], fmt="%.6f")
    return [], [bvec.name, "has 2 rows", "3 rows"]


@case("bval_and_image_counts_disagree")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    _edit_bvals(bval, lambda b: b[:-1])
    return [], [bval.name, "same volumes"]


@case("bval_and_bvec_counts_disagree")
def _(bids, tmp):
    bvec = _sib(_dwi(bids), ".bvec")
    np.savetxt(bvec, np.loadtxt(bvec)[:, :-1], fmt="%.6f")
    return [], [bvec.name, "b-vectors", "same volumes"]


@case("single_shell")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    _edit_bvals(bval, lambda b: np.where(b > 50, 1000, 0))
    return [], [bval.name, "at least two non-zero b-value shells"]


@case("b_max_leaves_one_shell")
def _(bids, tmp):
    return ["--b-max", "1100"], ["_dwi.bval", "shells", "raise b_max"]


@case("bvals_in_ms_per_um2")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    _edit_bvals(bval, lambda b: b / 1000)
    return [], [bval.name, "ms/µm²", "multiply by 1000"]


@case("bvals_in_s_per_m2")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    _edit_bvals(bval, lambda b: b * 1e6)
    return [], [bval.name, "s/m²", "divide by 1e6"]


@case("negative_bval")
def _(bids, tmp):
    bval = _sib(_dwi(bids), ".bval")
    _edit_bvals(bval, lambda b: np.where(np.arange(b.size) == 3, -b, b))
    return [], [bval.name, "Negative b-value"]


@case("zero_bvec_on_weighted_volume")
def _(bids, tmp):
    bvec = _sib(_dwi(bids), ".bvec")
    vecs, b = np.loadtxt(bvec), np.loadtxt(_sib(_dwi(bids), ".bval"))
    vecs[:, np.flatnonzero(b > 50)[2]] = 0
    np.savetxt(bvec, vecs, fmt="%.6f")
    return [], [bvec.name, "zero b-vector"]


@case("bvec_not_unit_norm")
def _(bids, tmp):
    bvec = _sib(_dwi(bids), ".bvec")
    vecs, b = np.loadtxt(bvec), np.loadtxt(_sib(_dwi(bids), ".bval"))
    vecs[:, np.flatnonzero(b > 50)[4]] *= 0.5
    np.savetxt(bvec, vecs, fmt="%.6f")
    return [], [bvec.name, "norm 0.500"]


# --- images ------------------------------------------------------------------------------


@case("three_d_dwi")
def _(bids, tmp):
    _rewrite_image(_dwi(bids), lambda d, a: (d[..., 0], a))
    return [], [str(_dwi(bids)), "3-D", "4-D"]


@case("nan_voxels")
def _(bids, tmp):
    def poke(d, a):
        d[4:6, 5, 5, :] = np.nan
        return d, a

    _rewrite_image(_dwi(bids), poke)
    return [], [str(_dwi(bids)), "2 voxel(s) with NaN", "mrcalc"]


@case("truncated_nii_gz")
def _(bids, tmp):
    raw = _dwi(bids).read_bytes()
    _dwi(bids).write_bytes(raw[: len(raw) // 2])
    return [], [str(_dwi(bids)), "truncated", "copy or convert it again"]


@case("dwi_not_nifti")
def _(bids, tmp):
    _dwi(bids).write_bytes(b"this is a DICOM export log, not an image\n" * 50)
    return [], [str(_dwi(bids)), "not NIfTI"]


# --- study design and models (group level / --models) -------------------------------------


@case("voxel_size_mismatch", level="group")
def _(bids, tmp):
    _rewrite_image(_dwi(bids, "01", "C"), lambda d, a: (d, a @ np.diag([1.25, 1.25, 1.25, 1])))
    return [], ["sub-01_ses-C_run-1_dwi.nii.gz", "2.5x2.5x2.5 mm", "reslice"]


@case("training_subject_missing_a_scanner", level="group")
def _(bids, tmp):
    return ["--train-participants", "02"], ["sub-02 has no scan on scanner(s) C", "sub-01"]


@case("unknown_reference_scanner", level="group")
def _(bids, tmp):
    return ["--reference-scanner", "Z"], ["reference scanner 'Z' does not exist", "C, D"]


@case("single_scanner_group", level="group")
def _(bids, tmp):
    return ["--session-label", "D"], ["at least two scanners", "--session-label"]


@case("models_folder_lacks_scanner")
def _(bids, tmp):
    models = tmp / "models"
    models.mkdir()
    extra = ["--participant-label", "01", "--session-label", "C", "--models", str(models)]
    return extra, ["scanner-C_harmonizer.safetensors", "Train it with the group level"]


@case("foreign_model_file")
def _(bids, tmp):
    import torch

    models = _genuine_models(tmp, _fingerprint(_dwi(bids, "01", "C")))
    weights = models / "scanner-C_harmonizer.safetensors"
    torch.save({"weight": torch.zeros(3)}, weights)  # a pickled checkpoint in disguise
    extra = ["--participant-label", "01", "--session-label", "C", "--models", str(models)]
    return extra, [str(weights), "not a safetensors file", "never unpickles"]


@case("model_for_another_protocol")
def _(bids, tmp):
    other = _fingerprint(_dwi(bids, "01", "C"))
    other["shells"] = [1000, 3000]
    models = _genuine_models(tmp, other)
    extra = ["--participant-label", "01", "--session-label", "C", "--models", str(models)]
    return extra, ["sub-01_ses-C_run-1_dwi.nii.gz", "b=3000", "Train a harmonizer"]


def _fingerprint(dwi: Path) -> dict:
    from dkiharm_nipype.cnn.modelio import scan_fingerprint

    img = nb.load(dwi)
    meta = json.loads(_sib(dwi, ".json").read_text())
    return scan_fingerprint(
        np.loadtxt(_sib(dwi, ".bval")),
        voxel_size=img.header.get_zooms()[:3],
        matrix=img.shape[:3],
        echo_time=1000 * meta["EchoTime"],
    )


def _genuine_models(tmp: Path, protocol: dict) -> Path:
    """A small but real model file pair for scanner C, trained (nominally) on ``protocol``."""
    from dkiharm_nipype.cnn.model import HierarchicalDKINet
    from dkiharm_nipype.cnn.modelio import ModelCard, save_model

    models = tmp / "models"
    models.mkdir()
    card = ModelCard(scanner="C", protocol=protocol, normalization={}, target_scaling={})
    save_model(
        HierarchicalDKINet(8, hidden_channels=4),
        card,
        models / "scanner-C_harmonizer.safetensors",
        models / "scanner-C_harmonizer.json",
    )
    return models


# --- options and folders -------------------------------------------------------------------


@case("output_dir_inside_bids_dir")
def _(bids, tmp):
    return ["@out", str(bids / "sub-01" / "dkiharm")], ["lies inside the raw BIDS data", "use"]


@case("output_dir_under_a_file")
def _(bids, tmp):
    (tmp / "blocker").write_text("")
    return ["@out", str(tmp / "blocker" / "out")], ["cannot be created", "blocker", "choose"]


@case("cluster_plugin_without_scheduler")
def _(bids, tmp):
    return ["--plugin", "SGE"], ["--plugin SGE needs qsub", "--plugin MultiProc"]


@case("bids_dir_missing")
def _(bids, tmp):
    return ["@bids", str(tmp / "nowhere")], ["nowhere does not exist", "BIDS root"]


# --- the checks --------------------------------------------------------------------------


@pytest.fixture
def isolated_process():
    """main() sets environment variables, warning filters, logging handlers and Nipype's
    log levels for the whole process: undo all of that after each case."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    environ = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    keys = [("logging", "workflow_level"), ("logging", "interface_level")]
    keys.append(("execution", "check_version"))
    nipype_values = {key: ncfg.get(*key) for key in keys}
    with warnings.catch_warnings():
        yield
    os.environ.clear()
    os.environ.update(environ)
    root.handlers[:] = handlers
    root.setLevel(level)
    for key, value in nipype_values.items():
        ncfg.set(*key, value)
    nlogging.update_logging(ncfg)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly_before_processing(
    name, excerpt, tmp_path, capsys, isolated_process
):
    bids = tmp_path / "bids"
    shutil.copytree(excerpt, bids)
    extra, fragments = CASES[name].make(bids, tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    if "@out" in extra:
        out = Path(extra.pop(extra.index("@out") + 1))
        extra.remove("@out")
    if "@bids" in extra:
        bids = Path(extra.pop(extra.index("@bids") + 1))
        extra.remove("@bids")
    argv = [str(bids), str(out), CASES[name].level, "-w", str(work), "--nprocs", "1"]
    argv += ["--device", "cpu", *extra]

    status, err = run_cli(argv, capsys)

    assert status not in (0, None), f"{name}: exit status {status}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dkiharm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
    assert not out.exists() or not any(out.rglob("*")), "partial derivatives written"
    assert not (work / "dkiharm_wf").exists(), "failed after processing had started"


def test_catalogue_is_large():
    assert len(CASES) >= 20
