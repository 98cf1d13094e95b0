"""Soft labels generated once: the teacher's class probabilities for every training case, stored with the case.

With ``--teacher-targets stored`` the teacher runs once per training image, before the first step, through the
deployment inferer on the whole model-grid input (the same forward as ``kdseg segment``; an ensemble teacher with
its flips). Its probabilities are kept as float16 log-probabilities (``arrays["teacher"]``, (C, *S), or (n, C, h, w)
for slice stacks): a log-probability is a valid logit (softmax(log p / T) = softmax(z / T)), so every output loss
(kd, soft_ce, hard_label) reads it unchanged. A training sample crops and warps it exactly as it crops and warps the
image (:func:`crop_logits`, :func:`warp_logits`), so the soft label stays spatially consistent with the student's
view; the intensity augmentation is the student's alone (the teacher saw the clean image). Per step the teacher then
costs nothing: an expensive teacher or an ensemble is paid once per image instead of once per patch.

Feature losses (hint, cwd, affinity) need the teacher's features of the augmented patch and so the online teacher.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.tasks import TaskSpec

# log-probability floor: exp(-16) ~ 1e-7 is "impossible" for any temperature used in KD, and float16 holds it exactly
LOG_FLOOR = -16.0


def check_stored_targets(task: TaskSpec, needs_features: bool, cases: Sequence[Dict[str, np.ndarray]],
                         patch: Sequence[int]) -> None:
    """Refuse (InputError) what stored soft labels cannot give: teacher features, and nodule slices larger than the
    patch (their crops move the click, so the teacher's view of the whole slice is not the student's)."""
    if needs_features:
        raise InputError("feature losses (hint, cwd, affinity) need the teacher's features of each augmented patch: "
                         "use --teacher-targets online with them")
    if task.spatial_dims == 2 and task.input_kind != "2d-rgb":
        for c in cases:
            if tuple(c["image"].shape[1:]) != tuple(patch):
                raise InputError(f"stored teacher targets need nodule-centred slices of the patch size {list(patch)} "
                                 f"(got {list(c['image'].shape[1:])}): use --teacher-targets online")


def store_teacher_logits(cases: List[Dict[str, np.ndarray]], task: TaskSpec, teacher: torch.nn.Module,
                         device: torch.device, should_stop: Callable[[], bool] = lambda: False,
                         tick: Callable[[int, int], None] = lambda i, n: None) -> int:
    """Add ``arrays["teacher"]`` (float16 log-probabilities, see the module docstring) to every case in place;
    returns the bytes they hold. ``tick(i, n)`` after each case; raises CancelledError when ``should_stop()``."""
    from KDSegmentationLib.training.sampling import network_input
    from KDSegmentationLib.training.validation import predict_probabilities

    slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
    roi = tuple(reversed(task.roi_size))
    total = 0
    for i, arrays in enumerate(cases):
        if should_stop():
            raise CancelledError("cancelled while the teacher labelled the training images")
        x = torch.from_numpy(np.ascontiguousarray(network_input(arrays, task)))
        prob = predict_probabilities(teacher, x if slices else x[None], roi, device)
        logp = torch.log(prob.clamp_min(float(np.exp(LOG_FLOOR)))).to(torch.float16).numpy()
        arrays["teacher"] = logp if slices else logp[0]
        total += arrays["teacher"].nbytes
        tick(i + 1, len(cases))
    return total


def crop_logits(logp: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """(C, *S) log-probabilities -> (C, *size) window centred at ``centre``; outside the image it is certain
    background (log 1 for class 0, the floor for the others), which is what the teacher says about air/no FOV."""
    from KDSegmentationLib.training.augment import crop

    return np.stack([crop(ch, centre, size, np.float16(0.0 if k == 0 else LOG_FLOOR)) for k, ch in enumerate(logp)])


def warp_logits(logp: torch.Tensor, theta: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, *region) log-probabilities -> float32 (B, C, *patch) through the samples' affines ``theta`` (the ones
    :func:`augment.warp_batch` applies to the image, same grid).

    Bilinear in probability space (a mean of distributions is a distribution; a mean of log-probabilities is not),
    outside the region certain background as in :func:`crop_logits`.
    """
    import torch.nn.functional as F

    b, c = logp.shape[:2]
    grid = F.affine_grid(theta.to(logp.device, torch.float32), [b, c, *patch], align_corners=False)
    fg = F.grid_sample(logp[:, 1:].float().exp(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bg = (1.0 - fg.sum(1, keepdim=True)).clamp_min(0.0)
    return torch.log(torch.cat([bg, fg], 1).clamp_min(float(np.exp(LOG_FLOOR))))
