"""The model catalogue: shipped models (``Resources/Models``) and locally distilled ones (the user's folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.files import read_header
from KDSegmentationLib.paths import shipped_models_dir, user_models_dir


def _entries(folder: Path, source: str) -> List[Dict]:
    out = []
    if not folder.is_dir():
        return out
    try:
        paths = sorted(folder.glob("*.kdseg.pt"))
    except OSError:  # an unreadable folder hides nothing else: the other source is still listed
        return out
    for path in paths:
        try:
            header = read_header(path)
        except Exception as exc:  # one bad file must never hide the others (the panel's model list reads this)
            message = str(exc) if isinstance(exc, InputError) else \
                f"model file {path} is unreadable ({type(exc).__name__}); reinstall or retrain it"
            out.append({"name": path.name[:-len(".kdseg.pt")], "path": str(path), "source": source, "task": "?",
                        "role": "?", "error": " ".join(message.split()), "card": {}})
            continue
        out.append({"name": path.name[:-len(".kdseg.pt")], "path": str(path), "source": source,
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
