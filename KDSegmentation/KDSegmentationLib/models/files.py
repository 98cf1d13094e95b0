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
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.atomic import atomic_path

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
        torch.save(obj, tmp)


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
        raise InputError(f"model file {path} has non-finite weights ({_clip(bad)}); reinstall or retrain it")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model file {path}: its weights do not fit its {header['arch']} header "
                         f"({_clip(first)}); reinstall or retrain it") from None
    network.to(device).eval()
    return LoadedModel(network=network, header=header, path=path)


# ---------------------------------------------------------------------------------------------------------------
# header validation
# ---------------------------------------------------------------------------------------------------------------
# The checksum only proves the file is intact, not who wrote it: anyone can re-save a file with a changed header and
# a fresh checksum. So every header value that steers a result or an allocation is checked against these bounds
# and the task registry before a network is built.

MAX_FILE_BYTES = 2 * 2**30          # shipped models are a few MB; 2 GiB is far above any sane model
MAX_CHANNELS = 1024                 # per layer (shipped networks use at most 320)
MAX_HALVINGS = 6                    # inputs are padded to 2**halvings: 64 already pads a 3D grid generously
MAX_BLOCKS = 16                     # repeated blocks per level
MAX_EXPANSION = 16.0
MAX_PARAMETERS = 50_000_000         # 200 MB in fp32; the shipped teachers have about 6M
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")

# kind, bounds: "int" (lo, hi), "float" (lo, hi), "ints" (min len, max len, lo, hi), "name" (choices or None)
_ARG_SPECS: Dict[str, Dict[str, tuple]] = {
    "teacher_unet": {
        "spatial_dims": ("int", 2, 3), "in_channels": ("int", 1, 16), "out_channels": ("int", 1, 64),
        "filters": ("ints", 2, MAX_HALVINGS + 1, 1, MAX_CHANNELS), "norm": ("name", None),
        "dropout": ("float", 0.0, 0.99),
    },
    "student_mobile": {
        "spatial_dims": ("int", 2, 3), "in_channels": ("int", 1, 16), "out_channels": ("int", 1, 64),
        "width": ("int", 1, MAX_CHANNELS), "depth": ("int", 1, MAX_HALVINGS), "expansion": ("float", 0.01, MAX_EXPANSION),
        "stem_stride": ("int", 1, 4), "channels": ("ints?", 1, MAX_HALVINGS + 1, 1, MAX_CHANNELS),
        "blocks": ("int|ints", 0, MAX_BLOCKS, 1, MAX_HALVINGS + 1), "decoder_expansion": ("float", 0.01, MAX_EXPANSION),
        "full_res_channels": ("int", 0, MAX_CHANNELS), "norm": ("name", ("batch", "instance", "group", "none")),
        "upsample_mode": ("name", ("linear", "nearest")),
    },
}


def _clip(text: Any, limit: int = 120) -> str:
    """A header value quoted in a message, cut short: a crafted file must not produce a megabyte error line."""
    text = repr(text) if not isinstance(text, str) else text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def _check_arg(arch: str, key: str, value: Any, spec: tuple) -> Optional[str]:
    """None when ``value`` fits ``spec``, else what is wrong with it."""
    kind = spec[0]
    if kind == "int":
        if not _is_int(value) or not spec[1] <= value <= spec[2]:
            return f"{key} must be an integer from {spec[1]} to {spec[2]}"
    elif kind == "float":
        if not _is_number(value) or not spec[1] <= value <= spec[2]:
            return f"{key} must be a number from {spec[1]} to {spec[2]}"
    elif kind in ("ints", "ints?", "int|ints"):
        if kind == "ints?" and value is None:
            return None
        if kind == "int|ints":
            lo, hi, min_len, max_len = spec[1:]
            if _is_int(value):
                return None if lo <= value <= hi else f"{key} must be from {lo} to {hi}"
        else:
            min_len, max_len, lo, hi = spec[1:]
        if not isinstance(value, list) or not min_len <= len(value) <= max_len \
                or not all(_is_int(v) and lo <= v <= hi for v in value):
            return f"{key} must be a list of {min_len} to {max_len} integers from {lo} to {hi}"
    elif kind == "name":
        if not isinstance(value, str) or not value or len(value) > 32 or not set(value) <= _NAME_CHARS \
                or (spec[1] is not None and value not in spec[1]):
            choices = f" ({', '.join(spec[1])})" if spec[1] else ""
            return f"{key} must be a short lower-case name{choices}"
    return None


