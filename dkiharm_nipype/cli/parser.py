"""Command-line parser of the ``dkiharm`` BIDS-App (fMRIPrep/QSIPrep conventions)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ..__about__ import __version__
from ..config import NETWORK_INPUTS, REFERENCE_LABELS, ExecConfig, RunConfig
from ..preproc.modes import DENOISERS, MASK_METHODS, PREPROC_MODES
from ..utils.env import DEVICE_PATTERN

PLUGINS = (
    "Linear",
    "MultiProc",
    "LegacyMultiProc",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "Condor",
    "CondorDAGMan",
    "OAR",
    "IPython",
    "Debug",
)


class _OneLineParser(argparse.ArgumentParser):
    """Errors are one line (``dkiharm: error: ...``) and exit with status 2."""

    #: where the options being parsed come from, when not the command line
    context = ""

    def error(self, message: str):  # noqa: D401 - argparse API
        where = f" in {self.context}" if self.context else ""
        self.exit(2, f"{self.prog}: error: {message}{where} (see '{self.prog} --help')\n")


#: Memory units of ``--mem`` (to GB).
_MEM_UNITS = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}


def parse_memory(value: str) -> float:
    """``16GB``, ``16G``, ``16000MB``, ``1.5T`` -> GB; a bare number is refused.

    >>> parse_memory("16GB"), parse_memory("16000MB"), parse_memory("1.5 T")
    (16.0, 16.0, 1500.0)
    """
    text = value.strip().upper().replace(" ", "").removesuffix("IB").removesuffix("B")
    number, unit = text[:-1], text[-1:]
    try:
        gigabytes = float(number) * _MEM_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"'{value}' is not a memory size; write e.g. 16GB or 16000MB") from None
    if gigabytes <= 0:
        raise ValueError(f"'{value}' is not a positive memory size; write e.g. 16GB")
    return gigabytes


def _memory(parser):
    def check(value: str) -> float:
        try:
            return parse_memory(value)
        except ValueError as exc:
            parser.error(f"--mem {exc}")

    return check


def _existing_dir(parser, value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_dir():
        parser.error(f"bids_dir {value} does not exist or is not a folder; give the BIDS root")
    return path


def _positive_int(parser, name: str, *, odd: bool = False):
    kind = "an odd positive integer (3 is the paper's)" if odd else "a positive integer"

    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1 or (odd and number % 2 == 0):
            parser.error(f"{name} must be {kind}, got '{value}'")
        return number

    return check


def _seed(parser):
    def check(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not 0 <= number < 2**32:
            parser.error(f"--seed must be an integer in [0, 2**32), got '{value}'")
        return number

    return check


def _plugin_args(parser):
    """``--plugin-args`` takes inline JSON or the path of a JSON file."""

    def parse(value: str) -> dict:
        text = value
        if not value.lstrip().startswith("{"):
            path = Path(value)
            if not path.is_file():
                parser.error(
                    f"--plugin-args {value} is neither inline JSON nor an existing JSON file; "
                    'write e.g. \'{"sbatch_args": "-p short"}\''
                )
            text = path.read_text()
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            parser.error(
                f"--plugin-args is not valid JSON ({exc.msg}); "
                'write e.g. \'{"sbatch_args": "-p short"}\''
            )
        if not isinstance(args, dict):
            parser.error("--plugin-args must be a JSON object, e.g. '{\"n_procs\": 2}'")
        return args

    return parse


def get_parser(*, positionals: bool = True) -> argparse.ArgumentParser:
    """Build the parser; positionals first, then option groups.

    ``positionals=False`` gives the options alone (what a ``--config-file`` may set).
    """
    parser = _OneLineParser(
        prog="dkiharm",
        description=(
            "dkiharm: harmonize diffusion kurtosis imaging (DKI) across MRI scanners with "
            "traveling subjects and a per-scanner 3-D hierarchical CNN. The participant level "
            "preprocesses and fits DKI for every scan; the group level picks the reference "
            "scanner, trains one network per scanner and writes harmonized maps."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # "--mem 16000" must not be read as another option's prefix
    )
    if positionals:
        _add_positionals(parser)
    parser.add_argument("--version", action="version", version=f"dkiharm {__version__}")
    parser.add_argument(
        "--config-file",
        type=Path,
        metavar="FILE",
        help="TOML file of options (long names without '--', e.g. 'epochs = 50', "
        "'participant-label = [\"01\"]'); options on the command line win; "
        "output_dir/logs/config.toml of a run can be passed back",
    )
    _add_options(parser)
    return parser


def _add_positionals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bids_dir",
        type=lambda v: _existing_dir(parser, v),
        help="root folder of a BIDS dataset (sub-XX folders at the top level)",
    )
    parser.add_argument(
        "output_dir", type=Path, help="folder for the derivatives (BIDS-Derivatives layout)"
    )
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="processing stage: per-scan fitting, or scanner-level training and harmonization",
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    sel = parser.add_argument_group("Selecting data")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="subjects to process (with or without 'sub-')",
    )
    sel.add_argument(
        "--session-label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="sessions to process (with or without 'ses-')",
    )
    sel.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON with pybids queries per data type, e.g. {"dwi": {"run": 1}}',
    )
    sel.add_argument(
        "--scanner-entity",
        default="ses",
        metavar="ENTITY",
        help="what identifies a scanner: 'ses' (session label), 'acq', or a "
        "sidecar field such as DeviceSerialNumber",
    )
    sel.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not validate the input dataset with bids-validator-deno before processing",
    )
    sel.add_argument(
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="folder of a pybids index of bids_dir, made if absent and reused by later runs "
        "(faster start on large datasets)",
    )

    sel.add_argument(
        "--derivatives",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="folder of preprocessed DWIs (QSIPrep-style *_desc-preproc_dwi.nii.gz with "
        ".bval/.bvec and *_desc-brain_mask.nii.gz); the scans found there skip dkiharm's "
        "preprocessing (repeatable)",
    )

    proc = parser.add_argument_group("Processing")
    proc.add_argument(
        "--preproc",
        choices=PREPROC_MODES,
        default="auto",
        help="auto: denoising + MRtrix3 Gibbs removal, plus FSL TOPUP/Eddy when "
        "FSL is installed; fsl: require TOPUP/Eddy; mrtrix: no FSL",
    )
    proc.add_argument(
        "--denoiser",
        choices=DENOISERS,
        default="mppca",
        help="denoising step of --preproc auto|fsl|mrtrix: the package's torch MP-PCA "
        "(default: dwidenoise's estimator, windows every 3 voxels, 6-7x faster and at least "
        "as accurate; on the GPU with --device auto/cuda) or MRtrix3 dwidenoise",
    )
    proc.add_argument(
        "--mask-method",
        choices=MASK_METHODS,
        default="dwi2mask",
        help="brain-mask estimation on the preprocessed DWI",
    )
    proc.add_argument(
        "--fit-method",
        choices=["irlls", "wls", "ols"],
        default="irlls",
        help="DKI fitting method (IRLLS: robust, iteratively reweighted)",
    )
    proc.add_argument(
        "--b-max",
        type=float,
        metavar="B",
        help="use only volumes with b <= B s/mm^2 for the DKI fit",
    )
    proc.add_argument(
        "--seed",
        type=_seed(parser),
        default=0,
        help="random seed for every stochastic step (reproducible outputs)",
    )

    harm = parser.add_argument_group("Harmonization")
    harm.add_argument(
        "--reference-scanner",
        metavar="LABEL",
        help="reference scanner (default: the one with the highest WM SNR)",
    )
    harm.add_argument(
        "--snr-roi",
        metavar="FILE",
        help="white-matter mask for each scan's SNR, on its DWI grid; {subject}, {session} and "
        "{run} in the path are replaced by the scan's labels (default: FA >= 0.45 and MD <= "
        "1.1e-3 mm2/s inside the eroded brain mask; a scan without such voxels gets SNR n/a)",
    )
    harm.add_argument(
        "--train-participants",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="traveling subjects to train on (default: 40%% of them, seeded)",
    )
    harm.add_argument(
        "--registration",
        default="auto",
        choices=["auto", "fnirt", "dipy-syn", "mrtrix", "none"],
        help="non-linear registration of the reference labels into each target "
        "scan (auto: FNIRT with FSL, else the best open engine; none: "
        "scans are already aligned)",
    )
    harm.add_argument(
        "--epochs",
        type=_positive_int(parser, "--epochs"),
        default=100,
        help="maximum training epochs per scanner (early stopping applies)",
    )
    harm.add_argument(
        "--samples-per-epoch",
        type=_positive_int(parser, "--samples-per-epoch"),
        default=200_000,
        help="training voxels drawn per epoch",
    )
    harm.add_argument(
        "--network-input",
        default="dwi",
        choices=NETWORK_INPUTS,
        help="what each scanner's network sees: the normalised DWIs (dwi, the paper) or also "
        "the scan's own IRLLS maps, which it learns to correct (dwi+fit: lower RK/KFA error)",
    )
    harm.add_argument(
        "--kernel-size",
        type=_positive_int(parser, "--kernel-size", odd=True),
        default=3,
        metavar="K",
        help="edge of each network's first (spatial) convolution: 3 (the paper's 3x3x3) or 5 "
        "(5x5x5 context: lower kurtosis error on noisy, undenoised data; ~3.5x training time)",
    )
    harm.add_argument(
        "--reference-labels",
        default="rescan",
        choices=REFERENCE_LABELS,
        help="labels of the reference scanner's own training scans: the subject's other run "
        "on that scanner, registered (rescan: independent noise, so its network learns the "
        "maps instead of copying its input) or the scan's own maps (fit, the paper)",
    )
    harm.add_argument(
        "--device",
        default="auto",
        help="torch device for training, inference and MP-PCA denoising: auto (each node "
        "takes a GPU if the host that runs it has one, else the CPU), cpu, cuda, cuda:1",
    )
    harm.add_argument(
        "--mc-samples",
        type=int,
        default=0,
        metavar="N",
        help="MC-dropout passes for voxelwise uncertainty maps (0: off)",
    )
    harm.add_argument(
        "--models",
        type=Path,
        metavar="DIR",
        help="participant level: trained models (output_dir/models of a group "
        "run) to write harmonized maps with",
    )

    ev = parser.add_argument_group("Evaluation and report (group level)")
    ev.add_argument(
        "--wm-mask",
        metavar="FILE",
        help="white-matter mask in each subject's reference scan space; '{subject}' in the "
        "path is replaced by the label (default: FA >= 0.2 and MD <= 1.5e-3 mm2/s of the "
        "reference fit)",
    )
    ev.add_argument(
        "--roi-atlas",
        metavar="FILE",
        help="ROI label image in each subject's reference scan space ('{subject}' as above); "
        "needs --roi-table (default: the phantom's 15 WM ROIs when the dataset has them)",
    )
    ev.add_argument(
        "--roi-table", type=Path, metavar="TSV", help="index, name[, abbreviation] per label"
    )
    ev.add_argument(
        "--comparators",
        nargs="+",
        choices=["combat", "rish", "linear"],
        default=[],
        help="also harmonize the test subjects with ComBat and/or RISH and compare; the linear "
        "baseline (per-map regression, fitted beside each network) is always scored, 'linear' "
        "also writes its desc-linear maps",
    )
    ev.add_argument(
        "--experiment",
        dest="experiments",
        nargs="+",
        choices=["trainsize", "leavepout", "tissue", "seeds"],
        default=[],
        help="the paper's validation experiments: training-size sweep, leave-p-subjects-out, "
        "leave-one-tissue-out, repeated trainings (each retrains networks: slow)",
    )
    ev.add_argument(
        "--tissue-maps",
        metavar="DIR|PATTERN",
        help="grey-matter and CSF probability maps for --experiment tissue, in each scan's DWI "
        "space: a derivatives folder with BIDS *_label-SGM|GM|CSF_probseg.nii.gz files, or a "
        "path pattern with {subject}, {session}, {run} and {label} (SGM or GM, CSF) "
        "(default: each scan segmented from its own fit: CSF MD >= 2e-3 mm2/s, WM FA >= 0.2 "
        "and MD < 1.1e-3, grey matter the rest)",
    )

    perf = parser.add_argument_group("Execution")
    perf.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        default=Path("work"),
        help="Nipype working folder (reused by reruns)",
    )
    perf.add_argument(
        "--nprocs",
        "--nthreads",
        type=_positive_int(parser, "--nprocs"),
        default=os.cpu_count() or 1,
        help="maximum processes for MultiProc",
    )
    perf.add_argument(
        "--omp-nthreads",
        type=_positive_int(parser, "--omp-nthreads"),
        default=None,
        help="threads per process (default: min(8, nprocs))",
    )
    perf.add_argument(
        "--mem",
        dest="mem_gb",
        type=_memory(parser),
        default=None,
        metavar="SIZE",
        help="memory limit for MultiProc, with a unit: 16GB, 16000MB",
    )
    perf.add_argument(
        "--mem-gb",
        "--mem_gb",
        dest="mem_gb",
        type=float,
        metavar="GB",
        help="the same limit in GB (older spelling of --mem)",
    )
    perf.add_argument(
        "--plugin", choices=PLUGINS, default="MultiProc", help="Nipype execution plugin"
    )
    perf.add_argument(
        "--plugin-args",
        type=_plugin_args(parser),
        default={},
        metavar="JSON",
        help="plugin arguments as inline JSON or a JSON file",
    )
    perf.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop the whole run at the first failed step, publishing nothing (default: "
        "report and skip the failed scan, finish and publish the others, exit with status 1)",
    )
    perf.add_argument(
        "--gpu-plugin-args",
        default="",
        metavar="ARGS",
        help="scheduler arguments for the jobs that can use a GPU (training, inference, torch "
        "denoising) under a batch plugin, e.g. '--gres=gpu:1 --partition=gpu' for SLURM",
    )
    perf.add_argument(
        "--write-graph",
        action="store_true",
        help="write the workflow graphs (hierarchical and colored, PNG and SVG; the "
        "group level adds the participant graph) and a methods figure (graph_methods) "
        "into output_dir/logs",
    )
    perf.add_argument(
        "--boilerplate-only",
        "--boilerplate_only",
        action="store_true",
        help="write the methods text (output_dir/logs/CITATION.{md,html,tex,bib}), and "
        "the graphs with --write-graph, then exit without processing",
    )
    perf.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-v info from Nipype, -vv debug)",
    )


def _read_toml(parser, path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        parser.error(f"--config-file {path} does not exist; check the path")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--config-file {path} is not valid TOML ({exc}); fix the file")


def _toml_to_argv(parser, table: dict, path: Path) -> list[str]:
    """The command-line tokens that a ``--config-file`` table stands for."""
    actions = parser._option_string_actions  # noqa: SLF001 - argparse's option table
    tokens: list[str] = []
    for key, value in table.items():
        if key == "resolved":  # what a run dumped for the record (logs/config.toml)
            continue
        option = "--" + key.replace("_", "-") if len(key) > 1 else "-" + key
        action = actions.get(option) or actions.get("--" + key)
        if action is None or option in ("--help", "--version", "--config-file"):
            parser.error(
                f"'{key}' is not an option of dkiharm; use the long option names of "
                "'dkiharm --help' (bids_dir, output_dir and the analysis level go on the "
                "command line)"
            )
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            tokens += [option] if value is True else []
        elif isinstance(action, argparse._CountAction):  # noqa: SLF001
            tokens += [option] * int(value)
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001 - repeatable
            for item in value if isinstance(value, list) else [value]:
                tokens += [option, str(item)]
        elif isinstance(value, list):
            tokens += [option, *(str(v) for v in value)] if value else []
        elif isinstance(value, dict):
            tokens += [option, json.dumps(value)]
        else:
            tokens += [option, str(value)]
    return tokens


def _with_config_file(parser, argv: list[str]) -> argparse.Namespace:
    """Options of ``--config-file`` as defaults that the command line overrides."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config-file", type=Path)
    known, _ = first.parse_known_args(argv)
    if known.config_file is None:
        return argparse.Namespace()
    path = known.config_file
    options = get_parser(positionals=False)
    options.context = f"--config-file {path}"
    for action in options._actions:  # noqa: SLF001 - only what the file sets
        action.default = argparse.SUPPRESS
    return options.parse_args(_toml_to_argv(options, _read_toml(parser, path), path))


