"""Per-lesion detection of a lesion label (liver tumours), counted the way lesion-detection challenges (LiTS) count.

A lesion is a 26-connected component. A reference lesion is *detected* when at least one predicted voxel of the
label overlaps it; a predicted lesion that overlaps no reference lesion is a *false positive*. A lesion's size is its
RECIST measurement (longest axial diameter, mm), so "lesions >= 10 mm" means what it means in a radiology report.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

DETECTION_MIN_DIAMETER_MM = 10.0


def _components(mask: np.ndarray, geometry):
    """bool (z, y, x) -> (labels int32 (z, y, x) 0 = none, count), 26-connected, on ``geometry``'s grid."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
    image.CopyInformation(geometry)
    labels = sitk.ConnectedComponent(image, True)
    count = int(sitk.GetArrayViewFromImage(labels).max()) if mask.any() else 0
    return labels, count


def _diameters_mm(labels, count: int) -> List[float]:
    """RECIST diameter (mm) of components 1..count of a SimpleITK label image, each measured in its own box."""
    import SimpleITK as sitk

    from KDSegmentationLib.tasks.lung_nodule import longest_axial_diameter_mm

    if count == 0:
        return []
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(labels)
    out = []
    for value in range(1, count + 1):
        box = shapes.GetBoundingBox(value)  # (x, y, z start, x, y, z size)
        crop = sitk.RegionOfInterest(labels, box[3:], box[:3]) == value
        out.append(longest_axial_diameter_mm(crop))
    return out


def lesion_detection(pred: np.ndarray, ref: np.ndarray, geometry,
                     min_diameter_mm: float = DETECTION_MIN_DIAMETER_MM) -> Dict[str, int]:
    """pred, ref: bool (z, y, x) masks of one lesion label on the grid of ``geometry`` (a SimpleITK image: spacing,
    direction) -> counts: ``reference_lesions`` and ``detected_lesions`` (all sizes), the same for lesions of at
    least ``min_diameter_mm`` (``..._10mm``), and ``false_positive_lesions``."""
    import SimpleITK as sitk

    ref_labels, n_ref = _components(np.asarray(ref, bool), geometry)
    pred_labels, n_pred = _components(np.asarray(pred, bool), geometry)
    ref_arr = sitk.GetArrayViewFromImage(ref_labels)
    pred_arr = sitk.GetArrayViewFromImage(pred_labels)
    both = (ref_arr > 0) & (pred_arr > 0)
    found = np.zeros(n_ref + 1, bool)
    found[np.unique(ref_arr[both])] = True
    matched = np.zeros(n_pred + 1, bool)
    matched[np.unique(pred_arr[both])] = True
    large = np.array([d >= min_diameter_mm for d in _diameters_mm(ref_labels, n_ref)], bool)
    return {"reference_lesions": n_ref, "detected_lesions": int(found[1:].sum()),
            "reference_lesions_10mm": int(large.sum()), "detected_lesions_10mm": int((found[1:] & large).sum()),
            "false_positive_lesions": int(n_pred - matched[1:].sum())}


def pooled_detection(cases: List[Dict[str, Dict]], label_name: str) -> Dict[str, float]:
    """Per-case metric dicts ({label: {...counts...}}) -> lesion-level sensitivity for lesions >= 10 mm (pooled over
    all cases: found / present, None without such lesions) and false positives per case."""
    rows = [c[label_name] for c in cases if "reference_lesions_10mm" in c.get(label_name, {})]
    present = sum(r["reference_lesions_10mm"] for r in rows)
    found = sum(r["detected_lesions_10mm"] for r in rows)
    return {"cases": len(rows), "lesions_10mm": present, "detected_10mm": found,
            "sensitivity_10mm": found / present if present else None,
            "false_positives_per_case": sum(r["false_positive_lesions"] for r in rows) / len(rows) if rows else None}
