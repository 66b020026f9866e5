"""Registration of reference DKI maps into a target DWI space: functions, interface, graph."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from conftest import hide_tools, install_fake_fsl
from scipy import ndimage

from dkiharm_nipype import registration as reg
from dkiharm_nipype.errors import DkiharmInputError
from dkiharm_nipype.evaluation.scores import nrmse
from dkiharm_nipype.interfaces.registration import CheckRegistration, RegisterMaps
from dkiharm_nipype.phantom import truth
from dkiharm_nipype.registration import engines, similarity
from dkiharm_nipype.workflows.registration import init_label_registration_wf

ENGINES_HERE = [e for e in ("dipy-syn", "mrtrix", "ants") if reg.engine_available(e)]
SHAPE = (36, 40, 32)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -(np.asarray(SHAPE) - 1)  # centred grid


def _brain(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An FA-like image (soft, partial-volume edges) and a 'white matter' label, in world mm."""
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]

    def inside(r2, width=0.15):  # 1 inside the ellipsoid r2 < 1, a smooth 0-1 ramp at its edge
        return 1.0 / (1.0 + np.exp((np.sqrt(r2) - 1.0) / width * 4))

    head = (x / 28) ** 2 + (y / 32) ** 2 + (z / 24) ** 2
    wm1 = (x / 18) ** 2 + (y / 12) ** 2 + ((z - 4) / 10) ** 2
    wm2 = ((x - 10) / 5) ** 2 + ((y + 16) / 9) ** 2 + (z / 12) ** 2
    img = 0.25 * inside(head) + 0.45 * np.maximum(inside(wm1), inside(wm2))
    img += 0.2 * np.exp(-(((x + 12) / 5) ** 2 + ((y - 14) / 6) ** 2 + (z / 6) ** 2))
    return img.astype(np.float32), ((wm1 < 1) | (wm2 < 1)).astype(np.uint8)


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    rot[:3, 3] = [1.5, -2.0, 1.0]
    return rot


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Fixed brain; moving = the same brain seen through a rotation + smooth bump."""
    out = tmp_path_factory.mktemp("synthetic")
    pos = reg.grid_positions(SHAPE, AFFINE)
    rot = _rotation(6.0)
    moved = pos @ rot[:3, :3].T + rot[:3, 3]
    bump = 4.0 * np.exp(
        -(((pos[..., 0] - 6) / 10) ** 2 + (pos[..., 1] / 12) ** 2 + (pos[..., 2] / 10) ** 2)
    )
    moved[..., 1] += bump  # up to 4 mm along y, like an EPI distortion
    fixed, fixed_wm = _brain(pos)
    moving, moving_wm = _brain(moved)
    paths = {}
    for key, data in (("fixed", fixed), ("moving", moving), ("moving_wm", moving_wm)):
        paths[key] = out / f"{key}.nii.gz"
        nb.Nifti1Image(data, AFFINE).to_filename(paths[key])
    return {**paths, "fixed_data": fixed, "fixed_wm": fixed_wm, "moving_data": moving}


# ------------------------------------------------------------------------ engines
def test_unknown_engine_error():
    with pytest.raises(reg.UnknownEngineError, match=r"Unknown registration engine 'flirt'.*auto"):
        reg.resolve_engine("flirt")
    with pytest.raises(DkiharmInputError, match="choose one of"):
        init_label_registration_wf(engine="syn")


def test_fnirt_without_fsl_error(no_fsl):
    assert reg.resolve_engine("auto") == reg.DEFAULT_OPEN_ENGINE
    with pytest.raises(reg.FNIRTNotFoundError, match=r"registration='fnirt' needs FSL.*\$FSLDIR"):
        reg.resolve_engine("fnirt")
    with pytest.raises(DkiharmInputError, match="install FSL"):
        init_label_registration_wf(engine="fnirt")


def test_auto_is_fnirt_with_fsl(fake_fsl):
    assert reg.resolve_engine("auto") == "fnirt"
    assert "fnirt" in init_label_registration_wf().list_node_names()


def test_ants_missing_error(monkeypatch):
    monkeypatch.setattr(engines, "_ants_importable", lambda: False)
    with pytest.raises(reg.EngineNotAvailableError, match="antspyx"):
        reg.resolve_engine("ants")


def test_voxel_size_error(synthetic, tmp_path):
    big = tmp_path / "big.nii.gz"
    nb.Nifti1Image(np.zeros((18, 20, 16), np.float32), np.diag([4.0, 4, 4, 1])).to_filename(big)
    with pytest.raises(reg.GridMismatchError, match=r"big\.nii\.gz has voxels of 4x4x4 mm.*2x2x2"):
        reg.register(synthetic["fixed"], big, engine="none")
    with pytest.raises(reg.GridMismatchError, match="same voxel grid|voxels of"):
        RegisterMaps(
            fixed_image=str(synthetic["fixed"]),
            moving_image=str(synthetic["moving"]),
            moving_maps=[str(big)],
            engine="dipy-syn",
        ).run(cwd=str(tmp_path))


def test_register_rejects_4d(tmp_path, synthetic):
    four = tmp_path / "dwi.nii.gz"
    nb.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), AFFINE).to_filename(four)
    with pytest.raises(reg.RegistrationInputError, match="needs a 3-D map"):
        reg.register(synthetic["fixed"], four, engine="dipy-syn")


# ------------------------------------------------------------------- plain functions
def test_resample_identity_and_affine():
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    img = nb.Nifti1Image(data, AFFINE)
    same = reg.resample(img, reg.affine_deformation(SHAPE, AFFINE), AFFINE)
    np.testing.assert_allclose(same.get_fdata(), data, atol=1e-6)
    shift = np.eye(4)
    shift[0, 3] = 2.0  # one voxel along i
    moved = reg.resample(img, reg.affine_deformation(SHAPE, AFFINE, shift), AFFINE, order=0)
    np.testing.assert_allclose(moved.get_fdata()[:-1], data[1:], atol=1e-6)


def test_support_is_where_all_trilinear_samples_are_inside():
    """Half a voxel off the moving grid, a map's edge voxels are blended with the zeros
    outside the moving mask: the support keeps only voxels drawn from inside it."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:20, 10:20, 10:20] = 1
    img = nb.Nifti1Image(mask, AFFINE)
    shift = np.eye(4)
    shift[0, 3] = 1.0  # half a voxel along i
    deformation = reg.affine_deformation(SHAPE, AFFINE, shift)
    r = reg.Registration("test", deformation, AFFINE)
    blended = np.asanyarray(r.apply(img).dataobj)
    support = np.asanyarray(r.support(img).dataobj)
    assert support.dtype == np.uint8
    # fixed voxel i samples moving i + 0.5: both i and i + 1 in 10..19, i.e. i in 10..18
    assert np.array_equal(np.flatnonzero(support[:, 15, 15]), np.arange(10, 19))
    assert support.sum() == 9 * 10 * 10
    assert np.all(blended[support > 0] == 1.0)
    assert np.all(blended[(blended > 0) & (support == 0)] < 1.0)  # the blended rim: left out
    identity = reg.Registration("none", reg.affine_deformation(SHAPE, AFFINE), AFFINE)
    assert np.array_equal(np.asanyarray(identity.support(img).dataobj), mask)


