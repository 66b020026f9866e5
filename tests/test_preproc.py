"""DWI preprocessing: FSL acquisition files, tool detection, and the preprocessing workflow.

MRtrix3 really runs here. FSL cannot be installed in CI, so its nodes are checked through
their command lines and through stand-in ``topup``/``eddy`` scripts that validate their
arguments the way the real tools do and write the outputs Nipype expects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import textwrap
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from conftest import hide_tools, install_fake_fsl

from dkiharm_nipype.errors import DkiharmInputError
from dkiharm_nipype.interfaces.preproc import TopupEddyFiles
from dkiharm_nipype.utils import env
from dkiharm_nipype.utils.dwi import b0_indices, degibbs_axes, mean_b0
from dkiharm_nipype.utils.fsl import (
    FieldmapError,
    MissingMetadataError,
    acqparams_from_metadata,
    has_reversed_pe,
    readout_time,
    topup_config,
    write_topup_files,
)
from dkiharm_nipype.workflows.preproc import init_dwi_mask_wf, init_dwi_preproc_wf

SHAPE = (20, 20, 12)
SIGMA = 40.0
RAS = np.diag([2.0, 2.0, 2.0, 1.0])  # positive determinant: FSL flips x
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])  # radiological storage: FSL keeps x


# ---------------------------------------------------------------------------- fixtures
def _hemisphere(n: int, seed: int) -> np.ndarray:
    """``n`` roughly uniform unit vectors on a hemisphere (Fibonacci lattice, rotated)."""
    k = np.arange(n) + 0.5
    z = 1 - k / n
    phi = np.pi * (1 + 5**0.5) * k + seed
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _save(data: np.ndarray, path: Path, affine: np.ndarray = RAS) -> Path:
    nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine).to_filename(path)
    return path


def _sidecar(image: Path, **fields) -> dict:
    image.with_name(image.name.replace(".nii.gz", ".json")).write_text(json.dumps(fields))
    return fields


@pytest.fixture(scope="module")
def dwi_data(tmp_path_factory) -> dict:
    """A 20x20x12 ellipsoid, 2 b0 + 12 dirs at b=1000 and b=2000, Rician noise (sigma 40).

    Kurtotic signal ``S0 exp(-b D + b^2 D^2 K / 6)`` with an anisotropic tensor whose
    principal axis turns across the object. Sidecars: DWI PE j- and a reversed-PE (j)
    ``epi`` b0 fieldmap, TotalReadoutTime 0.05 s.
    """
    out = tmp_path_factory.mktemp("dwi")
    rng = np.random.default_rng(0)
    bvals = np.r_[0, 0, np.full(12, 1000), np.full(12, 2000)].astype(float)
    bvecs = np.vstack([np.zeros((2, 3)), _hemisphere(12, 0), _hemisphere(12, 1)])

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    rel = (grid - (np.array(SHAPE) - 1) / 2) / np.array([7.0, 7.5, 4.5])
    obj = (rel**2).sum(-1) <= 1
    s0 = np.where(obj, 1000.0 * (1 + 0.2 * rel[..., 0]), 0.0)
    theta = np.pi / 2 * (rel[..., 0] + 1) / 2
    axis = np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=-1)
    cos2 = (axis @ bvecs.T) ** 2
    adc = 1e-3 * (0.5 + 1.2 * cos2)
    truth = s0[..., None] * np.exp(-bvals * adc + (bvals * adc) ** 2 * 0.8 / 6)

    def rician(signal):
        return np.hypot(
            signal + rng.normal(0, SIGMA, signal.shape), rng.normal(0, SIGMA, signal.shape)
        )

    dwi = _save(rician(truth), out / "sub-01_dwi.nii.gz")
    bval = out / "sub-01_dwi.bval"
    bvec = out / "sub-01_dwi.bvec"
    np.savetxt(bval, bvals[None], fmt="%d")
    np.savetxt(bvec, bvecs.T, fmt="%.6f")
    fmap = _save(rician(s0[..., None]), out / "sub-01_dir-PA_epi.nii.gz")
    return {
        "dwi_file": dwi,
        "bval_file": bval,
        "bvec_file": bvec,
        "metadata": _sidecar(dwi, PhaseEncodingDirection="j-", TotalReadoutTime=0.05),
        "fmap_epi_files": [fmap],
        "fmap_metadata": [_sidecar(fmap, PhaseEncodingDirection="j", TotalReadoutTime=0.05)],
        "truth": truth,
        "object": obj,
        "bvals": bvals,
        "bvecs": bvecs,
    }


def _inputs(data: dict) -> dict:
    keys = ("dwi_file", "bval_file", "bvec_file", "metadata", "fmap_epi_files", "fmap_metadata")
    inputs = {key: data[key] for key in keys}
    inputs["fmap_epi_files"] = [str(f) for f in inputs["fmap_epi_files"]]
    return {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()}


def _collect(
    dwi_file=None, bval_file=None, bvec_file=None, mask_file=None, b0_file=None, noise_file=None
):
    return locals()


def _run(wf, data: dict, base_dir: Path) -> tuple[dict, object]:
    """Run ``wf`` on ``data``; return its outputnode fields and the executed graph.

    Nipype drops identity nodes from the executed graph, so the outputs are gathered by a
    function node downstream of ``outputnode``.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    fields = ["dwi_file", "bval_file", "bvec_file", "mask_file", "b0_file", "noise_file"]
    collect = pe.Node(
        niu.Function(function=_collect, input_names=fields, output_names=["out"]),
        name="collect",
    )
    harness = pe.Workflow(name="harness", base_dir=str(base_dir))
    harness.config["execution"]["crashdump_dir"] = str(base_dir)
    harness.connect([(wf, collect, [(f"outputnode.{f}", f) for f in fields])])
    for key, value in _inputs(data).items():
        setattr(wf.inputs.inputnode, key, value)
    graph = harness.run()
    (node,) = [n for n in graph.nodes() if n.name == "collect"]
    return node.result.outputs.out, graph


