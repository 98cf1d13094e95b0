"""Self-describing model files (``*.kdseg.pt``) that can never run code.

A file is a plain dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "kdseg-model/1",
     "header": "<JSON>",            # arch, arch_args, task, role, version, preprocessing, labels, card
     "state_dict": {name: tensor},  # stored fp16 for floating tensors (halves the file), loaded back as fp32
     "sha256": "<hex>"}             # over the header and every tensor's name, dtype, shape and bytes

A wrong checksum (corrupt download, tampered file) is refused with :class:`InputError`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.atomic import atomic_path
from KDSegmentationLib.models.header_checks import clip_text, validate_header
from KDSegmentationLib.models.header_view import HeaderView

FORMAT = "kdseg-model/1"


def _digest(header: str, state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode("utf-8"))
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through :func:`io.atomic.atomic_path`: readers never see a half-written model or checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (e.g. a full disk) this way
            raise OSError(f"the write failed: {' '.join(str(exc).split())[-120:]}") from None


def save_model(path, network: torch.nn.Module, *, arch: str, arch_args: Dict[str, Any], task: str, role: str,
               version: str = "1", preprocessing: Optional[Dict[str, Any]] = None,
               labels: Optional[Dict[int, str]] = None, card: Optional[Dict[str, Any]] = None,
               half: bool = True, overwrite: bool = True) -> Path:
    """Write ``network`` as a self-describing model file (atomically)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it or choose another output name")
    header = json.dumps({
        "arch": arch, "arch_args": arch_args, "task": task, "role": role, "version": str(version),
        "preprocessing": preprocessing or {}, "labels": {str(k): v for k, v in (labels or {}).items()},
        "card": card or {},
    }, sort_keys=True)
    state = {}
    for k, v in network.state_dict().items():
        v = v.detach().cpu()
        state[k] = v.half() if (half and v.is_floating_point()) else v.clone()
    atomic_save({"format": FORMAT, "header": header, "state_dict": state, "sha256": _digest(header, state)}, path)
    return path


def rewrite_header(path, preprocessing: Optional[Dict[str, Any]] = None,
                   card: Optional[Dict[str, Any]] = None) -> Path:
    """Rewrite a model file with a new ``preprocessing`` and/or ``card`` (each replaces the old one when given); the
    weights and every other header field are kept. Atomic: an interrupted rewrite leaves the old file."""
    loaded = load_model(path)
    h = loaded.header
    return save_model(path, loaded.network, arch=h["arch"], arch_args=h["arch_args"], task=h["task"], role=h["role"],
                      version=h.get("version", "1"),
                      preprocessing=h.get("preprocessing") if preprocessing is None else preprocessing,
                      labels={int(k): v for k, v in h.get("labels", {}).items()},
                      card=h.get("card") if card is None else card)


@dataclass
class LoadedModel(HeaderView):
    """A model file's network (torch, eval mode) and its validated header."""
    network: torch.nn.Module
    header: Dict[str, Any]
    path: Path
    runtime: str = "torch"


def read_header(path) -> Dict[str, Any]:
    """Header only (still checksum-verified and validated): used by ``kdseg models`` and the Slicer model list."""
    path = Path(path)
    raw = _load_raw(path)
    return validate_header(_parse_header(raw, path), path)


def _load_raw(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise InputError(f"model file {path} not found; run 'kdseg models list' to see installed models")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"model file {path} cannot be read ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise InputError(f"model file {path} is {size / 2**30:.1f} GiB, larger than any KDSegmentation model "
                         f"({MAX_FILE_BYTES // 2**30} GiB at most); it is not a model file")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise InputError(f"model file {path} is unreadable or not a KDSegmentation model "
                         f"({type(exc).__name__}); reinstall or retrain it") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(f"{path} is not a KDSegmentation model file (expected format {FORMAT})")
    _check_raw_types(raw, path)
    if _digest(raw["header"], raw["state_dict"]) != raw.get("sha256"):
        raise InputError(f"model file {path} is corrupt or was modified (checksum mismatch); reinstall or retrain it")
    return raw


def load_model(path, device: str = "cpu") -> LoadedModel:
    """Load, verify and build the network in eval mode on ``device`` (fp32 weights)."""
    from KDSegmentationLib.models.networks import build_network

    path = Path(path)
    raw = _load_raw(path)
    header = validate_header(_parse_header(raw, path), path)
    network = build_network(header["arch"], **header["arch_args"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in raw["state_dict"].items()}
    # a NaN or infinite weight turns every probability into NaN, and NaN >= threshold is False: an empty result
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise InputError(f"model file {path} has non-finite weights ({clip_text(bad)}); reinstall or retrain it")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model file {path}: its weights do not fit its {header['arch']} header "
                         f"({clip_text(first)}); reinstall or retrain it") from None
    network.to(device).eval()
    return LoadedModel(network=network, header=header, path=path)


# ---------------------------------------------------------------------------------------------------------------
# header validation
# ---------------------------------------------------------------------------------------------------------------
# The checksum only proves the file is intact, not who wrote it: anyone can re-save a file with a changed header and
# a fresh checksum. So every header value that steers a result or an allocation is checked against these bounds
# and the task registry before a network is built.

MAX_FILE_BYTES = 2 * 2**30          # shipped models are a few MB; 2 GiB is far above any sane model


def _check_raw_types(raw: Dict[str, Any], path: Path) -> None:
    state = raw.get("state_dict")
    if not isinstance(raw.get("header"), str) or not isinstance(state, dict) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()) \
            or not isinstance(raw.get("sha256"), str):
        raise InputError(f"model file {path} is malformed (header, weights or checksum of the wrong type); "
                         "reinstall or retrain it")


def _parse_header(raw: Dict[str, Any], path: Path) -> Any:
    try:
        return json.loads(raw["header"])
    except (ValueError, RecursionError):
        raise InputError(f"model file {path} has an unreadable header (not JSON); reinstall or retrain it") from None


