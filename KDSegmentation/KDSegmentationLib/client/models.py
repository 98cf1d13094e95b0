"""The model list as the panel shows it: parsed from ``kdseg models list --json``, labels, cards, the choices of a
task, deleting a locally distilled model, and the next versioned file name of a new one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Union

from KDSegmentationLib import protocol as P

MODEL_SUFFIX = ".kdseg.pt"


def is_local_model(entry: Dict[str, Any]) -> bool:
    """Distilled on this machine (in the user's model folder): the panel offers it and may delete it."""
    return entry.get(P.MODEL_SOURCE) == P.SOURCE_LOCAL


def next_model_path(folder, task: str) -> Path:
    """The model file the next local distillation of ``task`` writes in ``folder`` (``liver_student_local_v3.kdseg.pt``):
    the engine's one versioned-name rule, so the panel and ``kdseg distill`` never disagree; never an existing file."""
    from KDSegmentationLib.models.naming import next_versioned_output

    return next_versioned_output(Path(folder), task)


def parse_models_output(output: Union[str, Iterable[str]]) -> List[Dict[str, Any]]:
    """The stdout of ``kdseg models list --json`` (text, or its lines): exactly one JSON array of objects.

    Raises ValueError, saying what was printed instead, for anything else.
    """
    text = output if isinstance(output, str) else "\n".join(output)
    if not text.strip():
        raise ValueError("the engine printed no model list (expected one JSON array on stdout)")
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError) as exc:
        head = " ".join(text.split())[:200]
        raise ValueError(f"the engine's model list is not JSON ({exc}): {head}") from None
    if not isinstance(entries, list):
        raise ValueError(f"the engine's model list is a JSON {type(entries).__name__}, not an array")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"the engine's model list holds a {type(entry).__name__}, not a model entry")
    return entries


def _source_text(entry: Dict[str, Any]) -> str:
    return "local" if is_local_model(entry) else str(entry.get(P.MODEL_SOURCE) or "")


def model_label(entry: Dict[str, Any]) -> str:
    card = entry.get("card") or {}
    name = entry.get("name") or Path(str(entry.get("path", "model"))).name
    source = _source_text(entry)
    if entry.get("error"):  # listed, so the user sees why it is not offered, instead of it silently missing
        return f"{name} (unusable, {source or 'local'})"
    bits = [b for b in (entry.get("task"), entry.get("role", ""), source) if b]
    label = f"{name} ({', '.join(bits)})" if bits else str(name)
    version = entry.get("version") or card.get("version")
    if version and not str(name).endswith(f"v{version}"):
        label += f" v{version}"
    return label


def model_card_text(entry: Dict[str, Any]) -> str:
    """The model card as text: what it was trained on, how well it does, how fast it is."""
    card = dict(entry.get("card") or {})
    lines = [model_label(entry)]
    if entry.get("error"):
        lines.append(f"Error: {entry['error']}")
    if entry.get("path"):
        lines.append(f"File: {entry['path']}")
    for key, title in (("data", "Data"), ("training_data", "Training data"), ("metrics", "Metrics"),
                       ("speed", "Speed"), ("parameters", "Parameters"), ("teacher", "Teacher"),
                       ("created", "Created"), ("notes", "Notes")):
        if key in card:
            lines.append(f"{title}: {_card_value(card.pop(key))}")
    for key, value in card.items():
        lines.append(f"{key}: {_card_value(value)}")
    return "\n".join(lines)


def _card_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_card_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_card_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_choices(entries: Iterable[Dict[str, Any]], task: str) -> List[tuple]:
    """(label, value) pairs for the panel's model list: the shipped student and teacher, then local models."""
    choices = [("Student (fast)", "student"), ("Teacher (slower, more accurate)", "teacher")]
    for entry in entries:
        if entry.get("task") == task and is_local_model(entry) and entry.get("path"):
            choices.append((model_label(entry), str(entry["path"])))
    return choices


def delete_user_model(entry: Dict[str, Any], user_dir) -> List[Path]:
    """Delete a locally distilled model and its report files; refuses anything outside ``user_dir``."""
    path = Path(str(entry.get("path", ""))).resolve()
    user_dir = Path(user_dir).resolve()
    if not is_local_model(entry) or user_dir not in path.parents:
        raise ValueError(f"{path} is not a locally distilled model in {user_dir}; shipped models cannot be deleted")
    if not path.name.endswith(MODEL_SUFFIX):
        raise ValueError(f"{path} is not a model file")
    stem = path.name[: -len(MODEL_SUFFIX)]
    removed = []
    for p in sorted(path.parent.iterdir()):
        # the model and the report written beside it (same stem: .json, .png, ...)
        if p.is_file() and (p == path or p.name.startswith(stem + ".") or p.name.startswith(stem + "_report")):
            p.unlink()
            removed.append(p)
    return removed
