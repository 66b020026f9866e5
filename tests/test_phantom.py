"""The traveling-subject phantom: BIDS validity, ground truth, scanner effects, CLI errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dkiharm_nipype.phantom import generate, get_preset
from dkiharm_nipype.phantom.truth import (
    load_scan_labels,
    load_subject_labels,
    load_truth,
    to_subject_space,
)

KURTOSIS = ("mk", "ak", "rk", "kfa")
NO_EFFECTS = dict(
    noise=False,
    bias=False,
    gradients=False,
    gibbs=False,
    partial_fourier=False,
    distortion=False,
    motion=False,
)


def _raw_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "derivatives"]
        out += ["/" + str((Path(dirpath) / f).relative_to(root)) for f in filenames]
    return sorted(out)


def _check_bids(root: Path, n_subjects: int, sessions: set[str]) -> None:
    from bids import BIDSLayout
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    rejected = [f for f in _raw_files(root) if not validator.is_bids(f)]
    assert rejected == []
    layout = BIDSLayout(str(root))
    assert len(layout.get_subjects()) == n_subjects
    assert set(layout.get_sessions()) == sessions
    dwis = layout.get(suffix="dwi", extension=".nii.gz")
    assert dwis
    for dwi in dwis:
        meta = layout.get_metadata(dwi.path)
        for key in (
            "Manufacturer",
            "ManufacturersModelName",
            "DeviceSerialNumber",
            "MagneticFieldStrength",
            "PhaseEncodingDirection",
            "TotalReadoutTime",
            "EffectiveEchoSpacing",
        ):
            assert key in meta
        assert 0.05 < meta["EchoTime"] < 0.2 and 1.0 < meta["RepetitionTime"] < 20.0
        img = nib.load(dwi.path)
        assert img.get_data_dtype() == np.int16
        bval = Path(dwi.path.replace(".nii.gz", ".bval"))
        assert img.shape[3] == np.loadtxt(bval).size


def test_tiny_is_valid_bids(tiny_bids):
    from bids import BIDSLayout

    _check_bids(tiny_bids, 3, {"A", "C", "D"})
    layout = BIDSLayout(str(tiny_bids))
    assert len(layout.get(suffix="dwi", extension=".nii.gz")) == 3 * 4  # A has 2 runs
    assert len(layout.get(suffix="T1w", extension=".nii.gz")) == 3
    a_run1 = layout.get(subject="01", session="A", run=1, suffix="dwi", extension=".nii.gz")[0]
    fmaps = layout.get_fieldmap(a_run1.path, return_list=True)
    assert [Path(f["epi"]).name for f in fmaps] == ["sub-01_ses-A_dir-PA_epi.nii.gz"]
    c_run1 = layout.get(subject="01", session="C", suffix="dwi", extension=".nii.gz")[0]
    assert layout.get_fieldmap(c_run1.path, return_list=True) == []  # C: no reversed PE
    header = (tiny_bids / "participants.tsv").read_text().splitlines()[0]
    assert header.split("\t") == ["participant_id", "age", "sex"]
    truth = load_truth(tiny_bids, "01", "D")
    assert set(truth) == {"md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa"}
    rois = np.unique(load_subject_labels(tiny_bids, "01", what="wmrois").get_fdata())
    assert len(rois) >= 4  # background + a few of the 15 ROIs at this size


@pytest.mark.parametrize("preset", ["paper-dataset1", "mushac", "hard", "hard-mixed-res"])
def test_cut_down_presets_are_valid_bids(tmp_path, preset):
    cfg = get_preset(preset)
    root = generate(
        tmp_path / preset,
        preset=preset,
        seed=1,
        subjects=2,
        matrix=(20, 24),
        slices=6,
        gibbs_oversample=1,
    )
    _check_bids(root, 2, {s.label for s in cfg.scanners})


def test_reference_protocol_reproduces_truth(tmp_path):
    """Noise-free, artefact-free Prisma-like protocol, dipy WLS vs truth in WM (wm > 0.9).

    Central 48 x 56 x 4 crop: ~7 000 WM voxels (printed).
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    root = generate(
        tmp_path / "ref",
        preset="paper-dataset1",
        seed=3,
        subjects=1,
        scanners=["D"],
        matrix=(48, 56),
        slices=4,
        **NO_EFFECTS,
    )
    stem = root / "sub-01/ses-D/dwi/sub-01_ses-D_run-1_dwi"
    data = nib.load(f"{stem}.nii.gz").get_fdata()
    gtab = gradient_table(np.loadtxt(f"{stem}.bval"), bvecs=np.loadtxt(f"{stem}.bvec").T)
    wm = load_scan_labels(root, "01", "D", what="WM").get_fdata() > 0.9
    fit = DiffusionKurtosisModel(gtab, fit_method="WLS").fit(data, mask=wm)
    fitted = {"mk": fit.mk(), "ak": fit.ak(), "rk": fit.rk(), "kfa": fit.kfa}
    truth = load_truth(root, "01", "D")
    print(f"\nWM voxels: {wm.sum()}")
    for name in KURTOSIS:
        t = truth[name].get_fdata()[wm]
        f = fitted[name][wm]
        median_rel = np.median(np.abs(f - t) / np.abs(t))
        mean_rel = abs(f.mean() - t.mean()) / t.mean()
        print(
            f"{name}: truth WM mean {t.mean():.3f}, median |rel err| {median_rel:.4f}, "
            f"WM-mean rel err {mean_rel:.4f}"
        )
        assert median_rel < 0.02
        assert mean_rel < 0.02


