"""The paper's validation experiments (section 2.3.3, Figs. 6-8) as plain functions.

Each experiment retrains the networks on chosen traveling subjects, harmonizes held-out
subjects and scores them, writing one tidy table (:data:`~dkiharm_nipype.evaluation.evaluate.
EXPERIMENTS`, read by the HTML report):

* ``trainsize`` (Fig. 6): one held-out test subject; every other subject set of size
  ``n_train = 1 .. N-1`` trains the networks (all combinations, or a seeded sample of at
  most ``max_combinations`` per size);
* ``leavepout`` (Fig. 7): each set of ``p`` subjects (p = 3 and p = 1 in the paper, on five
  subjects) is left out in turn and tested; the others train; one row per test subject;
* ``tissue`` (Fig. 8): the default training split, trained on the whole brain, without
  subcortical grey matter, and without CSF (:class:`~dkiharm_nipype.cnn.data.
  TrainingSubject` ``exclude``); scored in WM, SGM and CSF; ``repeats`` seeds each;
* ``seeds``: the default training split trained with ``n_seeds`` seeds.

In every training, one network per scanner (the target scanners and the reference's own)
learns from the training subjects' scans of that scanner (all runs), as in the group run.
The test subjects' first runs are harmonized and moved into the subject's **reference
scan** space (first run on the reference scanner) by one registration per scan, computed
once on the raw FA and reused by every replicate. Scores, per test subject:

* ``nrmse``: NRMSE-to-reference of each scanner's harmonized map against the reference
  scan's raw fit (section 2.3.2), in white matter (or in each tissue);
* ``cv``: mean voxelwise inter-scanner CV of the harmonized maps (section 2.3.1); its rows
  carry ``scanner`` = :data:`ALL_SCANNERS`.

White matter is :func:`~dkiharm_nipype.evaluation.scores.wm_mask_from_fit` of the reference scan's
raw fit (as in :mod:`~dkiharm_nipype.evaluation.evaluate`); SGM and CSF are the scans' tissue
probability maps at or above ``tissue_threshold`` (given by the user, see
:func:`find_tissue_files`) or, when none are given, each scan's own segmentation from its
fit (:func:`~dkiharm_nipype.evaluation.scores.tissue_masks_from_fit`; grey matter as a whole
then stands for SGM). Nothing is read from a phantom's truth.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from ..cnn.data import TrainingSubject, mask_bounding_box, normalize_dwi
from ..cnn.infer import harmonize_scan
from ..cnn.modelio import scan_fingerprint
from ..cnn.train import train_harmonizer
from ..dki.maps import ALL_METRICS
from ..errors import DkiharmInputError
from ..registration import VOXEL_TOLERANCE_MM, register, voxel_sizes
from ..study import first_runs, label_source, plan_study, run_key
from ..utils.dwi import check_volumes
from ..utils.io import load_mask, read_bvals
from .evaluate import EVAL_PARAMS, EXPERIMENTS, TISSUE_LEFT_OUT, WM, write_tsv
from .scores import mean_cv, nrmse, tissue_masks_from_fit, wm_mask_from_fit

LOGGER = logging.getLogger("dkiharm.experiments")

#: ``scanner`` of the ``cv`` rows: the CV is taken across all scanners.
ALL_SCANNERS = "all"
#: Tissues scored by the leave-one-tissue-out experiment (``tissue`` column).
TISSUES = (WM, "SGM", "CSF")
#: ``left_out`` value -> the tissue key of :attr:`ExperimentScan.tissues` removed.
LEFT_OUT_TISSUE = {"none": None, "subcortical_gm": "SGM", "csf": "CSF"}
#: The paper's leave-p-subjects-out strategies (on five subjects).
PAPER_PS = (3, 1)
#: The paper's number of repeated trainings (section 2.3.3).
PAPER_REPEATS = 10
#: Default cap on the training sets per size (training-size sweep, leave-p-out).
MAX_COMBINATIONS = 10
#: A tissue probability at or above this makes a voxel that tissue.
TISSUE_THRESHOLD = 0.5
#: Progress-line names of the experiments.
_TITLES = {"trainsize": "sweep", "leavepout": "leave-p-out", "tissue": "tissue", "seeds": "seeds"}


class ExperimentInputError(DkiharmInputError):
    """The scans given to an experiment cannot run it."""


@dataclass(frozen=True)
class ExperimentScan:
    """One preprocessed scan with its raw fit and its training labels.

    ``maps`` is the scan's raw IRLLS fit ``{param: path}`` (FA and MD, for registration
    and the WM rule, plus the scored parameters); ``labels`` the reference scanner's eight
    maps (:data:`~dkiharm_nipype.dki.maps.ALL_METRICS`) registered into this scan (for
    a reference-scanner scan, its own fit; empty: registered here from the subject's
    reference scan with the experiment's engine); ``tissues`` optional tissue probability
    maps ``{"SGM": path, "CSF": path}`` in this scan's space.
    """

    subject: str
    scanner: str
    dwi: str | Path
    bval: str | Path
    mask: str | Path
    maps: Mapping[str, str | Path]
    labels: Mapping[str, str | Path] = field(default_factory=dict)
    run: str = "1"
    tissues: Mapping[str, str | Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"sub-{self.subject} scanner {self.scanner} run {self.run}"


@dataclass(frozen=True)
class TrainingOptions:
    """How each network of an experiment is trained (:func:`~dkiharm_nipype.cnn.train.
    train_harmonizer` arguments)."""

    epochs: int = 100
    samples_per_epoch: int | None = 200_000
    hidden_channels: int = 150
    batch_size: int = 1024
    patience: int = 10
    val_fraction: float = 0.1
    block_size: int = 8
    device: str = "auto"
    network_input: str = "dwi"
    kernel_size: int = 3

    def kwargs(self) -> dict:
        return {
            "epochs": self.epochs, "samples_per_epoch": self.samples_per_epoch or None,
            "hidden_channels": self.hidden_channels, "batch_size": self.batch_size,
            "patience": self.patience, "val_fraction": self.val_fraction,
            "block_size": self.block_size, "device": self.device,
            "network_input": self.network_input, "kernel_size": self.kernel_size,
        }  # fmt: skip


@dataclass(frozen=True)
class Split:
    """One training of an experiment: who trains, who is tested, with which seed."""

    label: dict
    train: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = 0
    left_out: str = "none"


# --------------------------------------------------------------------------- training sets
def choose_combinations(
    pool: Sequence[str], size: int, *, max_combinations: int | None, seed: int = 0
) -> list[tuple[str, ...]]:
    """Every ``size``-subset of ``pool`` when there are at most ``max_combinations``, else a
    seeded sample of that many distinct subsets; sorted, subjects sorted within each."""
    pool = sorted(pool)
    total = math.comb(len(pool), size)
    if max_combinations is None or total <= max_combinations:
        return [tuple(c) for c in itertools.combinations(pool, size)]
    rng = random.Random(f"{seed}-{size}-{','.join(pool)}")
    chosen: set[tuple[str, ...]] = set()
    while len(chosen) < max_combinations:
        chosen.add(tuple(sorted(rng.sample(pool, size))))
    return sorted(chosen)


def trainsize_splits(
    subjects: Sequence[str],
    *,
    test_subjects: Sequence[str] | None = None,
    max_combinations: int | None = MAX_COMBINATIONS,
    seed: int = 0,
) -> list[Split]:
    """The training-size sweep: sizes 1 .. N-1 of the subjects other than the held-out
    ``test_subjects`` (default: the last subject, as the paper held out one)."""
    subjects = sorted(subjects)
    test = tuple(sorted(test_subjects or subjects[-1:]))
    unknown = sorted(set(test) - set(subjects))
    pool = [s for s in subjects if s not in test]
    if unknown or not pool:
        raise ExperimentInputError(
            f"The training-size sweep holds out {_subs(test)} but the subjects scanned on "
            f"every scanner are {_subs(subjects)}; hold out one of them and keep at least one "
            "for training."
        )
    splits = []
    for n in range(1, len(pool) + 1):
        sets = choose_combinations(pool, n, max_combinations=max_combinations, seed=seed)
        for rep, train in enumerate(sets, 1):
            splits.append(Split({"n_train": n, "replicate": rep}, train, test, seed))
    return splits


def leavepout_splits(
    subjects: Sequence[str],
    *,
    ps: Iterable[int] = PAPER_PS,
    max_combinations: int | None = MAX_COMBINATIONS,
    seed: int = 0,
) -> list[Split]:
    """Leave-p-subjects-out: each ``p``-subset (or a seeded sample) is tested in turn, the
    others train. A ``p`` leaving no training subject is skipped with a warning."""
    subjects = sorted(subjects)
    splits = []
    for p in ps:
        if not 1 <= p < len(subjects):
            LOGGER.warning(
                "leave-%d-out skipped: %d subjects are scanned on every scanner", p, len(subjects)
            )
            continue
        sets = choose_combinations(subjects, p, max_combinations=max_combinations, seed=seed)
        for rep, test in enumerate(sets, 1):
            train = tuple(s for s in subjects if s not in test)
            splits.append(Split({"p": p, "replicate": rep}, train, test, seed))
    if not splits:
        raise ExperimentInputError(
            f"No leave-p-out strategy fits {len(subjects)} subjects scanned on every scanner "
            f"(p = {', '.join(map(str, ps))}); choose p between 1 and {len(subjects) - 1}."
        )
    return splits


def default_split(
    scans: Sequence[ExperimentScan],
    subjects: Sequence[str],
    *,
    reference: str,
    train_subjects: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Training and test subjects of the tissue and seed experiments: ``train_subjects`` or
    the group run's split (:func:`~dkiharm_nipype.study.plan_study`, 40 %, seeded)."""
    if train_subjects:
        train = tuple(sorted(train_subjects))
        bad = sorted(set(train) - set(subjects))
        if bad:
            raise ExperimentInputError(
                f"Training subject(s) {_subs(bad)} are not scanned on every scanner; choose "
                f"among {_subs(subjects)}."
            )
    else:
        train = plan_study(scans, reference=reference, seed=seed).training
    test = tuple(s for s in subjects if s not in train)
    if not test:
        raise ExperimentInputError(
            f"Training on {_subs(train)} leaves no test subject; train on fewer subjects."
        )
    return train, test


#: Probseg labels accepted for each tissue of the experiment, in order of preference.
TISSUE_LABELS = {"SGM": ("SGM", "GM"), "CSF": ("CSF",)}


def find_tissue_files(
    source: str | Path, subject: str, session: str | None = None, run=None
) -> dict[str, Path]:
    """The grey-matter and CSF probability maps of one scan, from the user.

    ``source`` is either a derivatives folder, searched for
    ``sub-<subject>/[ses-<session>/]{dwi,anat}/sub-<subject>[_ses-<session>][_run-<run>]_*
    label-<SGM|GM|CSF>_probseg.nii.gz`` (BIDS probabilistic segmentations; subcortical
    ``SGM`` preferred, whole ``GM`` accepted), or a path pattern with ``{subject}``,
    ``{session}``, ``{run}`` and ``{label}`` (``SGM``/``GM``, ``CSF``) placeholders. The
    maps must be in the scan's DWI space. Returns ``{"SGM": path, "CSF": path}``, or ``{}``
    unless one file of each is found.
    """
    found = {}
    for tissue, labels in TISSUE_LABELS.items():
        for label in labels:
            hits = _tissue_candidates(source, subject, session, run, label)
            if len(hits) == 1:
                found[tissue] = hits[0]
                break
        else:
            return {}
    return found


def _tissue_candidates(source, subject, session, run, label) -> list[Path]:
    text = str(source)
    if "{" in text:
        path = Path(
            text.format(subject=subject, session=session or "", run=run or "", label=label)
        ).expanduser()
        return [path] if path.is_file() else []
    folder = Path(source) / f"sub-{subject}"
    stem = f"sub-{subject}"
    if session:
        folder, stem = folder / f"ses-{session}", f"{stem}_ses-{session}"
    if run not in (None, ""):
        stem = f"{stem}_run-{run}"
    pattern = f"{stem}_*label-{label}_probseg.nii*"
    return sorted(h for kind in ("dwi", "anat") for h in (folder / kind).glob(pattern))


# --------------------------------------------------------------------------- the study
@dataclass
class _Loaded:
    """A scan cropped to its brain's bounding box (plus the kernel radius)."""

    box: tuple[slice, ...]
    shape: tuple[int, ...]
    affine: np.ndarray
    dwi: np.ndarray
    bvals: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    tissues: dict[str, np.ndarray]
    normalized: np.ndarray | None = None
    fit: np.ndarray | None = None
    label_mask: np.ndarray | None = None


class ExperimentStudy:
    """The traveling subjects of an experiment, with everything computed once.

    Holds the subjects scanned on every scanner, each subject's reference scan and its
    scoring masks, and (lazily, cached) the registration of every test scan into its
    reference scan, computed once on the raw FA and reused by every training.
    """

    def __init__(
        self,
        scans: Iterable[ExperimentScan],
        *,
        reference: str,
        params: Sequence[str] = EVAL_PARAMS,
        engine: str = "dipy-syn",
        tissue_threshold: float = TISSUE_THRESHOLD,
        seed: int = 0,
        n_threads: int = 1,
        reference_labels: str = "rescan",
    ):
        self.scans = sorted(scans, key=lambda s: (s.subject, s.scanner, run_key(s.run)))
        self.reference, self.params, self.engine = reference, tuple(params), engine
        self.reference_labels = reference_labels
        self.tissue_threshold, self.seed, self.n_threads = tissue_threshold, seed, n_threads
        if not self.scans:
            raise ExperimentInputError("No scans given; give the traveling subjects' scans.")
        self.scanners = tuple(sorted({s.scanner for s in self.scans}))
        if reference not in self.scanners:
            raise ExperimentInputError(
                f"The reference scanner {reference!r} has no scan among {', '.join(self.scanners)}"
                "; name one of them."
            )
        by_subject: dict[str, set[str]] = defaultdict(set)
        for scan in self.scans:
            by_subject[scan.subject].add(scan.scanner)
        self.subjects = tuple(s for s in sorted(by_subject) if by_subject[s] == set(self.scanners))
        for sub in sorted(set(by_subject) - set(self.subjects)):
            LOGGER.warning("sub-%s is not scanned on every scanner: left out", sub)
        if len(self.subjects) < 2:
            raise ExperimentInputError(
                f"The experiments need at least two subjects scanned on every scanner "
                f"({', '.join(self.scanners)}); found {_subs(self.subjects) or 'none'}."
            )
        need = {"fa", "md", *self.params}
        for scan in self.scans:
            lacking = sorted(need - set(scan.maps))
            if lacking:
                raise ExperimentInputError(
                    f"{scan.name} has no raw-fit map for {', '.join(lacking)}; give its maps."
                )
            if scan.labels and set(scan.labels) != set(ALL_METRICS):
                raise ExperimentInputError(
                    f"The labels of {scan.name} must be the eight maps {', '.join(ALL_METRICS)}"
                    f"; got {', '.join(sorted(scan.labels))}."
                )
            _check_grids(scan)
        self._registrations: dict[int, object] = {}
        self._masks: dict[str, dict[str, np.ndarray]] = {}

    # -- lookup
    def first(self, subject: str, scanner: str) -> ExperimentScan:
        return first_runs(self.scans)[(subject, scanner)]

    def training_scans(self, subjects: Iterable[str], scanner: str) -> list[ExperimentScan]:
        subjects = set(subjects)
        return [s for s in self.scans if s.subject in subjects and s.scanner == scanner]

    def require_tissues(self, tissues: Iterable[str], subjects: Iterable[str]) -> None:
        """Tissue maps of ``subjects``: given for every scan, or for none (then each scan is
        segmented from its own fit, :func:`~.scores.tissue_masks_from_fit`)."""
        scans = [s for s in self.scans if s.subject in set(subjects)]
        if not any(s.tissues for s in scans):
            LOGGER.info(
                "No tissue maps given: each scan is segmented from its own fit (CSF: MD >= "
                "2.0e-3 mm^2/s; WM: FA >= 0.2 and MD < 1.1e-3; grey matter: the rest)."
            )
            return
        for scan in scans:
            lacking = [t for t in tissues if t not in scan.tissues]
            if lacking:
                raise ExperimentInputError(
                    f"{scan.name} has no {', '.join(lacking)} probability map while other "
                    "scans have them; give SGM (or GM) and CSF maps of every scan in its DWI "
                    "space (e.g. *_label-SGM_probseg.nii.gz), or none to segment each scan "
                    "from its own fit."
                )

    def tissue_probability(self, scan: ExperimentScan, tissue: str) -> np.ndarray:
        """The scan's ``tissue`` (``SGM``/``CSF``) probability map: the given file, else 0/1
        from the scan's own fit (``SGM`` then stands for grey matter as a whole)."""
        if tissue in scan.tissues:
            return _load(scan.tissues[tissue])
        masks = tissue_masks_from_fit(
            _load(scan.maps["fa"]), _load(scan.maps["md"]), load_mask(scan.mask)
        )
        return masks["GM" if tissue == "SGM" else tissue].astype(np.float32)

    # -- the reference space of a subject
    def masks(self, subject: str, tissues: Sequence[str] = (WM,)) -> dict[str, np.ndarray]:
        """Scoring masks on the subject's reference scan grid (empty ones left out)."""
        cache = self._masks.setdefault(subject, {})
        ref = self.first(subject, self.reference)
        for tissue in tissues:
            if tissue in cache:
                continue
            brain = load_mask(ref.mask)
            if tissue == WM:
                cache[tissue] = wm_mask_from_fit(
                    _load(ref.maps["fa"]), _load(ref.maps["md"]), brain
                )
            else:
                probability = self.tissue_probability(ref, tissue)
                cache[tissue] = brain & (probability >= self.tissue_threshold)
            if not cache[tissue].any():
                LOGGER.warning("sub-%s: no %s voxel in the reference scan; not scored",
                               subject, tissue)  # fmt: skip
        return {t: cache[t] for t in tissues if cache[t].any()}

    def scored_voxels(self, subject: str, tissues: Sequence[str]) -> np.ndarray:
        """The union of the subject's scoring masks: only these voxels are kept."""
        masks = list(self.masks(subject, tissues).values())
        return np.logical_or.reduce(masks) if masks else np.zeros(0, bool)

    def to_reference(self, scan: ExperimentScan, maps: np.ndarray, affine) -> np.ndarray:
        """``(X, Y, Z, P)`` maps of ``scan`` on its subject's reference scan grid."""
        ref = self.first(scan.subject, self.reference)
        if scan is ref:
            return maps
        key = id(scan)
        if key not in self._registrations:
            reg = register(
                ref.maps["fa"], scan.maps["fa"], engine=self.engine, moving_mask=scan.mask,
                seed=self.seed, n_threads=self.n_threads,
            )  # fmt: skip
            LOGGER.info("%s -> reference scan: %s, correlation %.3f -> %.3f", scan.name,
                        reg.engine, reg.metrics["correlation_before"],
                        reg.metrics["correlation_after"])  # fmt: skip
            self._registrations[key] = reg
        img = nb.Nifti1Image(np.asarray(maps, dtype=np.float32), affine)
        return np.asarray(self._registrations[key].apply(img).dataobj, dtype=np.float32)

    def labels(self, scan: ExperimentScan) -> np.ndarray:
        """``(X, Y, Z, 8)`` training labels of ``scan``: given, or registered as in the group
        run: the reference scan's fit into a target scan; into a reference-scanner scan the
        subject's other run there (``reference_labels='rescan'``), else its own fit."""
        return self.labels_and_support(scan)[0]

    def labels_and_support(self, scan: ExperimentScan) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`labels` and where they are valid: for registered labels, the support of
        the registration (:meth:`~dkiharm_nipype.registration.Registration.support`); else
        ``None`` (everywhere)."""
        if scan.labels:
            return np.stack([_load(scan.labels[p]) for p in ALL_METRICS], -1), None
        source = label_source(
            scan, self.scans, reference=self.reference, reference_labels=self.reference_labels
        )
        lacking = sorted(set(ALL_METRICS) - set(source.maps))
        if lacking:
            raise ExperimentInputError(
                f"{scan.name} has no labels and the raw fit of {source.name} lacks "
                f"{', '.join(lacking)} to make them from; give the eight maps or the labels."
            )
        stack = np.stack([_load(source.maps[p]) for p in ALL_METRICS], -1)
        if source is scan:
            return stack, None
        reg = register(
            scan.maps["fa"], source.maps["fa"], engine=self.engine, moving_mask=source.mask,
            seed=self.seed, n_threads=self.n_threads,
        )  # fmt: skip
        img = nb.Nifti1Image(stack, nb.load(source.maps["fa"]).affine)
        support = np.asarray(reg.support(source.mask).dataobj) > 0
        return np.asarray(reg.apply(img).dataobj, dtype=np.float32), support

    def load(
        self, scan: ExperimentScan, tissues: Iterable[str] = (), *, with_fit: bool = False
    ) -> _Loaded:
        """The scan's DWI, mask, labels and tissue masks (and, ``with_fit``, its own eight
        maps), cropped to the brain."""
        img = nb.load(scan.dwi)
        bvals = read_bvals(scan.bval)
        mask = load_mask(scan.mask)
        box = mask_bounding_box(mask, margin=1)
        labels, support = self.labels_and_support(scan)
        fit = None
        if with_fit:
            lacking = sorted(set(ALL_METRICS) - set(scan.maps))
            if lacking:
                raise ExperimentInputError(
                    f"network_input 'dwi+fit' needs the eight raw maps of {scan.name}; "
                    f"{', '.join(lacking)} missing."
                )
            fit = np.stack([_load(scan.maps[p])[box] for p in ALL_METRICS], -1)
        return _Loaded(
            fit=fit,
            box=box, shape=mask.shape, affine=img.affine,
            dwi=np.asarray(img.dataobj[box], dtype=np.float32), bvals=bvals,
            mask=mask[box], labels=labels[box],
            label_mask=None if support is None else support[box],
            tissues={
                t: self.tissue_probability(scan, t)[box] >= self.tissue_threshold for t in tissues
            },
        )  # fmt: skip


# --------------------------------------------------------------------------- running
#: Harmonized maps of one training: ``{(subject, scanner): {param: values}}``, the values
#: at the subject's scored voxels (:meth:`ExperimentStudy.scored_voxels`) of its reference
#: scan grid.
Harmonized = dict[tuple[str, str], dict[str, np.ndarray]]


def run_splits(
    study: ExperimentStudy,
    splits: Sequence[Split],
    *,
    tissues: Sequence[str] = (WM,),
    options: TrainingOptions = TrainingOptions(),
    title: str = "training",
    log: Callable[[str], None] | None = None,
    trainings: list[dict] | None = None,
) -> list[Harmonized]:
    """Train one network per scanner for every split and harmonize its test subjects.

    Scanner by scanner, so that only one scanner's scans are in memory at a time; the
    harmonized maps are kept at the voxels scored in ``tissues`` only. ``trainings``, when
    given, receives one record per network (scanner, split, voxels, epochs run).
    """
    log = log or LOGGER.info
    out: list[Harmonized] = [{} for _ in splits]
    total, done = len(splits) * len(study.scanners), 0
    left_out = sorted({LEFT_OUT_TISSUE[s.left_out] for s in splits} - {None})
    trained = {sub for sp in splits for sub in sp.train}
    tested = {sub for sp in splits for sub in sp.test}
    for scanner in study.scanners:
        # every run of a training subject; the first run of a test subject
        needed = study.training_scans(trained, scanner) + [
            study.first(sub, scanner) for sub in sorted(tested - trained)
        ]
        with_fit = options.network_input == "dwi+fit"
        loaded = {id(s): study.load(s, left_out, with_fit=with_fit) for s in needed}
        for i, split in enumerate(splits):
            done += 1
            log(f"{title} {done}/{total}: scanner {scanner}, {_describe(split)}")
            model, card = _train(study, loaded, split, scanner, options)
            if trainings is not None:
                trainings.append(
                    {"scanner": scanner, **split.label, "train": split.train,
                     "test": split.test, "seed": split.seed, "left_out": split.left_out,
                     "n_voxels": card.training["n_train_voxels"] + card.training["n_val_voxels"],
                     "epochs_run": card.training["epochs_run"]}
                )  # fmt: skip
            for subject in split.test:
                scan = study.first(subject, scanner)
                data = loaded[id(scan)]
                maps, _ = harmonize_scan(
                    model, card, data.dwi, data.bvals, data.mask, device=options.device,
                    fit_maps=data.fit,
                )  # fmt: skip
                full = np.zeros((*data.shape, len(study.params)), dtype=np.float32)
                full[data.box] = maps[..., [ALL_METRICS.index(p) for p in study.params]]
                moved = study.to_reference(scan, full, data.affine)
                keep = study.scored_voxels(subject, tissues)
                out[i][(subject, scanner)] = {
                    p: moved[..., k][keep] for k, p in enumerate(study.params)
                }
        del loaded
    return out


def _train(study: ExperimentStudy, loaded: Mapping, split: Split, scanner: str, options):
    """The network of ``scanner`` trained on the split's training subjects (all runs)."""
    tissue = LEFT_OUT_TISSUE[split.left_out]
    subjects = []
    for scan in study.training_scans(split.train, scanner):
        data = loaded[id(scan)]
        if data.normalized is None:
            data.normalized = normalize_dwi(data.dwi, data.bvals)
        subjects.append(
            TrainingSubject(
                dwi=data.normalized, labels=data.labels, mask=data.mask,
                exclude=data.tissues[tissue] if tissue else None, name=scan.name,
                fit=data.fit, label_mask=data.label_mask,
            )
        )  # fmt: skip
    first = loaded[id(study.first(split.train[0], scanner))]
    protocol = scan_fingerprint(
        first.bvals, voxel_size=voxel_sizes(first.affine), matrix=first.shape
    )
    model, card, _ = train_harmonizer(
        subjects, scanner=scanner, protocol=protocol, seed=split.seed, **options.kwargs()
    )
    return model, card


