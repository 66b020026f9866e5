"""The BIDS-App's group level on CUDA against CPU: same phantom, same options, one machine.

Generates a phantom study (``tiny`` by default), runs ``dkiharm bids_dir out group`` once per
``--devices`` entry (``--device cuda``, ``--device cpu``, ...) with ``--preproc none`` and
``--mask-method median_otsu`` (no MRtrix3 needed), and prints per device: the run's wall
time, each scanner's training time and the device its model card records, and the group
evaluation's white-matter CV of MK/AK/RK/KFA before and after harmonization. The devices
draw different random numbers (dropout, sampling) and round differently, so their networks
differ: the CV cuts should agree to a few points, not exactly.

Needs the package's Python dependencies but no MRtrix3, FSL or graphviz, so it runs on a
bare GPU machine with carried wheels::

    PYTHONPATH=. python benchmarks/group_device.py --devices cuda cpu --nprocs 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmonize import KURTOSIS, group_command, method_cv  # noqa: E402


def run_group(bids: Path, out: Path, work: Path, device: str, args) -> float:
    """One group-level run; returns its wall time (s)."""
    cmd = group_command(
        bids, out, work,
        "--preproc", "none", "--mask-method", args.mask_method, "--device", device,
        "--nprocs", str(args.nprocs), "--omp-nthreads", str(args.omp_nthreads), "--seed", "0",
    )  # fmt: skip
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    env = {**os.environ, "LOGNAME": os.environ.get("LOGNAME", "dkiharm")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"group level on {device} failed (exit {proc.returncode})")
    return seconds


def summarize(out: Path) -> dict:
    """Training time/device per scanner and WM CV before/after from a group run's outputs."""
    scanners = {}
    for card_path in sorted((out / "models").glob("scanner-*_harmonizer.json")):
        card = json.loads(card_path.read_text())
        training = card["training"]
        scanners[card["scanner"]] = {
            "seconds": training.get("seconds"),
            "device": training.get("device"),
            "epochs_run": training["epochs_run"],
            "val_nrmse_mk": training["validation"]["mk"]["nrmse"],
        }
    by_method = method_cv(out)
    cuts = {}
    for param in KURTOSIS:
        before, after = by_method["before"][param], by_method["dl"][param]
        cuts[param] = {"before": before, "after": after, "cut_pct": 100 * (1 - after / before)}
    return {"scanners": scanners, "cv": cuts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument(
        "--mask-method", default="median_otsu", help="median_otsu needs no MRtrix3"
    )
    parser.add_argument("--epochs", type=int, default=0, help="0: the BIDS-App's default")
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    import torch

    from dkiharm_nipype.phantom.generate import generate

    info = {"torch": torch.__version__, "preset": args.preset, "nprocs": args.nprocs}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        bids = root / "bids"
        start = time.perf_counter()
        generate(bids, preset=args.preset, seed=0, overwrite=True)
        print(f"phantom {args.preset}: {time.perf_counter() - start:.0f} s", flush=True)
        results = {}
        for device in args.devices:
            out = root / f"out-{device.replace(':', '')}"
            wall = run_group(bids, out, root / f"work-{device.replace(':', '')}", device, args)
            results[device] = {"wall_s": wall, **summarize(out)}
            res = results[device]
            print(f"\n== --device {device}: group level {wall:.0f} s", flush=True)
            for scanner, s in res["scanners"].items():
                print(
                    f"  train {scanner}: {s['seconds']:.1f} s on {s['device']}, "
                    f"{s['epochs_run']} epochs, validation MK NRMSE {s['val_nrmse_mk']:.3f}"
                )
            for param in KURTOSIS:
                c = res["cv"][param]
                print(
                    f"  WM CV {param.upper():3s}: {100 * c['before']:.2f} % -> "
                    f"{100 * c['after']:.2f} % (cut {c['cut_pct']:.1f} %)"
                )
    if args.json:
        args.json.write_text(json.dumps({**info, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
