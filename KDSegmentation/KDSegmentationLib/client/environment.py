"""The Python that runs the engine, and the packages it needs in Slicer's environment (read from package
metadata: nothing is imported)."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional

# Installed into Slicer's Python on first use. torch comes from the PyTorch extension (PyTorchUtils) and is not
# listed: pip would pull a CUDA build from PyPI. SimpleITK and numpy ship with Slicer and must not be replaced.
# onnxruntime runs compiled students on the CPU (onnx is its exporter's); without them torch runs every model.
TORCH_REQUIREMENT = ">=2.1"
SLICER_REQUIREMENTS = ("monai>=1.3", "pynrrd>=1.0", "slicerio>=1.1", "tqdm>=4.60", "onnxruntime>=1.16", "onnx>=1.14")


def engine_python(app_python: Optional[str] = None) -> str:
    """The interpreter for the engine process: PythonSlicer when available (Slicer's environment), otherwise
    this interpreter."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    exe = Path(app_python or sys.executable)
    candidate = exe.with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(candidate) if candidate.exists() else str(exe)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _split_requirement(requirement: str) -> tuple:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$", requirement)
    if not m:
        raise ValueError(f"unsupported requirement {requirement!r} (use 'name' or 'name>=version')")
    return m.group(1), m.group(2)


def installed_version(name: str) -> Optional[str]:
    """Installed version of a distribution, from its metadata (nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str] = SLICER_REQUIREMENTS,
                         version_of: Callable[[str], Optional[str]] = installed_version) -> List[str]:
    """The requirements (``name>=x.y``) that are absent or too old."""
    missing = []
    for req in requirements:
        name, minimum = _split_requirement(req)
        version = version_of(name)
        if version is None or (minimum and _version_tuple(version) < _version_tuple(minimum)):
            missing.append(req)
    return missing
