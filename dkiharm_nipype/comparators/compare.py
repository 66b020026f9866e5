"""The comparators of the group level: ComBat and RISH maps of the evaluated scans.

:func:`run_comparators` is what the group workflow's ``comparators`` node calls, once the
reference scanner is known:

* **ComBat** (:func:`.combat.combat_maps`): the first run of every subject on every scanner
  goes into the space of the reference scanner's first scan of the first subject (the
  paper's template space), each DKI map is harmonized voxelwise with site = scanner (age
  and sex from ``participants.tsv`` kept), and the adjustment is brought back to each scan;
* **RISH** (:mod:`.rish`): for every target scanner, scale maps are learned from the
  training subjects' first runs paired with their reference-scanner first runs, applied to
  the evaluated scans' DWIs, and the result is fitted with the same DKI fit. Shells the
  target lacks are left out, so the reference scanner's own maps for this method come from
  its DWIs restricted to the targets' largest b-value (the paper leaves b = 3000 out).

Scans a method does not produce (ComBat: repeated runs) get ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from ..dki.fit import fit_dki
from ..dki.maps import ALL_METRICS
from ..study import first_runs
from ..utils.io import read_bvals

LOGGER = logging.getLogger("dkiharm.comparators")

#: Comparators the group level knows.
COMPARATORS = ("combat", "rish")


def _save_maps(maps: dict[str, np.ndarray], ref: nb.Nifti1Image, stem: Path) -> list[str]:
    out = []
    for p in ALL_METRICS:
        path = stem.with_name(f"{stem.name}_param-{p}_dwimap.nii.gz")
        img = nb.Nifti1Image(np.asarray(maps[p], dtype=np.float32), ref.affine)
        img.header.set_xyzt_units("mm")
        img.to_filename(path)
        out.append(str(path))
    return out


def _fit_maps(dwi, bvals, bvecs, mask, *, method, b_max, n_threads) -> dict[str, np.ndarray]:
    # the same fit as the pipeline's DKI node (plausibility constraints on), so that the
    # comparators differ from "before" and the DL maps only by the harmonization
    fit = fit_dki(dwi, bvals, bvecs, mask=mask, method=method, b_max=b_max,
                  constraints=True, n_threads=n_threads)  # fmt: skip
    return fit.metrics(ALL_METRICS)


def run_comparators(
    methods: Sequence[str],
    *,
    scans: Sequence[dict],
    reference: str,
    training: Sequence[str],
    evaluated: Sequence[int],
    participants_file: str | None = None,
    fit_method: str = "irlls",
    engine: str = "dipy-syn",
    n_threads: int = 1,
    out_dir: str | Path = ".",
) -> dict[str, list[list[str] | None]]:
    """ComBat/RISH maps (``ALL_METRICS`` order) of the ``evaluated`` scans, per method.

    ``scans`` are dicts with ``subject``, ``scanner``, ``run``, ``dwi``, ``bval``,
    ``bvec``, ``mask`` and ``maps`` (the eight IRLLS maps); ``training`` the subjects the
    networks were trained on (RISH learns from them too).
    """
    from .combat import combat_maps, read_participants
    from .rish import RISHScan, find_shells, harmonize_dwi, train_rish

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(methods) - set(COMPARATORS))
    if unknown:
        raise ValueError(f"unknown comparator(s) {unknown}; use {list(COMPARATORS)}")
    first = first_runs(
        range(len(scans)),
        group=lambda i: (scans[i]["subject"], scans[i]["scanner"]),
        run=lambda i: scans[i]["run"],
    )
    results: dict[str, list[list[str] | None]] = {}

    def workdir(name: str) -> Path:
        path = out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stem(i: int, method: str) -> Path:
        s = scans[i]
        return out_dir / f"sub-{s['subject']}_ses-{s['scanner']}_run-{s['run']}_desc-{method}"

    if "combat" in methods:
        subjects = sorted({s["subject"] for s in scans})
        ref_firsts = [first[s, reference] for s in subjects if (s, reference) in first]
        members = sorted(first.values(), key=lambda i: (i not in ref_firsts, i))
        LOGGER.info(
            "ComBat: %d scans, template %s", len(members), Path(scans[members[0]]["dwi"]).name
        )
        participants = None
        if participants_file and Path(participants_file).is_file():
            participants = read_participants(participants_file)
        harmonized = combat_maps(
            {p: [scans[i]["maps"][k] for i in members] for k, p in enumerate(ALL_METRICS)},
            [scans[i]["mask"] for i in members],
            [scans[i]["scanner"] for i in members],
            subjects=[scans[i]["subject"] for i in members],
            participants=participants,
            template=0,
            reference_site=reference,
            engine=engine,
            n_threads=n_threads,
            work_dir=workdir("combat_work"),
        )
        row = {i: j for j, i in enumerate(members)}
        results["combat"] = []
        for i in evaluated:
            if i not in row:
                results["combat"].append(None)
                continue
            maps = {p: harmonized.maps[p][row[i]] for p in ALL_METRICS}
            ref_img = nb.load(scans[i]["maps"][0])
            results["combat"].append(_save_maps(maps, ref_img, stem(i, "combat")))

    if "rish" in methods:

        def load(i: int) -> RISHScan:
            s = scans[i]
            return RISHScan.from_files(s["dwi"], s["bval"], s["bvec"], s["mask"], fa=s["maps"][3])

        targets = sorted({scans[i]["scanner"] for i in evaluated} - {reference})
        b_max = max(
            max(find_shells(read_bvals(scans[i]["bval"])))
            for i in evaluated
            if scans[i]["scanner"] != reference
        ) if targets else None  # fmt: skip
        models = {}
        for target in targets:
            pairs = [
                (first[s, target], first[s, reference])
                for s in training
                if (s, target) in first and (s, reference) in first
            ]
            if not pairs:
                LOGGER.warning(
                    "RISH: no training subject has scans on %s and %s", target, reference
                )
                continue
            LOGGER.info("RISH: training %s -> %s on %d subjects", target, reference, len(pairs))
            models[target] = train_rish(
                [load(t) for t, _ in pairs],
                [load(r) for _, r in pairs],
                engine=engine,
                n_threads=n_threads,
                work_dir=workdir(f"rish_{target}_work"),
            )
        results["rish"] = []
        for i in evaluated:
            s = scans[i]
            if s["scanner"] == reference:
                scan = load(i)
                maps = _fit_maps(scan.dwi, scan.bvals, scan.bvecs, scan.mask, method=fit_method,
                                 b_max=b_max, n_threads=n_threads)  # fmt: skip
            elif s["scanner"] in models:
                scan = load(i)
                dwi, bvals, bvecs = harmonize_dwi(
                    models[s["scanner"]], scan, engine=engine, n_threads=n_threads,
                    work_dir=workdir(f"rish_apply_{i}"),
                )  # fmt: skip
                maps = _fit_maps(dwi, bvals, bvecs, scan.mask, method=fit_method, b_max=None,
                                 n_threads=n_threads)  # fmt: skip
            else:
                results["rish"].append(None)
                continue
            results["rish"].append(_save_maps(maps, nb.load(s["mask"]), stem(i, "rish")))
    return results
