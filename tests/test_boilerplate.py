"""Methods text (CITATION.*): content follows the options, files are valid, nothing is run."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import hide_tools, install_fake_fsl

from dkiharm_nipype.cli.boilerplate import (
    REFERENCES,
    cited_keys,
    methods_paragraphs,
    render_bibtex,
    render_html,
    render_latex,
    render_markdown,
    write_citation,
)
from dkiharm_nipype.config import RunConfig
from dkiharm_nipype.utils.env import EDDY_COMMANDS

FSL_TOOLS = ("topup", "eddy", "flirt", "fnirt", "applywarp")
REQUIRED = {
    "article": {"author", "title", "journal", "year"},
    "inproceedings": {"author", "title", "booktitle", "year"},
    "techreport": {"author", "title", "institution", "year"},
    "misc": {"author", "title", "year"},
}


def _config(**kwargs) -> RunConfig:
    base = dict(
        bids_dir=Path("bids"),
        output_dir=Path("out"),
        analysis_level="participant",
        work_dir=Path("work"),
        preproc="mrtrix",
    )
    return RunConfig(**{**base, **kwargs})


def parse_bibtex(text: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Minimal BibTeX reader: ``@type{key, name = {value}, ...}`` with balanced braces."""
    entries = {}
    pos = 0
    while (start := text.find("@", pos)) >= 0:
        head = re.match(r"@(\w+)\{([^,\s]+),", text[start:])
        assert head, f"malformed entry at {text[start : start + 40]!r}"
        depth, first = 0, start + text[start:].index("{")
        for i in range(first, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
        assert depth == 0, f"unbalanced braces in entry {head.group(2)}"
        body = text[start + head.end() : i]
        fields = dict(re.findall(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", body))
        assert head.group(2) not in entries, f"duplicate key {head.group(2)}"
        entries[head.group(2)] = (head.group(1).lower(), fields)
        pos = i + 1
    return entries


def test_fsl_cited_only_when_it_runs(tmp_path, monkeypatch):
    # the text is read from the built workflow, and an FSL workflow is built only with FSL
    install_fake_fsl(tmp_path / "fsl", monkeypatch, {tool: "" for tool in FSL_TOOLS})
    with_fsl = "\n".join(methods_paragraphs(_config(preproc="fsl", denoiser="dwidenoise")))
    without = "\n".join(methods_paragraphs(_config(preproc="mrtrix", denoiser="dwidenoise")))
    for text in (with_fsl, without):
        assert "dwidenoise" in text and "@veraart2016" in text and "@kellner2016" in text
    assert "TOPUP" in with_fsl and "Eddy" in with_fsl
    assert {"andersson2003", "andersson2016", "jenkinson2012"} <= set(cited_keys([with_fsl]))
    assert "TOPUP" not in without and "Eddy" not in without and "FSL" not in without
    assert not {"andersson2003", "andersson2016", "jenkinson2012"} & set(cited_keys([without]))
    none = "\n".join(methods_paragraphs(_config(preproc="none")))
    assert "without denoising" in none and "veraart2016" not in cited_keys([none])


def test_denoiser_named_in_the_text():
    mppca = methods_paragraphs(_config(denoiser="mppca"))[1]
    assert "dwidenoise" not in mppca and "every 3 voxels" in mppca
    assert "@veraart2016" in mppca and "mrdegibbs" in mppca


def test_network_input_named_in_the_text():
    def group(**kw):
        return "\n".join(methods_paragraphs(_config(analysis_level="group", **kw)))

    assert "own IRLLS maps" not in group()
    text = group(network_input="dwi+fit")
    assert "together with the scan's own IRLLS maps" in text and "residual connection" in text


def test_kernel_size_named_in_the_text():
    def group(**kw):
        return "\n".join(methods_paragraphs(_config(analysis_level="group", **kw)))

    assert "a 3×3×3 convolution followed" in group() and "published network's" not in group()
    text = group(kernel_size=5)
    assert "a 5×5×5 convolution (the published network's is 3×3×3) followed" in text


def test_reference_labels_named_in_the_text():
    def group(**kw):
        paragraphs = methods_paragraphs(_config(analysis_level="group", **kw))
        return "\n".join(paragraphs), set(cited_keys(paragraphs))

    text, keys = group()  # rescan, the default
    assert "the same subject's other run on that scanner" in text and "lehtinen2018" in keys
    text, keys = group(reference_labels="fit")
    assert "own scans kept their own maps" in text and "lehtinen2018" not in keys


def test_fit_options_change_the_text():
    irlls = methods_paragraphs(_config(fit_method="irlls"))[2]
    wls = methods_paragraphs(_config(fit_method="wls", b_max=2000.0))[2]
    assert "IRLLS" in irlls and "from all volumes" in irlls and "@collier2015" in irlls
    assert "weighted linear least squares" in wls and "@veraart2013" in wls
    assert "b ≤ 2000 s/mm²" in wls and "collier2015" not in wls
    median = methods_paragraphs(_config(mask_method="median_otsu"))[1]
    assert "median_otsu" in median and "dwi2mask" not in median


@pytest.mark.parametrize(
    ("engine", "named", "key"),
    [
        ("dipy-syn", "symmetric normalization (SyN)", "avants2008"),
        ("mrtrix", "mrregister", "raffelt2011"),
        ("none", "without registration", None),
    ],
)
def test_group_text_names_the_registration_engine(engine, named, key):
    paragraphs = methods_paragraphs(
        _config(analysis_level="group", registration=engine, epochs=7, device="cpu", seed=3)
    )
    text = "\n".join(paragraphs)
    assert named in text
    # registered labels are trained on only inside their support (none: nothing is resampled)
    assert ("partly from outside the reference brain mask" in text) is (engine != "none")
    other_keys = {"avants2008", "raffelt2011", "avants2011", "andersson2007"} - {key}
    assert not other_keys & set(cited_keys(paragraphs))
    assert "at most 7 epochs" in text and "seed 3" in text and "on the CPU" in text
    assert {"tong2020", "li2019", "paszke2019"} <= set(cited_keys(paragraphs))
    assert "Monte Carlo dropout" not in text
    participant = "\n".join(methods_paragraphs(_config()))
    assert "paszke2019" not in cited_keys([participant]) and "epochs" not in participant


def test_fnirt_with_fsl_and_mc_dropout(tmp_path, monkeypatch):
    install_fake_fsl(tmp_path / "fsl", monkeypatch, {tool: "" for tool in FSL_TOOLS})
    paragraphs = methods_paragraphs(
        _config(analysis_level="group", registration="auto", mc_samples=20, device="cuda:1")
    )
    text = "\n".join(paragraphs)
    assert "FNIRT" in text and {"andersson2007", "jenkinson2012"} <= set(cited_keys(paragraphs))
    assert "20 Monte Carlo dropout passes" in text and "gal2016" in cited_keys(paragraphs)
    assert "GPU (cuda:1)" in text


def test_models_and_comparators():
    models = "\n".join(methods_paragraphs(_config(models_dir=Path("/x/models"))))
    assert "previous group-level run (models)" in models and "@paszke2019" in models

    @dataclass(frozen=True)
    class WithComparators(RunConfig):
        comparators: tuple[str, ...] = ("combat", "rish")

    base = dict(bids_dir=Path("b"), output_dir=Path("o"), work_dir=Path("w"), preproc="none")
    both = methods_paragraphs(WithComparators(analysis_level="group", registration="none", **base))
    assert {"fortin2017", "fortin2018", "pomponio2020", "mirzaalian2016"} <= set(cited_keys(both))
    plain = methods_paragraphs(_config(analysis_level="group", registration="none"))
    assert not {"fortin2017", "pomponio2020", "mirzaalian2016"} & set(cited_keys(plain))


def test_every_format_is_valid_and_consistent(tmp_path, monkeypatch):
    install_fake_fsl(tmp_path / "fsl", monkeypatch, {tool: "" for tool in FSL_TOOLS})
    paragraphs = methods_paragraphs(
        _config(preproc="fsl", analysis_level="group", registration="mrtrix", mc_samples=5)
    )
    keys = cited_keys(paragraphs)
    assert all(k in REFERENCES for k in keys) and len(keys) >= 15

    bib = parse_bibtex(render_bibtex(keys))
    assert sorted(bib) == sorted(keys)
    for key, (kind, fields) in bib.items():
        assert REQUIRED[kind] <= set(fields), (key, kind, sorted(fields))
        assert re.fullmatch(r"(19|20)\d\d", fields["year"]), key
        if "doi" in fields:
            assert re.fullmatch(r"10\.\d{4,5}/\S+", fields["doi"]), key
    assert bib["tong2020"][1]["journal"] == "Magnetic Resonance Imaging"

    tex = render_latex(paragraphs)
    tex_keys = {k for group in re.findall(r"\\cite[pt]\{([^}]*)\}", tex) for k in group.split(",")}
    assert tex_keys == set(keys)
    assert "[@" not in tex and "%" not in tex.replace("\\%", "").split("\n", 1)[1]
    assert "\\bibliography{CITATION}" in tex

    md = render_markdown(paragraphs)
    assert "[@" not in md and "(Tournier et al., 2019)" in md and "Tong et al. (2020)" in md
    assert md.count("\n- ") == len(keys)  # one reference line per cited work

    class Links(HTMLParser):
        hrefs: set = set()
        ids: set = set()

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "a":
                self.hrefs.add(attrs["href"].lstrip("#"))
            if "id" in attrs:
                self.ids.add(attrs["id"])

    links = Links()
    links.feed(render_html(paragraphs))
    assert links.hrefs == set(keys) and links.ids == set(keys)

    written = write_citation(_config(), tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "CITATION.bib",
        "CITATION.html",
        "CITATION.md",
        "CITATION.tex",
    ]
    assert written["md"].read_text().startswith("# Methods")


def test_boilerplate_only_cli_writes_text_and_no_derivatives(tiny_bids, tmp_path, monkeypatch):
    """End to end: FSL found -> TOPUP/Eddy described for the runs with reversed-PE b0s."""
    install_fake_fsl(tmp_path / "fsl", monkeypatch, {tool: "" for tool in FSL_TOOLS})
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "dkiharm_nipype.cli.run",
        str(tiny_bids),
        str(out),
        "participant",
        "--participant-label",
        "01",
        "-w",
        str(work),
        "--boilerplate-only",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs"]  # no derivatives
    # the run's log (output_dir/logs/dkiharm-<time>.log) besides the methods text
    assert sorted(p.name for p in (out / "logs").iterdir() if p.suffix != ".log") == [
        "CITATION.bib",
        "CITATION.html",
        "CITATION.md",
        "CITATION.tex",
        "config.toml",  # the resolved options of the call
    ]
    assert not list(work.rglob("result_*.pklz"))  # no node ran
    md = (out / "logs" / "CITATION.md").read_text()
    dwis = sorted((tiny_bids / "sub-01").glob("ses-*/dwi/*_dwi.nii.gz"))
    with_rpe = [d for d in dwis if list((d.parent.parent / "fmap").glob("*_epi.nii.gz"))]
    assert 0 < len(with_rpe) < len(dwis)
    assert f"{len(dwis)} diffusion-weighted (DWI) runs of 1 participant" in md
    assert f"for the {len(with_rpe)} of {len(dwis)} runs with reversed phase-encoding" in md
    assert "Andersson and Sotiropoulos, 2016" in md

    hide_tools(monkeypatch, ("topup", *EDDY_COMMANDS))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out / "logs" / "CITATION.md").read_text()
    assert "TOPUP" not in md and "Andersson" not in md and "dwidenoise" in md


def test_text_is_the_visit_of_the_built_workflow(tiny_bids, monkeypatch):
    """The methods text comes from the factories' ``__desc__``: options changed in the run
    (and a value changed where the fit defines it) appear in the text, while the
    boilerplate module itself names no pipeline step or setting."""
    import inspect

    import dkiharm_nipype.cli.boilerplate as boilerplate
    from dkiharm_nipype.dki.fit import fit_dki
    from dkiharm_nipype.utils.bids import collect_scans, load_layout
    from dkiharm_nipype.workflows.base import init_dkiharm_wf

    source = inspect.getsource(boilerplate)
    for step in ("dwidenoise", "mrdegibbs", "epochs", "IRLLS", "registered", "[0, 10]"):
        assert step not in source, step

    scans = collect_scans(load_layout(tiny_bids), session_label=["C", "D"])
    config = _config(analysis_level="group", bids_dir=tiny_bids, registration="none",
                     denoiser="mppca", epochs=13, mc_samples=4)  # fmt: skip
    workflow, _ = init_dkiharm_wf(config=config, scans=scans)
    text = "\n".join(methods_paragraphs(config, workflow=workflow))
    assert "at most 13 epochs" in text and "4 Monte Carlo dropout passes" in text
    assert "every 3 voxels" in text and "dwidenoise" not in text  # mppca, from the preproc wf
    assert f"{len(scans)} diffusion-weighted (DWI) runs" in text
    assert text.count("Gibbs ringing was removed") == 1  # four scans, described once
    # the projection's range is the fit's own constant, not a copy of it
    assert "directional kurtosis in [0, 3]" in text and "[0, 10]" not in text
    monkeypatch.setitem(fit_dki.__kwdefaults__, "kurtosis_range", (0.0, 2.5))
    assert "directional kurtosis in [0, 2.5]" in methods_paragraphs(_config())[2]
