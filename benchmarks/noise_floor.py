"""Does the half-split noise floor predict a real rescan, through the DKI fit?

The evaluation's noise floor (``evaluation.scores.noise_floor``) takes two interleaved
halves of the reference scan's directions, fits each with the pipeline's fit and scales
their difference to one full scan's noise (``/ 2``: ``/ sqrt(2)`` for two independent
halves, ``/ sqrt(2)`` for each half's twice larger noise variance). The
scaling is exact for a linear estimator; the DKI fit is not linear (log signal, IRLLS,
constraints). Here the same voxels (plausible WM and GM tensors,
``dki.simulate.random_tissue_tensors``) are acquired twice with independent Rician noise
(a rescan) on a protocol, and the noise the rescan measures (its NRMSE over sqrt(2): one
scan's noise) is compared with the half-split floor of one of the scans.

Run: ``.venv/bin/python benchmarks/noise_floor.py [--snr 25] [--voxels 20000]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from dkiharm_nipype.dki.design import dki_signal
from dkiharm_nipype.dki.fit import fit_dki
from dkiharm_nipype.dki.halves import fit_halves
from dkiharm_nipype.dki.simulate import random_tissue_tensors
from dkiharm_nipype.evaluation.scores import noise_floor, nrmse

MAPS = ("md", "fa", "mk", "ak", "rk", "kfa")
PROTOCOLS = {
    # the tiny phantom's reference D (2 b0, 16 directions at b = 1000, 2000, 3000)
    "3 x 16": ((1000, 2000, 3000), 16, 2),
    # a common clinical DKI protocol
    "2 x 30": ((1000, 2000), 30, 4),
    "3 x 30": ((1000, 2000, 3000), 30, 6),
}


def protocol(shells, n_dirs, n_b0, rng) -> tuple[np.ndarray, np.ndarray]:
    bvals = [np.zeros(n_b0)]
    bvecs = [np.tile([1.0, 0, 0], (n_b0, 1))]
    for b in shells:
        v = rng.normal(size=(n_dirs, 3))
        bvals.append(np.full(n_dirs, float(b)))
        bvecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.concatenate(bvals), np.concatenate(bvecs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=25.0, help="b0 SNR")
    parser.add_argument("--voxels", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    dt, kt = random_tissue_tensors(args.voxels, rng=rng, kind="mixed")
    print(f"SNR {args.snr:g} at b0, {args.voxels} voxels (half WM, half GM), IRLLS + constraints")
    print("| protocol | map | rescan NRMSE / sqrt(2) | half-split floor | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, (shells, n_dirs, n_b0) in PROTOCOLS.items():
        bvals, bvecs = protocol(shells, n_dirs, n_b0, rng)
        clean = dki_signal(np.full(args.voxels, 1000.0), dt, kt, bvals, bvecs)
        sigma = 1000.0 / args.snr

        def scan(clean=clean, sigma=sigma):
            noise = rng.normal(0, sigma, (2, *clean.shape))
            return np.hypot(clean + noise[0], noise[1])[:, None, None, :].astype(np.float32)

        mask = np.ones((args.voxels, 1, 1), bool)
        first, second = scan(), scan()
        fits = [
            fit_dki(s, bvals, bvecs, mask=mask, constraints=True).metrics(MAPS)
            for s in (first, second)
        ]
        halves = fit_halves(first, bvals, bvecs, mask)
        for k in MAPS:
            rescan = nrmse(fits[1][k], fits[0][k]) / np.sqrt(2)
            floor = noise_floor(halves[0][k], halves[1][k], fits[0][k], kind="halves")
            print(f"| {name} | {k.upper()} | {rescan:.4f} | {floor:.4f} | {floor / rescan:.2f} |")


if __name__ == "__main__":
    main()