def _node(result_graph, name: str):
    (node,) = [n for n in result_graph.nodes() if n.name == name and "mask" not in n.fullname]
    return node


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


FAKE_TOPUP = """
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    n_vols = nb.load(args["imain"]).shape[3]
    rows = np.loadtxt(args["datain"], ndmin=2)
    if rows.shape != (n_vols, 4):
        sys.exit(f"topup: --datain has {rows.shape[0]} rows for {n_vols} volumes")
    if not np.any(rows[:, :3] != rows[0, :3]):
        sys.exit("topup: no volume with a different phase encoding")
    img = nb.load(args["imain"])
    for path in (args["out"] + "_fieldcoef.nii.gz", args["fout"], args["iout"]):
        img.to_filename(path)
    np.savetxt(args["out"] + "_movpar.txt", np.zeros((n_vols, 6)))
    Path(args["logout"]).write_text("fake topup\\n")
    for i in range(1, n_vols + 1):
        img.slicer[..., 0].to_filename(f"{args['dfout']}_{i:02d}.nii.gz")
        img.slicer[..., 0].to_filename(f"{args['jacout']}_{i:02d}.nii.gz")
        np.savetxt(f"{args['rbmout']}_{i:02d}.mat", np.eye(4))
"""

FAKE_EDDY = """
    args = dict((a[2:].split("=", 1) + [""])[:2] for a in sys.argv[1:])
    img = nb.load(args["imain"])
    index = np.loadtxt(args["index"], ndmin=1).astype(int)
    n_rows = np.loadtxt(args["acqp"], ndmin=2).shape[0]
    if index.size != img.shape[3] or index.min() < 1 or index.max() > n_rows:
        sys.exit("eddy: --index does not match --imain and --acqp")
    if nb.load(args["mask"]).shape != img.shape[:3]:
        sys.exit("eddy: --mask grid differs from --imain")
    if "topup" in args and not Path(args["topup"] + "_fieldcoef.nii.gz").exists():
        sys.exit("eddy: --topup field not found")
    img.to_filename(args["out"] + ".nii.gz")
    np.savetxt(args["out"] + ".eddy_parameters", np.zeros((img.shape[3], 16)))
    bvecs = np.loadtxt(args["bvecs"])
    np.savetxt(args["out"] + ".eddy_rotated_bvecs", bvecs, fmt="%.6f")
"""


