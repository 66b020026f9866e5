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
