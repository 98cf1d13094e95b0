"""The model catalogue: shipped models (``Resources/Models``) and locally distilled ones (the user's folder)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.paths import MODEL_SUFFIX, shipped_models_dir, user_models_dir

if TYPE_CHECKING:
    from KDSegmentationLib.tasks import TaskSpec

# An ensemble is written as model names or files joined by this (``--model a.kdseg.pt,b.kdseg.pt``).
SEPARATOR = ","


def is_ensemble(spec: str) -> bool:
    return SEPARATOR in str(spec)


def members(spec: str) -> List[str]:
    parts = [p.strip() for p in str(spec).split(SEPARATOR)]
    if len(parts) < 2 or not all(parts):
        raise InputError(f"ensemble {spec!r}: give two or more model files separated by commas")
    return parts


def _entries(folder: Path, source: str) -> List[Dict]:
    from KDSegmentationLib.models.files import read_header  # torch: only listing needs it, not resolving

    out = []
    if not folder.is_dir():
        return out
    try:
        paths = sorted(folder.glob(f"*{MODEL_SUFFIX}"))
    except OSError:  # an unreadable folder hides nothing else: the other source is still listed
        return out
    for path in paths:
        try:
            header = read_header(path)
        except Exception as exc:  # one bad file must never hide the others (the panel's model list reads this)
            message = str(exc) if isinstance(exc, InputError) else \
                f"model file {path} is unreadable ({type(exc).__name__}); reinstall or retrain it"
            out.append({"name": path.name[:-len(MODEL_SUFFIX)], "path": str(path), "source": source, "task": "?",
                        "role": "?", "error": " ".join(message.split()), "card": {}})
            continue
        out.append({"name": path.name[:-len(MODEL_SUFFIX)], "path": str(path), "source": source,
                    "task": header.get("task"), "role": header.get("role"), "version": header.get("version"),
                    "arch": header.get("arch"), "card": header.get("card", {})})
    return out


def list_models() -> List[Dict]:
    try:
        shipped = shipped_models_dir()
    except FileNotFoundError:
        shipped = None
    entries = _entries(shipped, "shipped") if shipped else []
    return entries + _entries(user_models_dir(), "local")


def find_model(name: str) -> Dict:
    for e in list_models():
        if e["name"] == name or Path(e["path"]).name == name:
            return e
    raise InputError(f"no model named '{name}'; run 'kdseg models list'")


def resolve_model(task: TaskSpec, model: str = "student") -> Path:
    """``student``/``teacher`` -> the shipped file; a path -> itself; a bare name -> the user's model folder."""
    if model in ("student", "teacher"):
        try:
            path = shipped_models_dir() / task.shipped_model_file(model)
        except FileNotFoundError:
            path = Path(task.shipped_model_file(model))
        if not path.is_file():
            raise InputError(f"no trained {model} model for task '{task.name}' is installed (expected {path}); "
                             f"train one with 'kdseg train-teacher'/'kdseg distill' or pass --model FILE")
        return path
    p = Path(model)
    if _is_bare_name(model):
        # A bare name means an installed model: the user's folder, then the shipped ones, and only then a file of
        # that name in the current directory (which anyone who can write there could plant).
        for cand in _named_model_candidates(model):
            if cand.is_file():
                return cand
    if p.is_file():
        return p
    raise InputError(f"model '{model}' not found; pass student, teacher, a model file, or a name from "
                     f"'kdseg models list'")


def _is_bare_name(model: str) -> bool:
    return bool(model) and Path(model).name == model and model not in (".", "..") and "/" not in model \
        and os.sep not in model and (os.altsep is None or os.altsep not in model)


def _named_model_candidates(model: str) -> List[Path]:
    folders = [user_models_dir()]
    try:
        folders.append(shipped_models_dir())
    except FileNotFoundError:
        pass
    return [folder / name for folder in folders for name in (model, f"{model}{MODEL_SUFFIX}")]


def resolve_models(task: "TaskSpec", spec: str) -> List[Path]:
    """The model file(s) of ``spec``: one model (see :func:`resolve_model`) or an ensemble ``a,b,...`` of them."""
    return [resolve_model(task, m) for m in members(spec)] if is_ensemble(spec) else [resolve_model(task, spec)]