@pytest.fixture
def fake_fsl(tmp_path, monkeypatch) -> Path:
    """An ``$FSLDIR`` whose ``topup``/``eddy`` check their inputs and write dummy outputs."""
    fsldir = tmp_path / "fsl"
    header = "import sys\nfrom pathlib import Path\nimport nibabel as nb\nimport numpy as np\n"
    scripts = {}
    for tool, body in (("topup", FAKE_TOPUP), ("eddy", FAKE_EDDY)):
        log = f"Path({str(fsldir / (tool + '.log'))!r}).write_text(' '.join(sys.argv))\n"
        scripts[tool] = header + log + textwrap.dedent(body)
    return install_fake_fsl(fsldir, monkeypatch, scripts)


@pytest.fixture
def no_fsl(monkeypatch) -> None:
    """Hide any FSL installation: unset ``$FSLDIR``, drop its tools' folders from ``PATH``."""
    hide_tools(monkeypatch, ("topup", *env.EDDY_COMMANDS))


# ------------------------------------------------------------------ plain functions
@pytest.mark.parametrize(
    ("metadata", "affine", "expected"),
    [
        ({"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}, RAS, [0, -1, 0, 0.05]),
        ({"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05}, RAS, [0, 1, 0, 0.05]),
        # FSL's radiological frame flips x for positive-determinant affines only.
        ({"PhaseEncodingDirection": "i", "TotalReadoutTime": 0.06}, RAS, [-1, 0, 0, 0.06]),
        ({"PhaseEncodingDirection": "i-", "TotalReadoutTime": 0.06}, RAS, [1, 0, 0, 0.06]),
        ({"PhaseEncodingDirection": "i", "TotalReadoutTime": 0.06}, LAS, [1, 0, 0, 0.06]),
        ({"PhaseEncodingDirection": "k-", "TotalReadoutTime": 0.03}, RAS, [0, 0, -1, 0.03]),
        # EffectiveEchoSpacing * (N_PE - 1), N_PE from the image (20 along j) ...
        ({"PhaseEncodingDirection": "j", "EffectiveEchoSpacing": 5e-4}, RAS, [0, 1, 0, 0.0095]),
        # ... or from ReconMatrixPE, which wins over the image shape
        (
            {"PhaseEncodingDirection": "j-", "EffectiveEchoSpacing": 5e-4, "ReconMatrixPE": 96},
            RAS,
            [0, -1, 0, 0.0475],
        ),
        # N_PE along i is 30 here
        ({"PhaseEncodingDirection": "i-", "EffectiveEchoSpacing": 1e-3}, LAS, [-1, 0, 0, 0.029]),
    ],
)
def test_acqparams_from_metadata(metadata, affine, expected):
    from dkiharm_nipype.utils.fsl import flips_x

    rows = acqparams_from_metadata(
        metadata, shape=(30, 20, 12), flip_x=flips_x(affine), n_volumes=2
    )
    assert rows.shape == (2, 4)
    np.testing.assert_allclose(rows, [expected, expected])


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"TotalReadoutTime": 0.05}, r"sub-01_dwi\.json has no 'PhaseEncodingDirection'"),
        ({"PhaseEncodingDirection": "y-", "TotalReadoutTime": 0.05}, r"= 'y-'.*i, i-, j"),
        ({"PhaseEncodingDirection": "j-"}, r"sub-01_dwi\.json .*'TotalReadoutTime'.*add one"),
        ({"PhaseEncodingDirection": "j", "TotalReadoutTime": 50}, r"milliseconds"),
        ({"PhaseEncodingDirection": "j", "EffectiveEchoSpacing": -1}, r"EffectiveEchoSpacing"),
    ],
)
def test_acqparams_errors_name_sidecar_and_field(metadata, match):
    with pytest.raises(MissingMetadataError, match=match):
        acqparams_from_metadata(metadata, shape=SHAPE, source="sub-01_dwi.json")