@pytest.mark.parametrize("engine", ENGINES_HERE)
def test_recovers_synthetic_deformation(synthetic, engine):
    """Rotation of 6 degrees + translation + a 4 mm smooth bump along y.

    Measured: NRMSE 0.58 before; after 0.12 (dipy-syn), 0.13 (mrtrix), 0.17 (ants),
    with WM Dice 0.93, 0.92, 0.92 (36 x 40 x 32 voxels, a few seconds each).
    """
    fixed = synthetic["fixed_data"]
    mask = ndimage.binary_dilation(fixed > 0, iterations=2)
    before = nrmse(synthetic["moving_data"], fixed, mask)
    result = reg.register(synthetic["fixed"], synthetic["moving"], engine=engine)
    warped = result.apply(synthetic["moving"]).get_fdata()
    wm = np.asanyarray(result.apply(synthetic["moving_wm"], label=True).dataobj)
    after = nrmse(warped, fixed, mask)
    wm_dice = reg.dice(wm, synthetic["fixed_wm"])
    print(f"{engine}: NRMSE {before:.3f} -> {after:.3f}, WM Dice {wm_dice:.3f}")
    assert after < 0.5 * before, (engine, before, after)
    assert wm_dice > 0.9, (engine, wm_dice)
    assert reg.dice(synthetic["moving_data"] > 0.5, synthetic["fixed_wm"]) < 0.85
    assert result.metrics["correlation_after"] > result.metrics["correlation_before"]
    assert wm.dtype == np.uint8


