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
from ..utils.env import resolve_device
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
    "direction_order",
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
#: Gradient directions (degrees, sign-invariant) up to this apart are the same direction;
#: above DIRECTION_WARN they warn. 15 degrees is about half the spacing of neighbouring
#: directions in a 30-direction shell, so a matching stays unambiguous.
DIRECTION_WARN, DIRECTION_TOL = 5.0, 15.0


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
    bvecs: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> dict:
    """Protocol fingerprint of a scan: shells, directions per shell, b0s, TE, geometry.

    ``echo_time`` is in milliseconds (BIDS sidecars store seconds: multiply by 1000).
    Shells group b-values rounded to 100 s/mm^2 and are reported as their mean. With
    ``bvecs`` (``(N, 3)`` or ``(3, N)``) the fingerprint also holds the gradient table in
    acquisition order (``gradients``: one ``[b, x, y, z]`` row per volume, the order the
    network's input channels follow) and an order- and sign-independent summary of each
    shell's directions (``direction_digest``).
    """
    bvals = np.asarray(bvals, dtype=float).ravel()
    dw = bvals[bvals >= b0_threshold]
    keys = np.round(dw / 100.0)
    shells = [int(round(float(dw[keys == k].mean()))) for k in np.unique(keys)]
    fp = {
        "shells": shells,
        "directions": [int((keys == k).sum()) for k in np.unique(keys)],
        "n_b0": int((bvals < b0_threshold).sum()),
        "n_volumes": int(bvals.size),
        "echo_time_ms": None if echo_time is None else round(float(echo_time), 2),
        "voxel_size_mm": [round(float(v), 3) for v in voxel_size][:3],
        "matrix": [int(n) for n in matrix][:3],
    }
    if bvecs is not None:
        table = _gradient_table(bvals, bvecs)
        fp["gradients"] = [[int(round(b)), *(round(float(v), 4) for v in g)] for b, *g in table]
        fp["direction_digest"] = _direction_digest(table, b0_threshold)
    return fp


def _gradient_table(bvals: np.ndarray, bvecs) -> np.ndarray:
    """``(N, 4)`` rows ``[b, x, y, z]``, directions normalised (zeros stay zeros)."""
    g = np.asarray(bvecs, dtype=float)
    if g.ndim != 2 or (g.shape[0] == 3 and g.shape[1] != 3):
        g = g.T if g.ndim == 2 else g
    if g.shape != (bvals.size, 3):
        raise ValueError(f"b-vectors of shape {g.shape} for {bvals.size} b-values.")
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    g = np.divide(g, norm, out=np.zeros_like(g), where=norm > 1e-6)
    return np.column_stack([bvals, g])


def _direction_digest(table: np.ndarray, b0_threshold: float = B0_THRESHOLD) -> str:
    """Digest of each shell's direction *set*: sign and order do not change it."""
    parts = []
    for key in np.unique(np.round(table[table[:, 0] >= b0_threshold, 0] / 100.0)):
        dirs = table[np.round(table[:, 0] / 100.0) == key, 1:]
        dirs = dirs * np.where(_first_nonzero(dirs) < 0, -1.0, 1.0)[:, None]  # v ~ -v
        rows = sorted(tuple(np.round(d, 2) + 0.0) for d in dirs)
        parts.append(f"{int(key)}:{rows}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def _first_nonzero(dirs: np.ndarray) -> np.ndarray:
    """Each row's first component that is not ~0 (the sign that canonicalises v ~ -v)."""
    idx = np.argmax(np.abs(dirs) > 1e-3, axis=1)
    return dirs[np.arange(len(dirs)), idx]


def _split(rows) -> tuple[np.ndarray, np.ndarray]:
    table = np.asarray(rows, dtype=float)
    return table[:, 0], table[:, 1:]


def direction_order(trained: Mapping, scan: Mapping) -> tuple[np.ndarray | None, float]:
    """Match a scan's gradient directions to the ones a network was trained on.

    Both arguments are :func:`scan_fingerprint` dicts with ``gradients``. Within each shell
    the scan's directions are compared, sign-invariantly, with the trained ones in the
    trained order; if one differs by more than :data:`DIRECTION_TOL` degrees, the scan's
    directions are matched to the trained ones in any order (optimal assignment). Returns
    ``(order, max_angle)``: ``order`` is ``None`` when the acquisition order already fits,
    else the volume indices that put the scan in the trained order (``dwi[..., order]``;
    b0s and other shells stay where they are); ``max_angle`` the largest angle (degrees)
    between matched directions. Raises :class:`ValueError` when the sets differ.
    """
    from scipy.optimize import linear_sum_assignment

    t_tab = _gradient_table(*_split(trained["gradients"]))  # re-normalised after rounding
    s_tab = _gradient_table(*_split(scan["gradients"]))
    order = np.arange(len(s_tab))
    worst = 0.0
    for key in np.unique(np.round(t_tab[t_tab[:, 0] >= B0_THRESHOLD, 0] / 100.0)):
        t_idx = np.flatnonzero(np.round(t_tab[:, 0] / 100.0) == key)
        s_idx = np.flatnonzero(np.round(s_tab[:, 0] / 100.0) == key)
        if t_idx.size != s_idx.size:
            raise ValueError(f"b={int(key) * 100} has {s_idx.size} directions, not {t_idx.size}")
        cos = np.abs(t_tab[t_idx, 1:] @ s_tab[s_idx, 1:].T).clip(0.0, 1.0)
        angles = np.degrees(np.arccos(np.diag(cos)))
        match = np.arange(s_idx.size)
        if angles.max(initial=0.0) > DIRECTION_TOL:
            _, match = linear_sum_assignment(-cos)
            angles = np.degrees(np.arccos(cos[np.arange(t_idx.size), match]))
            if angles.max(initial=0.0) > DIRECTION_TOL:
                raise ValueError(
                    f"b={int(key) * 100} directions differ from the trained ones by up to "
                    f"{angles.max():.0f} degrees, in any order"
                )
        order[s_idx] = s_idx[match]
        worst = max(worst, float(angles.max(initial=0.0)))
    return (None if np.array_equal(order, np.arange(len(s_tab))) else order), worst


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
    if not errors:
        _check_directions(trained, scan, errors, notes)
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


def _check_directions(trained: Mapping, scan: Mapping, errors: list, notes: list) -> None:
    """Add the gradient-direction verdict of :func:`direction_order` to errors/notes."""
    if "gradients" not in trained and "gradients" not in scan:
        return  # neither side has a gradient table (e.g. fingerprints from b-values alone)
    if "gradients" not in trained:
        notes.append("gradient directions not recorded in the model card, not checked")
        return
    if "gradients" not in scan:
        notes.append("the scan's gradient directions not given, not checked")
        return
    try:
        order, worst = direction_order(trained, scan)
    except ValueError as exc:
        errors.append(f"gradient directions differ: {exc}")
        return
    if order is not None:
        notes.append(
            "same gradient directions in another order; volumes re-ordered to the trained order"
        )
    if worst > DIRECTION_WARN:
        notes.append(f"gradient directions differ by up to {worst:.1f} degrees")


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
    return model.to(resolve_device(str(device))).eval(), card


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