def test_readout_time_optional_without_topup():
    meta = {"PhaseEncodingDirection": "j-"}
    assert acqparams_from_metadata(meta, require_readout=False)[0, 3] > 0
    with pytest.raises(MissingMetadataError, match="ReconMatrixPE"):
        readout_time({"EffectiveEchoSpacing": 5e-4})


def test_topup_config_and_rpe_detection():
    assert topup_config((20, 20, 12)) == "b02b0.cnf"
    assert topup_config((20, 20, 11)) == "b02b0_1.cnf"
    dwi = {"PhaseEncodingDirection": "j-"}
    assert has_reversed_pe(dwi, [{"PhaseEncodingDirection": "j"}])
    assert not has_reversed_pe(dwi, [{"PhaseEncodingDirection": "j-"}])
    assert not has_reversed_pe(dwi, [])


@pytest.mark.parametrize(
    ("metadata", "axes"),
    [
        (None, [0, 1]),
        ({}, [0, 1]),
        ({"SliceEncodingDirection": "i"}, [1, 2]),
        ({"SliceEncodingDirection": "j-"}, [0, 2]),
    ],
)
def test_degibbs_axes(metadata, axes):
    assert degibbs_axes(metadata) == axes


def test_mean_b0_and_b0_indices():
    bvals = np.array([5, 1000, 0, 2000])
    data = np.arange(4, dtype=float)[None, None, None].repeat(2, axis=0)
    np.testing.assert_array_equal(b0_indices(bvals), [0, 2])
    assert np.all(mean_b0(data, bvals) == 1.0)
    with pytest.raises(DkiharmInputError, match="No b=0 volume"):
        b0_indices(np.array([1000, 2000]))
    with pytest.raises(DkiharmInputError, match="4 volumes but its .bval file lists 3"):
        mean_b0(data, bvals[:3])


def test_write_topup_files_j(dwi_data, tmp_path):
    files = write_topup_files(
        dwi_data["dwi_file"],
        dwi_data["bvals"],
        dwi_data["metadata"],
        fmap_files=dwi_data["fmap_epi_files"],
        fmap_metadata=dwi_data["fmap_metadata"],
        out_dir=tmp_path,
    )
    # two DWI b0s (j-) then the fieldmap (j); eddy points every DWI volume at row 1
    assert Path(files["acqparams"]).read_text() == "0 -1 0 0.05\n0 -1 0 0.05\n0 1 0 0.05\n"
    assert Path(files["index"]).read_text().split() == ["1"] * 26
    assert nb.load(files["imain"]).shape == (*SHAPE, 3)
    assert files["config"] == "b02b0.cnf"


def test_write_topup_files_i_from_echo_spacing(tmp_path):
    dwi = _save(np.ones((*SHAPE, 3)), tmp_path / "sub-02_dwi.nii.gz", affine=LAS)
    fmap = _save(np.ones((*SHAPE, 2)), tmp_path / "sub-02_dir-RL_epi.nii.gz", affine=LAS)
    files = write_topup_files(
        dwi,
        np.array([0, 1000, 2000]),
        {"PhaseEncodingDirection": "i", "EffectiveEchoSpacing": 5e-4},
        fmap_files=[fmap],
        fmap_metadata=[{"PhaseEncodingDirection": "i-", "EffectiveEchoSpacing": 5e-4}],
        out_dir=tmp_path,
    )
    rows = np.loadtxt(files["acqparams"])
    np.testing.assert_allclose(rows, [[1, 0, 0, 0.0095], [-1, 0, 0, 0.0095], [-1, 0, 0, 0.0095]])
    assert Path(files["index"]).read_text() == "1 1 1\n"


