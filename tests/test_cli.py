"""The BIDS-App command line: options, dataset indexing and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dkiharm_nipype.cli.parser import parse_args
from dkiharm_nipype.errors import BIDSInputError
from dkiharm_nipype.utils.bids import collect_scans, load_layout, summary_table

DKIHARM = [sys.executable, "-m", "dkiharm_nipype.cli.run"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DKIHARM, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_options_follow_bids_app_conventions(tmp_path):
    (tmp_path / "bids").mkdir()
    cfg = parse_args(
        [
            str(tmp_path / "bids"),
            str(tmp_path / "out"),
            "participant",
            "--participant-label",
            "sub-01",
            "02",
            "--session-label",
            "ses-A",
            "-w",
            str(tmp_path / "w"),
            "--nprocs",
            "3",
            "--omp-nthreads",
            "1",
            "--plugin",
            "SLURM",
            "--plugin-args",
            '{"sbatch_args": "-p short"}',
            "--write-graph",
            "-vv",
            "--seed",
            "7",
            "--denoiser",
            "mppca",
            "--network-input",
            "dwi+fit",
            "--kernel-size",
            "5",
        ]
    )
    assert cfg.denoiser == "mppca" and cfg.network_input == "dwi+fit" and cfg.kernel_size == 5
    assert cfg.participant_label == ("01", "02")
    assert cfg.session_label == ("A",)
    assert cfg.work_dir == tmp_path / "w"
    assert cfg.execution.plugin == "SLURM"
    assert cfg.execution.nipype_plugin_args()["sbatch_args"] == "-p short"
    assert cfg.seed == 7 and cfg.write_graph and cfg.verbose == 2
    multiproc = parse_args(
        [str(tmp_path / "bids"), str(tmp_path / "o"), "group", "--nprocs", "2", "--mem-gb", "4"]
    )
    assert multiproc.execution.nipype_plugin_args()["n_procs"] == 2
    assert multiproc.execution.nipype_plugin_args()["memory_gb"] == 4


def test_version_flag():
    proc = _cli("--version")
    assert proc.returncode == 0
    from dkiharm_nipype import __version__

    assert proc.stdout.strip() == f"dkiharm {__version__}"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--seed", "-3"], "--seed must be an integer"),
        (["--nprocs", "0"], "--nprocs must be a positive integer"),
        (["--kernel-size", "4"], "--kernel-size must be an odd positive integer"),
        (["--plugin-args", "{not json"], "--plugin-args is not valid JSON"),
        (["--plugin", "Nope"], "invalid choice"),
        (["--tissue-maps", "/nonexistent/seg"], "--tissue-maps /nonexistent/seg is not a folder"),
        (["--tissue-maps", "s/{subject}_{label}.nii"], "only read by --experiment tissue"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, extra, fragment):
    (tmp_path / "bids").mkdir()
    proc = _cli(tmp_path / "bids", tmp_path / "out", "participant", *extra)
    assert proc.returncode == 2
    _one_line_error(proc, fragment)


def test_output_inside_raw_data_is_refused(tmp_path):
    (tmp_path / "bids" / "sub-01").mkdir(parents=True)
    proc = _cli(tmp_path / "bids", tmp_path / "bids" / "sub-01" / "out", "participant")
    _one_line_error(proc, "lies inside the raw BIDS data", "derivatives")
    assert not (tmp_path / "bids" / "sub-01" / "out").exists()
    # derivatives/ inside the dataset is the BIDS convention and stays allowed
    cfg = parse_args(
        [str(tmp_path / "bids"), str(tmp_path / "bids" / "derivatives" / "x"), "participant"]
    )
    assert cfg.output_dir.name == "x"


def test_not_a_bids_folder(tmp_path):
    (tmp_path / "data").mkdir()
    proc = _cli(tmp_path / "data", tmp_path / "out", "participant")
    _one_line_error(proc, "is not a BIDS dataset", "dataset_description.json")
    assert not (tmp_path / "out").exists()


def test_bids_filter_file_errors(tmp_path):
    (tmp_path / "bids").mkdir()
    bad = tmp_path / "filters.json"
    bad.write_text('{"anat": {"run": 1}}')
    proc = _cli(tmp_path / "bids", tmp_path / "out", "participant", "--bids-filter-file", bad)
    _one_line_error(proc, "unknown data type", "dwi")


def test_indexes_phantom_and_prints_subjects_by_scanners(tiny_bids, tmp_path):
    layout = load_layout(tiny_bids)
    scans = collect_scans(layout)
    subjects = sorted({s.subject for s in scans})
    scanners = sorted({s.scanner for s in scans})
    assert len(subjects) >= 2 and len(scanners) >= 2
    table = summary_table(scans)
    assert (
        f"{len(subjects)} subject(s) x {len(scanners)} scanner(s), {len(scans)} DWI run(s)"
        in table
    )
    for scan in scans:
        assert scan.bval.is_file() and scan.bvec.is_file()
        assert scan.metadata["EchoTime"] > 0
    # selection by label, with or without prefixes
    one = collect_scans(
        layout, participant_label=[f"sub-{subjects[0]}"], session_label=[scanners[0]]
    )
    assert {(s.subject, s.scanner) for s in one} == {(subjects[0], scanners[0])}
    with pytest.raises(BIDSInputError, match=r"participant\(s\) zz not found"):
        collect_scans(layout, participant_label=["zz"])
    # a sidecar field can identify scanners as well
    by_serial = collect_scans(layout, scanner_entity="DeviceSerialNumber")
    assert len({s.scanner for s in by_serial}) == len(scanners)


def test_filter_file_selects_runs(tiny_bids, tmp_path):
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"dwi": {"run": 1}}))
    cfg = parse_args(
        [str(tiny_bids), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filters)]
    )
    scans = collect_scans(load_layout(tiny_bids), bids_filters=cfg.bids_filters)
    assert scans and all(s.run == 1 for s in scans)


# --- CLI hygiene: no abbreviations, memory units, config file, docs from the parser ------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--mem", "16000"], "--mem '16000' is not a memory size; write e.g. 16GB"),
        (["--mem-g", "16"], "unrecognized arguments: --mem-g"),  # no prefix matching
        (["--epoch", "3"], "unrecognized arguments: --epoch"),
    ],
)
def test_options_are_never_abbreviated_and_memory_needs_a_unit(tmp_path, extra, fragment):
    (tmp_path / "bids").mkdir()
    proc = _cli(tmp_path / "bids", tmp_path / "out", "participant", *extra)
    assert proc.returncode == 2
    _one_line_error(proc, fragment)


@pytest.mark.parametrize(
    ("extra", "gigabytes"),
    [(["--mem", "16GB"], 16.0), (["--mem", "16000MB"], 16.0), (["--mem", "2T"], 2000.0),
     (["--mem-gb", "4"], 4.0), (["--mem_gb", "4.5"], 4.5)],
)  # fmt: skip
def test_memory_with_units(tmp_path, extra, gigabytes):
    (tmp_path / "bids").mkdir()
    cfg = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *extra])
    assert cfg.execution.mem_gb == pytest.approx(gigabytes)
    assert cfg.execution.nipype_plugin_args()["memory_gb"] == pytest.approx(gigabytes)


def test_config_file_is_merged_under_the_command_line(tmp_path):
    (tmp_path / "bids").mkdir()
    toml = tmp_path / "dkiharm.toml"
    toml.write_text(
        'participant-label = ["01", "sub-02"]\nepochs = 7\nfit_method = "wls"\n'
        'write-graph = true\nmem = "8GB"\nplugin-args = {n_procs = 1}\n'
    )
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
    cfg = parse_args([*base, "--config-file", str(toml), "--epochs", "9"])
    assert cfg.epochs == 9  # the command line wins
    assert cfg.participant_label == ("01", "02") and cfg.fit_method == "wls"
    assert cfg.write_graph and cfg.execution.mem_gb == 8.0
    assert cfg.execution.plugin_args == {"n_procs": 1}
    # the dump of the resolved configuration, passed back, gives the same configuration
    from dataclasses import replace

    from dkiharm_nipype.cli.parser import config_toml

    dump = tmp_path / "config.toml"
    dump.write_text(config_toml(cfg))
    again = parse_args([*base, "--config-file", str(dump)])
    assert replace(again, config_file=None) == replace(cfg, config_file=None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("epoch = 3\n", "'epoch' is not an option of dkiharm"),
        ('epochs = "many"\n', "--epochs must be a positive integer, got 'many' in --config-file"),
        ('preproc = "fast"\n', "invalid choice: 'fast'"),
        ("epochs = \n", "is not valid TOML"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, text, fragment):
    (tmp_path / "bids").mkdir()
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    proc = _cli(tmp_path / "bids", tmp_path / "out", "participant", "--config-file", toml)
    assert proc.returncode == 2
    _one_line_error(proc, fragment)


def _readme_options() -> list[tuple[str, list[str]]]:
    """(option, values) of every backticked option in the first column of README's table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Usage", 1)[1].split("\n## ", 1)[0]
    found = []
    for row in section.splitlines():
        if not row.startswith("| `-"):
            continue
        first = row.split(" | ")[0].replace("\\|", "\x00")
        for span in first.split("`")[1::2]:
            option, *values = span.split()
            for name in option.split("/"):
                found.append((name, [v for value in values for v in value.split("\x00")]))
    return found


def test_readme_option_table_names_only_what_help_has():
    from dkiharm_nipype.cli.parser import get_parser

    parser = get_parser()
    actions = parser._option_string_actions
    rows = _readme_options()
    assert len(rows) > 30
    for option, values in rows:
        assert option in actions, f"README names {option}, which dkiharm --help lacks"
        choices = actions[option].choices
        for value in values:
            if choices is not None and value.islower():  # a choice, not a placeholder
                assert value in choices, f"README offers {option} {value}; --help has {choices}"
    # the options that README lacked before (issue 18) are in its table now
    names = {option for option, _ in rows}
    assert {"--denoiser", "--mask-method", "--mem", "--skip-bids-validation"} <= names


def test_usage_reference_is_generated_from_the_parser():
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "usage_reference.py"),
         "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    from dkiharm_nipype.cli.parser import get_parser

    for action in get_parser()._actions:
        for option in action.option_strings:
            assert f"`{option}`" in usage or action.dest == "help", option
