"""``kdseg evaluate``: metrics of one prediction against a reference, or of a model over a whole dataset.

Every number in the model cards comes from :func:`evaluate_dataset` (run by ``scripts/evaluate_models.py``).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import InputError
from .tasks import TaskSpec, get_task


def write_json_atomic(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _labels(task: TaskSpec) -> Dict[int, str]:
    return {lab.value: lab.name for lab in task.labels}


def _same_grid(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _values_by_task(names_to_values: Dict[str, int], task: TaskSpec) -> Dict[int, int]:
    """Map a file's label values onto the task's: by segment name when the names match, else by value."""
    mapping = {}
    for lab in task.labels:
        if lab.name in names_to_values:
            mapping[names_to_values[lab.name]] = lab.value
    return mapping


def evaluate_pair(task_name: str, pred_path: str, ref_path: str) -> Dict:
    """Metrics of a predicted segmentation against a reference (.seg.nrrd or labelmap) on the same grid."""
    import SimpleITK as sitk

    from .metrics import segmentation_metrics
    from .segio import read_segmentation

    task = get_task(task_name)
    for p in (pred_path, ref_path):
        if not Path(p).exists():
            raise InputError(f"{p} does not exist; give a .seg.nrrd or labelmap file")
    pred, pred_names = read_segmentation(pred_path)
    ref, ref_names = read_segmentation(ref_path)
    if not _same_grid(pred, ref):
        raise InputError("prediction and reference are on different grids (size/spacing/origin/direction); "
                         "resample one onto the other first")
    pa = _remap(sitk.GetArrayFromImage(pred), _values_by_task(pred_names, task))
    ra = _remap(sitk.GetArrayFromImage(ref), _values_by_task(ref_names, task))
    metrics = segmentation_metrics(pa, ra, ref.GetSpacing(), _labels(task))
    return {"task": task.name, "pred": str(pred_path), "ref": str(ref_path), "metrics": metrics}


def _remap(arr: np.ndarray, mapping: Dict[int, int]) -> np.ndarray:
    if not mapping or all(k == v for k, v in mapping.items()):
        return arr
    out = np.zeros_like(arr)
    for src, dst in mapping.items():
        out[arr == src] = dst
    return out
