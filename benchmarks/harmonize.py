"""Benchmark of the whole harmonization on the phantom's ``paper-dataset1``.

Generates the traveling-subject phantom (4 scanners as in the paper's Table 1, 5 subjects),
runs ``dkiharm ... group`` (2 training subjects, 3 test subjects, as in the paper), then, for
the test subjects, in the reference scanner's space (every scanner's first run registered
to it with dipy SyN on FA, within subject):

* WM inter-scanner CV of MK/AK/RK/KFA before (IRLLS fits) and after (harmonized maps);
* NRMSE-to-reference of each target scanner before and after (reference: the reference
  scanner's IRLLS maps, the training labels' source);
* error to the phantom's truth (the reference scan's true maps) before and after;
* the ceiling of each score: a perfect harmonization, whose maps are the reference
  scanner's *true* maps brought into each scan's space with the phantom's known transforms
  (and, where the preprocessing kept it, its susceptibility distortion), then scored like
  the harmonized maps (same registration, same reference): what no network can beat here;
* training time per scanner, inference time per scan, peak memory of the run.

White matter: the phantom's true WM (probability > 0.9) in the reference scan's space.

The group level's own evaluation adds, per method (before, DL, the linear baseline, ComBat,
RISH), the NRMSE-to-reference with its ratio to the noise floor (the reference's own
repeatability) beside the ceiling; the networks against the linear baseline; and the detail
kept (error to the truth of the harmonized reference scan and targets, over the reference
scan's raw fit's).

Run: ``.venv/bin/python benchmarks/harmonize.py [--preset tiny] [--voxel-mm V] [--preproc none]
[--denoiser mppca] [--network-input dwi+fit] [--reference-labels fit] [--kernel-size 5]
[--epochs E]
[--keep DIR]``. ``--voxel-mm`` generates the whole brain on a coarser grid (3.0: 73x73x47
voxels, ~3x faster); ``--slices`` cuts a central slab, which is *not* a fair test: the
visits' head positions move anatomy in and out of a thin slab, so registration between
scanners (labels and evaluation) cannot be right there.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from dkiharm_nipype.config import NETWORK_INPUTS, REFERENCE_LABELS
from dkiharm_nipype.evaluation.evaluate import read_tsv
from dkiharm_nipype.evaluation.scores import mean_cv, nrmse
from dkiharm_nipype.phantom.truth import truth_deformation
from dkiharm_nipype.registration import register, resample
from dkiharm_nipype.utils.env import missing_fsl

KURTOSIS = ("mk", "ak", "rk", "kfa")
PAPER_CV = {"mk": (13.6, 6.6), "ak": (17.3, 5.9), "rk": (24.4, 11.3), "kfa": (16.7, 9.4)}


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float64)


def _scan_prefix(root: Path, sub: str, scanner: str) -> Path:
    return root / sub / f"ses-{scanner}" / "dwi" / f"{sub}_ses-{scanner}_run-1_space-dwi"


def perfect_maps(bids: Path, sub: str, scanner: str, ref: str, *, distorted: bool) -> dict:
    """The reference scan's true kurtosis maps (images) on ``scanner``'s first-run grid: what
    a perfect harmonization of that scan would output (``distorted``: the scan kept its
    susceptibility distortion, i.e. no TOPUP)."""
    deformation, affine = truth_deformation(
        bids, sub, fixed_session=scanner, moving_session=ref, distortion=distorted
    )
    prefix = _scan_prefix(bids / "derivatives" / "phantom-truth", sub, ref)
    return {
        k: resample(f"{prefix}_model-dki_param-{k}_desc-truth_dwimap.nii.gz", deformation, affine)
        for k in KURTOSIS
    }


def evaluate(bids: Path, out: Path, *, distorted: bool = True) -> dict:
    plan = json.loads((out / "models" / "harmonization.json").read_text())
    ref = plan["reference_scanner"]
    targets = [s for s in plan["scanners"] if s != ref]
    scores = ("before", "after", "ceiling")
    cv = {k: {w: [] for w in scores} for k in KURTOSIS}
    to_ref = {t: {k: {w: [] for w in scores} for k in KURTOSIS} for t in targets}
    to_truth = {
        t: {k: {"before": [], "after": [], "linear": []} for k in KURTOSIS}
        for t in plan["scanners"]
    }
    for sub in plan["test_subjects"]:
        ref_prefix = _scan_prefix(out, sub, ref)
        truth_prefix = _scan_prefix(bids / "derivatives" / "phantom-truth", sub, ref)
        wm = _load(f"{truth_prefix}_label-WM_probseg.nii.gz") > 0.9
        truth = {
            k: _load(f"{truth_prefix}_model-dki_param-{k}_desc-truth_dwimap.nii.gz")
            for k in KURTOSIS
        }
        label = {k: _load(f"{ref_prefix}_model-dki_param-{k}_dwimap.nii.gz") for k in KURTOSIS}
        stacks = {k: {w: [] for w in scores} for k in KURTOSIS}
        for scanner in plan["scanners"]:
            prefix = _scan_prefix(out, sub, scanner)
            warp = None
            if scanner != ref:
                warp = register(
                    f"{ref_prefix}_model-dki_param-fa_dwimap.nii.gz",
                    f"{prefix}_model-dki_param-fa_dwimap.nii.gz",
                    engine="dipy-syn",
                )
            perfect = perfect_maps(bids, sub, scanner, ref, distorted=distorted)
            for k in KURTOSIS:
                sources = {
                    "before": f"{prefix}_model-dki_param-{k}_dwimap.nii.gz",
                    "after": f"{prefix}_model-dki_param-{k}_desc-harmonized_dwimap.nii.gz",
                    "ceiling": perfect[k],
                }
                linear = Path(f"{prefix}_model-dki_param-{k}_desc-linear_dwimap.nii.gz")
                if linear.is_file():  # --comparators linear writes them
                    sources["linear"] = str(linear)
                for when, source in sources.items():
                    img = nb.load(source) if warp is None and isinstance(source, str) else source
                    data = np.asanyarray(
                        (img if warp is None else warp.apply(img)).dataobj, dtype=np.float64
                    )
                    if when in stacks[k]:
                        stacks[k][when].append(data)
                    if when in to_truth[scanner][k]:
                        to_truth[scanner][k][when].append(nrmse(data, truth[k], wm))
                    if scanner != ref and when in to_ref[scanner][k]:
                        to_ref[scanner][k][when].append(nrmse(data, label[k], wm))
        for k in KURTOSIS:
            for when in scores:
                cv[k][when].append(100 * mean_cv(np.stack(stacks[k][when]), wm))
    return {"plan": plan, "cv": cv, "to_ref": to_ref, "to_truth": to_truth}


def group_command(bids: Path, out: Path, work: Path, *options: str) -> list[str]:
    """``dkiharm bids out group -w work [options]`` with this Python."""
    cli = [sys.executable, "-m", "dkiharm_nipype.cli.run"]
    return [*cli, str(bids), str(out), "group", "-w", str(work), *options]


def method_cv(out: Path) -> dict[str, dict[str, float]]:
    """Mean WM CV per method and map from the group level's ``evaluation/cv.tsv``."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in read_tsv(out / "evaluation" / "cv.tsv"):
        if row["roi"] == "WM":
            values.setdefault(row["method"], {}).setdefault(row["param"], []).append(
                float(row["cv_mean"])
            )
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in values.items()}


