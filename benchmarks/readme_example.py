"""The README's own example, measured: the figures README states for it come from here.

Runs exactly README's first set-up command's two steps (the ``tiny`` phantom with seed 0,
then ``dkiharm ... group -w ... --nprocs 2``) into a scratch folder (or ``--keep DIR``), reads
the group level's evaluation tables and records, under ``docs/benchmarks/readme_example/``:

* ``cv``: WM inter-scanner CV of the test subjects per map and method (the mean over the
  evaluated subjects of ``evaluation/cv.tsv``'s WM rows) and the cut before -> after;
* ``nrmse``: WM NRMSE-to-reference of each target scanner's first run, before and after;
* wall time of each step.

Run: ``.venv/bin/python benchmarks/readme_example.py [--keep DIR] [--nprocs 2]``.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_record  # noqa: E402

BIN = Path(sys.executable).parent
#: The paper's WM inter-scanner CV cuts (%) of its Fig. 3, printed beside ours.
PAPER_CUT = {"mk": 51.5, "ak": 65.9, "rk": 53.7, "kfa": 61.5}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def cv_table(evaluation: Path) -> list[dict]:
    acc = defaultdict(list)
    for r in _rows(evaluation / "cv.tsv"):
        if r["roi"] == "WM":
            acc[(r["param"], r["method"])].append(float(r["cv_mean"]))
    params = list(dict.fromkeys(p for p, _ in acc))
    rows = []
    for param in params:
        before = _mean(acc[(param, "before")])
        for method in sorted({m for p, m in acc if p == param and m != "before"}):
            after = _mean(acc[(param, method)])
            rows.append({
                "param": param, "method": method, "cv_before_pct": round(100 * before, 1),
                "cv_after_pct": round(100 * after, 1),
                "cut_pct": round(100 * (1 - after / before)),
                "paper_cut_pct": PAPER_CUT.get(param, ""),
            })  # fmt: skip
    return rows


def nrmse_table(evaluation: Path) -> list[dict]:
    acc = defaultdict(list)
    for r in _rows(evaluation / "nrmse.tsv"):
        if r["roi"] == "WM" and r["nrmse"] not in ("", "n/a"):
            acc[(r["param"], r["scanner"], r["method"])].append(float(r["nrmse"]))
    rows = []
    for (param, scanner, method), values in sorted(acc.items()):
        rows.append({"param": param, "scanner": scanner, "method": method,
                     "nrmse": round(_mean(values), 3)})  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dkiharm-readme-"))
    bids, work = root / "tiny", root / "work"
    out = bids / "derivatives" / "dkiharm"
    steps = {
        "phantom": [str(BIN / "dkiharm-phantom"), str(bids), "--preset", "tiny", "--seed", "0",
                    "--overwrite"],
        "group": [str(BIN / "dkiharm"), str(bids), str(out), "group", "-w", str(work),
                  "--nprocs", str(args.nprocs)],
    }  # fmt: skip
    wall = {}
    for step, cmd in steps.items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall[step] = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{step} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    cv, nrmse = cv_table(out / "evaluation"), nrmse_table(out / "evaluation")
    for r in cv:
        print(f"{r['param'].upper():4s} {r['method']:7s} WM CV {r['cv_before_pct']:5.1f} % -> "
              f"{r['cv_after_pct']:5.1f} % (cut {r['cut_pct']} %)")  # fmt: skip
    print("wall:", {k: f"{v:.0f} s" for k, v in wall.items()})
    if not args.no_record:
        command = " && ".join(shlex.join(c) for c in steps.values())
        path = write_record(
            "readme_example", tables={"cv": cv, "nrmse": nrmse},
            options={"preset": "tiny", "seed": 0, "nprocs": args.nprocs}, wall_s=wall,
            command=command,
        )  # fmt: skip
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
