"""``kdseg calibrate``: choose a binary model's decision threshold on its own validation cases.

A network trained with Dice + cross-entropy (or on the readers' soft labels, or from a teacher) is not calibrated at
0.5: briefly trained nodule models drew their masks a ring of voxels too wide, and a KD student inherits its
teacher's bias. A threshold is chosen on the validation cases listed in the model's card (never the test cases) by
the one-standard-error rule (:func:`choose_threshold`), stored in the model file
(``preprocessing.decision_threshold``) and used by ``kdseg segment`` and ``kdseg evaluate``. Models without one
use 0.5. Only binary tasks (retina, lung nodule) have a threshold; the liver's labels are an argmax.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.evaluation.metrics import dice
from KDSegmentationLib.tasks import get_task

DEFAULT_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))  # 0.30 .. 0.90


def dice_at_thresholds(prob: np.ndarray, ref: np.ndarray, thresholds: Sequence[float],
                       mask: Optional[np.ndarray] = None, select=None) -> List[float]:
    """Dice of ``prob >= t`` against ``ref`` (both any shape, same shape) for each t, inside ``mask`` when given.
    ``select`` maps a boolean prediction to the part that counts (the seeded component for nodules)."""
    ref = ref > 0
    if mask is not None:
        ref = ref & mask
    out = []
    for t in thresholds:
        pred = prob >= t
        if mask is not None:
            pred = pred & mask
        if select is not None:
            pred = select(pred) > 0
        out.append(dice(pred, ref))
    return out


def _case_probability(case, task, loaded, dev) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], object]:
    """(probability, reference, mask or None, select or None) of one validation case, as evaluation sees it."""
    if case.layout == "lidc_slices":
        from KDSegmentationLib.evaluation.evaluate import lidc_nodule_probability

        prob, consensus, select = lidc_nodule_probability(case, loaded, dev)
        return prob, consensus, None, select
    from KDSegmentationLib.training.reading import _read_mask_2d, _read_sitk
    from KDSegmentationLib.inference.segment import segment_image

    image = _read_sitk(case.image)
    ref = _read_mask_2d(case.label)
    res = segment_image(image, task, loaded, dev)
    fov = _read_mask_2d(case.fov) > 0 if case.fov else None
    return res.probability.reshape(ref.shape), ref, fov, None


def calibrate(model: str, data_dir: str, thresholds: Sequence[float] = DEFAULT_GRID, device: str = "cpu",
              threads: Optional[int] = None) -> Dict:
    """Mean validation Dice per threshold and the best one, for the model file ``model`` on ``data_dir``."""
    from KDSegmentationLib.training.cache import is_cache
    from KDSegmentationLib.training.layouts import find_cases
    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.models.files import load_model

    path = Path(model)
    if not path.is_file():
        raise InputError(f"--model {model} is not a model file")
    if is_cache(data_dir):
        raise InputError(f"{data_dir} is a prepared training cache; calibrate on the original dataset, through the "
                         "same pipeline as kdseg segment")
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    dev = pick_device(device)
    loaded = load_model(path, device=str(dev))
    task = get_task(loaded.task)
    if task.num_classes != 2:
        raise InputError(f"task {task.name} has {task.num_classes - 1} labels chosen by argmax; only binary tasks "
                         "have a decision threshold")
    val_ids = set(loaded.card.get("split", {}).get("val_cases", []))
    if not val_ids:
        raise InputError(f"{path.name} lists no validation cases in its card; calibrating on other cases would "
                         "leak the test set")
    cases = [c for c in find_cases(data_dir, task) if c.case_id in val_ids and c.labelled]
    if not cases:
        raise InputError(f"none of the model's validation cases are in {data_dir}; pass the dataset it was "
                         "trained on")
    thresholds = sorted(float(t) for t in thresholds)
    if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
        raise InputError("thresholds must lie strictly between 0 and 1")
    per_case = []
    with torch.inference_mode():
        for case in cases:
            prob, ref, mask, select = _case_probability(case, task, loaded, dev)
            per_case.append(dice_at_thresholds(prob, ref, thresholds, mask, select))
    mean, best, se = choose_threshold(np.asarray(per_case), thresholds)
    return {"model": path.name, "task": task.name, "n_cases": len(cases),
            "thresholds": thresholds, "mean_dice": [round(float(v), 4) for v in mean],
            "best_threshold": thresholds[best], "best_dice": round(float(mean[best]), 4),
            "top_dice": round(float(mean.max()), 4), "standard_error": round(se, 4)}


def choose_threshold(per_case: np.ndarray, thresholds: Sequence[float]) -> Tuple[np.ndarray, int, float]:
    """(mean Dice per threshold, index of the chosen threshold, standard error) from per-case Dice (cases, thresholds).

    The one-standard-error rule: of the thresholds whose mean Dice is within one standard error (over the
    validation cases, at the top threshold) of the top, the one nearest 0.5, the network's own decision. A few
    validation cases from the training cameras or scanners cannot tell thresholds apart within that margin, and a
    threshold moved for them does not carry over: the retina student calibrated to 0.35 on six photographs of its two
    training cameras over-segmented a third camera (HRF).
    """
    mean = per_case.mean(0)
    top = int(np.argmax(mean))
    se = float(per_case[:, top].std(ddof=1) / np.sqrt(len(per_case))) if len(per_case) > 1 else 0.0
    near = [i for i in range(len(thresholds)) if mean[i] >= mean[top] - se - 1e-12]
    best = min(near, key=lambda i: (abs(thresholds[i] - 0.5), -mean[i]))
    return mean, best, se


def store_threshold(model: str, result: Dict) -> Path:
    """Rewrite the model file with ``preprocessing.decision_threshold`` and the calibration table in its card
    (same weights; written atomically, so an interrupted run leaves the old file)."""
    from KDSegmentationLib.models.files import read_header, rewrite_header

    h = read_header(model)
    pre = dict(h.get("preprocessing") or {})
    pre["decision_threshold"] = float(result["best_threshold"])
    card = dict(h.get("card") or {})
    card["calibration"] = {k: result[k] for k in ("n_cases", "thresholds", "mean_dice", "best_threshold",
                                                   "best_dice", "top_dice", "standard_error") if k in result}
    return rewrite_header(Path(model), preprocessing=pre, card=card)