def timings(out: Path, work: Path) -> dict:
    train = {}
    for log in sorted((out / "models").glob("scanner-*_training.tsv")):
        rows = read_tsv(log)
        train[log.name.split("_")[0][8:]] = (sum(float(r["seconds"]) for r in rows), len(rows))
    infer = []
    for report in work.glob("dkiharm_wf/harmonize_*_wf/apply/_report/report.rst"):
        text = report.read_text()
        for line in text.splitlines():
            if line.strip().startswith("* duration :"):
                infer.append(float(line.split(":")[1]))
    return {"train": train, "infer": infer}


def method_scores(out: Path, reference: str) -> dict:
    """Mean WM NRMSE-to-reference of the first runs of the target scanners, per method and
    map, with the mean noise floor, from the group level's ``evaluation/nrmse.tsv``."""
    rows = [
        r for r in read_tsv(out / "evaluation" / "nrmse.tsv")
        if r["roi"] == "WM" and r["scanner"] != reference and r["run"] == "1"
    ]  # fmt: skip
    scores: dict[str, dict[str, list[float]]] = {}
    floors: dict[str, list[float]] = {}
    for r in rows:
        scores.setdefault(r["method"], {}).setdefault(r["param"], []).append(float(r["nrmse"]))
        if r["floor"]:
            floors.setdefault(r["param"], []).append(float(r["floor"]))
    return {
        "nrmse": {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in scores.items()},
        "floor": {k: float(np.mean(v)) for k, v in floors.items()},
        "floor_kind": sorted({r["kind"] for r in read_tsv(out / "evaluation" / "floor.tsv")}),
        "baseline": read_tsv(out / "evaluation" / "baseline.tsv"),
    }


