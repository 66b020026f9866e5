"""Benchmark of DKI fits: speed, accuracy to truth and implausible voxels.

Synthesizes one realistic scan (64x64x40, 6 b=0 + 20 directions at b = 1000, 2000 and
3000 s/mm², Rician noise SNR 25 at b = 0, tensors from two-compartment white/grey matter
models, and slice dropouts (signal x0.3) in 4 slices of 3 volumes), then fits it with

* dkiharm IRLLS (with and without the plausibility projection) and dkiharm WLS,
* dipy WLS and dipy RWLS (robust iterative WLS with Geman-McClure weights and outlier
  rejection, ``fit_method="RWLS"``; run on a random subset because it is slow),
* MRtrix3 ``dwi2tensor -dkt`` (IWLS, 2 iterations; its rate is the fit only, maps from
  :func:`dkiharm_nipype.dki.maps.dki_metrics`).

Rates are brain voxels per second including the eight maps (MD, AD, RD, FA, MK, AK, RK,
KFA) unless noted. NRMSE = RMSE / mean(truth) over white matter. Implausible: MK < 0 or
MK > 3 over the brain.

By default the scan is the phantom's reference-scanner scan of ``paper-dataset1`` (subject
1, Prisma-like, 110x110x70, 6 b0 + 30 directions at b = 1000/2000/3000, generated on the
fly or read with ``--phantom ROOT``), scored against the phantom's truth maps in white
matter; ``--synthetic`` uses the synthetic scan above instead.

Run: ``.venv/bin/python benchmarks/dki_fit.py [--phantom ROOT | --synthetic | --quick]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from dkiharm_nipype.dki.design import dki_signal
from dkiharm_nipype.dki.fit import fit_dki
from dkiharm_nipype.dki.maps import ALL_METRICS, dki_metrics
from dkiharm_nipype.dki.simulate import random_tissue_tensors

KURTOSIS_MAPS = ("mk", "ak", "rk", "kfa")


def synthesize(shape=(64, 64, 40), snr=25.0, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt(((grid / np.array([0.9, 0.9, 0.85])) ** 2).sum(-1))
    brain = radius < 1.0
    wm = radius < 0.6
    n = int(brain.sum())
    dt = np.zeros(shape + (6,))
    kt = np.zeros(shape + (15,))
    n_wm = int(wm.sum())
    dt[wm], kt[wm] = random_tissue_tensors(n_wm, rng=rng, kind="wm")
    gm = brain & ~wm
    dt[gm], kt[gm] = random_tissue_tensors(n - n_wm, rng=rng, kind="gm")

    dirs = []
    for _ in range(3):
        g = rng.normal(size=(20, 3))
        dirs.append(g / np.linalg.norm(g, axis=1, keepdims=True))
    bvals = np.r_[np.zeros(6), np.repeat([1000.0, 2000.0, 3000.0], 20)]
    bvecs = np.concatenate([np.zeros((6, 3)), *dirs])
    s0 = 1000.0
    signal = np.zeros(shape + (bvals.size,))
    signal[brain] = dki_signal(np.full(n, s0), dt[brain], kt[brain], bvals, bvecs)
    sigma = s0 / snr
    noise = rng.normal(0, sigma, signal.shape) + 1j * rng.normal(0, sigma, signal.shape)
    signal = np.abs(signal + noise)
    # Slice dropouts from motion: 4 slices in each of 3 diffusion-weighted volumes.
    for vol in rng.choice(np.arange(6, bvals.size), size=3, replace=False):
        for z in rng.choice(shape[2], size=4, replace=False):
            signal[:, :, z, vol] *= 0.3
    return signal.astype(np.float32), bvals, bvecs, brain, wm, dt, kt


def load_phantom(root=None, seed=0):
    """Subject 1's reference-scanner scan (Prisma-like, 110x110x70x96) of paper-dataset1.

    Returns the same tuple as :func:`synthesize` but with truth maps instead of tensors.
    """
    from dkiharm_nipype.phantom import generate

    if root is None:
        root = Path(tempfile.mkdtemp()) / "paper-dataset1"
        print("generating paper-dataset1, subject 1, scanner D ...", flush=True)
        generate(root, preset="paper-dataset1", seed=seed, subjects=1, scanners=["D"])
    root = Path(root)
    dwi = sorted(root.glob("sub-*/ses-D/dwi/*_run-1_dwi.nii.gz"))[0]
    stem = dwi.name.removesuffix("_dwi.nii.gz")
    truth_dir = root / "derivatives" / "phantom-truth" / dwi.relative_to(root).parent
    signal = nb.load(dwi).get_fdata(dtype=np.float32)
    bvals = np.loadtxt(str(dwi).replace(".nii.gz", ".bval"))
    bvecs = np.loadtxt(str(dwi).replace(".nii.gz", ".bvec")).T
    brain = nb.load(truth_dir / f"{stem}_space-dwi_desc-brain_mask.nii.gz").get_fdata() > 0
    wm = nb.load(truth_dir / f"{stem}_space-dwi_label-WM_probseg.nii.gz").get_fdata() > 0.9
    truth = {
        k: nb.load(
            truth_dir / f"{stem}_space-dwi_model-dki_param-{k}_desc-truth_dwimap.nii.gz"
        ).get_fdata()
        for k in ALL_METRICS
    }
    return signal, bvals, bvecs, brain, wm, truth


def score(maps, truth, brain, wm, select=None):
    sel_wm = wm if select is None else wm & select
    sel_brain = brain if select is None else brain & select
    row = {}
    for name in KURTOSIS_MAPS:
        err = maps[name][sel_wm] - truth[name][sel_wm]
        row[name] = np.sqrt(np.mean(err**2)) / np.mean(truth[name][sel_wm])
    mk = maps["mk"][sel_brain]
    row["implausible"] = float(np.mean((mk < 0) | (mk > 3)))
    return row


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Clock:
    """Wall and CPU time of a block (CPU time is robust to other jobs on the machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def run_dkiharm(signal, bvals, bvecs, brain, method, constraints, threads):
    clock = Clock().__enter__()
    fit = fit_dki(
        signal,
        bvals,
        bvecs,
        mask=brain,
        method=method,
        constraints=constraints,
        n_threads=threads,
    )
    maps = fit.metrics(ALL_METRICS)
    clock.__exit__()
    return maps, clock


def run_dipy(signal, bvals, bvecs, mask, fit_method):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    model = DiffusionKurtosisModel(gradient_table(bvals, bvecs=bvecs), fit_method=fit_method)
    with Clock() as clock:
        fit = model.fit(signal, mask=mask)
        maps = {"md": fit.md, "ad": fit.ad, "rd": fit.rd, "fa": fit.fa, "kfa": fit.kfa}
        maps.update(mk=fit.mk(), ak=fit.ak(), rk=fit.rk())
    return maps, clock


def run_mrtrix(signal, bvals, bvecs, brain, threads):
    """dwi2tensor -dkt; returns maps and the fit time (file writing excluded)."""
    if shutil.which("dwi2tensor") is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        affine = np.eye(4)  # identity: scanner and voxel axes agree for the -grad table
        nb.Nifti1Image(signal, affine).to_filename(tmp / "dwi.nii")
        nb.Nifti1Image(brain.astype(np.uint8), affine).to_filename(tmp / "mask.nii")
        np.savetxt(tmp / "grad.b", np.c_[bvecs, bvals], fmt="%.8f")
        env = dict(os.environ, MRTRIX_QUIET="1")
        cmd = ["dwi2tensor", str(tmp / "dwi.nii"), str(tmp / "dt.nii"), "-dkt"]
        cmd += [str(tmp / "kt.nii"), "-grad", str(tmp / "grad.b"), "-mask"]
        cmd += [str(tmp / "mask.nii"), "-nthreads", str(threads), "-force"]
        with Clock() as clock:
            subprocess.run(cmd, check=True, env=env)
        dt_mr = nb.load(tmp / "dt.nii").get_fdata()
        kt_mr = nb.load(tmp / "kt.nii").get_fdata()
    # MRtrix D11 D22 D33 D12 D13 D23 -> dipy Dxx Dxy Dyy Dxz Dyz Dzz
    dt = dt_mr[..., [0, 3, 1, 4, 5, 2]]
    # MRtrix W1112 W1113 W1222 W1333 W2223 W2333 -> dipy xxxy xxxz xyyy yyyz xzzz yzzz
    kt = kt_mr[..., [0, 1, 2, 3, 4, 5, 7, 6, 8, 9, 10, 11, 12, 13, 14]]
    maps = {k: np.zeros(brain.shape) for k in ALL_METRICS}
    values = dki_metrics(dt[brain], kt[brain])
    for k in ALL_METRICS:
        maps[k][brain] = values[k]
    return maps, clock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x32x20 synthetic scan")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="64x64x40 synthetic scan with slice dropouts instead of the phantom",
    )
    parser.add_argument("--phantom", type=Path, help="an existing paper-dataset1 phantom root")
    parser.add_argument("--rwls-voxels", type=int, default=3000, help="dipy RWLS subset size")
    parser.add_argument(
        "--no-dipy", action="store_true", help="skip dipy (slow): dkiharm and MRtrix3 only"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for dkiharm and MRtrix (dipy: 1)"
    )
    args = parser.parse_args(argv)
    if args.quick or args.synthetic:
        shape = (32, 32, 20) if args.quick else (64, 64, 40)
        signal, bvals, bvecs, brain, wm, dt, kt = synthesize(shape)
        truth = {k: np.zeros(shape) for k in ALL_METRICS}
        values = dki_metrics(dt[brain], kt[brain])
        for k in ALL_METRICS:
            truth[k][brain] = values[k]
    else:
        signal, bvals, bvecs, brain, wm, truth = load_phantom(args.phantom)
        shape = brain.shape
    n = int(brain.sum())
    print(f"scan {shape + (bvals.size,)}, {n} brain voxels, {int(wm.sum())} WM voxels")
    print(f"threads: {args.threads}; load average before: {os.getloadavg()}")

    rows = []

    def add(label, maps, clock, note="", n_vox=n, select=None):
        rates = (n_vox / clock.wall, n_vox / clock.cpu)
        rows.append((label, rates, score(maps, truth, brain, wm, select), note))
        print(f"  done: {label} ({clock.wall:.1f} s wall, {clock.cpu:.1f} s CPU)", flush=True)

    for label, method, constraints in (
        ("dkiharm IRLLS + constraints", "irlls", True),
        ("dkiharm IRLLS", "irlls", False),
        ("dkiharm WLS", "wls", False),
    ):
        mid = shape[0] // 2  # warm-up on one slab
        run_dkiharm(
            signal[mid : mid + 1],
            bvals,
            bvecs,
            brain[mid : mid + 1],
            method,
            constraints,
            args.threads,
        )
        add(label, *run_dkiharm(signal, bvals, bvecs, brain, method, constraints, args.threads))
    if not args.no_dipy:
        add("dipy WLS", *run_dipy(signal, bvals, bvecs, brain, "WLS"))

    rng = np.random.default_rng(1)
    subset = np.zeros(shape, dtype=bool)
    idx = np.flatnonzero(brain)
    subset.flat[rng.choice(idx, size=min(args.rwls_voxels, idx.size), replace=False)] = True
    try:
        if args.no_dipy:
            raise RuntimeError("skipped (--no-dipy)")
        maps, clock = run_dipy(signal, bvals, bvecs, subset, "RWLS")
        add(
            "dipy RWLS (robust)",
            maps,
            clock,
            f"{int(subset.sum())} random voxels",
            int(subset.sum()),
            subset,
        )
    except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
        print(f"  dipy RWLS failed: {err}")
    maps, clock = run_mrtrix(signal, bvals, bvecs, brain, args.threads)
    if maps is not None:
        add("MRtrix3 dwi2tensor -dkt", maps, clock, "rate: fit only (+ file I/O)")

    print()
    print(f"load average after: {os.getloadavg()}")
    mrtrix = {label: r for label, r, _, _ in rows}.get("MRtrix3 dwi2tensor -dkt")
    dipy_wls = {label: r for label, r, _, _ in rows}.get("dipy WLS")
    print()
    print(
        "| method | voxels/s (wall) | voxels per CPU-s | x dipy WLS (CPU) | x MRtrix3 (CPU) "
        "| NRMSE MK | NRMSE AK | NRMSE RK | NRMSE KFA | MK<0 or >3 | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, (wall, cpu), s, note in rows:
        vs_dipy = f"{cpu / dipy_wls[1]:.1f}" if dipy_wls else "-"
        vs_mr = f"{cpu / mrtrix[1]:.2f}" if mrtrix else "-"
        print(
            f"| {label} | {wall:,.0f} | {cpu:,.0f} | {vs_dipy} | {vs_mr} | {s['mk']:.3f} | "
            f"{s['ak']:.3f} | {s['rk']:.3f} | {s['kfa']:.3f} | "
            f"{100 * s['implausible']:.2f} % | {note} |"
        )


if __name__ == "__main__":
    main()
