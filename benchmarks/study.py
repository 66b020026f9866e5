"""Where a whole study's time goes: participant then group level on a phantom, step by step.

Generates a phantom (``tiny`` by default), runs ``dkiharm bids out participant`` then
``dkiharm bids out group`` with one work directory (the group level reuses the participant
level's nodes, as a user with one ``-w`` gets), and prints, from Nipype's own runtime record
of every node that ran (``_report/report.rst``: ``duration``), a per-step table: summed node
time, share of all node time and number of runs, per level. Also: wall time and peak memory
(largest process) of each level, each scanner's training (epochs, seconds, validation loss,
device), the fit maps' NRMSE to the phantom's truth in WM (every scan, native space) and the
group evaluation's WM CV of MK/AK/RK/KFA before and after harmonization.

``--before TREE`` first runs the same study with the code of another source tree (e.g.
``git archive main | tar -x -C /tmp/before``), then this tree's, back to back on the same
phantom and machine: ratios from one run are fair on a shared machine where absolute times
are not. ``--before-args`` / ``--args`` add options to either run. Where time is short, the
two can also run side by side (the same load on both): one ``study.py`` per tree (a copy of
this script in the other tree, ``--bids`` sharing one phantom), then ``--combine
BEFORE.json AFTER.json`` tabulates them. A TSV (the step table of
every run) and a JSON record (commits, package versions, machine and load, options, wall
times, scores) are written under ``docs/benchmarks/study/`` (``--record``)::

    .venv/bin/python benchmarks/study.py --before /tmp/before --nprocs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nb
import numpy as np

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
MAPS = ("md", "ad", "rd", "fa", "mk", "ak", "rk", "kfa")
KURTOSIS = ("mk", "ak", "rk", "kfa")
_DURATION = re.compile(r"^\* duration : ([0-9.eE+-]+)", re.M)


def _measure(out_json: str, cmd: list[str]) -> int:
    """Run ``cmd``; write its wall time and peak RSS (largest descendant) to ``out_json``."""
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(out_json).write_text(
        json.dumps(
            {
                "wall_s": time.perf_counter() - start,
                "peak_rss_mib": usage.ru_maxrss / 1024,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )
    return rc


def run_level(tree: Path, level: str, bids: Path, out: Path, work: Path, options, log: Path):
    """One ``dkiharm`` level with ``tree``'s code; returns wall time, peak RSS, CPU time."""
    cli = [sys.executable, "-m", "dkiharm_nipype.cli.run", str(bids), str(out), level]
    cmd = [*cli, "-w", str(work), *options]
    env = {**os.environ, "PYTHONPATH": str(tree), "MRTRIX_QUIET": "1"}
    stats = log.with_suffix(".json")
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, __file__, "--_measure", str(stats), "--", *cmd],
            env=env,
            cwd=work,  # `python -m` puts the cwd first on sys.path: not a source tree
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"{level} level with {tree} failed (exit {proc.returncode}); log {log}")
    return json.loads(stats.read_text())


def node_times(work: Path, since: float = 0.0) -> dict[str, list[float]]:
    """Durations of every node run (report modified after ``since``), keyed by node name.

    MapNode iterations (``mapflow/_name3``) count under their node's name.
    """
    steps: dict[str, list[float]] = defaultdict(list)
    for report in work.rglob("_report/report.rst"):
        if report.stat().st_mtime < since:
            continue
        match = _DURATION.search(report.read_text(errors="replace"))
        if not match:
            continue
        node = report.parent.parent
        if node.parent.name == "mapflow":
            name = node.parent.parent.name
        else:
            name = node.name
        steps[name].append(float(match.group(1)))
    return steps


def step_table(steps: dict[str, list[float]]) -> list[dict]:
    """Rows ``step, count, seconds, share`` sorted by time, shares of all node time."""
    total = sum(sum(v) for v in steps.values()) or 1.0
    rows = [
        {"step": k, "count": len(v), "seconds": sum(v), "share": sum(v) / total}
        for k, v in steps.items()
    ]
    return sorted(rows, key=lambda r: -r["seconds"])


def truth_errors(bids: Path, out: Path) -> dict[str, float]:
    """Each fit map's median absolute relative error to the phantom truth in WM (prob >
    0.9), median over scans, in each scan's native space.

    A median, not an RMSE: without TOPUP/Eddy the scans keep their susceptibility
    distortion, which the truth (undistorted) does not have, and a few displaced voxels at
    the WM edge would otherwise dominate.
    """
    errors: dict[str, list[float]] = defaultdict(list)
    truth_root = bids / "derivatives" / "phantom-truth"
    for wm_file in sorted(truth_root.glob("sub-*/ses-*/dwi/*_space-dwi_label-WM_probseg.nii.gz")):
        stem = wm_file.name.split("_space-dwi")[0]
        rel = wm_file.parent.relative_to(truth_root)
        wm = np.asanyarray(nb.load(wm_file).dataobj) > 0.9
        for name in MAPS:
            fit = out / rel / f"{stem}_space-dwi_model-dki_param-{name}_dwimap.nii.gz"
            truth = truth_root / rel / f"{stem}_space-dwi_model-dki_param-{name}"
            truth = truth.with_name(truth.name + "_desc-truth_dwimap.nii.gz")
            if not fit.exists() or not truth.exists():
                continue
            est = np.asanyarray(nb.load(fit).dataobj, dtype=np.float64)
            ref = np.asanyarray(nb.load(truth).dataobj, dtype=np.float64)
            ok = wm & np.isfinite(est) & np.isfinite(ref) & (ref != 0)
            errors[name].append(float(np.median(np.abs(est[ok] / ref[ok] - 1))))
    return {k: float(np.median(v)) for k, v in errors.items()}


