"""Model files: safetensors weights plus a JSON model card; protocol fingerprints.

A trained harmonizer is only valid for scans acquired with the protocol it was trained on
(the input channels *are* the protocol's DWI volumes), so the card records the target
scanner's protocol fingerprint and :func:`check_fingerprint` refuses scans that differ.

Weights are read with :func:`safetensors.torch.load_file` only, never unpickled: a file
that is not a safetensors file is rejected before anything in it is interpreted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import DkiharmInputError
from .data import B0_THRESHOLD, TargetScaling
from .model import HierarchicalDKINet

__all__ = [
    "CARD_FORMAT",
    "ModelCard",
    "ModelFileError",
    "ProtocolMismatchError",
    "ProtocolWarning",
    "check_fingerprint",
    "describe_protocol",
    "load_model",
    "read_card",
    "save_model",
    "scan_fingerprint",
]

CARD_FORMAT = "dkiharm-cnn-card"
CARD_VERSION = 1
#: Relative b-value differences up to this are rounding (silent); up to B_WARN they warn.
B_SAME, B_WARN = 0.005, 0.025
#: Echo-time differences (ms) up to this are silent; up to TE_WARN they warn.
TE_SAME, TE_WARN = 0.5, 5.0
#: Voxel-size differences (mm) above this are refused.
VOXEL_TOL = 0.05


class ModelFileError(DkiharmInputError):
    """A weights or card file that cannot be used."""


class ProtocolMismatchError(DkiharmInputError):
    """A scan whose protocol differs from the one the harmonizer was trained on."""


class ProtocolWarning(UserWarning):
    """A scan whose protocol nearly matches the one the harmonizer was trained on."""


def scan_fingerprint(
    bvals: Sequence[float] | np.ndarray,
    *,
    voxel_size: Sequence[float],
    matrix: Sequence[int],
    echo_time: float | None = None,
    b0_threshold: float = B0_THRESHOLD,
) -> dict:
    """Protocol fingerprint of a scan: shells, directions per shell, b0s, TE, geometry.

    ``echo_time`` is in milliseconds (BIDS sidecars store seconds: multiply by 1000).
    Shells group b-values rounded to 100 s/mm^2 and are reported as their mean.
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    dw = bvals[bvals >= b0_threshold]
    keys = np.round(dw / 100.0)
    shells = [int(round(float(dw[keys == k].mean()))) for k in np.unique(keys)]
    return {
        "shells": shells,
        "directions": [int((keys == k).sum()) for k in np.unique(keys)],
        "n_b0": int((bvals < b0_threshold).sum()),
        "n_volumes": int(bvals.size),
        "echo_time_ms": None if echo_time is None else round(float(echo_time), 2),
        "voxel_size_mm": [round(float(v), 3) for v in voxel_size][:3],
        "matrix": [int(n) for n in matrix][:3],
    }


def describe_protocol(fp: Mapping) -> str:
    """One-line human description of a fingerprint."""
    shells = ", ".join(f"b={b}x{n}" for b, n in zip(fp["shells"], fp["directions"], strict=True))
    te = "TE ?" if fp.get("echo_time_ms") is None else f"TE {fp['echo_time_ms']:g} ms"
    vox = "x".join(f"{v:g}" for v in fp["voxel_size_mm"])
    mat = "x".join(str(n) for n in fp["matrix"])
    return f"[{shells}; {fp['n_b0']} b0; {te}; {vox} mm; matrix {mat}]"


def check_fingerprint(card: ModelCard | Mapping, scan: Mapping) -> list[str]:
    """Refuse a scan whose protocol differs from the card's; warn on a near match.

    Different shells, directions per shell, b-values (> 2.5 %), voxel size or TE (> 5 ms)
    raise :class:`ProtocolMismatchError`; small b-value or TE differences, a different
    number of b0s, a different matrix or an unknown TE emit :class:`ProtocolWarning`.
    Returns the warning messages.
    """
    trained = card.protocol if isinstance(card, ModelCard) else card
    both = f"model trained on {describe_protocol(trained)}, scan is {describe_protocol(scan)}"
    errors: list[str] = []
    notes: list[str] = []
    if len(trained["shells"]) != len(scan["shells"]):
        errors.append("different number of shells")
    else:
        if list(trained["directions"]) != list(scan["directions"]):
            errors.append("different number of directions per shell")
        for bt, bs in zip(trained["shells"], scan["shells"], strict=True):
            rel = abs(bt - bs) / bt
            if rel > B_WARN:
                errors.append(f"b={bs} differs from b={bt} by {100 * rel:.1f} %")
            elif rel > B_SAME:
                notes.append(f"b={bs} differs from b={bt} by {100 * rel:.1f} %")
    dv = np.abs(np.subtract(trained["voxel_size_mm"], scan["voxel_size_mm"]))
    if np.any(dv > VOXEL_TOL):
        errors.append("different voxel size")
    te_t, te_s = trained.get("echo_time_ms"), scan.get("echo_time_ms")
    if te_t is None or te_s is None:
        notes.append("echo time unknown, not checked")
    elif abs(te_t - te_s) > TE_WARN:
        errors.append(f"TE differs by {abs(te_t - te_s):g} ms")
    elif abs(te_t - te_s) > TE_SAME:
        notes.append(f"TE differs by {abs(te_t - te_s):g} ms")
    if trained["n_b0"] != scan["n_b0"]:
        notes.append(f"{scan['n_b0']} b0 volumes instead of {trained['n_b0']}")
    if list(trained["matrix"]) != list(scan["matrix"]):
        notes.append("different matrix")
    if errors:
        raise ProtocolMismatchError(
            f"Scan protocol does not match the harmonizer ({'; '.join(errors)}): {both}. "
            "Train a harmonizer for this protocol."
        )
    if notes:
        warnings.warn(
            f"Protocol near match ({'; '.join(notes)}): {both}.", ProtocolWarning, stacklevel=2
        )
    return notes