def print_methods(res: dict, scores: dict) -> None:
    """DL vs linear vs ComBat vs RISH, each with the ceiling and the noise floor."""
    ceiling = {
        k: float(np.mean([np.mean(v[k]["ceiling"]) for v in res["to_ref"].values()]))
        for k in KURTOSIS
    }
    names = [m for m in ("before", "dl", "linear", "combat", "rish") if m in scores["nrmse"]]
    kinds = ", ".join(scores["floor_kind"]) or "none"
    print(
        "\nNRMSE-to-reference in WM by method (group-level evaluation, test subjects' target "
        f"scanners' first runs); floor: the reference's repeatability ({kinds}); "
        "ceiling: a perfect harmonization (phantom truth)"
    )
    print("| map | " + " | ".join(names) + " | ceiling | floor |")
    print("|---|" + "---:|" * (len(names) + 2))
    for k in KURTOSIS:
        floor = scores["floor"].get(k, float("nan"))
        cells = []
        for m in names:
            v = scores["nrmse"][m].get(k, float("nan"))
            cells.append(f"{v:.3f} ({v / floor:.1f}x)" if np.isfinite(floor) else f"{v:.3f}")
        print(f"| {k.upper()} | " + " | ".join(cells) + f" | {ceiling[k]:.3f} | {floor:.3f} |")
    if scores["baseline"]:
        print("\nnetworks vs the linear baseline (evaluation/baseline.tsv)")
        print("| scanner | map | dl | linear | chosen | dl beats linear |")
        print("|---|---|---:|---:|---|---|")
        for r in scores["baseline"]:
            print(
                f"| {r['scanner']} | {r['param'].upper()} | {float(r['nrmse_dl']):.3f} | "
                f"{float(r['nrmse_linear']):.3f} | {r['chosen']} | {r['dl_beats_linear']} |"
            )


