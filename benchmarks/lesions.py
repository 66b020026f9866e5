"""Benchmark on the ``hard`` phantom: lesions kept, CV and NRMSE cuts (issue #20.3/#20.5).

Generates the ``hard`` preset (clinical-like C: TE 90 ms, b = 1000/2000 with 12/24
directions vs research-like reference R: TE 60 ms, b up to 6000 with 3-24 directions per
shell; a 12-slice slab at 2 mm; four subjects) with a focal lesion (oedema-like free water,
loss of intra-axonal signal) in subjects 03 and 04 only, runs ``dkiharm ... group`` trained on
subjects 01 and 02 (healthy), then reports

* **lesion contrast** (:func:`dkiharm_nipype.evaluation.scores.lesion_contrast`: lesion
  core vs the normal WM 2-4 voxels around it, each scan in its own space with the phantom's truth lesion
  and WM masks) of MD, FA, MK, RK (and AK, KFA) in each scan's raw fit, its harmonized map
  and the truth; the **ratio** harmonized / reference raw fit (target 0.8-1.2) per scanner;
* the WM inter-scanner **CV** and **NRMSE-to-reference** of the test subjects before and
  after, with the ceiling of a perfect harmonization (``benchmarks/harmonize.py``'s
  evaluation: dipy SyN on FA into the reference scan).

Run: ``.venv/bin/python benchmarks/lesions.py [--keep DIR] [--epochs E]
[--samples-per-epoch S] [--preproc none] [--comparators combat rish]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmonize import KURTOSIS, evaluate, group_command  # noqa: E402

from dkiharm_nipype.evaluation.scores import lesion_contrast  # noqa: E402

MAPS = ("md", "fa", "mk", "rk", "ak", "kfa")
LESION_SUBJECTS = ("03", "04")
TRAIN = ("01", "02")


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float64)


def lesion_scores(bids: Path, out: Path, plan: dict) -> dict:
    """Lesion contrast per subject, scanner, map and source (raw fit, harmonized, truth)."""
    truth_root = bids / "derivatives" / "phantom-truth"
    scores: dict = {}
    for sub in (f"sub-{s}" for s in LESION_SUBJECTS):
        if sub not in plan["test_subjects"]:
            continue
        for scanner in plan["scanners"]:
            stem = f"{sub}_ses-{scanner}_run-1_space-dwi"
            tdir = truth_root / sub / f"ses-{scanner}" / "dwi"
            lesion = _load(tdir / f"{stem}_desc-lesion_mask.nii.gz") > 0
            wm = _load(tdir / f"{stem}_label-WM_probseg.nii.gz") > 0.9
            odir = out / sub / f"ses-{scanner}" / "dwi"
            for k in MAPS:
                name = f"{stem}_model-dki_param-{k}"
                sources = {
                    "raw": odir / f"{name}_dwimap.nii.gz",
                    "harmonized": odir / f"{name}_desc-harmonized_dwimap.nii.gz",
                    "truth": tdir / f"{name}_desc-truth_dwimap.nii.gz",
                }
                for what, path in sources.items():
                    if path.is_file():
                        res = lesion_contrast(_load(path), lesion, wm)
                        scores.setdefault(sub, {}).setdefault(scanner, {}).setdefault(k, {})[
                            what
                        ] = res
    return scores


def contrast_ratios(scores: dict, reference: str) -> dict:
    """Contrast of each scan's raw and harmonized map over the reference's raw contrast."""
    ratios: dict = {}
    for by_scanner in scores.values():
        ref = by_scanner[reference]
        for scanner, by_map in by_scanner.items():
            for k, by_src in by_map.items():
                base = ref[k]["raw"]["contrast"]
                for what in ("raw", "harmonized"):
                    if what in by_src:
                        ratios.setdefault(scanner, {}).setdefault(k, {}).setdefault(
                            what, []
                        ).append(by_src[what]["contrast"] / base)
    return ratios


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="folder to keep (and reuse) the run in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples-per-epoch", type=int, default=40_000)
    parser.add_argument("--preproc", default="mrtrix", choices=["auto", "mrtrix", "none"])
    parser.add_argument("--denoiser", default="mppca", choices=["dwidenoise", "mppca"])
    parser.add_argument("--network-input", default="dwi", choices=["dwi", "dwi+fit"])
    parser.add_argument("--comparators", nargs="*", default=[], help="combat, rish")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="dkiharm-lesions-"))
    bids, out, work = root / "bids", root / "out", root / "work"

    started = time.time()
    if not (bids / "dataset_description.json").exists():
        from dkiharm_nipype.phantom import generate

        print(f"generating hard (lesions in {', '.join(LESION_SUBJECTS)}) into {bids}", flush=True)
        generate(bids, "hard", args.seed, overwrite=True, lesion_subjects=LESION_SUBJECTS)
    t_gen = time.time() - started

    started = time.time()
    cmd = group_command(
        bids, out, work,
        "--nprocs", "2", "--omp-nthreads", "1", "--seed", str(args.seed),
        "--train-participants", *TRAIN, "--reference-labels", "fit",
        "--epochs", str(args.epochs), "--samples-per-epoch", str(args.samples_per_epoch),
        "--preproc", args.preproc, "--denoiser", args.denoiser,
        "--network-input", args.network_input,
    )  # fmt: skip
    if args.comparators:
        cmd += ["--comparators", *args.comparators]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    t_group = time.time() - started

    plan = json.loads((out / "models" / "harmonization.json").read_text())
    ref = plan["reference_scanner"]
    scores = lesion_scores(bids, out, plan)
    ratios = contrast_ratios(scores, ref)
    print(
        f"\nphantom generation {t_gen:.0f} s; group level {t_group:.0f} s; reference {ref}; "
        f"training {', '.join(plan['training_subjects'])}; testing "
        f"{', '.join(plan['test_subjects'])}"
    )
    print("\nLesion contrast (core / surrounding WM - 1), mean over the lesion subjects")
    print("| scanner | source | " + " | ".join(k.upper() for k in MAPS) + " |")
    print("|---|---|" + "---:|" * len(MAPS))
    for scanner in plan["scanners"]:
        for what in ("truth", "raw", "harmonized"):
            cells = []
            for k in MAPS:
                vals = [
                    scores[s][scanner][k][what]["contrast"]
                    for s in scores
                    if what in scores[s][scanner][k]
                ]
                cells.append(f"{100 * np.mean(vals):+.0f} %" if vals else "-")
            print(f"| {scanner} | {what} | " + " | ".join(cells) + " |")
    print(f"\nLesion contrast ratio to the reference ({ref}) raw fit (target 0.8-1.2)")
    print("| scanner | map | " + " | ".join(k.upper() for k in MAPS) + " |")
    print("|---|---|" + "---:|" * len(MAPS))
    for scanner, by_map in ratios.items():
        for what in ("raw", "harmonized"):
            cells = [
                f"{np.mean(by_map[k][what]):.2f}" if what in by_map.get(k, {}) else "-"
                for k in MAPS
            ]
            print(f"| {scanner} | {what} | " + " | ".join(cells) + " |")

    res = evaluate(bids, out, distorted=True)
    print("\nWM inter-scanner CV (%), test subjects: before -> after [ceiling]")
    print("| map | before | after | cut | ceiling (cut) |")
    print("|---|---:|---:|---:|---:|")
    for k in KURTOSIS:
        b, a, c = (np.mean(res["cv"][k][w]) for w in ("before", "after", "ceiling"))
        print(
            f"| {k.upper()} | {b:.1f} | {a:.1f} | {100 * (1 - a / b):.0f} % | "
            f"{c:.1f} ({100 * (1 - c / b):.0f} %) |"
        )
    print("\nNRMSE-to-reference in WM, test subjects: before -> after (cut) [ceiling, cut]")
    print("| scanner | " + " | ".join(k.upper() for k in KURTOSIS) + " |")
    print("|---|" + "---|" * len(KURTOSIS))
    for scanner, vals in res["to_ref"].items():
        cells = []
        for k in KURTOSIS:
            b, a, c = (np.mean(vals[k][w]) for w in ("before", "after", "ceiling"))
            cut, ceiling = 100 * (1 - a / b), 100 * (1 - c / b)
            cells.append(f"{b:.3f} -> {a:.3f} ({cut:.0f} %) [{c:.3f}, {ceiling:.0f} %]")
        print(f"| {scanner} | " + " | ".join(cells) + " |")
    (root / "lesions.json").write_text(
        json.dumps(
            {"command": cmd, "scores": scores, "ratios": ratios, "evaluation": res},
            indent=2,
            default=float,
        )
    )
    print(f"\nrecord: {root / 'lesions.json'}")


if __name__ == "__main__":
    main()
