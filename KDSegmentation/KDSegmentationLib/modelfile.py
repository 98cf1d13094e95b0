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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .errors import InputError

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
    """torch.save to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=str(path.parent))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a model file is an ordinary shareable file
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


@dataclass
class LoadedModel:
    network: torch.nn.Module
    header: Dict[str, Any]
    path: Path

    @property
    def task(self) -> str:
        return self.header["task"]

    @property
    def role(self) -> str:
        return self.header.get("role", "model")

    @property
    def card(self) -> Dict[str, Any]:
        return self.header.get("card", {})

    @property
    def decision_threshold(self) -> float:
        """Foreground probability at or above which a binary model's voxel is labelled (``kdseg calibrate``)."""
        return float((self.header.get("preprocessing") or {}).get("decision_threshold", 0.5))


def read_header(path) -> Dict[str, Any]:
    """Header only (still checksum-verified): used by ``kdseg models`` and the Slicer model list."""
    raw = _load_raw(Path(path))
    return json.loads(raw["header"])


def _load_raw(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise InputError(f"model file {path} not found; run 'kdseg models list' to see installed models")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise InputError(f"model file {path} is unreadable or not a KDSegmentation model "
                         f"({type(exc).__name__}); reinstall or retrain it") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(f"{path} is not a KDSegmentation model file (expected format {FORMAT})")
    if _digest(raw["header"], raw["state_dict"]) != raw.get("sha256"):
        raise InputError(f"model file {path} is corrupt or was modified (checksum mismatch); reinstall or retrain it")
    return raw


def load_model(path, device: str = "cpu") -> LoadedModel:
    """Load, verify and build the network in eval mode on ``device`` (fp32 weights)."""
    from .networks import build_network

    path = Path(path)
    raw = _load_raw(path)
    header = json.loads(raw["header"])
    network = build_network(header["arch"], **header["arch_args"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in raw["state_dict"].items()}
    network.load_state_dict(state)
    network.to(device).eval()
    return LoadedModel(network=network, header=header, path=path)
