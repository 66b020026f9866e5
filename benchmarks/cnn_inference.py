"""Time and memory of CNN harmonization on a full-size scan, and of one training epoch.

Scan: 110x110x70 voxels (paper Table 1 matrix, 70 slices), 96 volumes (6 b0 + 3 shells x
30 directions, the reference protocol of Table 1), an ellipsoidal brain mask of ~40 % of
the voxels, the paper's network (150 channels, random weights). Training: two such
subjects, one epoch over all their brain voxels. ``--network-input dwi+fit`` times the
network that also takes the scan's own eight DKI maps (random here) and corrects them.

Run: ``OMP_NUM_THREADS=2 python benchmarks/cnn_inference.py [--threads 2] [--dense]
[--network-input dwi|dwi+fit]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import numpy as np
import psutil
import torch

from dkiharm_nipype.cnn.data import (
    FIT_CLIP,
    TargetScaling,
    TrainingSubject,
    fit_channels,
    make_training_sets,
    normalize_dwi,
)
from dkiharm_nipype.cnn.infer import harmonize_scan
from dkiharm_nipype.cnn.model import HierarchicalDKINet
from dkiharm_nipype.cnn.modelio import ModelCard, scan_fingerprint
from dkiharm_nipype.cnn.train import fit

SHAPE = (110, 110, 70)
BVALS = np.r_[np.zeros(6), np.repeat([1000.0, 2000.0, 3000.0], 30)]


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.increase_mb = (self.peak - self.base) / 2**20


def synthetic_scan(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"), -1)
    mask = (grid**2 / np.array([0.93, 0.93, 0.93]) ** 2).sum(-1) <= 1.0
    adc = rng.uniform(0.3e-3, 2.5e-3, size=(*SHAPE, 1)).astype(np.float32)
    dwi = 1000.0 * np.exp(-BVALS.astype(np.float32) * adc)
    dwi += rng.normal(0, 20.0, size=dwi.shape).astype(np.float32)
    return dwi.astype(np.float32), mask


def fit_maps(seed: int) -> np.ndarray:
    """Stand-in for a scan's own eight DKI maps (``--network-input dwi+fit``)."""
    return np.random.default_rng(seed).random((*SHAPE, 8), dtype=np.float32)


def bench_model(network_input: str = "dwi") -> tuple[HierarchicalDKINet, ModelCard]:
    """The paper's network (seeded random weights) and a card for the synthetic protocol."""
    torch.manual_seed(0)
    residual = 8 if network_input == "dwi+fit" else 0
    model = HierarchicalDKINet(int((BVALS > 50).sum()) + residual, residual_channels=residual)
    normalization = {"b0_threshold": 50.0, "clip": [0.0, 1.5]}
    if residual:
        normalization["fit_maps"] = {"scaling": "target_scaling", "clip": FIT_CLIP}
    card = ModelCard(
        scanner="bench",
        protocol=scan_fingerprint(BVALS, voxel_size=(2, 2, 2), matrix=SHAPE, echo_time=75.0),
        normalization=normalization,
        target_scaling=TargetScaling.fit([], [], mode="units").to_dict(),
    )
    return model.eval(), card


def training_sets(network_input: str = "dwi"):
    """Training and validation voxels of two synthetic full-size subjects (random labels)."""
    labels = np.random.default_rng(1).random((*SHAPE, 8), dtype=np.float32)
    scaling = TargetScaling.fit([labels], [np.ones(SHAPE, bool)])
    subjects = []
    for seed in (1, 2):
        scan, m = synthetic_scan(seed)
        dwi = normalize_dwi(scan, BVALS)
        del scan
        if network_input == "dwi+fit":
            dwi = np.concatenate([dwi, fit_channels(fit_maps(seed), scaling, m)], axis=-1)
        subjects.append(TrainingSubject(dwi, labels, m))
    return make_training_sets(subjects, scaling=scaling, val_fraction=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-voxels", type=int, default=4096)
    parser.add_argument("--dense", action="store_true", help="also time the dense forward")
    parser.add_argument("--no-train", action="store_true", help="skip the training epoch")
    parser.add_argument("--network-input", choices=("dwi", "dwi+fit"), default="dwi")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dwi, mask = synthetic_scan(0)
    print(f"scan {dwi.shape}, mask {mask.mean():.1%} of voxels ({mask.sum()} voxels)")
    model, card = bench_model(args.network_input)
    own_maps = fit_maps(0) if args.network_input == "dwi+fit" else None
    print(f"network input {args.network_input}: {model.in_channels} channels")

    cpu_seconds = []

    def run(**kw) -> float:
        start, cpu = time.perf_counter(), time.process_time()
        harmonize_scan(
            model, card, dwi, BVALS, mask, batch_voxels=args.batch_voxels, fit_maps=own_maps, **kw
        )
        cpu_seconds.append(time.process_time() - cpu)
        return time.perf_counter() - start

    print(f"load average before: {os.getloadavg()[0]:.2f} (others' processes skew wall time)")
    run()  # warm-up: allocator, MKL kernels
    with PeakRSS() as mem:
        times = [run() for _ in range(args.repeats)]
    print(
        f"harmonize_scan ({args.threads} threads): median {np.median(times):.2f} s "
        f"(min {min(times):.2f} s over {args.repeats}; process CPU {min(cpu_seconds[1:]):.2f} s)"
        f", peak RSS +{mem.increase_mb:.0f} MiB above the {mem.base / 2**20:.0f} MiB holding "
        "the scan"
    )
    with PeakRSS() as mem:
        t_mc = run(mc_samples=20)
    print(f"harmonize_scan mc_samples=20: {t_mc:.2f} s, peak RSS +{mem.increase_mb:.0f} MiB")

    if args.dense:
        x = torch.from_numpy(normalize_dwi(dwi, BVALS)).permute(3, 0, 1, 2)[None]
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
        print(f"dense forward, whole field of view: {time.perf_counter() - start:.2f} s")
        del x

    if not args.no_train:
        train, val = training_sets(args.network_input)
        with PeakRSS() as mem:
            result = fit(model, train, val, epochs=1, batch_size=1024, patience=1)
        rec = result.history[0]
        print(
            f"training epoch, 2 subjects ({len(train)} train + {len(val)} val voxels, batch "
            f"1024): {rec['seconds']:.1f} s, peak RSS +{mem.increase_mb:.0f} MiB"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak RSS of the whole benchmark process (scans, training sets, model): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