def score(
    study: ExperimentStudy,
    harmonized: Harmonized,
    subject: str,
    *,
    tissues: Sequence[str] = (WM,),
) -> list[dict]:
    """``nrmse`` (per scanner) and ``cv`` (across scanners) rows of one test subject:
    dicts with ``tissue``, ``scanner``, ``param``, ``metric`` and ``value``.

    ``harmonized`` must hold the subject's values at its scored voxels in ``tissues``.
    """
    ref = study.first(subject, study.reference)
    keep = study.scored_voxels(subject, tissues)
    rows = []
    for tissue, mask in study.masks(subject, tissues).items():
        sel = mask[keep]
        for param in study.params:
            reference = _load(ref.maps[param])[mask]
            values = {sc: harmonized[(subject, sc)][param][sel] for sc in study.scanners}
            for scanner, v in values.items():
                rows.append({"tissue": tissue, "scanner": scanner, "param": param,
                             "metric": "nrmse", "value": nrmse(v, reference)})  # fmt: skip
            cv = mean_cv(np.stack(list(values.values())), np.ones(sel.sum(), bool))
            rows.append({"tissue": tissue, "scanner": ALL_SCANNERS, "param": param,
                         "metric": "cv", "value": cv})  # fmt: skip
    return rows


def _mean_over_subjects(rows: Iterable[dict], keys: Sequence[str]) -> list[dict]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row["value"])
    return [
        {**dict(zip(keys, key, strict=True)), "value": float(np.nanmean(v))}
        for key, v in groups.items()
    ]


