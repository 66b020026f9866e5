"""``dkiharm-phantom``: write a traveling-subject phantom as a BIDS dataset."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESET_NAMES


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid seed {value!r}; give a non-negative integer, e.g. --seed 0"
        ) from None
    if seed < 0:
        raise argparse.ArgumentTypeError(
            f"invalid seed {value!r}; give a non-negative integer, e.g. --seed 0"
        )
    return seed


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}; give an integer >= 1")
    return n


def _preset(value: str) -> str:
    if value not in PRESET_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown preset {value!r}; choose one of {', '.join(PRESET_NAMES)}"
        )
    return value


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {value!r}; give a number in [0, 1]")
    return x


def _radius(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if not 0.5 <= x <= 40.0:
        raise argparse.ArgumentTypeError(
            f"invalid lesion radius {value!r}; give a number of mm in [0.5, 40], e.g. 6"
        )
    return x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkiharm-phantom",
        description="Simulate traveling subjects on virtual scanners and write BIDS raw data "
        "with ground-truth derivatives (derivatives/phantom-truth).",
    )
    parser.add_argument("out_dir", help="dataset root to create (empty or absent)")
    parser.add_argument(
        "--preset",
        type=_preset,
        default="tiny",
        help=f"one of {', '.join(PRESET_NAMES)} (default: tiny)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="non-negative integer seed")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace out_dir if it is not empty"
    )
    parser.add_argument("--subjects", type=_positive, help="number of subjects")
    parser.add_argument(
        "--scanners", nargs="+", metavar="LABEL", help="keep only these scanners (session labels)"
    )
    parser.add_argument(
        "--matrix",
        type=_positive,
        nargs=2,
        metavar=("NI", "NJ"),
        help="in-plane matrix of every scanner (centred crop of the FOV)",
    )
    parser.add_argument("--slices", type=_positive, help="number of slices (centred slab)")
    parser.add_argument(
        "--voxel-mm",
        type=float,
        metavar="MM",
        help="isotropic voxel size: the same field of view on a coarser/finer grid",
    )
    parser.add_argument("--n-jobs", type=_positive, help="parallel processes (one per subject)")
    parser.add_argument(
        "--no-effects",
        nargs="+",
        default=[],
        metavar="EFFECT",
        choices=["noise", "bias", "gradients", "gibbs", "partial_fourier", "distortion", "motion"],
        help="switch scanner effects off",
    )
    lesions = parser.add_argument_group(
        "lesions",
        "a focal white-matter lesion (oedema-like free water, loss of intra-axonal signal) at "
        "the same anatomical place in every scan of the chosen subjects; its truth mask is in "
        "derivatives/phantom-truth (desc-lesion_mask). Keep these subjects out of training.",
    )
    lesions.add_argument(
        "--lesion-subjects",
        nargs="+",
        metavar="LABEL",
        help="subjects that get a lesion, e.g. 03 04",
    )
    lesions.add_argument(
        "--lesion-radius-mm", type=_radius, metavar="MM", help="core radius (default 6)"
    )
    lesions.add_argument(
        "--lesion-free-water",
        type=_fraction,
        metavar="F",
        help="share of the tissue water turned into free water (default 0.3)",
    )
    lesions.add_argument(
        "--lesion-intra-loss",
        type=_fraction,
        metavar="F",
        help="share of the intra-axonal signal lost (default 0.5)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .generate import PhantomError, generate

    overrides = {
        "subjects": args.subjects,
        "scanners": args.scanners,
        "matrix": tuple(args.matrix) if args.matrix else None,
        "slices": args.slices,
        "voxel_mm": args.voxel_mm,
        "n_jobs": args.n_jobs,
        "lesion_subjects": args.lesion_subjects,
        "lesion_radius_mm": args.lesion_radius_mm,
        "lesion_free_water": args.lesion_free_water,
        "lesion_intra_loss": args.lesion_intra_loss,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update({name: False for name in args.no_effects})
    try:
        root = generate(
            args.out_dir, args.preset, args.seed, overwrite=args.overwrite, **overrides
        )
    except PhantomError as exc:
        parser.error(str(exc).rstrip("."))
    except KeyboardInterrupt:
        print("dkiharm-phantom: interrupted; nothing was written.", file=sys.stderr)
        return 130
    print(root)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
