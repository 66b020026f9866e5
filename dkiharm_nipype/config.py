"""Small frozen dataclasses describing one run of the BIDS-App.

The command line is parsed once into a :class:`RunConfig`; only the top-level workflow
factory (:mod:`dkiharm_nipype.workflows.base`) reads it, everything below receives plain
keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What each scanner's network sees: ``dwi``, the paper's input (the normalised DWIs), or
#: ``dwi+fit``, also the scan's own DKI maps, which the network learns to correct
#: (:mod:`dkiharm_nipype.cnn.model`). Torch-free here so the CLI can offer the choices.
NETWORK_INPUTS = ("dwi", "dwi+fit")

#: Labels of the reference scanner's own training scans: ``rescan``, the subject's other run
#: on the reference scanner registered into the scan (its noise is independent of the
#: scan's, so the network learns the maps rather than to copy its input; a scan without a
#: repeat keeps its own maps), or ``fit``, the scan's own maps (the paper).
REFERENCE_LABELS = ("rescan", "fit")


@dataclass(frozen=True)
class ExecConfig:
    """How Nipype executes the graph."""

    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    nprocs: int = 2
    omp_nthreads: int = 1
    mem_gb: float | None = None
    #: scheduler arguments added to the jobs of nodes that can use a GPU (batch plugins)
    gpu_plugin_args: str = ""

    def nipype_plugin_args(self) -> dict[str, Any]:
        """Plugin arguments with the resource limits filled in for MultiProc."""
        args = dict(self.plugin_args)
        if self.plugin in ("MultiProc", "LegacyMultiProc"):
            args.setdefault("n_procs", self.nprocs)
            if self.mem_gb:
                args.setdefault("memory_gb", self.mem_gb)
            # workers must not inherit torch's thread pools from the parent (a forked
            # child that touches torch after the parent did can deadlock)
            args.setdefault("mp_context", "forkserver")
        args.setdefault("raise_insufficient", False)
        return args


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``dkiharm`` call needs, resolved from the command line."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    skip_bids_validation: bool = False
    bids_database_dir: Path | None = None
    config_file: Path | None = None
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    scanner_entity: str = "session"
    preproc: str = "auto"
    denoiser: str = "mppca"
    mask_method: str = "dwi2mask"
    fit_method: str = "irlls"
    b_max: float | None = None
    seed: int = 0
    write_graph: bool = False
    boilerplate_only: bool = False
    verbose: int = 0
    # harmonization (group level; models_dir also at the participant level)
    reference_scanner: str | None = None
    # white-matter ROI for the SNR ({subject}/{session}/{run} expand); default automatic
    snr_roi: str | None = None
    train_participants: tuple[str, ...] = ()
    registration: str = "auto"
    epochs: int = 100
    samples_per_epoch: int = 200_000
    network_input: str = "dwi"
    kernel_size: int = 3
    reference_labels: str = "rescan"
    device: str = "auto"
    mc_samples: int = 0
    models_dir: Path | None = None
    # evaluation (group level): user WM mask / ROI atlas ("{subject}" for one per subject)
    wm_mask: str | None = None
    roi_atlas: str | None = None
    roi_table: Path | None = None
    comparators: tuple[str, ...] = ()
    experiments: tuple[str, ...] = ()
    #: QSIPrep-style folders of preprocessed DWIs (``--derivatives``)
    derivatives: tuple[Path, ...] = ()
    #: stop the whole run at the first failed node (default: skip the scan, go on)
    stop_on_first_crash: bool = False
    # --experiment tissue: user tissue maps (a derivatives folder or a {subject} pattern)
    tissue_maps: str | None = None
    execution: ExecConfig = field(default_factory=ExecConfig)