# --------------------------------------------------------------------------- experiments
def run_experiment(
    experiment: str,
    scans: Iterable[ExperimentScan],
    *,
    reference: str,
    out_file: str | Path | None = None,
    params: Sequence[str] = EVAL_PARAMS,
    engine: str = "dipy-syn",
    reference_labels: str = "rescan",
    options: TrainingOptions = TrainingOptions(),
    seed: int = 0,
    max_combinations: int | None = MAX_COMBINATIONS,
    ps: Sequence[int] = PAPER_PS,
    test_subjects: Sequence[str] | None = None,
    train_subjects: Sequence[str] | None = None,
    n_seeds: int = PAPER_REPEATS,
    repeats: int = PAPER_REPEATS,
    tissue_threshold: float = TISSUE_THRESHOLD,
    n_threads: int = 1,
    log: Callable[[str], None] | None = None,
    trainings: list[dict] | None = None,
) -> list[dict]:
    """Run one experiment; return its rows (columns of :data:`~dkiharm_nipype.evaluation.evaluate.
    EXPERIMENTS`) and write them to ``out_file`` (atomically) when given.

    Parameters
    ----------
    experiment
        ``trainsize``, ``leavepout``, ``tissue`` or ``seeds``.
    scans
        Every scan of the traveling subjects (:class:`ExperimentScan`); subjects not scanned
        on every scanner are left out.
    reference
        The reference scanner.
    params
        The scored parameters (default MK, AK, RK, KFA).
    engine
        Registration engine of :func:`~dkiharm_nipype.registration.register` (``none``:
        every scan of a subject is on one grid).
    reference_labels
        ``rescan`` or ``fit``: labels of the reference scanner's scans, as the group run's
        ``--reference-labels``.
    options
        How each network is trained (epochs, samples per epoch, width, device...).
    seed
        Seed of the trainings (``tissue``: repeat ``r`` uses ``seed + r``; ``seeds``: seeds
        ``seed .. seed + n_seeds - 1``), of the sampled training sets and of the split.
    max_combinations
        Most training sets per size (``trainsize``) or per ``p`` (``leavepout``); beyond,
        a seeded sample. ``None``: all.
    ps
        ``leavepout``: the numbers of subjects left out (paper: 3 and 1).
    test_subjects
        ``trainsize``: the held-out subjects (default: the last one).
    train_subjects
        ``tissue``, ``seeds``: the training subjects (default: the group run's split).
    n_seeds, repeats
        Trainings of the ``seeds`` experiment, and per condition of ``tissue`` (paper: 10).
    tissue_threshold
        Tissue probability at or above which a voxel is SGM or CSF.
    log
        Receives one progress line per training (default: this module's logger).
    trainings
        If given, receives one record per trained network (:func:`run_splits`).
    """
    if experiment not in EXPERIMENTS:
        raise ExperimentInputError(
            f"Unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}."
        )
    study = ExperimentStudy(
        scans, reference=reference, params=params, engine=engine,
        tissue_threshold=tissue_threshold, seed=seed, n_threads=n_threads,
        reference_labels=reference_labels,
    )  # fmt: skip
    subjects = study.subjects
    kw = {"options": options, "title": _TITLES[experiment], "log": log, "trainings": trainings}
    rows: list[dict] = []
    if experiment == "trainsize":
        splits = trainsize_splits(
            subjects, test_subjects=test_subjects, max_combinations=max_combinations, seed=seed
        )
        for split, harm in zip(splits, run_splits(study, splits, **kw), strict=True):
            scored = [r for sub in split.test for r in score(study, harm, sub)]
            for row in _mean_over_subjects(scored, ("scanner", "param", "metric")):
                rows.append({**split.label, "train_subjects": _join(split.train), **row})
    elif experiment == "leavepout":
        splits = leavepout_splits(subjects, ps=ps, max_combinations=max_combinations, seed=seed)
        for split, harm in zip(splits, run_splits(study, splits, **kw), strict=True):
            for sub in split.test:
                for row in score(study, harm, sub):
                    del row["tissue"]
                    rows.append({**split.label, "train_subjects": _join(split.train),
                                 "test_subjects": sub, **row})  # fmt: skip
    else:
        train, test = default_split(
            study.scans, subjects, reference=reference, train_subjects=train_subjects, seed=seed
        )
        if experiment == "tissue":
            study.require_tissues(("SGM", "CSF"), (*train, *test))
            splits = [
                Split({"repeat": r + 1}, train, test, seed + r, left_out)
                for left_out in TISSUE_LEFT_OUT
                for r in range(repeats)
            ]
            tissues = TISSUES
        else:
            splits = [Split({"seed": seed + k}, train, test, seed + k) for k in range(n_seeds)]
            tissues = (WM,)
        harmonized = run_splits(study, splits, tissues=tissues, **kw)
        for split, harm in zip(splits, harmonized, strict=True):
            scored = [r for sub in test for r in score(study, harm, sub, tissues=tissues)]
            for row in _mean_over_subjects(scored, ("tissue", "scanner", "param", "metric")):
                if experiment == "tissue":
                    rows.append({"left_out": split.left_out, **row})
                else:
                    del row["tissue"]
                    rows.append({"seed": split.seed, **row})
    if out_file is not None:
        write_tsv(rows, EXPERIMENTS[experiment][1], out_file)
    return rows