def _wm_mean_mk(root: Path, session: str) -> tuple[float, float]:
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    stem = root / f"sub-01/ses-{session}/dwi/sub-01_ses-{session}_run-1_dwi"
    data = nib.load(f"{stem}.nii.gz").get_fdata()
    gtab = gradient_table(np.loadtxt(f"{stem}.bval"), bvecs=np.loadtxt(f"{stem}.bvec").T)
    wm = load_scan_labels(root, "01", session, what="WM").get_fdata() > 0.9
    fit = DiffusionKurtosisModel(gtab, fit_method="WLS").fit(data, mask=wm)
    return float(fit.mk()[wm].mean()), float(
        load_truth(root, "01", session)["mk"].get_fdata()[wm].mean()
    )


def test_longer_echo_time_changes_mk_as_the_model_predicts(tmp_path):
    # Prediction: with T2(intra) > T2(extra), a longer TE raises the intra-axonal signal
    # fraction f(TE) = f e^{-TE/T2i} / (f e^{-TE/T2i} + (1-f) e^{-TE/T2e}); MK follows the
    # sign of dMK/df of a stick+zeppelin voxel, computed here from the model itself.
    from dkiharm_nipype.phantom.anatomy import AnatomySample, make_subject
    from dkiharm_nipype.phantom.microstructure import TISSUE_PARAMS, prepare, truth_dki

    wm = TISSUE_PARAMS["wm"]
    assert wm["t2_intra"] > wm["t2_extra"]
    subject = make_subject(np.random.default_rng(0), (68, 84, 60))
    n = 64
    rng = np.random.default_rng(1)
    dirs = rng.standard_normal((n, 4, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    weights = np.zeros((n, 4), np.float32)
    weights[np.arange(n), rng.integers(0, 4, n)] = 1
    tissues = np.zeros((n, 5), np.float32)
    tissues[:, 0] = 1
    sample = AnatomySample(
        tissues=tissues,
        weights=weights,
        directions=dirs,
        radial=dirs[:, 0],
        texture=np.zeros(n, np.float32),
    )
    mk = [
        truth_dki(prepare(sample, subject, te_ms=te, tr_ms=5000.0))["mk"].mean()
        for te in (70.0, 110.0)
    ]
    predicted = np.sign(mk[1] - mk[0])
    assert predicted != 0

    base = get_preset("paper-dataset1", scanners=["D"])
    d = base.scanners[0]
    short = replace(d, label="S", protocol=replace(d.protocol, te_ms=70.0, tr_ms=5000.0))
    long_ = replace(d, label="L", protocol=replace(d.protocol, te_ms=110.0, tr_ms=5000.0))
    preset = replace(base, scanners=(short, long_), reference="S")
    root = generate(
        tmp_path / "te", preset=preset, seed=5, subjects=1, matrix=(40, 48), slices=4, **NO_EFFECTS
    )
    fit_s, truth_s = _wm_mean_mk(root, "S")
    fit_l, truth_l = _wm_mean_mk(root, "L")
    print(
        f"\nMK(TE 70 ms) fit {fit_s:.4f} truth {truth_s:.4f}; "
        f"MK(TE 110 ms) fit {fit_l:.4f} truth {truth_l:.4f}; predicted sign {predicted:+.0f}"
    )
    assert np.sign(truth_l - truth_s) == predicted
    assert np.sign(fit_l - fit_s) == predicted


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_identical_different_seed_differs(tmp_path):
    kw = dict(preset="tiny", subjects=1, scanners=["A"])
    a = _digest(generate(tmp_path / "a", seed=7, **kw))
    b = _digest(generate(tmp_path / "b", seed=7, **kw))
    c = _digest(generate(tmp_path / "c", seed=8, **kw))
    assert a == b
    dwi = "sub-01/ses-A/dwi/sub-01_ses-A_run-1_dwi.nii.gz"
    assert a[dwi] != c[dwi]
    # repeats get fresh noise
    r1 = nib.load(tmp_path / "a" / dwi).get_fdata()
    r2 = nib.load(tmp_path / "a" / dwi.replace("run-1", "run-2")).get_fdata()
    assert not np.array_equal(r1, r2)


def _denoise(data: np.ndarray) -> np.ndarray:
    """MP-PCA denoising as in the paper's preprocessing (MRtrix dwidenoise if present)."""
    import tempfile

    exe = shutil.which("dwidenoise")
    if exe is None:
        from dipy.denoise.localpca import mppca

        return mppca(data, patch_radius=2)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.nii", Path(tmp) / "out.nii"
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), src)
        subprocess.run([exe, "-quiet", "-nthreads", "2", str(src), str(dst)], check=True)
        return np.asarray(nib.load(dst).dataobj)