def print_detail(res: dict) -> None:
    """What smooths: the harmonized reference scan against its raw fit, and the harmonized
    targets against the reference raw fit, all as NRMSE to the truth (issue #20.6 bars:
    1.2x and 1.5x)."""
    ref = res["plan"]["reference_scanner"]
    truth = res["to_truth"]
    print("\ndetail kept: NRMSE to the truth in WM, ratio to the reference scan's raw fit")
    print("| map | reference raw | reference harmonized (ratio) | targets harmonized (ratio) "
          "| targets linear (ratio) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for k in KURTOSIS:
        raw = np.mean(truth[ref][k]["before"])
        harm = np.mean(truth[ref][k]["after"])
        tgt = np.mean([np.mean(truth[t][k]["after"]) for t in truth if t != ref])
        lin = [np.mean(truth[t][k]["linear"]) for t in truth if t != ref and truth[t][k]["linear"]]
        lin_cell = f"{np.mean(lin):.3f} ({np.mean(lin) / raw:.2f}x)" if lin else "-"
        print(
            f"| {k.upper()} | {raw:.3f} | {harm:.3f} ({harm / raw:.2f}x) | "
            f"{tgt:.3f} ({tgt / raw:.2f}x) | {lin_cell} |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="paper-dataset1", help="phantom preset (tiny: a quick check)"
    )
    parser.add_argument("--slices", type=int, default=None, help="central slab thickness")
    parser.add_argument(
        "--voxel-mm",
        type=float,
        default=None,
        help="isotropic voxel size of the phantom (whole brain on a coarser grid; default 2)",
    )
    parser.add_argument(
        "--preproc",
        default="auto",
        choices=["auto", "mrtrix", "none"],
        help="the BIDS-App's --preproc (none skips MRtrix3 dwidenoise/mrdegibbs, which take "
        "most of the time of a 2-core run)",
    )
    parser.add_argument(
        "--denoiser",
        default="dwidenoise",
        choices=["dwidenoise", "mppca"],
        help="the BIDS-App's --denoiser (mppca: the package's torch MP-PCA, about 7x faster)",
    )
    parser.add_argument(
        "--network-input",
        default="dwi",
        choices=NETWORK_INPUTS,
        help="the BIDS-App's --network-input (dwi+fit: the networks also see and correct each "
        "scan's own IRLLS maps)",
    )
    parser.add_argument(
        "--reference-labels",
        default="rescan",
        choices=REFERENCE_LABELS,
        help="the BIDS-App's --reference-labels (fit: the reference scanner's network learns "
        "from its scans' own maps, as the paper)",
    )
    parser.add_argument(
        "--kernel-size", type=int, default=3, help="the BIDS-App's --kernel-size (3: the paper's)"
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--samples-per-epoch", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="folder to keep (and reuse) the run in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--comparators",
        nargs="*",
        default=["combat", "rish", "linear"],
        help="also run these (or none); linear also writes the baseline's maps (detail table)",
    )
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dkiharm-bench-"))
    bids, out, work = root / "bids", root / "out", root / "work"

    started = time.time()
    if not (bids / "dataset_description.json").exists():
        from dkiharm_nipype.phantom import generate

        overrides = {"slices": args.slices} if args.slices else {}
        if args.voxel_mm:
            overrides["voxel_mm"] = args.voxel_mm
        print(f"generating {args.preset} {overrides} into {bids} ...", flush=True)
        generate(bids, preset=args.preset, seed=args.seed, overwrite=True, **overrides)
    t_gen = time.time() - started

    started = time.time()
    cmd = group_command(
        bids, out, work,
        "--nprocs", "2", "--omp-nthreads", "1", "--seed", str(args.seed),
        "--epochs", str(args.epochs), "--samples-per-epoch", str(args.samples_per_epoch),
        "--preproc", args.preproc, "--denoiser", args.denoiser,
        "--network-input", args.network_input, "--reference-labels", args.reference_labels,
        "--kernel-size", str(args.kernel_size),
    )  # fmt: skip
    if args.comparators:
        cmd += ["--comparators", *args.comparators]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    t_group = time.time() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2

    # TOPUP (FSL, --preproc auto) corrects the susceptibility distortion; otherwise every
    # scan keeps it, and so must the perfect harmonization's maps
    res = evaluate(bids, out, distorted=args.preproc != "auto" or bool(missing_fsl()))
    times = timings(out, work)
    plan = res["plan"]
    print(
        f"\nphantom generation {t_gen:.0f} s; group level {t_group:.0f} s; peak RSS of one "
        f"process {peak_gb:.2f} GB; reference {plan['reference_scanner']}; training "
        f"{', '.join(plan['training_subjects'])}; testing {', '.join(plan['test_subjects'])}"
    )
    print("\nWM inter-scanner CV (%), mean over test subjects")
    print(
        "| map | before | after | reduction | ceiling: perfect harmonization (reduction) "
        "| paper before -> after (reduction) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for k in KURTOSIS:
        b, a = np.mean(res["cv"][k]["before"]), np.mean(res["cv"][k]["after"])
        c = np.mean(res["cv"][k]["ceiling"])
        pb, pa = PAPER_CV[k]
        print(
            f"| {k.upper()} | {b:.1f} | {a:.1f} | {100 * (1 - a / b):.1f} % | "
            f"{c:.1f} ({100 * (1 - c / b):.1f} %) | {pb} -> {pa} ({100 * (1 - pa / pb):.1f} %) |"
        )
    methods = method_cv(out)
    if methods:
        names = [m for m in ("before", "dl", "combat", "rish") if m in methods]
        print("\nWM inter-scanner CV (%) by method, group-level evaluation (evaluation/cv.tsv)")
        print("| map | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for k in KURTOSIS:
            cells = [f"{100 * methods[m].get(k, float('nan')):.1f}" for m in names]
            print(f"| {k.upper()} | " + " | ".join(cells) + " |")
    print(
        "\nNRMSE-to-reference in WM, mean over test subjects (before -> after; [ceiling: a "
        "perfect harmonization])"
    )
    print("| scanner | " + " | ".join(k.upper() for k in KURTOSIS) + " |")
    print("|---|" + "---|" * len(KURTOSIS))
    for scanner, vals in res["to_ref"].items():
        cells = []
        for k in KURTOSIS:
            b, a, c = (np.mean(vals[k][w]) for w in ("before", "after", "ceiling"))
            cells.append(
                f"{b:.3f} -> {a:.3f} ({100 * (1 - a / b):.0f} % lower) "
                f"[{c:.3f}, {100 * (1 - c / b):.0f} %]"
            )
        print(f"| {scanner} | " + " | ".join(cells) + " |")
    scores = method_scores(out, plan["reference_scanner"])
    print_methods(res, scores)
    print_detail(res)
    print("\nNRMSE to the phantom truth (reference scan's true maps) in WM (before -> after)")
    print("| scanner | " + " | ".join(k.upper() for k in KURTOSIS) + " |")
    print("|---|" + "---|" * len(KURTOSIS))
    for scanner, vals in res["to_truth"].items():
        cells = [
            f"{np.mean(vals[k]['before']):.3f} -> {np.mean(vals[k]['after']):.3f}"
            for k in KURTOSIS
        ]
        print(f"| {scanner} | " + " | ".join(cells) + " |")
    print(
        "\ntraining time per scanner: "
        + ", ".join(f"{s}: {sec:.0f} s ({n} epochs)" for s, (sec, n) in times["train"].items())
    )
    if times["infer"]:
        print(
            f"inference per scan: median {np.median(times['infer']):.1f} s "
            f"(max {max(times['infer']):.1f} s, {len(times['infer'])} scans)"
        )
    (root / "results.json").write_text(
        json.dumps({**res, "times": times, "methods": scores}, indent=2, default=float)
    )


if __name__ == "__main__":
    main()