def test_truth_deformation_is_identity_within_a_scan(tiny_bids):
    deformation, affine = truth.truth_deformation(
        tiny_bids, "01", fixed_session="D", moving_session="D", distortion=False
    )
    np.testing.assert_allclose(
        deformation, reg.grid_positions(deformation.shape, affine), atol=1e-4
    )


# ---------------------------------------------------------------------- tiny phantom
def _tiny_fa(bids: Path, session: str) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """DTI FA of the raw run-1 DWIs (distortion kept) and a median-Otsu mask."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    from dkiharm_nipype.preproc.masks import median_otsu_mask
    from dkiharm_nipype.utils.dwi import mean_b0

    stem = bids / "sub-01" / f"ses-{session}" / "dwi" / f"sub-01_ses-{session}_run-1_dwi"
    img = nb.load(f"{stem}.nii.gz")
    bvals, bvecs = np.loadtxt(f"{stem}.bval"), np.loadtxt(f"{stem}.bvec")
    data = np.asarray(img.dataobj, np.float32)
    mask = median_otsu_mask(mean_b0(data, bvals))
    gtab = gradient_table(bvals, bvecs=bvecs)
    fa = np.nan_to_num(TensorModel(gtab).fit(data, mask=mask).fa) * mask
    return nb.Nifti1Image(fa.astype(np.float32), img.affine), nb.Nifti1Image(
        mask.astype(np.uint8), img.affine
    )


def test_tiny_phantom_d_to_c(tiny_bids):
    """D's truth FA/WM into C's (distorted, moved) DWI space: better than no registration.

    Measured (seed 0): FA NRMSE / WM Dice 0.28 / 0.89 without registration, 0.21 / 0.93
    with dipy-syn.
    """
    fixed, fixed_mask = _tiny_fa(tiny_bids, "C")
    moving = truth.load_truth(tiny_bids, "01", "D", params=("fa",))["fa"]
    moving_wm = truth.load_scan_labels(tiny_bids, "01", "D", what="WM")
    frame, affine = truth.truth_deformation(
        tiny_bids, "01", fixed_session="C", moving_session="C", distortion=True
    )
    target_fa = reg.resample(
        truth.load_truth(tiny_bids, "01", "C", params=("fa",))["fa"], frame, affine
    )
    target_wm = reg.resample(
        truth.load_scan_labels(tiny_bids, "01", "C", what="WM"), frame, affine
    )
    brain = reg.resample(
        truth.load_scan_labels(tiny_bids, "01", "C", what="brain"), frame, affine, order=0
    )
    brain, target_fa, target_wm = (np.asanyarray(i.dataobj) for i in (brain, target_fa, target_wm))

    def score(deformation):
        fa = reg.resample(moving, deformation, affine).get_fdata()
        wm = reg.resample(moving_wm, deformation, affine).get_fdata()
        return nrmse(fa, target_fa, brain > 0), reg.dice(wm > 0.5, target_wm > 0.5)

    none = score(reg.affine_deformation(fixed.shape, affine))
    result = reg.register(fixed, moving, engine="auto", fixed_mask=fixed_mask)
    after = score(result.deformation)
    print(f"tiny D -> C: none {none}, {result.engine} {after}")
    assert after[0] < 0.85 * none[0], (none, after)
    assert after[1] > none[1] + 0.02, (none, after)


# ------------------------------------------------------------------------- interface
def test_register_maps_none_passes_through(tiny_bids, tmp_path):
    maps = truth.load_truth(tiny_bids, "01", "A", params=("fa", "md"))
    paths = [m.get_filename() for m in maps.values()]
    label = truth.load_scan_labels(tiny_bids, "01", "A", what="wmrois").get_filename()
    res = RegisterMaps(
        fixed_image=paths[0], moving_image=paths[0], moving_maps=paths, label_maps=[label],
        engine="none",
    ).run(cwd=str(tmp_path))  # fmt: skip
    out = res.outputs
    assert len(out.registered_maps) == 2 and len(out.registered_labels) == 1
    for src, dst in zip(
        [*paths, label], [*out.registered_maps, *out.registered_labels], strict=True
    ):
        assert Path(dst).parent == tmp_path
        assert Path(src).read_bytes() == Path(dst).read_bytes()
    report = json.loads(Path(out.report).read_text())
    assert report["engine"] == "none" and report["max_displacement_mm"] == 0.0
    # no moving_mask: the support is the moving field of view, here the whole grid
    assert np.asanyarray(nb.load(out.support_mask).dataobj).all()
    assert nb.load(out.transform).shape == (*nb.load(paths[0]).shape, 3)


def test_register_maps_none_needs_one_grid(tiny_bids, synthetic, tmp_path):
    fa = truth.load_truth(tiny_bids, "01", "A", params=("fa",))["fa"].get_filename()
    with pytest.raises(reg.GridMismatchError, match="not on the same voxel grid"):
        RegisterMaps(fixed_image=fa, moving_image=str(synthetic["fixed"]), engine="none").run(
            cwd=str(tmp_path)
        )


@pytest.mark.skipif("mrtrix" not in ENGINES_HERE, reason="MRtrix3 not installed")
def test_register_maps_mrtrix_outputs(synthetic, tmp_path):
    res = RegisterMaps(
        fixed_image=str(synthetic["fixed"]),
        moving_image=str(synthetic["moving"]),
        moving_maps=[str(synthetic["moving"])],
        label_maps=[str(synthetic["moving_wm"])],
        engine="mrtrix",
    ).run(cwd=str(tmp_path))
    out = res.outputs
    assert out.elapsed_seconds > 0
    assert np.loadtxt(out.linear_transform).shape == (4, 4)
    assert json.loads(Path(out.report).read_text())["engine"] == "mrtrix"
    wm = np.asanyarray(nb.load(out.registered_labels[0]).dataobj)
    assert reg.dice(wm, synthetic["fixed_wm"]) > 0.9
    # the written field is the one mrtransform -warp would apply
    field = nb.load(out.transform)
    again = reg.resample(synthetic["moving"], np.asarray(field.dataobj), field.affine)
    np.testing.assert_allclose(
        again.get_fdata(), nb.load(out.registered_maps[0]).get_fdata(), atol=1e-5
    )


# -------------------------------------------------------------------------- workflow
def _edges(wf) -> set[tuple[str, str, str, str]]:
    return {
        (u.name, v.name, src, dst)
        for u, v, data in wf._graph.edges(data=True)
        for src, dst in data["connect"]
    }


def test_workflow_open_engine_graph():
    wf = init_label_registration_wf(engine="dipy-syn", omp_nthreads=2)
    node = wf.get_node("register_maps")
    assert node.interface.inputs.engine == "dipy-syn" and node.n_procs == 2
    assert {
        ("inputnode", "register_maps", "moving_maps", "moving_maps"),
        ("mask_list", "register_maps", "out", "label_maps"),
        ("register_maps", "outputnode", "registered_maps", "registered_maps"),
        ("first_label", "outputnode", "out", "registered_mask"),
        ("register_maps", "outputnode", "transform", "transform"),
    } <= _edges(wf)


def test_workflow_none_runs(tiny_bids, tmp_path):
    maps = truth.load_truth(tiny_bids, "01", "C")
    paths = [m.get_filename() for m in maps.values()]
    mask = truth.load_scan_labels(tiny_bids, "01", "C", what="brain").get_filename()
    wf = init_label_registration_wf(engine="none")
    wf.base_dir = str(tmp_path)
    wf.inputs.inputnode.fixed_image = paths[3]
    wf.inputs.inputnode.moving_image = paths[3]
    wf.inputs.inputnode.moving_maps = paths
    wf.inputs.inputnode.moving_mask = mask
    res = wf.run()
    out = next(n for n in res.nodes() if n.name == "register_maps").result.outputs
    assert [Path(p).name for p in out.registered_maps] == [
        Path(p).name.replace(".nii.gz", "_registered.nii.gz") for p in paths
    ]
    for src, dst in zip(paths, out.registered_maps, strict=True):
        assert Path(src).read_bytes() == Path(dst).read_bytes()


# ------------------------------------------------------------------------------ FSL
@pytest.fixture
def fake_fsl(tmp_path, monkeypatch) -> Path:
    """An ``$FSLDIR`` with stand-in ``flirt``/``fnirt``/``applywarp`` so graphs build."""
    scripts = dict.fromkeys(reg.FNIRT_COMMANDS, "import sys\nsys.exit(1)\n")
    return install_fake_fsl(tmp_path / "fsl", monkeypatch, scripts)


@pytest.fixture
def no_fsl(monkeypatch) -> None:
    hide_tools(monkeypatch, reg.FNIRT_COMMANDS)


def test_fnirt_graph_and_cmdlines(fake_fsl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = init_label_registration_wf(engine="fnirt")
    assert {
        ("inputnode", "flirt", "moving_image", "in_file"),
        ("inputnode", "flirt", "fixed_image", "reference"),
        ("flirt", "fnirt", "out_matrix_file", "affine_file"),
        ("inputnode", "fnirt", "moving_mask", "inmask_file"),
        ("inputnode", "applywarp_maps", "moving_maps", "in_file"),
        ("fnirt", "applywarp_maps", "fieldcoeff_file", "field_file"),
        ("fnirt", "applywarp_mask", "fieldcoeff_file", "field_file"),
        ("fnirt", "check_registration", "warped_file", "registered_image"),
        ("inputnode", "check_registration", "fixed_image", "fixed_image"),
        ("inputnode", "check_registration", "moving_image", "moving_image"),
        ("applywarp_maps", "check_registration", "out_file", "registered_maps"),
        ("check_registration", "outputnode", "registered_maps", "registered_maps"),
        ("applywarp_mask", "outputnode", "out_file", "registered_mask"),
        ("inputnode", "applywarp_support", "moving_mask", "in_file"),
        ("fnirt", "applywarp_support", "fieldcoeff_file", "field_file"),
        ("applywarp_support", "threshold_support", "out_file", "in_file"),
        ("threshold_support", "outputnode", "out_file", "support_mask"),
        ("fnirt", "outputnode", "fieldcoeff_file", "transform"),
    } <= _edges(wf)
    assert wf.get_node("applywarp_maps").iterfield == ["in_file"]
    for name in ("ref_fa", "ref_mask", "ref_md", "tgt_fa"):
        (tmp_path / f"{name}.nii.gz").touch()

    flirt = wf.get_node("flirt").interface
    flirt.inputs.in_file = "ref_fa.nii.gz"
    flirt.inputs.reference = "tgt_fa.nii.gz"
    assert flirt.cmdline == (
        "flirt -in ref_fa.nii.gz -ref tgt_fa.nii.gz -out ref_fa_flirt.nii.gz "
        "-omat ref_fa_flirt.mat -cost corratio -dof 12 -interp trilinear"
    )
    fnirt = wf.get_node("fnirt").interface
    fnirt.inputs.in_file = "ref_fa.nii.gz"
    fnirt.inputs.ref_file = "tgt_fa.nii.gz"
    fnirt.inputs.inmask_file = "ref_mask.nii.gz"
    fnirt.inputs.affine_file = "ref_fa.nii.gz"  # any existing file stands for the .mat
    assert fnirt.cmdline == (
        "fnirt --aff=ref_fa.nii.gz --config=FA_2_FMRIB58_1mm "
        f"--cout={tmp_path / 'ref_fa_fieldwarp.nii.gz'} --in=ref_fa.nii.gz "
        f"--inmask=ref_mask.nii.gz --logout={tmp_path / 'ref_fa_log.txt'} "
        "--ref=tgt_fa.nii.gz --subsamp=4,2,1,1 "
        f"--iout={tmp_path / 'ref_fa_warped.nii.gz'}"
    )
    warp = wf.get_node("applywarp_mask").interface
    warp.inputs.in_file = "ref_mask.nii.gz"
    warp.inputs.ref_file = "tgt_fa.nii.gz"
    warp.inputs.field_file = "ref_fa.nii.gz"
    assert warp.cmdline == (
        "applywarp --in=ref_mask.nii.gz --ref=tgt_fa.nii.gz "
        f"--out={tmp_path / 'ref_mask_warp.nii.gz'} --warp=ref_fa.nii.gz --interp=nn"
    )
    support = wf.get_node("applywarp_support").interface
    support.inputs.in_file = "ref_mask.nii.gz"
    support.inputs.ref_file = "tgt_fa.nii.gz"
    support.inputs.field_file = "ref_fa.nii.gz"
    assert support.cmdline == (
        "applywarp --in=ref_mask.nii.gz --ref=tgt_fa.nii.gz "
        f"--out={tmp_path / 'ref_mask_warp.nii.gz'} --datatype=float --warp=ref_fa.nii.gz "
        "--interp=trilinear"
    )
    threshold = wf.get_node("threshold_support").interface
    threshold.inputs.in_file = "ref_mask.nii.gz"
    assert threshold.cmdline == (
        f"fslmaths ref_mask.nii.gz -thr 0.999 -bin {tmp_path / 'ref_mask_maths.nii.gz'} -odt char"
    )


# ------------------------------------------------------------------ failure guards
DIVERGENCE = Path(__file__).parent / "data" / "divergence"


def test_plausible_affine_bounds_the_scaling():
    rot = np.eye(4)
    rot[:3, :3] = _rotation(20)[:3, :3]
    assert reg.plausible_affine(rot)
    assert np.allclose(reg.linear_scales(rot), 1)
    stretched = rot @ np.diag([1.2, 1.0, 0.9, 1.0])
    assert reg.plausible_affine(stretched)
    assert not reg.plausible_affine(rot @ np.diag([1.4, 1.0, 1.0, 1.0]))
    assert not reg.plausible_affine(np.diag([1.0, 1.0, 0.7, 1.0]))


def test_diverging_affine_stage_is_rejected(caplog, monkeypatch):
    """A real divergence: the tiny phantom (seed 0) fitted without preprocessing, D's FA
    into sub-02 A run-1 (files kept in ``tests/data/divergence``). DIPY's affine stage
    scaled by 16/9/6 and SyN then lowered the correlation 0.28 -> 0.07; the rigid stage is
    kept instead (0.28 -> 0.44, as the subject's other scans: 0.45-0.51), and without that
    guard the failure is caught and named."""
    fixed = DIVERGENCE / "sub-02_ses-A_run-1_model-dki_param-fa_dwimap.nii.gz"
    moving = DIVERGENCE / "sub-02_ses-D_run-1_model-dki_param-fa_dwimap.nii.gz"
    mask = DIVERGENCE / "sub-02_ses-D_run-1_desc-brain_mask.nii.gz"
    with caplog.at_level("WARNING", logger="dkiharm.registration"):
        result = reg.register(fixed, moving, engine="dipy-syn", moving_mask=mask)
    assert "affine stage diverged" in caplog.text
    assert np.allclose(reg.linear_scales(result.linear), 1, atol=1e-6)  # the rigid stage
    assert result.metrics["correlation_after"] > result.metrics["correlation_before"] + 0.1

    monkeypatch.setattr(engines, "plausible_affine", lambda affine: True)
    with pytest.raises(reg.RegistrationFailedError, match=r"sub-02_ses-D_run-1.*0\.28 to 0\.0"):
        reg.register(fixed, moving, engine="dipy-syn", moving_mask=mask)


def test_check_registration_stops_a_failed_external_registration(tmp_path, monkeypatch):
    """The FNIRT path's guard (``CheckRegistration``) on the real divergence above: the
    diverged result (what an external engine could hand back) is stopped with both names
    and its numbers, the maps it carries go nowhere; the guarded result passes them on."""
    fixed = DIVERGENCE / "sub-02_ses-A_run-1_model-dki_param-fa_dwimap.nii.gz"
    moving = DIVERGENCE / "sub-02_ses-D_run-1_model-dki_param-fa_dwimap.nii.gz"
    mask = DIVERGENCE / "sub-02_ses-D_run-1_desc-brain_mask.nii.gz"
    good = reg.register(fixed, moving, engine="dipy-syn", moving_mask=mask)
    monkeypatch.setattr(engines, "plausible_affine", lambda affine: True)
    monkeypatch.setattr(similarity, "FAILURE_MARGIN", 1.0)
    bad = reg.register(fixed, moving, engine="dipy-syn", moving_mask=mask)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    for name, result in (("good", good), ("bad", bad)):
        result.apply(moving).to_filename(tmp_path / f"{name}_warped.nii.gz")
        result.apply(mask, label=True).to_filename(tmp_path / f"{name}_mask.nii.gz")

    def check(name):
        return CheckRegistration(
            fixed_image=str(fixed),
            moving_image=str(moving),
            moving_mask=str(mask),
            registered_image=str(tmp_path / f"{name}_warped.nii.gz"),
            registered_maps=[str(tmp_path / f"{name}_mask.nii.gz")],
        ).run()

    out = check("good").outputs
    report = json.loads(Path(out.report).read_text())
    for key in ("correlation_before", "correlation_after"):  # the numbers register() finds
        assert report[key] == pytest.approx(good.metrics[key], abs=1e-4)
    assert report["correlation_after"] > report["correlation_before"] + 0.1
    assert out.registered_maps == [str(tmp_path / "good_mask.nii.gz")]
    with pytest.raises(
        reg.RegistrationFailedError,
        match=r"Registering .*sub-02_ses-D_run-1_model-dki_param-fa_dwimap.nii.gz to "
        r".*sub-02_ses-A_run-1.* with fnirt failed: .* from 0\.[23]\d to 0\.0\d",
    ):
        check("bad")