def _trilinear_support(points_ijk: np.ndarray, shape) -> np.ndarray:
    """Boolean mask of the voxels that trilinear interpolation at ``points_ijk`` (3, N) reads."""
    out = np.zeros(shape, bool)
    base = np.floor(points_ijk).astype(int)
    for corner in np.ndindex(2, 2, 2):
        idx = [np.clip(base[a] + corner[a], 0, shape[a] - 1) for a in range(3)]
        out[tuple(idx)] = True
    return out


def test_inter_scanner_cv_before_harmonization(tmp_path):
    """Voxelwise CV across the four scanners' first runs in subject-space WM (paper Fig. 3).

    Central 40 x 56 x 6 crop of subject 1: 2 679 subject-space WM voxels (probability
    > 0.9) whose nearest scan voxel is WM core (> 0.8) in all four scans. To save time each
    scan is fitted only on the voxels that the trilinear resampling of those subject voxels
    reads, so the resampled maps equal those of a whole-brain fit.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    from dkiharm_nipype.phantom.truth import scan_to_subject

    paper = {"mk": 13.6, "ak": 17.3, "rk": 24.4, "kfa": 16.7}
    root = generate(
        tmp_path / "cv", preset="paper-dataset1", seed=0, subjects=1, matrix=(40, 56), slices=6
    )
    ref = load_subject_labels(root, "01", what="WM")
    valid = ref.get_fdata() > 0.9
    for ses in "ABCD":  # subject voxels whose nearest scan voxel is WM core in every scan
        core = load_scan_labels(root, "01", ses, what="WM")
        covered = nib.Nifti1Image((core.get_fdata() > 0.8).astype(np.float32), core.affine)
        valid &= to_subject_space(covered, root, "01", ses, order=0).get_fdata() > 0.5
    ijk = np.stack(np.nonzero(valid))
    maps = {k: [] for k in KURTOSIS}
    for ses in "ABCD":
        stem = root / f"sub-01/ses-{ses}/dwi/sub-01_ses-{ses}_run-1_dwi"
        img = nib.load(f"{stem}.nii.gz")
        data = _denoise(img.get_fdata(dtype=np.float32))
        gtab = gradient_table(np.loadtxt(f"{stem}.bval"), bvecs=np.loadtxt(f"{stem}.bvec").T)
        xfm = scan_to_subject(root, "01", ses)
        vox2vox = np.linalg.inv(img.affine) @ np.linalg.inv(xfm) @ ref.affine
        src = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
        mask = _trilinear_support(src, img.shape[:3])
        fit = DiffusionKurtosisModel(gtab, fit_method="WLS").fit(data, mask=mask)
        kw = dict(min_kurtosis=0, max_kurtosis=3)
        fitted = {"mk": fit.mk(**kw), "ak": fit.ak(**kw), "rk": fit.rk(**kw), "kfa": fit.kfa}
        for k in KURTOSIS:
            moved = to_subject_space(
                nib.Nifti1Image(fitted[k].astype(np.float32), img.affine), root, "01", ses
            )
            maps[k].append(moved.get_fdata())
    print(f"\nWM voxels in all scans: {valid.sum()}")
    print("metric  phantom CV %  paper CV %   per-scanner WM means (A B C D)")
    cvs = {}
    for k in KURTOSIS:
        values = np.stack(maps[k], -1)[valid]
        cv = values.std(-1, ddof=1) / np.maximum(np.abs(values.mean(-1)), 1e-6) * 100
        cvs[k] = float(cv.mean())
        print(f"{k:6s}  {cvs[k]:11.1f}  {paper[k]:10.1f}   {np.round(values.mean(0), 3)}")
    assert valid.sum() > 1000
    for k in KURTOSIS:  # all four within 0.5x - 1.6x of the paper (docs/phantom.md)
        assert 0.5 * paper[k] <= cvs[k] <= 1.6 * paper[k], k


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dkiharm_nipype.phantom.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["out", "--preset", "huge"], "unknown preset 'huge'; choose one of tiny"),
        (["out", "--seed", "-3"], "invalid seed '-3'; give a non-negative integer"),
        (["out", "--seed", "1.5"], "invalid seed '1.5'; give a non-negative integer"),
        (["full"], "is not empty; pass --overwrite"),
        (["ro/sub/out"], "permission denied"),
        (["full/keep.txt/out"], "is a file, not a folder"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    if os.geteuid() == 0 and message == "permission denied":
        pytest.skip("root can write to read-only folders")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o555)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("dkiharm-phantom: error: ")
    assert message in last
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_error_during_generation_leaves_nothing(tmp_path, monkeypatch):
    gen_module = sys.modules["dkiharm_nipype.phantom.generate"]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen_module.bw, "write_dataset_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "out", preset="tiny", seed=0, subjects=1, scanners=["C"])
    assert list(tmp_path.iterdir()) == []


def test_voxel_mm_override_keeps_the_field_of_view():
    """``voxel_mm`` puts the same head on a coarser grid (whole-brain quick benchmarks)."""
    full = get_preset("paper-dataset1")
    coarse = get_preset("paper-dataset1", voxel_mm=3.0)
    fov = np.multiply(full.subject_shape, full.subject_voxel_mm)
    assert np.allclose(np.multiply(coarse.subject_shape, coarse.subject_voxel_mm), fov, atol=3.0)
    assert coarse.subject_shape == (73, 73, 47)
    for a, b in zip(full.scanners, coarse.scanners, strict=True):
        assert b.protocol.voxel_mm == (3.0, 3.0, 3.0)
        assert b.protocol.shells == a.protocol.shells and b.snr_db == a.snr_db
        extent_a = np.multiply([*a.protocol.matrix, a.protocol.n_slices], a.protocol.voxel_mm)
        extent_b = np.multiply([*b.protocol.matrix, b.protocol.n_slices], 3.0)
        assert np.all(np.abs(extent_a - extent_b) <= 1.5)
    with pytest.raises(ValueError, match=r"voxel_mm 20.0 is outside \[0.5, 8\] mm"):
        get_preset("paper-dataset1", voxel_mm=20)


def test_reversed_pe_b0_from_line_interpolation_matches_direct_sampling():
    """The reversed-PE b0 reuses the forward readout's anatomy (1-D interpolation along PE)."""
    import importlib

    from dkiharm_nipype.phantom.scanners import grid_affine, random_pose, reverse_pe

    gen = importlib.import_module("dkiharm_nipype.phantom.generate")
    cfg = get_preset("paper-dataset1", voxel_mm=4.0, subjects=1)
    scanner = cfg.scanners[0]
    proto = scanner.protocol
    subject = gen._make_subject(cfg, 0, 0)
    affine = grid_affine(proto.shape, proto.voxel_mm)
    to_subject = np.linalg.inv(random_pose(np.random.default_rng(3), rot_deg=2, trans_mm=3))
    bvals, bvecs = np.array([0.0, 1000.0]), np.array([[0.0, 0, 0], [1, 0, 0]])
    data, disp, hz, rev = gen._acquire(
        subject, scanner, to_subject, affine, bvals, bvecs, gen._seed(1),
        pe_dir=proto.pe_dir, n_reversed=2,
    )  # fmt: skip
    direct, *_ = gen._acquire(
        subject, scanner, to_subject, affine, np.zeros(1), np.zeros((1, 3)), gen._seed(1),
        pe_dir=reverse_pe(proto.pe_dir), hz=hz,
    )  # fmt: skip
    assert rev.shape == (*proto.shape, 2) and np.array_equal(rev[..., 0], rev[..., 1])
    ref = direct[..., 0]
    inside = ref > 0.1 * ref.max()

    def nrmse(a):
        return np.sqrt(np.mean((a - ref)[inside] ** 2)) / ref[inside].mean()

    assert np.abs(disp).max() > proto.voxel_mm[1]  # distortion of more than a voxel
    assert nrmse(data[..., 0]) > 0.1  # forward and reversed b0 differ a lot ...
    # ... the interpolated reversed b0 is the direct one (1 % at 4 mm, 0.45 % at 2 mm)
    assert nrmse(rev[..., 0]) < 0.02


