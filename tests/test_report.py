"""The HTML report: built from small synthetic tables and maps, rendered by headless Chromium."""

from __future__ import annotations

import html
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from evaldata import make_study, rms_over_mean, wm

from dkiharm_nipype.evaluation.evaluate import EXPERIMENTS, evaluate_study, write_tsv
from dkiharm_nipype.interfaces.metrics import SNR_COLUMNS
from dkiharm_nipype.report.html import GROUP_FIGURES, GROUP_TABLES, SUBJECT_FIGURES, build_report

PARAMS = ("mk", "kfa")


def _experiments(folder: Path) -> None:
    """Experiment tables in the schema the experiments write (values are arbitrary)."""
    rng = random.Random(0)
    scanners, subjects = ("A", "C"), ("01", "02", "03", "04", "05")
    rows = {
        "trainsize": [
            {"n_train": n, "replicate": r, "train_subjects": ",".join(subjects[:n]),
             "scanner": s, "param": p, "metric": "nrmse", "value": 0.3 / n + 0.01 * r}
            for n in (1, 2, 4) for r in range(3) for s in scanners for p in PARAMS
        ],
        "leavepout": [
            {"p": p, "replicate": r, "train_subjects": ",".join(train),
             "test_subjects": test, "scanner": s, "param": q, "metric": "nrmse",
             "value": rng.uniform(0.1, 0.3)}
            for p, sets in ((3, (subjects[:2], subjects[1:3])), (1, (subjects[:4],)))
            for r, train in enumerate(sets)
            for test in subjects if test not in train
            for s in scanners for q in PARAMS
        ],
        "tissue": [
            {"left_out": lo, "tissue": t, "scanner": s, "param": p, "metric": "nrmse",
             "value": rng.uniform(0.1, 0.4)}
            for lo in ("none", "subcortical_gm", "csf") for t in ("WM", "SGM", "CSF")
            for s in scanners for p in PARAMS for _ in range(3)
        ],
        "seeds": [
            {"seed": seed, "scanner": s, "param": p, "metric": m, "value": rng.uniform(0, 0.2)}
            for seed in range(4) for s in scanners for p in PARAMS for m in ("nrmse", "cv")
        ],
    }  # fmt: skip
    for name, (fname, columns) in EXPERIMENTS.items():
        write_tsv(rows[name], columns, folder / fname)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sub-02/03 exclusions
        evaluate_study(**make_study(root / "maps"), out_dir=root / "eval")
    snr = [
        {"participant_id": f"sub-{s}", "session": sc, "run": 1, "scanner": sc, "snr_db": v}
        for s, base in (("01", 20.0), ("02", 22.0))
        for sc, v in (("A", base), ("C", base + 1), ("D", base + 8))
    ]
    write_tsv(snr, SNR_COLUMNS, root / "eval" / "snr.tsv")
    _experiments(root / "eval")
    return root / "eval"


@pytest.fixture(scope="module")
def report(evaluated) -> list[Path]:
    return build_report(evaluated, evaluated.parent / "html")


def test_pages_are_self_contained(report):
    assert [p.name for p in report] == ["report.html", "sub-01.html", "sub-02.html"]
    for page in report:
        text = page.read_text()
        assert "<script" not in text and "<link" not in text and "@import" not in text
        assert not re.search(r"(src|href)=\"(https?:|//)", text)
        sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_group_page_tables(report):
    text = html.unescape(report[0].read_text())
    for table in GROUP_TABLES:
        assert f'id="{table}"' in text
    # Table 3: sub-01 on D = 28 dB, mean of D = (28 + 30) / 2; reference named
    assert "<td>28.00</td>" in text and "<td>29.00</td>" in text and "Reference: D." in text
    # Table 4: NRMSE-to-reference of A (0.9 b) against D (b) in WM is 0.1 k
    assert f"<td>{0.1 * rms_over_mean(wm()):.2f}</td>" in text
    # CV table: 10.0 % before, 0.0 % after
    assert re.search(r"<td>MK</td><td>10\.0</td><td>0\.0</td>", text)
    assert "sub-02 excluded from cv" in text


def test_missing_experiments_are_labelled_interface(evaluated, tmp_path):
    empty = tmp_path / "no-experiments"
    empty.mkdir()
    from dkiharm_nipype.interfaces.evaluation import HarmonizationReport

    node = HarmonizationReport(tsv_dir=str(evaluated), experiment_dir=str(empty))
    outputs = node.run(cwd=str(tmp_path)).outputs
    assert [Path(p).name for p in outputs.subject_pages] == ["sub-01.html", "sub-02.html"]
    text = Path(outputs.report).read_text()
    for fig_id, name in (
        ("fig-trainsize", "trainsize"),
        ("fig-leavepout", "leavepout"),
        ("fig-tissue", "tissue"),
        ("fig-seeds", "seeds"),
    ):
        box = f'<div class="not-run" id="{fig_id}">not run \u2014 use --experiment {name}</div>'
        assert box in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_PROBE = (
    "<script>window.addEventListener('load',()=>{const o=[...document.images].map("
    "i=>i.id+':'+i.naturalWidth+'x'+i.naturalHeight);const p=document.createElement('pre');"
    "p.id='img-check';p.textContent=o.join(';');document.body.appendChild(p);});</script>"
)


def _render(page: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Open ``page`` (a probed copy) in headless Chromium; image id -> decoded size."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
        "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="img-check">([^<]*)</pre>', dom)
    assert found, dom[-2000:]
    sizes = {}
    for item in filter(None, found.group(1).split(";")):
        name, size = item.rsplit(":", 1)
        width, height = size.split("x")
        sizes[name] = (int(width), int(height))
    return sizes


@pytest.mark.skipif(
    _chromium() is None, reason="Chromium is not installed (tools/install.sh --test installs it)"
)
def test_chromium_renders_every_figure(report, tmp_path):
    group = _render(report[0], tmp_path)
    assert set(group) == set(GROUP_FIGURES), group
    assert all(w > 100 and h > 100 for w, h in group.values()), group
    subject = _render(report[1], tmp_path)
    assert set(subject) == set(SUBJECT_FIGURES), subject
    assert all(w > 100 and h > 100 for w, h in subject.values()), subject