# --------------------------------------------------------------------------- helpers
def _load(path) -> np.ndarray:
    return np.asarray(nb.load(path).dataobj, dtype=np.float32)


def _check_grids(scan: ExperimentScan) -> None:
    """Headers only: one b-value per volume, and every 3-D file of the scan on its grid."""
    img = nb.load(scan.dwi)
    check_volumes(img.shape, read_bvals(scan.bval), source=str(scan.dwi))
    files = {"brain mask": scan.mask, **{f"{p} map": f for p, f in scan.maps.items()}}
    files.update({f"{p} label": f for p, f in scan.labels.items()})
    files.update({f"{t} probability map": f for t, f in scan.tissues.items()})
    for what, path in files.items():
        other = nb.load(path)
        if other.shape[:3] != img.shape[:3] or not np.allclose(
            other.affine, img.affine, atol=VOXEL_TOLERANCE_MM
        ):
            raise ExperimentInputError(
                f"The {what} {path} ({_dims(other)} voxels) is not on the grid of its DWI "
                f"{scan.dwi} ({_dims(img)} voxels, or another affine); give {scan.name}'s "
                "own files, in its DWI space."
            )


def _dims(img) -> str:
    return "x".join(str(n) for n in img.shape[:3])


def _join(subjects: Iterable[str]) -> str:
    return ",".join(subjects)


def _subs(subjects: Iterable[str]) -> str:
    return ", ".join(f"sub-{s}" for s in subjects)


def _describe(split: Split) -> str:
    label = ", ".join(f"{k} {v}" for k, v in split.label.items() if k != "seed")
    without = f", without {split.left_out}" if split.left_out != "none" else ""
    return (
        f"train {'+'.join('sub-' + s for s in split.train)}, test "
        f"{'+'.join('sub-' + s for s in split.test)} ({label + ', ' if label else ''}"
        f"seed {split.seed}{without})"
    )