def group_scores(out: Path) -> dict:
    """Training per scanner (model cards) and WM CV before/after (evaluation/cv.tsv)."""
    sys.path.insert(0, str(HERE))
    from harmonize import method_cv  # noqa: PLC0415

    scanners = {}
    for card_path in sorted((out / "models").glob("scanner-*_harmonizer.json")):
        card = json.loads(card_path.read_text())
        training = card["training"]
        scanners[card["scanner"]] = {
            "seconds": training.get("seconds"),
            "epochs_run": training["epochs_run"],
            "best_epoch": training["best_epoch"],
            "best_val_loss": training["best_loss"],
            "device": training.get("device"),
            "seconds_per_epoch": (training.get("seconds") or 0) / max(training["epochs_run"], 1),
        }
    by_method = method_cv(out)
    cv = {
        p: {
            "before": by_method["before"][p],
            "after": by_method["dl"][p],
            "cut_pct": 100 * (1 - by_method["dl"][p] / by_method["before"][p]),
        }
        for p in KURTOSIS
    }
    return {"training": scanners, "cv": cv}


def compare_steps(before: list[dict], after: list[dict], *, top: int = 15):
    """``(step, before s, after s)`` summed over levels, the costliest ``top`` steps of either.

    Steps are matched by name, except that the denoiser counts as one step ``denoise``
    whichever tool ran it (the node is called ``denoise`` either way).
    """
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for i, rows in enumerate((before, after)):
        for row in rows:
            totals[row["step"]][i] += row["seconds"]
    ranked = sorted(totals.items(), key=lambda kv: -max(kv[1]))[:top]
    return [(k, v[0], v[1]) for k, v in ranked]


