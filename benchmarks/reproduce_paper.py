"""The paper's whole study on the phantom, with the paper's tables printed beside ours.

For each dataset (``paper-dataset1``: Table 1's four scanners, 5 subjects; ``mushac``:
Prisma- and Connectom-like, 9 subjects), generates the phantom, runs

    dkiharm BIDS OUT group --comparators combat rish [--experiment ...]

(SNR-based reference, 40 % of the traveling subjects for training, label registration, one
network per scanner, harmonized maps, evaluation of the test subjects, the HTML report), then
prints from ``OUT/snr.tsv`` and ``OUT/evaluation/*.tsv``:

* Table 3: mean WM SNR (dB) per scanner;
* WM inter-scanner CV (%) before / DL / ComBat / RISH (paper: abstract and Fig. 3, Fig. 9);
* Table 4: NRMSE-to-reference in WM per scanner, before -> after (mean over test subjects);
* Table 5: scan-rescan NRMSE in WM per scanner, before -> after.

This is a long run (hours on 2 CPU cores at full size, most of it MRtrix3 ``dwidenoise``):
``--preproc none`` skips denoising/Gibbs removal, ``--voxel-mm 3`` puts the whole brain on a
coarser grid, ``--epochs``/``--samples-per-epoch`` shorten training, ``--keep DIR`` reuses a
previous run (Nipype's cache): the group command is the one ``benchmarks/harmonize.py`` runs,
so ``harmonize.py --keep DIR/paper-dataset1`` and this script with ``--keep DIR`` share one
run. Run: ``.venv/bin/python benchmarks/reproduce_paper.py [--dataset NAME]``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

KURTOSIS = ("mk", "ak", "rk", "kfa")

#: Paper, Table 3: mean SNR (dB) per scanner (subjects 1-5, or 1-9 for Dataset 2).
PAPER_SNR = {
    "paper-dataset1": {"A": 22.21, "B": 23.97, "C": 23.71, "D": 29.64},
    "mushac": {"Prisma": 22.84, "Connectom": 24.78},
}
#: Paper: WM inter-scanner CV (%) before -> after (Dataset 1; abstract's reductions).
PAPER_CV = {"mk": (13.6, 6.6), "ak": (17.3, 5.9), "rk": (24.4, 11.3), "kfa": (16.7, 9.4)}
#: Paper, Table 4 (Dataset 1): NRMSE-to-reference, mean of the 3 test subjects.
PAPER_TABLE4 = {
    "A": {"mk": (0.21, 0.11), "ak": (0.26, 0.14), "rk": (0.45, 0.24), "kfa": (0.28, 0.17)},
    "B": {"mk": (0.19, 0.10), "ak": (0.23, 0.12), "rk": (0.42, 0.23), "kfa": (0.25, 0.16)},
    "C": {"mk": (0.24, 0.15), "ak": (0.31, 0.17), "rk": (0.42, 0.24), "kfa": (0.35, 0.20)},
    "D": {"mk": (None, 0.08), "ak": (None, 0.13), "rk": (None, 0.21), "kfa": (None, 0.15)},
}
#: Paper, Table 5 (Dataset 1): scan-rescan NRMSE, mean of the 3 test subjects.
PAPER_TABLE5 = {
    "A": {"mk": (0.21, 0.08), "ak": (0.31, 0.07), "rk": (0.39, 0.15), "kfa": (0.24, 0.10)},
    "B": {"mk": (0.17, 0.05), "ak": (0.23, 0.04), "rk": (0.33, 0.09), "kfa": (0.19, 0.05)},
    "D": {"mk": (0.12, 0.11), "ak": (0.13, 0.09), "rk": (0.24, 0.17), "kfa": (0.14, 0.10)},
}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _mean_by(rows, keys, value, **where) -> dict[tuple, float]:
    groups = defaultdict(list)
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            groups[tuple(r[k] for k in keys)].append(float(r[value]))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def run_dataset(name: str, args, root: Path) -> None:
    bids, out, work = root / name / "bids", root / name / "out", root / name / "work"
    started = time.time()
    if args.print_only:
        if not (out / "evaluation" / "cv.tsv").is_file():
            sys.exit(f"{out / 'evaluation' / 'cv.tsv'} not found: run without --print-only first.")
        print_tables(name, out)
        return
    if not (bids / "dataset_description.json").exists():
        from dkiharm_nipype.phantom import generate

        overrides = {"slices": args.slices} if args.slices else {}
        if args.voxel_mm:
            overrides["voxel_mm"] = args.voxel_mm
        print(f"[{name}] generating the phantom {overrides} ...", flush=True)
        generate(bids, preset=name, seed=args.seed, overwrite=True, **overrides)
    cmd = [sys.executable, "-m", "dkiharm_nipype.cli.run", str(bids), str(out), "group",
           "-w", str(work), "--nprocs", str(args.nprocs), "--omp-nthreads", "1",
           "--seed", str(args.seed), "--epochs", str(args.epochs),
           "--samples-per-epoch", str(args.samples_per_epoch), "--preproc", args.preproc,
           "--comparators", "combat", "rish"]  # fmt: skip
    if args.experiments:
        cmd += ["--experiment", *args.experiments]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print(f"\n[{name}] done in {time.time() - started:.0f} s; report: {out / 'report.html'}")
    print_tables(name, out)


def print_tables(name: str, out: Path) -> None:
    """The paper's tables beside ours, from a finished group run's outputs."""
    snr = _mean_by(_rows(out / "snr.tsv"), ["scanner"], "snr_db")
    print(f"\nTable 3 - mean WM SNR (dB) per scanner ({name})")
    print("| scanner | phantom | paper |\n|---|---:|---:|")
    for (scanner,), value in sorted(snr.items()):
        paper = PAPER_SNR.get(name, {}).get(scanner)
        print(f"| {scanner} | {value:.2f} | {paper if paper is not None else '-'} |")

    ev = out / "evaluation"
    cv = _mean_by(_rows(ev / "cv.tsv"), ["method", "param"], "cv_mean", roi="WM")
    methods = [m for m in ("before", "dl", "combat", "rish") if (m, "mk") in cv]
    print("\nWM inter-scanner CV (%), mean over test subjects")
    print("| map | " + " | ".join(methods) + " | DL reduction | paper before -> after |")
    print("|---|" + "---:|" * (len(methods) + 1) + "---|")
    for k in KURTOSIS:
        cells = [f"{100 * cv[m, k]:.1f}" for m in methods]
        cut = 100 * (1 - cv["dl", k] / cv["before", k])
        pb, pa = PAPER_CV[k]
        print(f"| {k.upper()} | " + " | ".join(cells) + f" | {cut:.1f} % | {pb} -> {pa} |")

    for title, file, table in (
        ("Table 4 - NRMSE-to-reference in WM", "nrmse.tsv", PAPER_TABLE4),
        ("Table 5 - scan-rescan NRMSE in WM", "scanrescan.tsv", PAPER_TABLE5),
    ):
        rows = _rows(ev / file)
        vals = {m: _mean_by(rows, ["scanner", "param"], "nrmse", roi="WM", method=m)
                for m in ("before", "dl")}  # fmt: skip
        print(f"\n{title}, before -> after (paper)")
        print("| scanner | " + " | ".join(k.upper() for k in KURTOSIS) + " |")
        print("|---|" + "---|" * len(KURTOSIS))
        for scanner in sorted({s for s, _ in vals["dl"]}):
            cells = []
            for k in KURTOSIS:
                b, a = vals["before"].get((scanner, k)), vals["dl"].get((scanner, k))
                paper_row = table.get(scanner, {}) if name == "paper-dataset1" else {}
                pb, pa = paper_row.get(k, (None, None))
                ours = f"{b:.2f} -> {a:.2f}" if b is not None and a is not None else "-"
                paper = f" ({pb if pb is not None else '-'} -> {pa})" if pa is not None else ""
                cells.append(ours + paper)
            print(f"| {scanner} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["paper-dataset1", "mushac", "both"],
                        default="both")  # fmt: skip
    parser.add_argument("--slices", type=int, help="central slab thickness (default: full)")
    parser.add_argument("--voxel-mm", type=float, help="whole brain on a coarser grid (e.g. 3)")
    parser.add_argument("--preproc", default="auto", choices=["auto", "mrtrix", "none"],
                        help="the BIDS-App's --preproc")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--samples-per-epoch", type=int, default=100_000)
    parser.add_argument("--experiment", dest="experiments", nargs="*", default=[],
                        choices=["trainsize", "leavepout", "tissue", "seeds"])  # fmt: skip
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="folder to keep (and reuse) the runs in")
    parser.add_argument("--print-only", action="store_true",
                        help="only print the tables of a finished run in --keep")  # fmt: skip
    args = parser.parse_args(argv)
    if args.print_only and not args.keep:
        parser.error("--print-only needs --keep DIR (the folder of a finished run)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="dkiharm-paper-"))
    names = ["paper-dataset1", "mushac"] if args.dataset == "both" else [args.dataset]
    for name in names:
        run_dataset(name, args, root)


if __name__ == "__main__":
    main()
