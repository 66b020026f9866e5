"""The HTML report: built from small synthetic tables and maps, rendered by headless Chromium."""

from __future__ import annotations

import html
import json
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from evaldata import make_study, rms_over_mean, wm

from dkiharm_nipype.evaluation.evaluate import EXPERIMENTS, evaluate_study, write_tsv
from dkiharm_nipype.interfaces.scores import SNR_COLUMNS
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


def _training_logs(folder: Path) -> list[Path]:
    """Training logs in the schema TrainHarmonizer writes: the validation loss bottoms out at
    epoch 7 for A and 9 for C."""
    files = []
    for scanner, best in (("A", 7), ("C", 9)):
        rows = [
            {"epoch": e, "loss": 1.0 / e, "val_loss": 0.2 + 0.01 * (e - best) ** 2, "seconds": 1.0}
            for e in range(1, 13)
        ]
        files.append(folder / f"scanner-{scanner}_training.tsv")
        write_tsv(rows, ("epoch", "loss", "val_loss", "seconds"), files[-1])
    return files


@pytest.fixture(scope="module")
def report(evaluated) -> list[Path]:
    logs = _training_logs(evaluated.parent)
    return build_report(evaluated, evaluated.parent / "html", training_logs=logs)


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
    "<script>window.addEventListener('load',()=>{const o=[...document.images].map(i=>{"
    "let h=0;for(const c of i.src){h=(h*31+c.charCodeAt(0))|0;}"
    "return {id:i.id,w:i.naturalWidth,h:i.naturalHeight,hash:h,"
    "windows:JSON.parse(i.dataset.windows||'null')};});"
    "const p=document.createElement('pre');"
    "p.id='img-check';p.textContent=JSON.stringify(o);document.body.appendChild(p);});</script>"
)


def _probe(page: Path, tmp_path: Path) -> list[dict]:
    """Open ``page`` (a probed copy) in headless Chromium; what each decoded image holds."""
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
    return json.loads(html.unescape(found.group(1)))


def _render(page: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Image id -> decoded size, as headless Chromium shows ``page``."""
    return {i["id"]: (i["w"], i["h"]) for i in _probe(page, tmp_path)}


@pytest.mark.skipif(
    _chromium() is None, reason="Chromium is not installed (tools/install.sh --test installs it)"
)
def test_chromium_renders_every_figure(report, tmp_path):
    group = _render(report[0], tmp_path)
    # only raw and dl maps were evaluated: Fig. 9's maps would repeat Fig. 2, so it is a note
    assert set(group) == set(GROUP_FIGURES) - {"fig-methods"}, group
    assert "Fig. 2 already shows every evaluated method (before, dl)" in report[0].read_text()
    assert all(w > 100 and h > 100 for w, h in group.values()), group
    subject = _render(report[1], tmp_path)
    assert set(subject) == set(SUBJECT_FIGURES), subject
    assert all(w > 100 and h > 100 for w, h in subject.values()), subject


@pytest.mark.skipif(
    _chromium() is None, reason="Chromium is not installed (tools/install.sh --test installs it)"
)
def test_figures_share_windows_and_never_repeat(report, tmp_path):
    """As rendered: each parameter's panels (raw, harmonized, reference) share one window,
    Fig. 5's panels share their axes, and no two figures of a page are the same image."""
    images = _probe(report[0], tmp_path)
    hashes = [i["hash"] for i in images]
    assert len(set(hashes)) == len(hashes), [i["id"] for i in images]
    drawn = {i["id"]: i["windows"] for i in images}
    for fig_id in ("fig-maps", "fig-diff", "fig-scanrescan"):
        assert set(drawn[fig_id]) == set(PARAMS), (fig_id, drawn[fig_id])
        for param, windows in drawn[fig_id].items():
            assert len(windows) == 1, (fig_id, param, windows)  # one shared window
    assert len(drawn["fig-cv"]["cv"]) == 1
    # differences are drawn on a symmetric scale around 0
    for ((lo, hi),) in drawn["fig-diff"].values():
        assert lo == -hi and hi > 0
    # Fig. 2's shared MK window covers the reference's values: 0 to their 99th percentile
    ((lo, hi),) = drawn["fig-maps"]["mk"]
    assert lo == 0 and hi > 0


def test_training_curves_mark_the_kept_epoch(report):
    from dkiharm_nipype.report.figures import fig_training
    from dkiharm_nipype.report.html import read_training_logs

    logs = read_training_logs(_training_logs(report[0].parent.parent))
    assert sorted(logs) == ["A", "C"]
    fig = fig_training(logs)
    stars = [line for ax in fig.axes for line in ax.lines if line.get_marker() == "*"]
    assert [int(line.get_xdata()[0]) for line in stars] == [7, 9]
    assert 'id="fig-training"' in report[0].read_text()