def test_write_topup_files_errors(dwi_data, tmp_path):
    kwargs = {"out_dir": tmp_path, "fmap_files": dwi_data["fmap_epi_files"]}
    with pytest.raises(MissingMetadataError, match=r"sub-01_dir-PA_epi\.json .*TotalReadout"):
        write_topup_files(
            dwi_data["dwi_file"],
            dwi_data["bvals"],
            dwi_data["metadata"],
            fmap_metadata=[{"PhaseEncodingDirection": "j"}],
            **kwargs,
        )
    with pytest.raises(FieldmapError, match=r"No 'epi' fieldmap .* other than the DWI's \(j-\)"):
        write_topup_files(
            dwi_data["dwi_file"],
            dwi_data["bvals"],
            dwi_data["metadata"],
            fmap_metadata=[dwi_data["metadata"]],
            **kwargs,
        )
    with pytest.raises(FieldmapError, match="none was given"):
        write_topup_files(
            dwi_data["dwi_file"], dwi_data["bvals"], dwi_data["metadata"], out_dir=tmp_path
        )
    small = _save(np.ones((10, 10, 6)), tmp_path / "sub-01_dir-PA_run-2_epi.nii.gz")
    with pytest.raises(FieldmapError, match=r"run-2_epi\.nii\.gz has grid \(10, 10, 6\)"):
        write_topup_files(
            dwi_data["dwi_file"],
            dwi_data["bvals"],
            dwi_data["metadata"],
            fmap_files=[small],
            fmap_metadata=dwi_data["fmap_metadata"],
            out_dir=tmp_path,
        )
    # without TOPUP only the PE direction is needed: one acqparams row
    files = write_topup_files(
        dwi_data["dwi_file"],
        dwi_data["bvals"],
        {"PhaseEncodingDirection": "j-"},
        use_topup=False,
        out_dir=tmp_path,
    )
    assert Path(files["acqparams"]).read_text() == "0 -1 0 0.05\n"
    assert "imain" not in files


