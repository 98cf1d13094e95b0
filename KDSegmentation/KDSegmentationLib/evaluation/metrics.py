"""Segmentation metrics per label: overlap, surface distance (mm), volume (mL) and ranking scores of probabilities.

Arrays are numpy (z, y, x) or (y, x); spacings are given in ITK order (x, y[, z]) mm and reversed here to match the
array axes. Conventions for empty structures: both empty -> Dice = Jaccard = precision = recall = 1; only the reference
empty -> recall None, precision 0; only the prediction empty -> precision None, recall 0; HD95 None when either side is
empty; average precision / AUC None when undefined (no positives, or for AUC no negatives).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

Metrics = Dict[str, Optional[float]]


def _squeeze_to(a: np.ndarray, ndim: int) -> np.ndarray:
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    return a


def _bbox(a: np.ndarray, margin: int = 1):
    idx = np.nonzero(a)
    return tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + margin + 1) for i in idx)


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> Optional[float]:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two binary masks (MONAI); None if either is empty."""
    if not pred.any() or not ref.any():
        return None
    from monai.metrics import compute_hausdorff_distance

    # the surfaces lie inside the union's bounding box: cropping keeps distances exact and saves most of the work
    box = _bbox(pred | ref)
    p = pred[box][None, None].astype(np.float32)
    r = ref[box][None, None].astype(np.float32)
    with warnings.catch_warnings():
        # MONAI warns about its own use of a deprecated argument; nothing the caller can act on
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                        spacing=[float(s) for s in spacing_zyx])
    return float(hd.reshape(-1)[0])


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # start of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None without positives or negatives."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Average precision: sum over distinct thresholds of (recall step) x precision; tied scores form one step."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    tp = np.cumsum(positive[order])
    # evaluate only at the last element of each run of equal scores (a threshold admits all ties together)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = tp[last].astype(np.float64)
    n = (last + 1).astype(np.float64)
    precision = tp / n
    recall = tp / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """The project's one Dice of two boolean masks (any shape); both empty -> 1.0 (nothing to find, nothing found)."""
    n = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if n == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / n


def overlap(pred: np.ndarray, ref: np.ndarray) -> Metrics:
    """Dice, Jaccard, precision and recall of two boolean masks, with the module's conventions for empty masks."""
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_p + n_r == 0:
        return {"dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0}
    tp = int(np.count_nonzero(pred & ref))
    return {"dice": dice(pred, ref), "jaccard": tp / (n_p + n_r - tp),
            "precision": tp / n_p if n_p else None, "recall": tp / n_r if n_r else None}


def _is_physical(spacing: Sequence[float]) -> bool:
    return not all(abs(float(s) - 1.0) < 1e-9 for s in spacing)


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], labels: Mapping[int, str],
                         prob: Optional[Mapping[int, np.ndarray]] = None, mask: Optional[np.ndarray] = None,
                         contains: Optional[Mapping[int, Sequence[int]]] = None) -> Dict[str, Metrics]:
    """Per-label metrics -> {label name: {dice, jaccard, precision, recall, hd95_mm, volume_pred_ml, volume_ref_ml,
    [area_pred_px, area_ref_px, area_pred_mm2, area_ref_mm2 for 2D], [average_precision, auc with prob]}}.

    pred, ref: integer label arrays (z, y, x) or (y, x) (leading size-1 axes are dropped to match); spacing_mm:
    (x, y[, z]) mm; labels: {value: name}; prob: {value: scores on the same grid}; mask: bool, restricts every metric
    (e.g. the fundus field of view). 2D images report areas: pixels always, mm^2 only when the spacing is physical
    (spacing (1, 1) means unknown, as for photos, and then hd95_mm is in pixels); their volumes are None.
    contains: {value: values of the labels inside it}: an organ is scored with the lesions it contains, in the
    prediction and in the reference, as LiTS scores the liver (the organ a clinician sees is the whole liver).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    ndim = min(pred.ndim, ref.ndim)
    pred, ref = _squeeze_to(pred, ndim), _squeeze_to(ref, ndim)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} are on different grids; resample first")
    if ndim not in (2, 3):
        raise ValueError(f"expected 2D or 3D label arrays, got {ndim}D")
    spacing = [float(s) for s in spacing_mm][:ndim]
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit {ndim}D arrays")
    spacing_zyx = spacing[::-1]
    if mask is not None:
        mask = _squeeze_to(np.asarray(mask, dtype=bool), ndim)
        if mask.shape != pred.shape:
            raise ValueError(f"mask {mask.shape} does not match the labels {pred.shape}")

    out: Dict[str, Metrics] = {}
    for value, name in labels.items():
        members = [value, *(contains or {}).get(value, ())]
        p, r = np.isin(pred, members), np.isin(ref, members)
        if mask is not None:
            p &= mask
            r &= mask
        m = overlap(p, r)
        m["hd95_mm"] = hd95_mm(p, r, spacing_zyx)
        m.update(_sizes(int(p.sum()), int(r.sum()), spacing))
        if prob is not None and value in prob:
            m.update(_ranking(prob[value], ref == value, mask, ndim, pred.shape))
        out[name] = m
    return out


def _sizes(n_pred: int, n_ref: int, spacing: Sequence[float]) -> Metrics:
    """Volumes in mL (3D), or areas in pixels and, with a physical spacing, mm^2 (2D)."""
    voxel_mm3 = float(np.prod(spacing))
    if len(spacing) == 3:
        return {"volume_pred_ml": n_pred * voxel_mm3 / 1000.0, "volume_ref_ml": n_ref * voxel_mm3 / 1000.0}
    sizes: Metrics = {"volume_pred_ml": None, "volume_ref_ml": None, "area_pred_px": n_pred, "area_ref_px": n_ref}
    if _is_physical(spacing):
        sizes.update(area_pred_mm2=n_pred * voxel_mm3, area_ref_mm2=n_ref * voxel_mm3)
    return sizes


def _ranking(scores, ref: np.ndarray, mask: Optional[np.ndarray], ndim: int, shape) -> Metrics:
    """Average precision and ROC AUC of the scores of one label against its reference, inside ``mask``."""
    scores = _squeeze_to(np.asarray(scores), ndim)
    if scores.shape != shape:
        raise ValueError(f"probabilities {scores.shape} do not match the labels {shape}")
    if mask is not None:
        scores, ref = scores[mask], ref[mask]
    return {"average_precision": average_precision(scores, ref), "auc": roc_auc(scores, ref)}


def mean_metrics(per_case: List[Mapping[str, Mapping[str, Optional[float]]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Aggregate per-case results -> {label: {metric: {"mean", "sd", "n"}}}; None values are skipped.

    ``sd`` is the sample standard deviation (n - 1), None for fewer than two values; a metric with no values has
    mean None and n 0.
    """
    names: List[str] = []
    for case in per_case:
        for name in case:
            if name not in names:
                names.append(name)
    result: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in names:
        keys: List[str] = []
        for case in per_case:
            for k in case.get(name, {}):
                if k not in keys:
                    keys.append(k)
        per_metric = {}
        for k in keys:
            vals = [float(case[name][k]) for case in per_case
                    if name in case and case[name].get(k) is not None
                    and not (isinstance(case[name][k], float) and math.isnan(case[name][k]))]
            n = len(vals)
            per_metric[k] = {
                "mean": float(np.mean(vals)) if n else None,
                "sd": float(np.std(vals, ddof=1)) if n > 1 else None,
                "n": n,
            }
        result[name] = per_metric
    return result