def _glue_option_values(argv: list[str]) -> list[str]:
    """``--gpu-plugin-args --partition=gpu``: argparse would read the value as an option."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--gpu-plugin-args":
            argv[i : i + 2] = [f"{arg}={argv[i + 1]}"]
            break
    return argv


def _gpu_plugin_args(parser, opts) -> str:
    """``--gpu-plugin-args`` only means something to a batch plugin that submits each node."""
    from ..utils.resources import ARGS_KEY

    gpu = opts.gpu_plugin_args.strip()
    if gpu and opts.plugin not in ARGS_KEY:
        parser.error(
            f"--gpu-plugin-args needs a batch plugin ({', '.join(ARGS_KEY)}); "
            f"--plugin {opts.plugin} runs every node on this machine"
        )
    if gpu and opts.device == "cpu":
        parser.error(
            "--gpu-plugin-args asks GPUs for the training/inference jobs but --device cpu "
            "keeps them on the CPU; use --device auto (or cuda), or drop --gpu-plugin-args"
        )
    return gpu


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate the command line into a :class:`RunConfig`.

    Options of a ``--config-file`` fill in what the command line does not set.
    """
    parser = get_parser()
    argv = _glue_option_values(sys.argv[1:] if argv is None else list(argv))
    opts = parser.parse_args(argv, namespace=_with_config_file(parser, argv))
    bids_dir: Path = opts.bids_dir
    output_dir = opts.output_dir.expanduser().absolute()
    if output_dir == bids_dir:
        parser.error(
            f"output_dir {output_dir} is the BIDS folder itself; "
            f"use e.g. {bids_dir / 'derivatives' / 'dkiharm'}"
        )
    if bids_dir in output_dir.parents and (bids_dir / "derivatives") not in (
        output_dir,
        *output_dir.parents,
    ):
        parser.error(
            f"output_dir {output_dir} lies inside the raw BIDS data; "
            f"use {bids_dir / 'derivatives' / 'dkiharm'} or a folder outside it"
        )
    omp = opts.omp_nthreads or min(8, opts.nprocs)
    if opts.mc_samples < 0 or opts.mc_samples == 1:
        parser.error(f"--mc-samples must be 0 (off) or at least 2, got {opts.mc_samples}")
    device = opts.device  # "auto" stays: each node decides on the host that runs it
    if not re.fullmatch(DEVICE_PATTERN, device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")
    models_dir = None
    if opts.models is not None:
        models_dir = opts.models.expanduser().absolute()
        if not models_dir.is_dir():
            parser.error(
                f"--models {opts.models} is not a folder; give output_dir/models of a "
                "group-level run"
            )
    for folder in opts.derivatives:
        if not folder.expanduser().is_dir():
            parser.error(f"--derivatives {folder} is not a folder; give a QSIPrep output folder")
    for flag, value in (("--wm-mask", opts.wm_mask), ("--roi-atlas", opts.roi_atlas)):
        if value and "{subject}" not in value and not Path(value).expanduser().is_file():
            parser.error(f"{flag} {value} does not exist; give a NIfTI label image")
    if opts.snr_roi and "{" not in opts.snr_roi and not Path(opts.snr_roi).expanduser().is_file():
        parser.error(f"--snr-roi {opts.snr_roi} does not exist; give a white-matter mask (NIfTI)")
    if opts.tissue_maps and "{" not in opts.tissue_maps:
        if not Path(opts.tissue_maps).expanduser().is_dir():
            parser.error(
                f"--tissue-maps {opts.tissue_maps} is not a folder; give a derivatives folder "
                "of *_label-SGM|GM|CSF_probseg.nii.gz files or a pattern with {subject} and "
                "{label}"
            )
    if opts.tissue_maps and "tissue" not in opts.experiments:
        parser.error("--tissue-maps is only read by --experiment tissue; add it or drop the maps")
    if bool(opts.roi_atlas) != bool(opts.roi_table):
        parser.error("--roi-atlas and --roi-table go together; give both")
    if opts.roi_table and not opts.roi_table.is_file():
        parser.error(f"--roi-table {opts.roi_table} does not exist; give a TSV of labels")
    execution = ExecConfig(
        plugin=opts.plugin,
        plugin_args=opts.plugin_args,
        nprocs=opts.nprocs,
        omp_nthreads=omp,
        mem_gb=opts.mem_gb,
        gpu_plugin_args=_gpu_plugin_args(parser, opts),
    )
    from ..utils.bids import load_bids_filters

    try:
        filters = load_bids_filters(opts.bids_filter_file)
    except ValueError as exc:
        parser.error(str(exc))
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        work_dir=opts.work_dir.expanduser().absolute(),
        skip_bids_validation=opts.skip_bids_validation,
        bids_database_dir=(
            opts.bids_database_dir.expanduser().absolute() if opts.bids_database_dir else None
        ),
        config_file=opts.config_file.expanduser().absolute() if opts.config_file else None,
        participant_label=tuple(p.removeprefix("sub-") for p in opts.participant_label),
        session_label=tuple(s.removeprefix("ses-") for s in opts.session_label),
        bids_filters=filters,
        scanner_entity=opts.scanner_entity,
        preproc=opts.preproc,
        denoiser=opts.denoiser,
        mask_method=opts.mask_method,
        fit_method=opts.fit_method,
        b_max=opts.b_max,
        seed=opts.seed,
        write_graph=opts.write_graph,
        boilerplate_only=opts.boilerplate_only,
        execution=execution,
        verbose=opts.verbose,
        reference_scanner=opts.reference_scanner,
        train_participants=tuple(p.removeprefix("sub-") for p in opts.train_participants),
        registration=opts.registration,
        epochs=opts.epochs,
        samples_per_epoch=opts.samples_per_epoch,
        network_input=opts.network_input,
        kernel_size=opts.kernel_size,
        reference_labels=opts.reference_labels,
        device=device,
        mc_samples=opts.mc_samples,
        models_dir=models_dir,
        wm_mask=opts.wm_mask,
        roi_atlas=opts.roi_atlas,
        roi_table=opts.roi_table.expanduser().absolute() if opts.roi_table else None,
        comparators=tuple(dict.fromkeys(opts.comparators)),
        experiments=tuple(dict.fromkeys(opts.experiments)),
        derivatives=tuple(d.expanduser().absolute() for d in opts.derivatives),
        stop_on_first_crash=opts.stop_on_first_crash,
        tissue_maps=opts.tissue_maps,
        snr_roi=opts.snr_roi,
    )