# --- lesions -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesion_bids(tmp_path_factory) -> Path:
    """``tiny``, two subjects on A, C and D, a 4 mm lesion in sub-02 only (seed 2)."""
    out = tmp_path_factory.mktemp("lesion") / "bids"
    return generate(out, preset="tiny", seed=2, subjects=2, lesion_subjects=["02"],
                    lesion_radius_mm=4.0)  # fmt: skip


def _lesion_mask(root: Path, sub: str, ses: str | None = None, what: str = "desc-lesion_mask"):
    truth = root / "derivatives" / "phantom-truth" / f"sub-{sub}"
    if ses is None:
        return nib.load(truth / "anat" / f"sub-{sub}_space-T1w_{what}.nii.gz")
    name = f"sub-{sub}_ses-{ses}_run-1_space-dwi_{what}.nii.gz"
    return nib.load(truth / f"ses-{ses}" / "dwi" / name)


def _centroid_mm(img: nib.Nifti1Image, xfm: np.ndarray | None = None) -> np.ndarray:
    ijk = np.argwhere(np.asanyarray(img.dataobj) > 0).mean(0)
    world = img.affine @ [*ijk, 1.0]
    return (world if xfm is None else xfm @ world)[:3]


def test_lesion_sits_at_the_same_place_in_every_scan(lesion_bids):
    """Each scan's truth lesion, moved to subject space with that visit's true rigid
    transform, lands on the subject-space lesion: mask centroids within 1 mm (half a voxel),
    Dice >= 0.75 of the trilinearly moved lesion probability (> 0.5) with the subject-space
    mask; the other subject has no lesion."""
    from dkiharm_nipype.phantom.truth import scan_to_subject

    subject_mask = _lesion_mask(lesion_bids, "02")
    ref = np.asanyarray(subject_mask.dataobj) > 0
    centre = _centroid_mm(subject_mask)
    poses = []
    for ses in ("A", "C", "D"):
        scan = _lesion_mask(lesion_bids, "02", ses)
        xfm = scan_to_subject(lesion_bids, "02", ses)
        poses.append(xfm)
        prob = _lesion_mask(lesion_bids, "02", ses, "label-lesion_probseg")
        moved = to_subject_space(prob, lesion_bids, "02", ses).get_fdata() > 0.5
        dice = 2 * (moved & ref).sum() / (moved.sum() + ref.sum())
        shift = np.linalg.norm(_centroid_mm(scan, xfm) - centre)
        print(
            f"\nses-{ses}: {int(ref.sum())} subject / {int(moved.sum())} moved voxels, "
            f"Dice {dice:.2f}, centroid {shift:.2f} mm from the subject-space lesion"
        )
        assert ref.sum() >= 20 and dice >= 0.75 and shift < 1.0
    # the visits moved the head (else the check above would be trivial)
    assert max(np.abs(p[:3, 3] - poses[0][:3, 3]).max() for p in poses) > 0.5
    assert not list((lesion_bids / "derivatives" / "phantom-truth" / "sub-01").rglob("*lesion*"))


