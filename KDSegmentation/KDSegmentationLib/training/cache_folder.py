"""The user's cache folder of prepared datasets (``kdseg cache``): what it holds, its size on disk, and clearing it.

Only what the engine put there is ever removed: folders holding a prepared-cache manifest, and the hidden leftovers
of a preparation that was interrupted (``.tmp-*``, ``.old-*``). Anything else in the folder is left alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.training.cache import default_cache_root, is_cache


def _size_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _ours(entry: Path) -> bool:
    return entry.is_dir() and not entry.is_symlink() and (
        is_cache(entry) or entry.name.startswith((".tmp-", ".old-")))


def cached_datasets(root: Optional[Path] = None) -> List[Dict]:
    """One entry per prepared dataset in ``root`` (default: the user's cache folder): name, task, the source
    folder's name, number of cases and bytes on disk; interrupted preparations are listed as ``incomplete``."""
    root = Path(root) if root else default_cache_root()
    if not root.is_dir():
        return []
    entries = []
    for entry in sorted(root.iterdir()):
        if not _ours(entry):
            continue
        info = {"name": entry.name, "bytes": _size_bytes(entry), "incomplete": not is_cache(entry)}
        if is_cache(entry):
            try:
                manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
                info.update(task=manifest.get("task"), cases=len(manifest.get("cases", [])),
                            source=Path(str(manifest.get("source") or "")).name)
            except (OSError, ValueError):
                info["incomplete"] = True
        entries.append(info)
    return entries


def clear_cache(root: Optional[Path] = None) -> Dict:
    """Remove every prepared dataset (and interrupted preparation) from ``root``; returns what was freed.
    A training run that needs a dataset again prepares it again."""
    root = Path(root) if root else default_cache_root()
    removed, freed = 0, 0
    for info in cached_datasets(root):
        path = root / info["name"]
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise InputError(f"cannot remove {path} ({exc.strerror or exc}); close programs using it and try "
                             f"again") from None
        removed += 1
        freed += info["bytes"]
    return {"folder": str(root), "removed": removed, "freed_bytes": freed}