#: RunConfig fields written under another option name (``--models DIR`` -> models_dir).
_OPTION_OF_FIELD = {"models_dir": "models", "experiments": "experiment"}
#: Fields that are no option (the positionals) or are kept only for the record.
_RESOLVED_ONLY = ("bids_dir", "output_dir", "analysis_level", "bids_filters", "config_file")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def config_toml(config: RunConfig) -> str:
    """The resolved configuration as TOML, loadable again with ``--config-file``.

    Options come first under their long names; ``[resolved]`` records what is not an option
    (positionals, the BIDS filters read from ``--bids-filter-file``, the version).

    >>> from pathlib import Path
    >>> text = config_toml(RunConfig(bids_dir=Path("/raw"), output_dir=Path("/out"),
    ...                              analysis_level="participant", work_dir=Path("/work")))
    >>> print(text.splitlines()[1]); "[resolved]" in text
    work-dir = "/work"
    True
    """
    from dataclasses import asdict, fields

    lines = [f"# dkiharm {__version__}: resolved configuration of this run"]
    values = asdict(config)
    execution = values.pop("execution")
    for item in fields(RunConfig):
        name = item.name
        if name in _RESOLVED_ONLY or name == "execution" or values.get(name) in (None, []):
            continue
        key = _OPTION_OF_FIELD.get(name, name).replace("_", "-")
        lines.append(f"{key} = {_toml_value(values[name])}")
    for name, value in execution.items():
        if value is not None and value != {}:
            lines.append(f"{name.replace('_', '-')} = {_toml_value(value)}")
    lines += ["", "[resolved]", f"version = {_toml_value(__version__)}"]
    for name in _RESOLVED_ONLY:
        if values.get(name) is not None:
            lines.append(f"{name} = {_toml_value(values[name])}")
    return "\n".join(lines) + "\n"


