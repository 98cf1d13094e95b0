"""Validation during training: the network being trained through the deployment inferer, scored by the one Dice.

The entry point is :func:`validate`; :class:`ValItem` is what it scores (built by :func:`val_item`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from KDSegmentationLib.evaluation.metrics import dice
from KDSegmentationLib.tasks import TaskSpec


@dataclass
class ValItem:
    """A validation case: network input (1, C, *S), or (n, C, h, w) for slice stacks; reference (*S) / (n, h, w);
    an optional mask (FOV) restricting the Dice; ``vs_teacher``: scored against the teacher's prediction."""

    case_id: str
    x: torch.Tensor
    ref: Optional[np.ndarray]
    mask: Optional[np.ndarray] = None
    vs_teacher: bool = False


def val_item(case_id: str, arrays: Dict[str, np.ndarray], task: TaskSpec, vs_teacher: bool = False) -> ValItem:
    """A cached case's arrays -> :class:`ValItem` (its reference is the label, or the teacher with ``vs_teacher``)."""
    from KDSegmentationLib.training.sampling import network_input

    x = torch.from_numpy(np.ascontiguousarray(network_input(arrays, task)))
    slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
    if not slices:
        x = x[None]
    mask = arrays.get("fov_ref", arrays.get("fov"))
    ref = None if vs_teacher else arrays["label"]
    return ValItem(case_id=case_id, x=x, ref=ref, mask=None if mask is None else np.asarray(mask, bool),
                   vs_teacher=vs_teacher)


def dice_per_label(pred: np.ndarray, ref: np.ndarray, values: Sequence[int],
                   mask: Optional[np.ndarray] = None) -> Dict[int, float]:
    """:func:`evaluation.metrics.dice` per label value (a label absent from both scores 1.0), inside ``mask``."""
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    return {v: dice(pred == v, ref == v) for v in values}


def predict_probabilities(net: torch.nn.Module, x: torch.Tensor, roi: Sequence[int],
                          device: torch.device) -> torch.Tensor:
    """Class probabilities of the deployment inferer (the forward ``kdseg segment`` runs) on model-grid inputs.

    x (B, C, *S) -> float32 (B, classes, *S) on the CPU; for slice stacks B is the number of slices, run in chunks
    of 64. Precision is the inferer's (float16 on CUDA, float32 on CPU).
    """
    from KDSegmentationLib.inference.inferer import Inferer

    inferer = Inferer(net, device)
    roi = tuple(min(r, s) for r, s in zip(roi, x.shape[2:]))
    chunks = torch.split(x, 64 if x.dim() == 4 and x.shape[0] > 1 else 1)
    return torch.cat([inferer.probabilities(c, roi).cpu() for c in chunks])


def predict_labels(net: torch.nn.Module, x: torch.Tensor, roi: Sequence[int], device: torch.device) -> np.ndarray:
    """Argmax labels (B, *S) uint8 of :func:`predict_probabilities`."""
    return predict_probabilities(net, x, roi, device).argmax(1).to(torch.uint8).numpy()


def _reference(item: ValItem, roi, device, teacher_preds: Dict[str, np.ndarray],
               teacher: Optional[torch.nn.Module]) -> np.ndarray:
    if not item.vs_teacher:
        return item.ref
    if item.case_id not in teacher_preds:  # the teacher does not change: predicted once per run
        teacher_preds[item.case_id] = predict_labels(teacher, item.x, roi, device)
    return teacher_preds[item.case_id]


def validate(net: torch.nn.Module, items: Sequence[ValItem], task: TaskSpec, roi: Sequence[int],
             device: torch.device, teacher_preds: Optional[Dict[str, np.ndarray]] = None,
             teacher: Optional[torch.nn.Module] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[Dict[str, Any]]:
    """Score ``net`` on ``items``: {'val_dice': mean over cases (each case: mean over its labels),
    'per_label': {label name: mean Dice}, 'vs_teacher': whether every reference is the teacher's}; None when
    ``should_stop()`` became true meanwhile. ``teacher_preds`` caches the teacher's predictions between calls."""
    teacher_preds = {} if teacher_preds is None else teacher_preds
    was_training = net.training
    net.eval()
    values = [lab.value for lab in task.labels]
    per_case, per_label = [], {v: [] for v in values}
    try:
        for item in items:
            if should_stop is not None and should_stop():
                return None
            pred = predict_labels(net, item.x, roi, device)
            ref = _reference(item, roi, device, teacher_preds, teacher)
            pred = pred.reshape(ref.shape)
            mask = None if item.mask is None else np.broadcast_to(item.mask, ref.shape)
            d = dice_per_label(pred, ref, values, mask)
            per_case.append(float(np.mean(list(d.values()))))
            for v in values:
                per_label[v].append(d[v])
    finally:
        net.train(was_training)
    names = {lab.value: lab.name for lab in task.labels}
    return {"val_dice": float(np.mean(per_case)) if per_case else 1.0,
            "per_label": {names[v]: float(np.mean(per_label[v])) if per_label[v] else 1.0 for v in values},
            "vs_teacher": all(i.vs_teacher for i in items)}
