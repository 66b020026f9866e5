"""Training settings compared back to back: time per epoch, epochs, total, validation loss.

One scanner's network is trained on phantom scans (``tiny`` by default; ``--voxel-mm``
regrids it) with each ``--configs`` entry in turn, in one process, same data, same seed,
same threads, so that ratios hold on a shared machine where absolute times do not. Inputs
are the raw scans of the training subjects (normalised as the pipeline does), labels the
phantom's true maps of the same scan; with ``--participant OUT`` (a participant-level output
of the same phantom) inputs are the preprocessed run-1 scans and labels the IRLLS maps of the
subject's run 2 on that scanner (noisy labels, a small head movement away, as the
pipeline's ``--reference-labels rescan``), where validation curves flatten as in a study. Each
network is then applied to a held-out subject's
scan and scored against its truth in WM (NRMSE, probability > 0.9).

A config is ``name:key=value,key=value`` over :func:`~dkiharm_nipype.cnn.train.
train_harmonizer`'s arguments (``precision``, ``batch_size``, ``lr``, ``patience``,
``min_delta``, ``epochs``, ``samples_per_epoch``)::

    .venv/bin/python benchmarks/training.py --threads 2 \\
        --configs "before:precision=fp32,batch_size=1024,patience=10,min_delta=0" default
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from dkiharm_nipype.cnn.data import TrainingSubject, normalize_dwi
from dkiharm_nipype.cnn.infer import harmonize_scan
from dkiharm_nipype.cnn.model import OUTPUT_NAMES
from dkiharm_nipype.cnn.train import train_harmonizer
from dkiharm_nipype.evaluation.scores import nrmse

_FLOATS = {"lr", "min_delta"}
_STRS = {"precision", "loss"}


def parse_config(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    kwargs = {}
    for item in filter(None, body.split(",")):
        key, value = item.split("=", 1)
        kwargs[key] = value if key in _STRS else float(value) if key in _FLOATS else int(value)
    return name, kwargs


def load_scan(root: Path, sub: str, scanner: str):
    """Normalised DWI, bvals, raw DWI, true maps (X, Y, Z, 8), brain mask, WM of one scan."""
    stem = f"{sub}_ses-{scanner}_run-1"
    dwi_file = root / sub / f"ses-{scanner}" / "dwi" / f"{stem}_dwi.nii.gz"
    truth = root / "derivatives" / "phantom-truth" / sub / f"ses-{scanner}" / "dwi"
    prefix = f"{stem}_space-dwi_"
    dwi = np.asarray(nb.load(dwi_file).dataobj, dtype=np.float32)
    bvals = np.loadtxt(str(dwi_file).replace(".nii.gz", ".bval"))
    maps = np.stack(
        [
            np.asarray(
                nb.load(truth / f"{prefix}model-dki_param-{k}_desc-truth_dwimap.nii.gz").dataobj,
                dtype=np.float32,
            )
            for k in OUTPUT_NAMES
        ],
        axis=-1,
    )
    mask = np.asarray(nb.load(truth / f"{prefix}desc-brain_mask.nii.gz").dataobj) > 0
    wm = np.asarray(nb.load(truth / f"{prefix}label-WM_probseg.nii.gz").dataobj) > 0.9
    return dwi, bvals, maps, mask, wm


def participant_scan(out: Path, sub: str, scanner: str):
    """Preprocessed run-1 DWI and bvals, and the run-2 IRLLS maps, of a participant output."""
    prefix = out / sub / f"ses-{scanner}" / "dwi" / f"{sub}_ses-{scanner}_run-"
    dwi_file = Path(f"{prefix}1_space-dwi_desc-preproc_dwi.nii.gz")
    dwi = np.asarray(nb.load(dwi_file).dataobj, dtype=np.float32)
    bvals = np.loadtxt(str(dwi_file).replace(".nii.gz", ".bval"))
    labels = np.stack(
        [
            np.asarray(
                nb.load(f"{prefix}2_space-dwi_model-dki_param-{k}_dwimap.nii.gz").dataobj,
                dtype=np.float32,
            )
            for k in OUTPUT_NAMES
        ],
        axis=-1,
    )
    return dwi, bvals, labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", type=Path, help="an existing phantom root")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--voxel-mm", type=float)
    parser.add_argument("--participant", type=Path, help="participant-level output (labels)")
    parser.add_argument("--scanner", default="A")
    parser.add_argument("--train", nargs="+", default=["sub-01", "sub-02"])
    parser.add_argument("--test", default="sub-03")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=["default"])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.phantom
    if root is None:
        from dkiharm_nipype.phantom.generate import generate

        root = Path(tempfile.mkdtemp(prefix="dkiharm-training-"))
        extra = {"voxel_mm": args.voxel_mm} if args.voxel_mm else {}
        generate(root, preset=args.preset, seed=0, overwrite=True, **extra)
    subjects = []
    for sub in args.train:
        dwi, bvals, maps, mask, _ = load_scan(root, sub, args.scanner)
        if args.participant:
            dwi, bvals, maps = participant_scan(args.participant, sub, args.scanner)
        subjects.append(
            TrainingSubject(dwi=normalize_dwi(dwi, bvals), labels=maps, mask=mask, name=sub)
        )
    test_dwi, test_bvals, test_maps, test_mask, test_wm = load_scan(root, args.test, args.scanner)
    if args.participant:
        test_dwi, test_bvals, _ = participant_scan(args.participant, args.test, args.scanner)
    print(
        f"{root} scanner {args.scanner}: grid {test_dwi.shape}, "
        f"{sum(int(s.mask.sum()) for s in subjects)} training voxels, {args.threads} threads",
        flush=True,
    )
    results = {}
    for text in args.configs:
        name, kwargs = parse_config(text)
        start = time.perf_counter()
        model, card, result = train_harmonizer(
            subjects, scanner=args.scanner, protocol={}, seed=args.seed, **kwargs
        )
        wall = time.perf_counter() - start
        maps, _ = harmonize_scan(model, card, test_dwi, test_bvals, test_mask)
        test = {
            k: nrmse(maps[..., i], test_maps[..., i], test_wm) for i, k in enumerate(OUTPUT_NAMES)
        }
        epochs = [h["seconds"] for h in result.history]
        hyper = card.training["hyperparameters"]
        results[name] = {
            "hyperparameters": hyper,
            "epochs_run": len(epochs),
            "best_epoch": result.best_epoch,
            "seconds_per_epoch": float(np.mean(epochs)),
            "train_seconds": float(np.sum(epochs)),
            "wall_seconds": wall,
            "best_val_loss": result.best_loss,
            "test_nrmse": test,
        }
        r = results[name]
        print(
            f"{name:10s} {hyper['precision']} batch {hyper['batch_size']} "
            f"patience {hyper['patience']} min_delta {hyper['min_delta']}: "
            f"{r['epochs_run']} epochs (best {r['best_epoch']}) x {r['seconds_per_epoch']:.2f} s "
            f"= {r['train_seconds']:.1f} s; val loss {r['best_val_loss']:.4f}; test NRMSE "
            + " ".join(f"{k.upper()} {test[k]:.3f}" for k in ("md", "fa", "mk", "rk", "kfa")),
            flush=True,
        )
    if len(results) > 1:
        first = next(iter(results.values()))
        for name, r in list(results.items())[1:]:
            print(
                f"{name} vs {next(iter(results))}: per epoch "
                f"{first['seconds_per_epoch'] / r['seconds_per_epoch']:.2f}x, total "
                f"{first['train_seconds'] / r['train_seconds']:.2f}x, val loss "
                f"{r['best_val_loss'] / first['best_val_loss']:.3f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
