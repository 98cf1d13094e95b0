"""Lesion-by-lesion detection: found, missed and false-positive lesions, and their RECIST sizes in mm."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from KDSegmentationLib.evaluation.lesions import lesion_detection, pooled_detection


def _grid(spacing=(0.8, 0.8, 5.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1)):
    """A CT-like grid (x, y, z): anisotropic voxels, flipped y."""
    image = sitk.Image(60, 50, 12, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _lesions():
    ref = np.zeros((12, 50, 60), bool)
    ref[3:6, 10:25, 10:24] = True     # 15 x 14 px at 0.8 mm: about 16 mm across, >= 10 mm
    ref[8, 40:44, 40:44] = True       # 4 x 4 px: about 4 mm, small
    ref[2:4, 30:45, 45:58] = True     # about 16 mm, missed below
    return ref


def test_found_missed_and_false_positive_lesions_are_counted():
    ref = _lesions()
    pred = np.zeros_like(ref)
    pred[4, 15:17, 15:17] = True      # touches the first large lesion: found
    pred[8, 41, 41] = True            # the small one: found, but not counted among the >= 10 mm
    pred[10, 2:6, 2:6] = True         # overlaps nothing: a false positive
    pred[10, 20:22, 50:52] = True     # another false positive
    counts = lesion_detection(pred, ref, _grid())
    assert counts == {"reference_lesions": 3, "detected_lesions": 2, "reference_lesions_10mm": 2,
                      "detected_lesions_10mm": 1, "false_positive_lesions": 2}


def test_a_lesion_is_measured_in_mm_not_in_voxels():
    ref = np.zeros((12, 50, 60), bool)
    ref[5, 10:20, 10:20] = True       # 10 px across: 8 mm at 0.8 mm, 12 mm at 1.2 mm (diagonal: more)
    small = lesion_detection(ref, ref, _grid(spacing=(0.5, 0.5, 5.0)))
    large = lesion_detection(ref, ref, _grid(spacing=(1.2, 1.2, 5.0)))
    assert small["reference_lesions_10mm"] == 0 and large["reference_lesions_10mm"] == 1


def test_an_empty_prediction_finds_nothing_and_claims_nothing():
    ref = _lesions()
    counts = lesion_detection(np.zeros_like(ref), ref, _grid())
    assert counts["detected_lesions"] == 0 and counts["false_positive_lesions"] == 0
    assert lesion_detection(np.zeros_like(ref), np.zeros_like(ref), _grid())["reference_lesions"] == 0


def test_pooled_sensitivity_counts_lesions_not_cases():
    cases = [{"Liver tumor": {"reference_lesions_10mm": 3, "detected_lesions_10mm": 3, "false_positive_lesions": 0}},
             {"Liver tumor": {"reference_lesions_10mm": 1, "detected_lesions_10mm": 0, "false_positive_lesions": 3}},
             {"Liver tumor": {"reference_lesions_10mm": 0, "detected_lesions_10mm": 0, "false_positive_lesions": 0}}]
    pooled = pooled_detection(cases, "Liver tumor")
    assert pooled["sensitivity_10mm"] == pytest.approx(0.75)      # 3 of 4 lesions; a mean over cases gives 0.5
    assert pooled["false_positives_per_case"] == pytest.approx(1.0)
    assert pooled_detection(cases[2:], "Liver tumor")["sensitivity_10mm"] is None
