"""Model-file headers checked before anything is built: types, ranges, agreement with the task registry, size.

A model file's checksum has no key, so a header is trusted only as far as these checks go: every value that reaches
the network constructor or the inference pipeline is bounded here, and each problem is one line (exit code 2).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Optional

from KDSegmentationLib.errors import InputError

Bad = Callable[[str], InputError]

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


def clip_text(text: Any, limit: int = 120) -> str:
    """A header value quoted in a message, cut short: a crafted file must not produce a megabyte error line."""
    text = repr(text) if not isinstance(text, str) else text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


def validate_header(header: Any, path, what: str = "", remedy: str = "reinstall or retrain it",
                    compiled: bool = False) -> Dict[str, Any]:
    """Check every header field's type and range, and its agreement with the task registry; returns the header.

    Raises :class:`InputError` naming the first problem. Runs before any network is built, so a crafted header
    cannot make the loader allocate more than ``MAX_PARAMETERS`` weights. ``what`` and ``remedy`` word the message
    for other callers (a training run's own architecture options). ``compiled=True`` skips the architecture checks,
    which need torch, for a compiled model: its network is the graph checked against torch when it was compiled.
    """
    what = what or f"model file {path} has an invalid header"

    def bad(problem: str) -> InputError:
        return InputError(f"{what}: {problem}; {remedy}")

    task = _checked_task(header, bad)
    _check_preprocessing(header.get("preprocessing") or {}, task, bad)
    _check_labels(header.get("labels", {}), task, bad)
    if not compiled:
        _check_parameter_count(*_checked_architecture(header, task, bad), bad)
    return header


def _checked_task(header: Any, bad: Bad):
    from KDSegmentationLib.tasks import TASKS

    if not isinstance(header, dict):
        raise bad("not a JSON object")
    task_name = header.get("task")
    if not isinstance(task_name, str) or task_name not in TASKS:
        raise bad(f"unknown task {clip_text(task_name)} (known: {', '.join(TASKS)})")
    for key in ("role", "version"):
        if key in header and (not isinstance(header[key], str) or len(header[key]) > 64):
            raise bad(f"{key} must be a short text")
    if not isinstance(header.get("card", {}), dict):
        raise bad("card must be a JSON object")
    return TASKS[task_name]


def _checked_architecture(header: Dict[str, Any], task, bad: Bad):
    from KDSegmentationLib.models.networks import ARCHITECTURES

    arch = header.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise bad(f"unknown architecture {clip_text(arch)} (known: {', '.join(sorted(ARCHITECTURES))}); the file may "
                  "come from a newer KDSegmentation")
    args = header.get("arch_args")
    if not isinstance(args, dict):
        raise bad("arch_args must be a JSON object")
    specs = _ARG_SPECS.get(arch, {})
    for key, value in args.items():
        if key not in specs:
            raise bad(f"unknown {arch} argument {clip_text(key)}")
        problem = _check_arg(arch, key, value, specs[key])
        if problem:
            raise bad(f"{arch} {problem} (got {clip_text(value)})")
    defaults = {k: p.default for k, p in inspect.signature(ARCHITECTURES[arch]).parameters.items()}
    for key, expected in (("spatial_dims", task.spatial_dims), ("in_channels", task.input_channels),
                          ("out_channels", task.num_classes)):
        if args.get(key, defaults.get(key)) != expected:
            raise bad(f"{key} {clip_text(args.get(key, defaults.get(key)))} does not match task {task.name} "
                      f"({expected})")
    return arch, args


def _check_preprocessing(pre: Any, task, bad: Bad) -> None:
    if not isinstance(pre, dict):
        raise bad("preprocessing must be a JSON object")
    for key, expected in (("task", task.name), ("input_kind", task.input_kind), ("spatial_dims", task.spatial_dims)):
        if key in pre and pre[key] != expected:
            raise bad(f"preprocessing {key} {clip_text(pre[key])} does not match task {task.name} ({expected})")
    for key, expected in (("spacing_mm", task.spacing_mm), ("hu_window", task.hu_window),
                          ("fov_diameter_px", task.fov_diameter_px)):
        if key not in pre:
            continue
        if expected is None or not _close(pre[key], list(expected) if isinstance(expected, tuple) else expected):
            want = "none" if expected is None else clip_text(list(expected) if isinstance(expected, tuple) else expected)
            raise bad(f"preprocessing {key} {clip_text(pre[key])} differs from task {task.name}'s ({want}): inference "
                      "would not prepare images as the model was trained")
    if "withheld_labels" in pre:
        _check_withheld(pre["withheld_labels"], task, bad)
    if "decision_threshold" in pre:
        t = pre["decision_threshold"]
        if not _is_number(t) or not 0.0 < t < 1.0:
            raise bad(f"decision_threshold must be a number strictly between 0 and 1 (got {clip_text(t)})")


def _check_withheld(withheld: Any, task, bad: Bad) -> None:
    """{label value: reason}: labels of the task the model does not offer, never all of them, each with a reason."""
    values = {str(lab.value) for lab in task.labels}
    if not isinstance(withheld, dict) or not all(isinstance(k, str) and isinstance(v, str) and 0 < len(v) <= 300
                                                 for k, v in withheld.items()):
        raise bad("withheld_labels must map label values to short reasons")
    if not set(withheld) <= values or set(withheld) == values:
        raise bad(f"withheld_labels {clip_text(sorted(withheld))} must be some, not all, of task {task.name}'s "
                  f"labels {sorted(values)}")


def _check_labels(labels: Any, task, bad: Bad) -> None:
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise bad("labels must map label values to names")
    if labels and set(labels) != {str(lab.value) for lab in task.labels}:
        raise bad(f"labels {clip_text(sorted(labels))} do not match task {task.name}'s "
                  f"{sorted(str(lab.value) for lab in task.labels)}")


def _check_parameter_count(arch: str, args: Dict[str, Any], bad: Bad) -> None:
    """Exact count without allocating: the network is built on the meta device (shapes only, no storage)."""
    import torch

    from KDSegmentationLib.models.networks import build_network, count_parameters

    try:
        with torch.device("meta"):
            n_params = count_parameters(build_network(arch, **args))
    except InputError:
        raise
    except Exception as exc:  # the constructor's own consistency checks (e.g. channels vs depth)
        raise bad(f"{arch} refuses its arguments ({clip_text(str(exc))})") from None
    if n_params > MAX_PARAMETERS:
        raise bad(f"{arch} would have {n_params:,} parameters, more than the {MAX_PARAMETERS:,} allowed")
