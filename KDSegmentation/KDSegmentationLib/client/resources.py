"""Files the panel reads beside the module (bundled samples, terminology) and names it gives the files it writes
for the engine."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List


def sha256_file(path) -> str:
    # the client imports nothing of the engine but its protocol (see Testing/client/test_protocol.py)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _node_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_samples(samples_dir) -> List[Dict[str, Any]]:
    """Bundled samples, one ``<task>/sample.json`` each: ``{"file": ..., "seed_ras": [...], "sha256": ...}``."""
    samples_dir = Path(samples_dir)
    found = []
    if not samples_dir.is_dir():
        return found
    for meta in sorted(samples_dir.glob("*/sample.json")):
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        path = meta.parent / str(info.get("file", ""))
        if not info.get("file") or not path.is_file():
            continue
        task = str(info.get("task") or meta.parent.name)
        found.append({"task": task, "path": str(path), "file_name": path.name, "node_name": _node_name(path),
                      "sample_name": f"KD {task.replace('_', ' ')} sample",
                      "sha256": str(info.get("sha256") or sha256_file(path)),
                      "seed_ras": info.get("seed_ras")})
    return found


def terminology_files(folder) -> List[tuple]:
    """``(path, kind)`` for Slicer terminology files: kind ``"category"`` or ``"anatomic"``."""
    folder = Path(folder)
    result = []
    if not folder.is_dir():
        return result
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        if "AnatomicContextName" in content or "AnatomicRegion" in content:
            result.append((str(path), "anatomic"))
        elif "SegmentationCategoryTypeContextName" in content or "SegmentationCodes" in content:
            result.append((str(path), "category"))
    return result


def safe_name(text: str, fallback: str = "case") -> str:
    """A file-name-safe version of a node name (letters, digits, ``-`` and ``_``; non-ASCII letters kept)."""
    name = re.sub(r"[^\w\-]+", "_", str(text), flags=re.UNICODE).strip("_")
    return name or fallback
