"""The container image: built from ``Containerfile`` here, it runs the participant level.

``tools/container/build.sh`` builds the image with Debian's ``buildah`` from a debootstrapped
Debian 12 base (no registry), in a private storage folder; the tiny example's reference scan
of sub-01 is then processed inside the image (``buildah run --isolation chroot``, the BIDS
folder mounted read-only) and on the host with the same options. Every map must match the
host's to float32 round-off (both use Debian's MRtrix3 and the pinned torch; numpy/scipy may
be newer in the image). Slow (a full image build): ``pytest -m slow tests/test_container.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
OPTIONS = ["participant", "--participant-label", "01", "--omp-nthreads", "1", "--nprocs", "2"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """``(buildah command, image name)`` of a fresh build in a private storage folder."""
    if os.geteuid() != 0:
        pytest.skip("buildah builds and runs images as root here")
    missing = [exe for exe in ("buildah", "debootstrap") if not shutil.which(exe)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bash tools/install.sh --test)")
    storage = tmp_path_factory.mktemp("buildah")
    buildah = ["buildah", "--root", str(storage), "--runroot", str(storage / "run")]
    env = {**os.environ, "BUILDER": "buildah", "BUILDAH_ROOT": str(storage)}
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/container/build.sh")],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"image built in {time.monotonic() - started:.0f} s:", proc.stdout.strip())
    yield buildah, proc.stdout.strip().splitlines()[-1]
    subprocess.run([*buildah, "rm", "--all"], capture_output=True, timeout=300)  # unmounts
    shutil.rmtree(storage, ignore_errors=True)


def test_participant_level_in_the_image_matches_the_host(image, tiny_bids, tmp_path):
    buildah, name = image
    io = tmp_path / "io"
    io.mkdir()
    (io / "filter.json").write_text(json.dumps({"dwi": {"session": "D", "run": 1}}))
    ctr = subprocess.run(
        [*buildah, "from", name], capture_output=True, text=True, check=True
    ).stdout.strip()
    started = time.monotonic()
    inside = subprocess.run(
        [*buildah, "run", "--isolation", "chroot", "-v", f"{tiny_bids}:/data:ro"]
        + ["-v", f"{io}:/io", ctr, "--", "dkiharm", "/data", "/io/out", *OPTIONS]
        + ["--bids-filter-file", "/io/filter.json", "-w", "/io/work"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    print(f"participant level in the image: {time.monotonic() - started:.0f} s")
    subprocess.run([*buildah, "rm", ctr], capture_output=True, timeout=300)
    assert inside.returncode == 0, inside.stderr[-3000:]
    host = subprocess.run(
        [sys.executable, "-m", "dkiharm_nipype.cli.run", str(tiny_bids), str(tmp_path / "host")]
        + [*OPTIONS, "--bids-filter-file", str(io / "filter.json"), "-w", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert host.returncode == 0, host.stderr[-3000:]

    maps = sorted((tmp_path / "host").rglob("*.nii.gz"))
    assert len(maps) == 11  # preprocessed DWI, mask, 8 DKI maps, outlier fraction
    identical = 0
    for path in maps:
        rel = path.relative_to(tmp_path / "host")
        got = io / "out" / rel
        assert got.is_file(), rel
        expected = np.asanyarray(nb.load(path).dataobj)
        actual = np.asanyarray(nb.load(got).dataobj)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=str(rel))
        identical += np.array_equal(actual, expected, equal_nan=True)
    print(f"{identical}/{len(maps)} maps bit-identical to the host's")
    fa = next((io / "out").rglob("*_param-fa_dwimap.nii.gz"))
    assert 0.2 < np.nanmax(nb.load(fa).get_fdata()) <= 1.0
