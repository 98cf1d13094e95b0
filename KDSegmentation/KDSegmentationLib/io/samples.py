"""Bundled sample inputs (one per task), described by ``Resources/Samples/<task>/sample.json``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.paths import samples_dir


def list_samples() -> List[str]:
    root = samples_dir()
    return sorted(p.parent.name for p in root.glob("*/sample.json"))


def sample_info(task: str) -> Dict:
    meta = samples_dir() / task / "sample.json"
    if not meta.is_file():
        raise InputError(f"no bundled sample for task '{task}'; available: {', '.join(list_samples())}")
    info = json.loads(meta.read_text())
    info["source_path"] = str(meta.parent / info["file"])
    return info


def write_sample(task: str, out_dir: Path) -> Dict:
    """Copy the sample of ``task`` into ``out_dir``; returns its path and (lung) the seed point in RAS mm."""
    info = sample_info(task)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / info["file"]
        shutil.copyfile(info["source_path"], dest)
    except OSError as exc:
        raise InputError(f"cannot write the sample to {out_dir} ({exc.strerror}); choose another --output") from None
    result = {"task": task, "path": str(dest)}
    if "seed_ras" in info:
        result["seed_ras"] = info["seed_ras"]
    return result