def options_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The option reference of ``docs/usage.md``, generated from the parser.

    One table per option group: every option string, its choices or value, its default
    and its help text, as ``dkiharm --help`` has them (``tools/usage_reference.py`` writes
    it into the page; ``tests/test_cli.py`` fails when the page is out of date).
    """
    parser = parser or get_parser()
    out = []
    for group in parser._action_groups:  # noqa: SLF001 - argparse keeps groups private
        rows = [a for a in group._group_actions if a.option_strings and a.dest != "help"]  # noqa: SLF001
        if not rows:
            continue
        title = "General" if group.title in ("options", "optional arguments") else group.title
        out += [f"### {title}", "", "| option | value | default | meaning |", "|---|---|---|---|"]
        for action in rows:
            names = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.choices:
                value = " \\| ".join(f"`{c}`" for c in action.choices)
            elif action.nargs == 0:
                value = ""
            else:
                value = f"`{action.metavar or action.dest.upper()}`"
            default = action.default
            empty = default is None or default is False or default == [] or default == {}
            shown = "" if empty or default is argparse.SUPPRESS else f"`{default}`"
            if action.dest == "nprocs":
                shown = "CPU count"
            text = (action.help or "").replace("%%", "%").replace("|", "\\|")
            out.append(f"| {names} | {value} | {shown} | {text} |")
        out.append("")
    return "\n".join(out)


def write_config(config: RunConfig, path: Path) -> None:
    """Write :func:`config_toml` to ``path`` (``output_dir/logs/config.toml``) atomically."""
    from ..utils.io import atomic_write_text

    atomic_write_text(config_toml(config), path)


if __name__ == "__main__":  # pragma: no cover
    parse_args(sys.argv[1:])
