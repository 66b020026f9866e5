"""Benchmark on the ``hard`` phantom: lesions kept, CV and NRMSE cuts (issue #20.3/#20.5).

Generates the ``hard`` preset (clinical-like C: TE 90 ms, b = 1000/2000 with 12/24
directions vs research-like reference R: TE 60 ms, b up to 6000 with 3-24 directions per
shell; a 12-slice slab at 2 mm; four subjects) with a focal lesion (oedema-like free water,
loss of intra-axonal signal) in subjects 03 and 04 only, runs ``dkiharm ... group`` trained on
subjects 01 and 02 (healthy), then reports

* **lesion contrast** (:func:`dkiharm_nipype.evaluation.scores.lesion_contrast`: lesion
  core vs the normal WM 2-4 voxels around it, each scan in its own space with the phantom's
  truth lesion and WM masks) of MD, FA, MK, RK (and AK, KFA) in each scan's raw fit, its
  harmonized map and the truth; the **ratio** harmonized / reference raw fit (target
  0.8-1.2) per scanner;
* the WM inter-scanner **CV** and **NRMSE-to-reference** of the test subjects before and
  after, with the ceiling of a perfect harmonization (``benchmarks/harmonize.py``'s
  evaluation: dipy SyN on FA into the reference scan).

Run: ``.venv/bin/python benchmarks/lesions.py [--keep DIR] [--epochs E]
[--samples-per-epoch S] [--preproc none] [--comparators combat rish] [--record NAME]``;
``--from-json DIR/lesions.json`` prints (and records) a finished run again. Tables and a
``record.json`` go to ``docs/benchmarks/NAME/`` (``benchmarks/record.py``).
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
from record import write_record  # noqa: E402

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


def tables(result: dict) -> dict[str, list[dict]]:
    """The run's figures as rows: lesion contrast, contrast ratios, WM CV, NRMSE."""
    scores, ratios, res = result["scores"], result["ratios"], result["evaluation"]
    plan = res["plan"]
    contrast = []
    for scanner in plan["scanners"]:
        for what in ("truth", "raw", "harmonized"):
            row = {"scanner": scanner, "source": what}
            for k in MAPS:
                vals = [
                    scores[s][scanner][k][what]["contrast"]
                    for s in scores
                    if what in scores[s][scanner][k]
                ]
                row[k] = round(100 * float(np.mean(vals)), 1) if vals else None
            contrast.append(row)
    ratio = [
        {"scanner": scanner, "source": what}
        | {k: round(float(np.mean(by_map[k][what])), 2) for k in MAPS}
        for scanner, by_map in ratios.items()
        for what in ("raw", "harmonized")
    ]
    cv = []
    for k in KURTOSIS:
        b, a, c = (float(np.mean(res["cv"][k][w])) for w in ("before", "after", "ceiling"))
        cv.append(
            {"map": k, "before": round(b, 1), "after": round(a, 1),
             "cut_pct": round(100 * (1 - a / b)), "ceiling": round(c, 1),
             "ceiling_cut_pct": round(100 * (1 - c / b))}
        )  # fmt: skip
    nrmse = []
    for scanner, vals in res["to_ref"].items():
        for k in KURTOSIS:
            b, a, c = (float(np.mean(vals[k][w])) for w in ("before", "after", "ceiling"))
            nrmse.append(
                {"scanner": scanner, "map": k, "before": round(b, 3), "after": round(a, 3),
                 "cut_pct": round(100 * (1 - a / b)), "ceiling": round(c, 3),
                 "ceiling_cut_pct": round(100 * (1 - c / b))}
            )  # fmt: skip
    return {"lesion_contrast_pct": contrast, "contrast_ratio": ratio, "wm_cv": cv, "nrmse": nrmse}


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("-" if v is None else str(v) for v in row.values()) + " |")


def report(result: dict, *, record: str | None = None, wall_s: dict | None = None) -> None:
    """Print the tables (and write them as a benchmark record)."""
    res = result["evaluation"]
    plan = res["plan"]
    print(
        f"\nreference {plan['reference_scanner']}; training "
        f"{', '.join(plan['training_subjects'])}; testing {', '.join(plan['test_subjects'])}"
    )
    rows = tables(result)
    _print_table("Lesion contrast (core / surrounding WM - 1, %), mean over the lesion subjects",
                 rows["lesion_contrast_pct"])  # fmt: skip
    _print_table(f"Lesion contrast ratio to the reference ({plan['reference_scanner']}) raw fit "
                 "(target 0.8-1.2)", rows["contrast_ratio"])  # fmt: skip
    _print_table("WM inter-scanner CV (%), test subjects", rows["wm_cv"])
    _print_table("NRMSE-to-reference in WM, test subjects", rows["nrmse"])
    if record:
        path = write_record(
            record,
            tables=rows,
            options=result.get("options", {}),
            wall_s=wall_s or result.get("wall_s"),
            command=" ".join(result["command"]),
            notes="hard preset, lesions in sub-03/04 (test), trained on sub-01/02",
        )
        print(f"\nrecord: {path}")


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
    parser.add_argument("--record", help="write the tables under docs/benchmarks/RECORD/")
    parser.add_argument("--from-json", type=Path, help="report a finished run's lesions.json")
    args = parser.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()), record=args.record)
        return
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
    scores = lesion_scores(bids, out, plan)
    result = {
        "command": cmd,
        "options": vars(args) | {"keep": str(root), "from_json": None},
        "wall_s": {"phantom": t_gen, "group": t_group},
        "scores": scores,
        "ratios": contrast_ratios(scores, plan["reference_scanner"]),
        "evaluation": evaluate(bids, out, distorted=True),
    }
    (root / "lesions.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"phantom generation {t_gen:.0f} s; group level {t_group:.0f} s")
    report(result, record=args.record)
    print(f"run: {root / 'lesions.json'}")


if __name__ == "__main__":
    main()