def _close(a: Any, b: Any) -> bool:
    if isinstance(b, (list, tuple)):
        return isinstance(a, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return _is_number(a) and abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


def validate_header(header: Any, path) -> Dict[str, Any]:
    """Check every header field's type and range, and its agreement with the task registry; returns the header.

    Raises :class:`InputError` naming the first problem. Runs before any network is built, so a crafted header
    cannot make the loader allocate more than ``MAX_PARAMETERS`` weights.
    """
    from KDSegmentationLib.models.networks import ARCHITECTURES, build_network, count_parameters
    from KDSegmentationLib.tasks import TASKS

    def bad(problem: str) -> InputError:
        return InputError(f"model file {path} has an invalid header: {problem}; reinstall or retrain it")

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    task_name = header.get("task")
    if not isinstance(task_name, str) or task_name not in TASKS:
        raise bad(f"unknown task {_clip(task_name)} (known: {', '.join(TASKS)})")
    task = TASKS[task_name]
    for key in ("role", "version"):
        if key in header and (not isinstance(header[key], str) or len(header[key]) > 64):
            raise bad(f"{key} must be a short text")
    if not isinstance(header.get("card", {}), dict):
        raise bad("card must be a JSON object")

    arch = header.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise bad(f"unknown architecture {_clip(arch)} (known: {', '.join(sorted(ARCHITECTURES))}); the file may "
                  "come from a newer KDSegmentation")
    args = header.get("arch_args")
    if not isinstance(args, dict):
        raise bad("arch_args must be a JSON object")
    specs = _ARG_SPECS.get(arch, {})
    for key, value in args.items():
        if key not in specs:
            raise bad(f"unknown {arch} argument {_clip(key)}")
        problem = _check_arg(arch, key, value, specs[key])
        if problem:
            raise bad(f"{arch} {problem} (got {_clip(value)})")
    defaults = {k: p.default for k, p in inspect.signature(ARCHITECTURES[arch]).parameters.items()}
    for key, expected in (("spatial_dims", task.spatial_dims), ("in_channels", task.input_channels),
                          ("out_channels", task.num_classes)):
        if args.get(key, defaults.get(key)) != expected:
            raise bad(f"{key} {_clip(args.get(key, defaults.get(key)))} does not match task {task.name} "
                      f"({expected})")

    pre = header.get("preprocessing") or {}
    if not isinstance(pre, dict):
        raise bad("preprocessing must be a JSON object")
    for key, expected in (("task", task.name), ("input_kind", task.input_kind), ("spatial_dims", task.spatial_dims)):
        if key in pre and pre[key] != expected:
            raise bad(f"preprocessing {key} {_clip(pre[key])} does not match task {task.name} ({expected})")
    for key, expected in (("spacing_mm", task.spacing_mm), ("hu_window", task.hu_window),
                          ("fov_diameter_px", task.fov_diameter_px)):
        if key not in pre:
            continue
        if expected is None or not _close(pre[key], list(expected) if isinstance(expected, tuple) else expected):
            want = "none" if expected is None else _clip(list(expected) if isinstance(expected, tuple) else expected)
            raise bad(f"preprocessing {key} {_clip(pre[key])} differs from task {task.name}'s ({want}): inference "
                      "would not prepare images as the model was trained")
    if "decision_threshold" in pre:
        t = pre["decision_threshold"]
        if not _is_number(t) or not 0.0 < t < 1.0:
            raise bad(f"decision_threshold must be a number strictly between 0 and 1 (got {_clip(t)})")

    labels = header.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise bad("labels must map label values to names")
    if labels and set(labels) != {str(lab.value) for lab in task.labels}:
        raise bad(f"labels {_clip(sorted(labels))} do not match task {task.name}'s "
                  f"{sorted(str(lab.value) for lab in task.labels)}")

    # Exact count without allocating: the network is built on the meta device (shapes only, no storage).
    try:
        with torch.device("meta"):
            n_params = count_parameters(build_network(arch, **args))
    except InputError:
        raise
    except Exception as exc:  # the constructor's own consistency checks (e.g. channels vs depth)
        raise bad(f"{arch} refuses its arguments ({_clip(str(exc))})") from None
    if n_params > MAX_PARAMETERS:
        raise bad(f"{arch} would have {n_params:,} parameters, more than the {MAX_PARAMETERS:,} allowed")
    return header
