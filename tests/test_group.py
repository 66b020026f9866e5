"""The group level end to end on the tiny phantom: reference, training, harmonized maps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nb
import numpy as np
import pytest

from dkiharm_nipype.dki.maps import ALL_METRICS
from dkiharm_nipype.evaluation.scores import nrmse
from dkiharm_nipype.registration import register

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


@pytest.fixture(scope="module")
def group_run(tiny_bids, tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    out, work = root / "out", root / "work"
    cmd = [
        *DKIHARM,
        str(tiny_bids),
        str(out),
        "group",
        "-w",
        str(work),
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
        "--epochs",
        "40",
        "--samples-per-epoch",
        "20000",
        "--seed",
        "1",
        "--comparators",
        "combat",
        "rish",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "work": work, "bids": tiny_bids, "stdout": proc.stdout, "root": root}


def _map(path):
    return nb.load(path).get_fdata()


def test_models_and_plan(group_run):
    models = group_run["out"] / "models"
    plan = json.loads((models / "harmonization.json").read_text())
    assert plan["reference_scanner"] == "D"  # the highest-SNR scanner of the phantom
    assert plan["registration"] == "dipy-syn"  # auto without FSL
    assert len(plan["training_subjects"]) == 1 and len(plan["test_subjects"]) == 2
    for scanner in plan["scanners"]:
        card = json.loads((models / f"scanner-{scanner}_harmonizer.json").read_text())
        assert card["scanner"] == scanner
        assert card["protocol"]["voxel_size_mm"] == [2.0, 2.0, 2.0]
        assert card["training"]["subjects"]
        # labels registered from the reference are trained on only inside their support
        assert card["training"]["label_masks"] is True
        outside = card["training"]["n_brain_voxels_outside_label_masks"]
        assert (outside > 0) is (scanner != "D")  # D's own fit: no registration, no rim
        assert (models / f"scanner-{scanner}_harmonizer.safetensors").stat().st_size > 1e5
        log = (models / f"scanner-{scanner}_training.tsv").read_text().splitlines()
        assert log[0].split("\t") == ["epoch", "loss", "val_loss", "seconds"]
        assert len(log) > 5


def test_every_scan_has_harmonized_maps(group_run):
    bids, out = group_run["bids"], group_run["out"]
    for dwi in sorted(bids.glob("sub-*/ses-*/dwi/*_dwi.nii.gz")):
        stem = dwi.name.removesuffix("_dwi.nii.gz")
        folder = out / dwi.relative_to(bids).parent
        for param in ALL_METRICS:
            name = f"{stem}_space-dwi_model-dki_param-{param}_desc-harmonized_dwimap"
            assert (folder / f"{name}.nii.gz").is_file(), name
            sidecar = json.loads((folder / f"{name}.json").read_text())
            # the out-of-distribution flag of the same inputs, on by default
            ood = nb.load(folder / f"{stem}_space-dwi_desc-ood_mask.nii.gz").get_fdata()
            assert set(np.unique(ood)) <= {0, 1} and ood.mean() < 0.2
            # BEP016 Model object: the scanner whose network made the map
            assert sidecar["Model"]["Parameters"]["Scanner"] == dwi.parts[-3][4:]


def test_harmonization_lowers_target_vs_reference_error(group_run):
    """Test subjects: scanner A's maps move towards the reference scanner D's."""
    out = group_run["out"]
    plan = json.loads((out / "models" / "harmonization.json").read_text())
    before, after = [], []
    for sub in plan["test_subjects"]:
        a = out / sub / "ses-A" / "dwi" / f"{sub}_ses-A_run-1_space-dwi"
        d = out / sub / "ses-D" / "dwi" / f"{sub}_ses-D_run-1_space-dwi"
        reg = register(
            f"{a}_model-dki_param-fa_dwimap.nii.gz",
            f"{d}_model-dki_param-fa_dwimap.nii.gz",
            engine="dipy-syn",
        )
        mask = _map(f"{a}_desc-brain_mask.nii.gz") > 0
        wm = mask & (_map(f"{a}_model-dki_param-fa_dwimap.nii.gz") > 0.3)
        for param in ("mk", "ak", "rk", "kfa"):
            ref = np.asanyarray(reg.apply(f"{d}_model-dki_param-{param}_dwimap.nii.gz").dataobj)
            raw = _map(f"{a}_model-dki_param-{param}_dwimap.nii.gz")
            harm = _map(f"{a}_model-dki_param-{param}_desc-harmonized_dwimap.nii.gz")
            before.append(nrmse(raw, ref, wm))
            after.append(nrmse(harm, ref, wm))
    print(
        f"NRMSE-to-reference in WM, scanner A, test subjects: before {np.mean(before):.3f}, "
        f"after {np.mean(after):.3f}"
    )
    assert np.mean(after) < 0.8 * np.mean(before)


def test_participant_level_applies_trained_models(group_run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *DKIHARM,
            str(group_run["bids"]),
            str(out),
            "participant",
            "--participant-label",
            "03",
            "--session-label",
            "A",
            "-w",
            str(group_run["work"]),
            "--models",
            str(group_run["out"] / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    harmonized = sorted(out.glob("sub-03/ses-A/dwi/*_desc-harmonized_dwimap.nii.gz"))
    assert len(harmonized) == 8 * 2  # two runs
    # identical to the group level's maps of the same scans (same model, same input)
    ref = group_run["out"] / harmonized[0].relative_to(out)
    assert np.allclose(_map(harmonized[0]), _map(ref), atol=1e-6)


def _fail(cmd, *fragments):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_group_bad_inputs(tiny_bids, tmp_path):
    out = tmp_path / "out"
    base = [*DKIHARM, str(tiny_bids), str(out), "group", "-w", str(tmp_path / "w")]
    _fail([*base, "--reference-scanner", "Z"], "reference scanner 'Z' does not exist")
    _fail([*base, "--participant-label", "01", "--session-label", "A"], "at least two scanners")
    _fail([*base, "--train-participants", "sub-09"], "sub-09 is not in the selection")
    assert not out.exists()


def test_model_files_are_checked(group_run, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(group_run["out"] / "models", models)
    base = [
        *DKIHARM,
        str(group_run["bids"]),
        str(tmp_path / "out"),
        "participant",
        "--participant-label",
        "01",
        "--session-label",
        "A",
        "-w",
        str(tmp_path / "w"),
        "--models",
        str(models),
    ]
    weights = models / "scanner-A_harmonizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    _fail(base, "scanner-A_harmonizer.safetensors")
    shutil.copy(models / "scanner-C_harmonizer.safetensors", weights)  # another scanner's
    _fail(base, "scanner-A_harmonizer")
    # a model trained for another protocol: scanner C's files named as scanner A's
    shutil.copy(models / "scanner-C_harmonizer.json", models / "scanner-A_harmonizer.json")
    _fail(base, "cannot use", "scanner-A_harmonizer.safetensors")
    (models / "scanner-A_harmonizer.json").unlink()
    _fail(base, "no model for scanner 'A'")
    assert not (tmp_path / "out").exists()


def test_evaluation_and_report(group_run):
    """The group level scores the test subjects before/after and writes the HTML report."""
    import csv

    out = group_run["out"]
    with open(out / "evaluation" / "cv.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    plan = json.loads((out / "models" / "harmonization.json").read_text())
    tested = {s.removeprefix("sub-") for s in plan["test_subjects"]}
    assert {r["subject"] for r in rows} <= tested and rows
    wm = {(r["method"], r["param"]): [] for r in rows if r["roi"] == "WM"}
    for r in rows:
        if r["roi"] == "WM":
            wm[r["method"], r["param"]].append(float(r["cv_mean"]))
    cv = {m: {p: np.mean(wm[m, p]) for p in ("mk", "ak", "rk", "kfa")}
          for m in ("before", "dl", "combat", "rish")}  # fmt: skip
    print("WM inter-scanner CV by method:", cv)
    with open(out / "evaluation" / "nrmse.tsv", newline="") as fh:
        scored = [r for r in csv.DictReader(fh, delimiter="\t") if r["roi"] == "WM"]
    # the target scanners (the reference's own raw fit is the yardstick)
    scored = [r for r in scored if r["nrmse"] not in ("", "n/a")
              and r["scanner"] != plan.get("reference")]  # fmt: skip
    err = {m: {p: np.mean([float(r["nrmse"]) for r in scored
                           if r["method"] == m and r["param"] == p])
               for p in cv["before"]} for m in ("before", "dl", "combat")}  # fmt: skip
    print("WM NRMSE-to-reference by method:", err)
    cards = [json.loads(f.read_text()) for f in (out / "models").glob("*_harmonizer.json")]
    linear_maps = {name for card in cards
                   for name, pick in (card.get("mapping") or {}).get("selection", {})
                   .get("maps", {}).items()
                   if pick["chosen"] == "linear"}  # fmt: skip
    print("maps given to the linear baseline:", sorted(linear_maps))
    for p in cv["before"]:  # the networks make the scanners agree, better than the comparators
        assert cv["dl"][p] < 0.7 * cv["before"][p], (p, cv["before"][p], cv["dl"][p])
        assert cv["dl"][p] < cv["rish"][p], (p, cv)
        # and move the targets towards the reference (a constant map would have zero CV)
        assert err["dl"][p] < err["before"][p], (p, err)
        # per map the networks make the scanners agree at least about as well as ComBat;
        # a map that model selection gave to the linear baseline on some scanner (chosen for
        # its held-out accuracy, not its agreement) is held to the before/after bars above
        if p not in linear_maps:
            assert cv["dl"][p] < 1.1 * cv["combat"][p], (p, cv)  # measured: 10-40 % below
    assert np.mean(list(cv["dl"].values())) < 0.85 * np.mean(list(cv["combat"].values()))
    assert (out / "evaluation" / "nrmse.tsv").is_file()
    report = (out / "report.html").read_text()
    assert "<script" not in report and report.count("data:image/png") >= 5
    assert sorted(p.name for p in out.glob("sub-*.html")) == [
        f"sub-{s}.html" for s in sorted(tested)
    ]


def test_experiments_and_comparators_are_wired(tiny_bids, tmp_path):
    """--experiment and --comparators add their nodes, fed by every traveling scan."""
    from pathlib import Path

    from dkiharm_nipype.config import RunConfig
    from dkiharm_nipype.study import StudyDesignError
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_group_wf

    scans = collect_scans(load_layout(tiny_bids))
    config = RunConfig(
        bids_dir=Path(tiny_bids), output_dir=tmp_path / "out", analysis_level="group",
        work_dir=tmp_path / "work", registration="dipy-syn",
        experiments=("seeds", "tissue"), comparators=("combat", "rish"),
        tissue_maps=str(Path(tiny_bids) / "derivatives" / "phantom-truth"),
    )  # fmt: skip
    wf = init_group_wf(scans=scans, staging_dir=tmp_path / "stage", config=config)
    names = wf.list_node_names()
    assert {"experiment_seeds_wf.run", "experiment_tissue_wf.run",
            "comparators_wf.comparators"} <= set(names)  # fmt: skip
    tissue = wf.get_node("experiment_tissue_wf").get_node("inputnode").inputs
    assert len(tissue.sgm_files) == len(scans) and all(Path(f).is_file() for f in tissue.csf_files)
    compare = wf.get_node("comparators_wf.comparators").inputs
    assert compare.methods == ["combat", "rish"] and len(compare.meta) == len(scans)
    # torch nodes run with the threads they declare to the scheduler (no oversubscription)
    checked = {"TrainHarmonizer": 0, "ApplyHarmonizer": 0}
    for name in names:
        node = wf.get_node(name)
        kind = type(node.interface).__name__
        if kind in checked:
            assert node.inputs.num_threads == node.n_procs == 1, name
            checked[kind] += 1
    assert checked["TrainHarmonizer"] >= 2 and checked["ApplyHarmonizer"] >= len(scans), checked
    # --tissue-maps without maps of every scan is refused at build time, in one line
    bare = tmp_path / "bare"
    shutil.copytree(tiny_bids, bare, ignore=shutil.ignore_patterns("derivatives"))
    bare_scans = collect_scans(load_layout(bare))
    with pytest.raises(StudyDesignError, match="has no SGM \\(or GM\\) and CSF") as err:
        init_group_wf(
            scans=bare_scans,
            staging_dir=tmp_path / "stage2",
            config=RunConfig(
                bids_dir=bare, output_dir=tmp_path / "out2", analysis_level="group",
                work_dir=tmp_path / "work2", experiments=("tissue",),
                tissue_maps=str(bare / "derivatives"),
            ),
        )  # fmt: skip
    assert "\n" not in str(err.value)


def test_dwi_plus_fit_is_wired(tiny_bids, tmp_path):
    """--network-input dwi+fit: every network is trained on its scans' own maps, and every
    harmonized scan gets its own maps (participant level with --models too)."""
    from pathlib import Path

    from dkiharm_nipype.config import RunConfig
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_group_wf

    scans = collect_scans(load_layout(tiny_bids))
    config = RunConfig(
        bids_dir=Path(tiny_bids), output_dir=tmp_path / "out", analysis_level="group",
        work_dir=tmp_path / "work", registration="none", reference_scanner="D",
        network_input="dwi+fit",
    )  # fmt: skip
    wf = init_group_wf(scans=scans, staging_dir=tmp_path / "stage", config=config)

    def into(node):
        return {c for _, _, d in wf._graph.in_edges(node, data=True) for c in d["connect"]}

    def inside(sub_wf, node):
        return {c for _, _, d in sub_wf._graph.in_edges(node, data=True) for c in d["connect"]}

    # each scanner's network is trained in its own train_<scanner>_wf
    trains = [wf.get_node(n) for n in wf.list_node_names() if n.endswith("_wf.train")]
    trains = [n for n in trains if type(n.interface).__name__ == "TrainHarmonizer"]
    assert len(trains) == len({s.scanner for s in scans})
    for node in trains:
        train_wf = wf.get_node(f"train_{node.inputs.scanner}_wf")
        assert node.inputs.network_input == "dwi+fit"
        assert ("out", "inputnode.fit_files") in into(train_wf)
        assert ("fit_files", "fit_files") in inside(train_wf, node)
        merge = wf.get_node(f"train_fit_{node.inputs.scanner}")
        assert len(into(merge)) == len(node.inputs.subject_ids)
    applies = [n for n in wf._graph.nodes if n.name.startswith("harmonize_")]
    assert len(applies) == len(scans)
    assert all(("outputnode.maps", "inputnode.fit_files") in into(n) for n in applies)
    for node in trains:  # labels are trained on inside their registration's support only
        train_wf = wf.get_node(f"train_{node.inputs.scanner}_wf")
        assert ("out", "inputnode.label_mask_files") in into(train_wf)
        assert ("label_mask_files", "label_mask_files") in inside(train_wf, node)
        merge = wf.get_node(f"train_support_{node.inputs.scanner}")
        assert into(merge) == {
            ("outputnode.support_mask", f"in{i}")
            for i in range(1, len(node.inputs.subject_ids) + 1)
        }


def test_reference_labels_rescan_is_wired(tiny_bids, tmp_path):
    """--reference-labels rescan (default): each training scan's label selector also gets the
    subject's other run on the same scanner, used if that scanner is the reference; a scan
    without a repeat (the tiny phantom's D and C) gets none; ``fit`` wires none at all."""
    from pathlib import Path

    from dkiharm_nipype.config import RunConfig
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_group_wf
    from dkiharm_nipype.workflows.harmonize import _select_moving

    scans = collect_scans(load_layout(tiny_bids))

    def build(labels):
        config = RunConfig(
            bids_dir=Path(tiny_bids), output_dir=tmp_path / labels, analysis_level="group",
            work_dir=tmp_path / "work", registration="dipy-syn", reference_scanner="A",
            train_participants=("01", "02"), reference_labels=labels,
        )  # fmt: skip
        return init_group_wf(scans=scans, staging_dir=tmp_path / "stage", config=config)

    def partner_of(wf, node_name):
        node = wf.get_node(node_name)
        return {
            u.name for u, _, d in wf._graph.in_edges(node, data=True)
            if ("outputnode.fa_file", "inputnode.partner_fa") in d["connect"]
        }  # fmt: skip

    wf = build("rescan")
    assert partner_of(wf, "labels_sub_01_ses_A_run_1_wf") == {"sub_01_ses_A_run_2_wf"}
    assert partner_of(wf, "labels_sub_01_ses_A_run_2_wf") == {"sub_01_ses_A_run_1_wf"}
    assert partner_of(wf, "labels_sub_02_ses_D_run_1_wf") == set()
    plan = json.loads(wf.get_node("reference_wf.plan").inputs.plan_json)
    assert plan["reference_labels"] == "rescan"
    wf = build("fit")
    assert partner_of(wf, "labels_sub_01_ses_A_run_1_wf") == set()

    # what the selector hands to the label registration, once the reference is known
    common = dict(
        own_fa="a1_fa", own_maps=["a1"], own_mask="a1_mask", cand_scanners=["A", "D"],
        cand_fa=["a1_fa", "d_fa"], cand_maps=[["a1"], ["d"]], cand_masks=["a1_mask", "d_mask"],
        engine="dipy-syn",
    )  # fmt: skip
    rescan = dict(partner_fa="a2_fa", partner_maps=["a2"], partner_mask="a2_mask")
    assert _select_moving("A", "A", **common, **rescan) == ("a2_fa", ["a2"], "a2_mask", "dipy-syn")
    assert _select_moving("A", "A", **common) == ("a1_fa", ["a1"], "a1_mask", "none")
    assert _select_moving("D", "A", **common, **rescan) == ("d_fa", ["d"], "d_mask", "dipy-syn")
