"""Benchmark of MP-PCA denoising: dkiharm's torch MP-PCA against MRtrix3 ``dwidenoise``.

One full-size phantom scan (``paper-dataset1``, subject 1, 110x110x70; ``--scanner``
picks the scanner, default A: 6 b0 + 30 + 30 directions) is denoised inside its brain
mask by

* MRtrix3 ``dwidenoise -mask`` (5x5x5 window, exp2 estimator, one window per voxel),
  the mask being the phantom's true brain mask,
* dkiharm ``mppca`` with windows every 2 and every 3 voxels (the BIDS-App default),

with the same number of threads, and each result (and the raw scan) is fitted with the
pipeline's IRLLS DKI fit; the table gives time, the ratio to ``dwidenoise``, the median
noise level and the NRMSE of the fitted maps to the phantom's truth in white matter
(probability > 0.9).

A second table removes Gibbs ringing from the ``mppca`` (stride 3) output, in the acquired
(axial) slices, with MRtrix3 ``mrdegibbs`` and with DIPY's ``gibbs_removal`` (the same
local subvoxel-shift method of Kellner et al. 2016), same threads, and scores the fits alike.

Run: ``.venv/bin/python benchmarks/denoise.py [--phantom ROOT] [--scanner A] [--threads 2]
[--voxel-mm 3]`` (``ROOT`` holds a generated ``paper-dataset1``; without it one subject is
generated, ~1 min at full size; ``--voxel-mm 3`` generates the same field of view on a
coarser grid, 73x73x47, for a quick run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from dkiharm_nipype.dki.fit import fit_dki
from dkiharm_nipype.evaluation.scores import nrmse
from dkiharm_nipype.preproc.denoise import mppca

MAPS = ("md", "fa", "mk", "ak", "rk", "kfa")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", type=Path, help="folder holding paper-dataset1")
    parser.add_argument("--scanner", default="A")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--voxel-mm", type=float, help="generate on a coarser grid (mm)")
    args = parser.parse_args(argv)
    root = args.phantom
    if root is None:
        from dkiharm_nipype.phantom import generate

        root = Path(tempfile.mkdtemp(prefix="dkiharm-denoise-"))
        print(f"generating paper-dataset1 into {root} ...", flush=True)
        extra = {"voxel_mm": args.voxel_mm} if args.voxel_mm else {}
        generate(root, preset="paper-dataset1", seed=0, subjects=1, overwrite=True, **extra)
    stem = f"sub-01_ses-{args.scanner}_run-1"
    dwi_file = root / "sub-01" / f"ses-{args.scanner}" / "dwi" / f"{stem}_dwi.nii.gz"
    truth = root / "derivatives" / "phantom-truth" / "sub-01" / f"ses-{args.scanner}" / "dwi"
    truth_prefix = truth / f"{stem}_space-dwi_"
    img = nb.load(dwi_file)
    dwi = np.asarray(img.dataobj, dtype=np.float32)
    bvals = np.loadtxt(str(dwi_file).replace(".nii.gz", ".bval"))
    bvecs = np.loadtxt(str(dwi_file).replace(".nii.gz", ".bvec"))
    mask = np.asarray(nb.load(f"{truth_prefix}desc-brain_mask.nii.gz").dataobj) > 0
    wm = np.asarray(nb.load(f"{truth_prefix}label-WM_probseg.nii.gz").dataobj) > 0.9
    truths = {}
    for k in MAPS:
        path = f"{truth_prefix}model-dki_param-{k}_desc-truth_dwimap.nii.gz"
        truths[k] = np.asarray(nb.load(path).dataobj)
    torch.set_num_threads(args.threads)
    print(f"{dwi_file.name}: {dwi.shape}, {int(mask.sum())} brain voxels, {args.threads} threads")

    results = {"raw": (None, dwi, None)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nb.Nifti1Image(dwi, img.affine).to_filename(tmp / "dwi.nii")
        nb.Nifti1Image(mask.astype(np.uint8), img.affine).to_filename(tmp / "mask.nii")
        start = time.perf_counter()
        subprocess.run(
            ["dwidenoise", "-nthreads", str(args.threads), "-mask", str(tmp / "mask.nii"),
             "-noise", str(tmp / "sigma.nii"), str(tmp / "dwi.nii"), str(tmp / "dn.nii")],
            check=True, env={**os.environ, "MRTRIX_QUIET": "1"},
        )  # fmt: skip
        seconds = time.perf_counter() - start
        results["MRtrix3 dwidenoise"] = (
            seconds,
            np.asarray(nb.load(tmp / "dn.nii").dataobj, dtype=np.float32),
            np.asarray(nb.load(tmp / "sigma.nii").dataobj),
        )
    for stride in (2, 3):
        start = time.perf_counter()
        res = mppca(dwi, mask, stride=stride)
        results[f"dkiharm mppca, stride {stride}"] = (
            time.perf_counter() - start,
            res.denoised,
            res.sigma,
        )
    reference = results["MRtrix3 dwidenoise"][0]

    def scores(data) -> list[str]:
        fit = fit_dki(data, bvals, bvecs, mask=mask, method="irlls", constraints=True)
        maps = fit.metrics(MAPS)
        return [f"{nrmse(maps[k], truths[k], wm):.3f}" for k in MAPS]

    print(
        "\n| denoiser | seconds | x faster than dwidenoise | median sigma | "
        + " | ".join(f"NRMSE {k.upper()}" for k in MAPS)
        + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(MAPS))
    for name, (seconds, data, sigma) in results.items():
        cells = scores(data)
        timing = ["-", "-"]
        if seconds is not None:
            timing = [f"{seconds:.1f}", f"{reference / seconds:.1f}"]
        sig = "-" if sigma is None else f"{np.median(sigma[mask]):.1f}"
        print(f"| {name} | " + " | ".join([*timing, sig, *cells]) + " |")
    degibbs(results["dkiharm mppca, stride 3"][1], img.affine, args.threads, scores)


def degibbs(dwi: np.ndarray, affine: np.ndarray, threads: int, scores) -> None:
    """Gibbs-ringing removal of ``dwi`` by ``mrdegibbs`` and DIPY, timed and scored."""
    from dipy.denoise.gibbs import gibbs_removal

    results = {"none": (None, dwi)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nb.Nifti1Image(dwi, affine).to_filename(tmp / "dn.nii")
        start = time.perf_counter()
        subprocess.run(
            ["mrdegibbs", "-nthreads", str(threads), "-axes", "0,1", str(tmp / "dn.nii"),
             str(tmp / "unr.nii")],
            check=True, env={**os.environ, "MRTRIX_QUIET": "1"},
        )  # fmt: skip
        seconds = time.perf_counter() - start
        results["MRtrix3 mrdegibbs"] = (
            seconds,
            np.asarray(nb.load(tmp / "unr.nii").dataobj, dtype=np.float32),
        )
    start = time.perf_counter()
    unr = gibbs_removal(dwi.copy(), slice_axis=2, n_points=3, num_processes=threads)
    results["DIPY gibbs_removal"] = (time.perf_counter() - start, unr.astype(np.float32))
    reference = results["MRtrix3 mrdegibbs"][0]
    print("\n| Gibbs removal (after mppca) | seconds | x faster than mrdegibbs | "
          + " | ".join(f"NRMSE {k.upper()}" for k in MAPS) + " |")  # fmt: skip
    print("|---|---:|---:|" + "---:|" * len(MAPS))
    for name, (seconds, data) in results.items():
        timing = ["-", "-"]
        if seconds is not None:
            timing = [f"{seconds:.1f}", f"{reference / seconds:.2f}"]
        print(f"| {name} | " + " | ".join([*timing, *scores(data)]) + " |", flush=True)


if __name__ == "__main__":
    main()