def _commit(tree: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if proc.returncode == 0:
        return proc.stdout.strip()
    stamp = tree / "COMMIT"  # written next to a `git archive` extraction, if any
    return stamp.read_text().strip() if stamp.exists() else "unknown"


def print_run(label: str, res: dict) -> None:
    print(f"\n== {label}: {res['tree']} ({res['commit'][:10]}) {res['options']}")
    for level, lv in res["levels"].items():
        print(
            f"{level}: wall {lv['wall_s']:.0f} s, CPU {lv['cpu_s']:.0f} s, node time "
            f"{lv['node_s']:.0f} s, peak RSS {lv['peak_rss_mib']:.0f} MiB"
        )
    print(f"{'step':28s} {'level':11s} {'count':>5s} {'seconds':>9s} {'share':>6s}")
    for row in res["steps"]:
        if row["share"] >= 0.005:
            print(
                f"{row['step']:28s} {row['level']:11s} {row['count']:5d} "
                f"{row['seconds']:9.1f} {100 * row['share']:5.1f}%"
            )
    for scanner, t in res["scores"]["training"].items():
        print(
            f"train {scanner}: {t['seconds']:.1f} s, {t['epochs_run']} epochs "
            f"({t['seconds_per_epoch']:.2f} s each, best {t['best_epoch']}), "
            f"val loss {t['best_val_loss']:.4f}, {t['device']}"
        )
    cv = res["scores"]["cv"]
    if cv:
        print("WM CV cut: " + ", ".join(f"{p.upper()} {cv[p]['cut_pct']:.1f} %" for p in cv))
    print(
        "fit error to truth (median |relative error| in WM, median over scans): "
        + ", ".join(f"{k.upper()} {v:.4f}" for k, v in res["truth_error"].items())
    )


def run_study(label: str, tree: Path, bids: Path, root: Path, options: list[str]) -> dict:
    out, work = root / label / "out", root / label / "work"
    work.mkdir(parents=True, exist_ok=True)
    levels, steps = {}, []
    for level in ("participant", "group"):
        start = time.time()
        log = root / f"{label}-{level}.log"
        levels[level] = run_level(tree, level, bids, out, work, options, log)
        # the group level's nodes: reports written since it started (cached nodes keep theirs)
        times = node_times(work, since=start - 1 if level == "group" else 0.0)
        levels[level]["node_s"] = sum(sum(v) for v in times.values())
        steps += [{**row, "level": level} for row in step_table(times)]
    total = sum(r["seconds"] for r in steps) or 1.0
    for row in steps:
        row["share"] = row["seconds"] / total
    steps.sort(key=lambda r: -r["seconds"])
    return {
        "tree": str(tree),
        "commit": _commit(tree),
        "options": options,
        "levels": levels,
        "node_s": total,
        "steps": steps,
        "scores": group_scores(out),
        "truth_error": truth_errors(bids, out),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_measure"]:
        raise SystemExit(_measure(argv[1], argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--bids", type=Path, help="an existing phantom (not regenerated)")
    parser.add_argument(
        "--phantom",
        default="",
        help="dkiharm-phantom overrides, e.g. 'subjects=4' (space-separated key=value)",
    )
    parser.add_argument("--before", type=Path, help="source tree of the 'before' run")
    parser.add_argument("--before-args", default="", help="options of the 'before' run only")
    parser.add_argument("--args", default="", help="options of this tree's run only")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--omp-nthreads", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder")
    parser.add_argument("--record", type=Path, default=TREE / "docs" / "benchmarks" / "study")
    parser.add_argument(
        "--combine",
        nargs=2,
        type=Path,
        metavar=("BEFORE_JSON", "AFTER_JSON"),
        help="only tabulate two runs' saved results (<label>.json of --keep folders), e.g. "
        "of a 'before' and an 'after' run made side by side",
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(TREE))
    from record import write_record

    from dkiharm_nipype.phantom.generate import generate

    common = ["--nprocs", str(args.nprocs), "--omp-nthreads", str(args.omp_nthreads)]
    common += ["--seed", "0"]
    overrides = {}
    for item in args.phantom.split():
        key, value = item.split("=", 1)
        overrides[key] = int(value) if value.isdigit() else value
    runs = []
    if args.before:
        runs.append(("before", args.before.resolve(), shlex.split(args.before_args)))
    runs.append(("after" if args.before else "run", TREE, shlex.split(args.args)))
    load_start = os.getloadavg()
    results = {}
    if args.combine:
        runs = []
        pairs = zip(("before", "after"), args.combine, strict=True)
        results = {k: json.loads(p.read_text()) for k, p in pairs}
        for label, res in results.items():
            print_run(label, res)
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)).resolve()
        bids = args.bids.resolve() if args.bids else root / "bids"
        if runs and not args.bids:
            start = time.perf_counter()
            generate(bids, preset=args.preset, seed=0, overwrite=True, **overrides)
            seconds = time.perf_counter() - start
            print(f"phantom {args.preset} {overrides}: {seconds:.0f} s", flush=True)
        for label, tree, extra in runs:
            results[label] = run_study(label, tree, bids, root, [*common, *extra])
            (root / f"{label}.json").write_text(json.dumps(results[label], indent=2))
            print_run(label, results[label])
            sys.stdout.flush()
    ratios = {}
    if {"before", "after"} <= set(results):
        b, a = results["before"], results["after"]
        ratios = {"node_time": b["node_s"] / a["node_s"]}
        for lv in set(b["levels"]) & set(a["levels"]):
            ratios[f"{lv}_wall"] = b["levels"][lv]["wall_s"] / a["levels"][lv]["wall_s"]
        print(
            f"\nbefore/after: node time {b['node_s']:.0f} / {a['node_s']:.0f} s = "
            f"{ratios['node_time']:.2f}x; "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if k != "node_time")
        )
        print(f"{'step':28s} {'before s':>9s} {'after s':>9s} {'ratio':>6s}")
        for step, sec_b, sec_a in compare_steps(b["steps"], a["steps"]):
            ratio = f"{sec_b / sec_a:6.1f}" if sec_a else "     -"
            print(f"{step:28s} {sec_b:9.1f} {sec_a:9.1f} {ratio}")
    tables = {
        "steps": [{"run": k, **r} for k, res in results.items() for r in res["steps"]],
        "levels": [
            {"run": k, "level": lv, **v}
            for k, res in results.items()
            for lv, v in res["levels"].items()
        ],
        "training": [
            {"run": k, "scanner": sc, **t}
            for k, res in results.items()
            for sc, t in res["scores"]["training"].items()
        ],
        "cv": [
            {"run": k, "param": p, **c}
            for k, res in results.items()
            for p, c in res["scores"]["cv"].items()
        ],
        "truth_error": [{"run": k, **res["truth_error"]} for k, res in results.items()],
    }
    options = {
        "preset": args.preset,
        "phantom_overrides": overrides,
        "common_options": common,
        "runs": {k: {"tree": r["tree"], "commit": r["commit"], "options": r["options"]}
                 for k, r in results.items()},
        "ratios": ratios,
        "load_average_start_end": [load_start, os.getloadavg()],
    }  # fmt: skip
    path = write_record(
        "study",
        tables=tables,
        options=options,
        wall_s={
            f"{k}_{lv}": v["wall_s"] for k, r in results.items() for lv, v in r["levels"].items()
        },
        command=" ".join(["benchmarks/study.py", *(argv or [])]),
        out_dir=args.record,
    )
    print(f"record: {path}")


if __name__ == "__main__":
    main()
