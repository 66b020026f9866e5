"""CUDA against CPU for the harmonization CNN: inference on a full-size scan, training epochs.

Same synthetic full-size scan and network as ``cnn_inference.py`` (110x110x70, 96 volumes,
the paper's 150-channel network), timed on one machine in one run:

* ``harmonize_scan`` on the GPU for several chunk sizes (host -> device copy and the copy of
  the maps back included), with and without 20 MC-dropout samples, and on ``--cpu-threads``
  CPU threads of the same machine; peak GPU memory; the largest difference between the CPU
  and GPU maps of the same weights.
* Training epochs of the group level's defaults (200,000 voxels per epoch, batch 1,024) on
  two such subjects, on the GPU and on the CPU; and whether two seeded GPU runs agree.

Needs only numpy, torch, safetensors, scipy and psutil (no Nipype), so it runs on a bare
GPU machine: ``PYTHONPATH=. python benchmarks/cnn_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cnn_inference import BVALS, bench_model, synthetic_scan, training_sets  # noqa: E402

from dkiharm_nipype.cnn.infer import harmonize_scan  # noqa: E402
from dkiharm_nipype.cnn.model import HierarchicalDKINet  # noqa: E402
from dkiharm_nipype.cnn.train import fit  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up: allocator, cuBLAS/cuDNN handles, MKL kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--epochs", type=int, default=3, help="timed GPU epochs")
    parser.add_argument("--cpu-epochs", type=int, default=1)
    parser.add_argument("--samples-per-epoch", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.cpu_threads)
    out: dict = {"torch": torch.__version__, "cpu_threads": args.cpu_threads}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(out))

    dwi, mask = synthetic_scan(0)
    model, card = bench_model()
    print(f"scan {dwi.shape}, {int(mask.sum())} brain voxels")

    def infer(device, chunk, mc=0):
        return harmonize_scan(
            model, card, dwi, BVALS, mask, device=device, batch_voxels=chunk, mc_samples=mc
        )

    cpu_maps, _ = infer("cpu", 4096)
    med, best = _timed(lambda: infer("cpu", 4096), max(1, args.repeats // 2))
    out["cpu_infer_s"] = med
    print(
        f"inference CPU {args.cpu_threads} threads, chunk 4096: median {med:.2f} s "
        f"(min {best:.2f})"
    )
    for chunk in args.chunks:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        med, best = _timed(lambda c=chunk: infer(dev, c), args.repeats)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
        out[f"gpu_infer_s_chunk{chunk}"] = med
        out[f"gpu_peak_mib_chunk{chunk}"] = peak
        print(
            f"inference {dev} chunk {chunk}: median {med:.3f} s (min {best:.3f}), "
            f"peak GPU memory {peak:.0f} MiB, {out['cpu_infer_s'] / med:.1f}x the CPU"
        )
    gpu_maps, _ = infer(dev, args.chunks[-1])
    diff = np.abs(gpu_maps - cpu_maps)[mask]
    scale = np.abs(cpu_maps[mask]).max(axis=0)
    out["max_rel_diff_cpu_gpu"] = float((diff.max(axis=0) / scale).max())
    print(f"largest |GPU - CPU| / max|CPU| over the 8 maps: {out['max_rel_diff_cpu_gpu']:.2e}")
    med, _ = _timed(lambda: infer(dev, args.chunks[-1], mc=20), 2)
    out["gpu_infer_mc20_s"] = med
    print(f"inference {dev} with 20 MC-dropout samples: {med:.3f} s")
    del cpu_maps, gpu_maps

    train, val = training_sets()
    print(f"training set {len(train)} voxels, validation {len(val)}")

    def train_once(device, epochs):
        net = HierarchicalDKINet(model.in_channels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = fit(
            net,
            train,
            val,
            epochs=epochs,
            batch_size=1024,
            patience=epochs + 1,
            device=device,
            samples_per_epoch=args.samples_per_epoch,
        )
        return res.history

    hist = train_once(torch.device("cpu"), args.cpu_epochs)
    cpu_epoch = float(np.median([h["seconds"] for h in hist]))
    out["cpu_epoch_s"] = cpu_epoch
    print(f"training epoch CPU {args.cpu_threads} threads: {cpu_epoch:.1f} s")
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # fit() seeds itself; this only proves that it does
        runs.append(train_once(dev, args.epochs))
    gpu_epoch = float(np.median([h["seconds"] for h in runs[0][1:]] or [runs[0][0]["seconds"]]))
    out["gpu_epoch_s"] = gpu_epoch
    if dev.type == "cuda":
        out["gpu_train_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    losses = [[h["loss"] for h in r] for r in runs]
    out["gpu_losses"] = losses
    out["gpu_seeded_runs_equal"] = losses[0] == losses[1]
    print(
        f"training epoch {dev}: {gpu_epoch:.2f} s ({cpu_epoch / gpu_epoch:.1f}x the CPU), "
        f"peak GPU memory {out.get('gpu_train_peak_mib', float('nan')):.0f} MiB; "
        f"two seeded runs give {'the same' if out['gpu_seeded_runs_equal'] else 'different'} "
        f"losses: {losses}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
