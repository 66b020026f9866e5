"""README's reuse example runs as written: a plain node -> dkiharm's nodes -> a DataSink."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _reuse_example() -> str:
    text = README.read_text()
    section = text[text.index("## Reusing the pieces in your own Nipype pipeline") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _train_scanner_a(tiny_bids: Path, models: Path) -> None:
    """A small scanner-A network, as a group run would leave in ``out/models``."""
    from dkiharm_nipype.interfaces.dki import FitDKI
    from dkiharm_nipype.interfaces.harmonize import TrainHarmonizer

    raw = tiny_bids / "sub-01" / "ses-A" / "dwi" / "sub-01_ses-A_run-2_dwi"
    work = models.parent / "train"
    work.mkdir(parents=True)
    img = nb.load(f"{raw}.nii.gz")
    mask = work / "mask.nii.gz"
    nb.Nifti1Image((img.get_fdata()[..., 0] > 0.1 * img.get_fdata()[..., 0].max()).astype(
        np.uint8), img.affine).to_filename(mask)  # fmt: skip
    files = {"dwi_file": f"{raw}.nii.gz", "bval_file": f"{raw}.bval", "bvec_file": f"{raw}.bvec"}
    fit = FitDKI(**files, mask_file=str(mask)).run(cwd=str(work)).outputs
    labels = [getattr(fit, f"{m}_file") for m in ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")]
    res = TrainHarmonizer(
        dwi_files=[files["dwi_file"]], bval_files=[files["bval_file"]],
        bvec_files=[files["bvec_file"]], mask_files=[str(mask)], label_files=[labels],
        sidecar_files=[f"{raw}.json"], scanner="A", epochs=2, samples_per_epoch=2000,
        out_name="scanner-A",
    ).run(cwd=str(work)).outputs  # fmt: skip
    models.mkdir(parents=True)
    shutil.copyfile(res.weights_file, models / "scanner-A_harmonizer.safetensors")
    shutil.copyfile(res.card_file, models / "scanner-A_harmonizer.json")


def test_readme_reuse_example_runs(tiny_bids, tmp_path, monkeypatch):
    code = _reuse_example()
    # a complete pipeline: a plain Nipype node, dkiharm's nodes, a sink, all connected, run
    assert "niu.IdentityInterface" in code and "nio.DataSink" in code
    assert "wf.connect(" in code and "wf.run()" in code
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").symlink_to(tiny_bids)
    _train_scanner_a(tiny_bids, tmp_path / "out" / "models")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    derivatives = tmp_path / "derivatives"
    fit_mk = sorted((derivatives / "fit").glob("*mk*.nii.gz"))
    harmonized_mk = sorted((derivatives / "harmonized").glob("*mk*.nii.gz"))
    assert len(fit_mk) == 1 and len(harmonized_mk) == 1
    assert sorted(p.name for p in (derivatives / "harmonized").iterdir()) == sorted(
        p.name for p in (derivatives / "harmonized").glob("*.nii.gz")
    )
    # real maps: the harmonized MK is finite, inside the brain, on the scan's grid
    fit_img, harm_img = nb.load(fit_mk[0]), nb.load(harmonized_mk[0])
    assert harm_img.shape == fit_img.shape == nb.load(tiny_bids / "sub-01" / "ses-A" / "dwi"
                                                      / "sub-01_ses-A_run-1_dwi.nii.gz").shape[:3]
    harm = harm_img.get_fdata()
    assert np.isfinite(harm).all() and (harm != 0).sum() > 100
