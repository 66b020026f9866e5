"""Time and peak memory of ``dkiharm-phantom`` per preset.

Usage::

    python benchmarks/phantom.py                       # every preset at full size
    python benchmarks/phantom.py tiny mushac           # some presets
    python benchmarks/phantom.py paper-dataset1 --subjects 1

Each preset runs in a fresh child process so its peak resident memory (``ru_maxrss`` of
the children, which includes the worker processes) is measured in isolation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, sys, time
from dkiharm_nipype.phantom import generate
kw = json.loads(sys.argv[3])
t = time.perf_counter()
generate(sys.argv[1], preset=sys.argv[2], seed=0, **kw)
print(time.perf_counter() - t)
"""


def run(preset: str, overrides: dict) -> tuple[float, float, float, float, float]:
    """(wall s, generate() s, CPU s, peak RSS MiB, size MiB) of one preset in a child process.

    CPU time is user + system of the child and its worker processes: on a shared machine
    it is the more reliable number (wall time grows with the other jobs' load).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / preset
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, str(out), preset, json.dumps(overrides)],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    peak = after.ru_maxrss / 1024
    return wall, float(res.stdout.strip().splitlines()[-1]), cpu, peak, size


def main(argv=None) -> int:
    from dkiharm_nipype.phantom import PRESET_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESET_NAMES))
    parser.add_argument("--subjects", type=int)
    parser.add_argument("--n-jobs", type=int)
    args = parser.parse_args(argv)
    overrides = {"subjects": args.subjects} if args.subjects else {}
    if args.n_jobs:
        overrides["n_jobs"] = args.n_jobs
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(
        f"{'preset':16s} {'wall s':>8s} {'generate s':>11s} {'CPU s':>8s} {'peak MiB':>9s} "
        f"{'size MiB':>9s}"
    )
    for preset in args.presets:
        wall, gen, cpu, peak, size = run(preset, overrides)
        print(
            f"{preset:16s} {wall:8.1f} {gen:11.1f} {cpu:8.1f} {peak:9.0f} {size:9.0f}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