def test_lesion_raises_md_lowers_fa_only_in_its_subject(lesion_bids, tmp_path):
    """Truth and a dipy WLS fit of the noisy scans: MD up, FA down in the lesion core against
    the surrounding WM, in every scan; the subject without a lesion is byte-identical to a
    dataset generated without any lesion."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    from dkiharm_nipype.evaluation.scores import lesion_contrast

    for ses in ("A", "C", "D"):
        core = np.asanyarray(_lesion_mask(lesion_bids, "02", ses).dataobj) > 0
        wm = load_scan_labels(lesion_bids, "02", ses, what="WM").get_fdata() > 0.9
        truth = load_truth(lesion_bids, "02", ses)
        stem = lesion_bids / f"sub-02/ses-{ses}/dwi/sub-02_ses-{ses}_run-1_dwi"
        gtab = gradient_table(np.loadtxt(f"{stem}.bval"), bvecs=np.loadtxt(f"{stem}.bvec").T)
        data = nib.load(f"{stem}.nii.gz").get_fdata()
        fit = DiffusionKurtosisModel(gtab, fit_method="WLS").fit(data, mask=core | wm)
        out = {}
        for name, fitted in (("md", fit.md), ("fa", fit.fa)):
            out[name] = (
                lesion_contrast(truth[name].get_fdata(), core, wm)["contrast"],
                lesion_contrast(fitted, core, wm)["contrast"],
            )
        md, fa = out["md"], out["fa"]
        print(
            f"\nses-{ses} contrast (truth, fit): MD {md[0]:+.0%} {md[1]:+.0%}, "
            f"FA {fa[0]:+.0%} {fa[1]:+.0%}"
        )
        assert out["md"][0] > 0.3 and out["md"][1] > 0.2
        assert out["fa"][0] < -0.2 and out["fa"][1] < -0.2
    plain = generate(tmp_path / "plain", preset="tiny", seed=2, subjects=2)
    with_lesion = {k: v for k, v in _digest(lesion_bids).items() if "sub-01" in k}
    assert with_lesion == {k: v for k, v in _digest(plain).items() if "sub-01" in k}


def test_lesion_contrast_on_a_synthetic_map():
    """Core 1.5 in WM 1.0 with a partial-volume shell of 1.25 (excluded by the gap) and grey
    matter of 0.6 (excluded by the WM mask): contrast +50 % exactly."""
    from dkiharm_nipype.evaluation.scores import lesion_contrast

    ii, jj, kk = np.mgrid[:24, :24, :24]
    r = np.sqrt((ii - 12) ** 2 + (jj - 12) ** 2 + (kk - 12) ** 2)
    core = r <= 3
    values = np.where(core, 1.5, 1.0)
    values[(r > 3) & (r <= 4)] = 1.25
    wm = ii < 20
    values[~wm] = 0.6
    values[0, 0, 0] = np.nan
    res = lesion_contrast(values, core, wm)
    assert res["contrast"] == pytest.approx(0.5)
    assert res["n_core"] == core.sum() and res["n_ring"] > 5 * res["n_core"]
    assert lesion_contrast(values, core, wm, gap=0)["contrast"] < 0.5  # shell included
    with pytest.raises(ValueError, match="no white-matter voxel around the lesion"):
        lesion_contrast(values, core, np.zeros_like(wm))
    with pytest.raises(ValueError, match="lesion mask holds no finite voxel"):
        lesion_contrast(values, np.zeros_like(core), wm)
