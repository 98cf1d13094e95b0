"""Locate the extension's resources (models, samples, terminology, UI) and the user's model folder.

Works from the source tree (``<repo>/KDSegmentation/KDSegmentationLib`` with ``<repo>/Resources``) and from the
extension build, where ``Resources/`` is installed beside the module's Python files. ``KDSEG_RESOURCES`` overrides.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The one file-name suffix of model files (shipped, trained, distilled).
MODEL_SUFFIX = ".kdseg.pt"

_LIB_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    env = os.environ.get("KDSEG_RESOURCES")
    candidates = [Path(env)] if env else []
    candidates += [_LIB_DIR.parent / "Resources", _LIB_DIR.parent.parent / "Resources"]
    for c in candidates:
        if (c / "Models").is_dir() or (c / "Samples").is_dir():
            return c
    raise FileNotFoundError(
        "KDSegmentation resources not found (looked in " + ", ".join(str(c) for c in candidates) + "); "
        "set KDSEG_RESOURCES to the extension's Resources folder")


def shipped_models_dir() -> Path:
    return resources_dir() / "Models"


def samples_dir() -> Path:
    return resources_dir() / "Samples"


def terminology_dir() -> Path:
    return resources_dir() / "Terminology"


def user_models_dir() -> Path:
    """Where locally distilled models go (never inside the installed extension, which may be read-only)."""
    env = os.environ.get("KDSEG_USER_MODELS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or (Path.home() / ".local" / "share")
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA", str(Path.home()))
    return Path(base) / "KDSegmentation" / "models"


def user_cache_dir(kind: str) -> Path:
    """A folder of regenerable files in the user's cache (``kind``: 'datasets', 'compiled'); safe to delete."""
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA", str(Path.home()))
    return Path(base) / "KDSegmentation" / kind


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