@dataclass
class ModelCard:
    """Everything needed to reuse, audit and reproduce a trained harmonizer.

    ``protocol`` is the target scanner's :func:`scan_fingerprint`; ``normalization`` the
    input recipe (:func:`.data.normalize_dwi` arguments); ``target_scaling`` a
    :meth:`.data.TargetScaling.to_dict`; ``architecture`` the network's ``hparams``;
    ``training`` subjects, seed, hyper-parameters and validation metrics; ``mapping`` the
    linear baseline and which of it and the network harmonizes each map (empty for cards
    written before model selection: the network harmonizes every map).
    """

    scanner: str
    protocol: dict
    normalization: dict
    target_scaling: dict
    architecture: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    mapping: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    weights_sha256: str = ""
    format: str = CARD_FORMAT
    format_version: int = CARD_VERSION

    @property
    def scaling(self) -> TargetScaling:
        return TargetScaling.from_dict(self.target_scaling)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "model card") -> ModelCard:
        if not isinstance(data, Mapping) or data.get("format") != CARD_FORMAT:
            raise ModelFileError(
                f"{source} is not a dkiharm model card (format != {CARD_FORMAT})."
            )
        if data.get("format_version") != CARD_VERSION:
            raise ModelFileError(
                f"{source} has card format version {data.get('format_version')!r}; this "
                f"dkiharm reads version {CARD_VERSION}."
            )
        required = ("scanner", "protocol", "normalization", "target_scaling", "architecture")
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelFileError(f"{source} lacks the field(s) {', '.join(missing)}.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def read_card(path: str | Path) -> ModelCard:
    """Read and validate a JSON model card."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelFileError(f"Cannot read model card {path}: {err.strerror}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"Model card {path} is not valid JSON ({err}).") from None
    return ModelCard.from_dict(data, source=f"Model card {path}")


def save_model(
    model: HierarchicalDKINet, card: ModelCard, weights_path: str | Path, card_path: str | Path
) -> ModelCard:
    """Write ``model`` as safetensors and ``card`` (completed with the architecture, the
    weights' sha256 and provenance) as JSON; returns the completed card."""
    weights_path, card_path = Path(weights_path), Path(card_path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": "pt", "dkiharm_card": CARD_FORMAT})
    card.architecture = dict(model.hparams)
    card.weights_sha256 = _sha256(weights_path)
    card.provenance = {
        "dkiharm_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **card.provenance,
    }
    card_path.write_text(card.to_json() + "\n", encoding="utf-8")
    return card


def load_model(
    weights_path: str | Path, card_path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[HierarchicalDKINet, ModelCard]:
    """Rebuild the network from the card and load its safetensors weights (never pickle).

    Raises :class:`ModelFileError` for a file that is not safetensors, weights that do not
    fit the card's architecture, or weights that are not the ones the card was saved with.
    """
    weights_path = Path(weights_path)
    card = read_card(card_path)
    state = _read_safetensors(weights_path)
    try:
        model = HierarchicalDKINet(**card.architecture)
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"Model card {card_path}: invalid architecture ({err}).") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [
        f"{k} has shape {found[k]}, card says {expected[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
        raise ModelFileError(
            f"Weights {weights_path} do not match model card {card_path}: {shown}."
        )
    if card.weights_sha256 and card.weights_sha256 != _sha256(weights_path):
        raise ModelFileError(
            f"Weights {weights_path} are not the ones model card {card_path} was saved with "
            "(sha256 differs); use the card written together with these weights."
        )
    model.load_state_dict(state)
    return model.to(device).eval(), card


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    hint = "dkiharm reads safetensors weights only and never unpickles model files"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError as err:
        raise ModelFileError(f"Cannot read model weights {path}: {err.strerror}.") from None
    # safetensors layout: u64 little-endian header length, then a JSON header.
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    if not 2 <= n <= size - 8 or head[8:9] != b"{":
        raise ModelFileError(f"{path} is not a safetensors file (bad header); {hint}.")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError and friends: report on one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelFileError(
            f"{path} is not a valid safetensors file ({reason}); {hint}."
        ) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