def test_topup_eddy_files_interface_names_raw_sidecar(dwi_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    node = TopupEddyFiles(
        in_file=str(dwi_data["dwi_file"]),
        source_file="/data/sub-07/dwi/sub-07_acq-multishell_dwi.nii.gz",
        in_bval=str(dwi_data["bval_file"]),
        metadata={"PhaseEncodingDirection": "j-"},
        fmap_files=[str(f) for f in dwi_data["fmap_epi_files"]],
        fmap_metadata=dwi_data["fmap_metadata"],
    )
    with pytest.raises(MissingMetadataError, match=r"^sub-07_acq-multishell_dwi\.json has"):
        node.run()


# -------------------------------------------------------------------- tool detection
def test_fsl_requested_but_missing(no_fsl):
    assert not env.fsl_available()
    with pytest.raises(env.FSLNotFoundError, match=r"install FSL .* or use --preproc mrtrix\.$"):
        init_dwi_preproc_wf(preproc="fsl")


def test_auto_without_fsl_logs_one_line(no_fsl, caplog):
    caplog.set_level(logging.DEBUG, logger="dkiharm")
    wf = init_dwi_preproc_wf(preproc="auto", has_rpe_fmap=True)
    records = [r for r in caplog.records if r.name.startswith("dkiharm")]
    assert len(records) == 1
    assert "skipping TOPUP and Eddy" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()
    assert not {"topup", "eddy"} & set(wf.list_node_names())

    caplog.clear()
    init_dwi_preproc_wf(preproc="mrtrix")
    assert not [r for r in caplog.records if r.name.startswith("dkiharm")]


def test_bad_arguments():
    with pytest.raises(DkiharmInputError, match="preproc='topup' is not a preprocessing mode"):
        init_dwi_preproc_wf(preproc="topup")
    with pytest.raises(DkiharmInputError, match="mask_method='bet' is unknown"):
        init_dwi_preproc_wf(preproc="none", mask_method="bet")
    with pytest.raises(DkiharmInputError, match="denoiser='lpca' is unknown"):
        init_dwi_preproc_wf(preproc="mrtrix", denoiser="lpca")


def test_mppca_denoiser_needs_only_mrdegibbs(no_fsl, monkeypatch, tmp_path):
    degibbs = shutil.which("mrdegibbs")
    hide_tools(monkeypatch, ("dwidenoise",))
    (tmp_path / "mrdegibbs").symlink_to(degibbs)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(
        env.ToolNotFoundError, match="dwidenoise not found on PATH; .* --denoiser mppca"
    ):
        init_dwi_preproc_wf(preproc="mrtrix", denoiser="dwidenoise")
    # mppca is the default denoiser
    wf = init_dwi_preproc_wf(preproc="mrtrix", mask_method="median_otsu", omp_nthreads=2)
    denoise = wf.get_node("denoise")
    assert type(denoise.interface).__name__ == "MPPCADenoise"
    assert denoise.interface.inputs.nthreads == 2
    assert ("denoise", "degibbs", "out_file", "in_file") in _edges(wf)
    assert ("denoise", "outputnode", "noise", "noise_file") in _edges(wf)


# ------------------------------------------------------------------- workflow graphs
def _edges(wf) -> set[tuple[str, str, str, str]]:
    return {
        (src.name, dst.name, s, d)
        for src, dst, data in wf._graph.edges(data=True)
        for s, d in data["connect"]
    }


def test_graph_mrtrix(no_fsl):
    wf = init_dwi_preproc_wf(preproc="mrtrix", mask_method="median_otsu", omp_nthreads=2)
    assert set(wf.list_node_names()) == {
        "inputnode",
        "denoise",
        "degibbs",
        "slice_axes",
        "mask_wf.inputnode",
        "mask_wf.mean_b0",
        "mask_wf.brain_mask",
        "mask_wf.outputnode",
        "outputnode",
    }
    edges = _edges(wf)
    assert ("inputnode", "denoise", "dwi_file", "in_file") in edges
    assert ("denoise", "degibbs", "out_file", "in_file") in edges
    assert ("slice_axes", "degibbs", "axes", "axes") in edges
    assert ("denoise", "outputnode", "noise", "noise_file") in edges
    assert ("degibbs", "outputnode", "out_file", "dwi_file") in edges
    assert ("inputnode", "outputnode", "bvec_file", "bvec_file") in edges
    denoise = wf.get_node("denoise")
    assert denoise.n_procs == 2 and denoise.interface.inputs.nthreads == 2


def test_graph_none_is_passthrough():
    wf = init_dwi_preproc_wf(preproc="none", mask_method="median_otsu")
    assert not {"denoise", "degibbs", "eddy"} & set(wf.list_node_names())
    edges = _edges(wf)
    for field in ("dwi_file", "bval_file", "bvec_file"):
        assert ("inputnode", "outputnode", field, field) in edges


def test_graph_fsl_without_fmap_skips_topup(fake_fsl, caplog):
    caplog.set_level(logging.INFO, logger="dkiharm")
    wf = init_dwi_preproc_wf(preproc="fsl", has_rpe_fmap=False)
    assert "eddy" in wf.list_node_names() and "topup" not in wf.list_node_names()
    assert wf.get_node("fsl_files").interface.inputs.use_topup is False
    assert any("Eddy without TOPUP" in r.getMessage() for r in caplog.records)


def test_fsl_cmdlines(fake_fsl, dwi_data, tmp_path, monkeypatch):
    """TOPUP/Eddy command lines rendered from the generated acquisition files."""
    monkeypatch.chdir(tmp_path)
    wf = init_dwi_preproc_wf(preproc="fsl", has_rpe_fmap=True, omp_nthreads=2)
    edges = _edges(wf)
    assert {
        ("degibbs", "eddy", "out_file", "in_file"),
        ("fsl_files", "topup", "imain", "in_file"),
        ("fsl_files", "topup", "acqparams", "encoding_file"),
        ("fsl_files", "topup", "config", "config"),
        ("fsl_files", "eddy", "acqparams", "in_acqp"),
        ("fsl_files", "eddy", "index", "in_index"),
        ("topup", "eddy", "out_fieldcoef", "in_topup_fieldcoef"),
        ("topup", "eddy", "out_movpar", "in_topup_movpar"),
        ("eddy", "outputnode", "out_rotated_bvecs", "bvec_file"),
        ("eddy", "outputnode", "out_corrected", "dwi_file"),
    } <= edges

    files = (
        TopupEddyFiles(
            in_file=str(dwi_data["dwi_file"]),
            in_bval=str(dwi_data["bval_file"]),
            metadata=dwi_data["metadata"],
            fmap_files=[str(f) for f in dwi_data["fmap_epi_files"]],
            fmap_metadata=dwi_data["fmap_metadata"],
        )
        .run()
        .outputs
    )
    assert Path(files.acqparams).read_text() == "0 -1 0 0.05\n0 -1 0 0.05\n0 1 0 0.05\n"

    topup = wf.get_node("topup").interface
    topup.inputs.in_file = files.imain
    topup.inputs.encoding_file = files.acqparams
    topup.inputs.config = files.config
    assert topup.cmdline == (
        f"topup --config=b02b0.cnf --datain={files.acqparams} --imain={files.imain} "
        "--out=topup_imain_base --iout=topup_imain_corrected.nii.gz "
        "--fout=topup_imain_field.nii.gz --jacout=jac --logout=topup_imain_topup.log "
        "--rbmout=xfm --dfout=warpfield"
    )

    for name in ("fieldcoef.nii.gz", "movpar.txt"):
        (tmp_path / f"topup_imain_base_{name}").touch()
    mask = _save(np.ones(SHAPE), tmp_path / "mask.nii.gz")
    eddy = wf.get_node("eddy").interface
    eddy.inputs.in_file = str(dwi_data["dwi_file"])
    eddy.inputs.in_bval = str(dwi_data["bval_file"])
    eddy.inputs.in_bvec = str(dwi_data["bvec_file"])
    eddy.inputs.in_acqp = files.acqparams
    eddy.inputs.in_index = files.index
    eddy.inputs.in_mask = str(mask)
    eddy.inputs.in_topup_fieldcoef = str(tmp_path / "topup_imain_base_fieldcoef.nii.gz")
    eddy.inputs.in_topup_movpar = str(tmp_path / "topup_imain_base_movpar.txt")
    assert eddy.cmdline == (
        f"eddy_openmp --flm=quadratic --ff=10.0 --acqp={files.acqparams} "
        f"--bvals={dwi_data['bval_file']} --bvecs={dwi_data['bvec_file']} "
        f"--imain={dwi_data['dwi_file']} --index={files.index} --mask={mask} "
        f"--topup={tmp_path / 'topup_imain_base'} --interp=spline --data_is_shelled "
        "--resamp=jac --niter=5 --nvoxhp=1000 "
        f"--out={tmp_path / 'eddy_corrected'} --repol --slm=none"
    )
    assert "--slspec" not in eddy.cmdline
    assert eddy.inputs.environ["OMP_NUM_THREADS"] == "2"


# ------------------------------------------------------------------ workflow runs
@pytest.mark.parametrize(
    ("preproc", "mask_method", "denoiser"),
    [("mrtrix", "dwi2mask", "dwidenoise"), ("auto", "median_otsu", "dwidenoise"),
     ("mrtrix", "dwi2mask", "mppca")],
)  # fmt: skip
def test_run_mrtrix(no_fsl, dwi_data, tmp_path, preproc, mask_method, denoiser):
    wf = init_dwi_preproc_wf(
        preproc=preproc, mask_method=mask_method, denoiser=denoiser, omp_nthreads=2
    )
    out, graph = _run(wf, dwi_data, tmp_path)

    for key in ("dwi_file", "mask_file", "b0_file", "noise_file"):
        assert Path(out[key]).exists(), key
    np.testing.assert_array_equal(np.loadtxt(out["bval_file"]), dwi_data["bvals"])
    np.testing.assert_allclose(np.loadtxt(out["bvec_file"]).T, dwi_data["bvecs"], atol=1e-6)

    truth, obj = dwi_data["truth"], dwi_data["object"]
    noisy = nb.load(dwi_data["dwi_file"]).get_fdata()
    denoised = nb.load(_node(graph, "denoise").result.outputs.out_file).get_fdata()
    final = nb.load(out["dwi_file"]).get_fdata()
    assert final.shape == noisy.shape

    def rmse(x):
        return np.sqrt(np.mean((x[obj] - truth[obj]) ** 2))

    assert rmse(denoised) < 0.8 * rmse(noisy)
    assert rmse(final) < 0.8 * rmse(noisy)
    # the denoiser's sigma estimate inside the object is near the simulated one
    noise = nb.load(out["noise_file"]).get_fdata()
    assert 0.5 * SIGMA < np.median(noise[obj]) < 1.5 * SIGMA

    mask = nb.load(out["mask_file"]).get_fdata() > 0
    assert _dice(mask, obj) > 0.8
    b0 = nb.load(out["b0_file"]).get_fdata()
    assert b0.shape == SHAPE and b0[obj].mean() > 5 * b0[~obj].mean()


def test_run_none_passthrough(dwi_data, tmp_path):
    wf = init_dwi_preproc_wf(preproc="none", mask_method="median_otsu")
    out, _ = _run(wf, dwi_data, tmp_path)
    assert out["dwi_file"] == str(dwi_data["dwi_file"])
    assert _dice(nb.load(out["mask_file"]).get_fdata() > 0, dwi_data["object"]) > 0.8


@pytest.mark.parametrize("has_rpe_fmap", [True, False])
def test_run_fsl_with_standin_tools(fake_fsl, dwi_data, tmp_path, has_rpe_fmap):
    """The FSL branch runs end to end (real MRtrix3, stand-in TOPUP/Eddy)."""
    wf = init_dwi_preproc_wf(preproc="fsl", has_rpe_fmap=has_rpe_fmap, mask_method="median_otsu")
    out, _ = _run(wf, dwi_data, tmp_path)

    assert out["dwi_file"].endswith("eddy_corrected.nii.gz")
    assert out["bvec_file"].endswith("eddy_corrected.eddy_rotated_bvecs")
    assert _dice(nb.load(out["mask_file"]).get_fdata() > 0, dwi_data["object"]) > 0.8
    eddy_call = (fake_fsl / "eddy.log").read_text()
    assert "--index=" in eddy_call and "--acqp=" in eddy_call
    assert ("--topup=" in eddy_call) is has_rpe_fmap
    assert (fake_fsl / "topup.log").exists() is has_rpe_fmap


def test_mask_wf_graph():
    wf = init_dwi_mask_wf(mask_method="dwi2mask", omp_nthreads=2)
    assert ("inputnode", "brain_mask", "bvec_file", "in_bvec") in _edges(wf)
    assert wf.get_node("brain_mask").interface.inputs.out_file == "brainmask.nii.gz"
