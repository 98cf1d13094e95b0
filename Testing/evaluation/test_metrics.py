"""Metrics on hand-computed cases: overlaps of boxes, HD95 with anisotropic spacing, AP/AUC of known rankings."""
from __future__ import annotations

import numpy as np
import pytest

from KDSegmentationLib.evaluation import metrics


def test_dice_jaccard_precision_recall_of_boxes():
    pred = np.zeros((10, 20, 30), np.int16)
    ref = np.zeros_like(pred)
    pred[2:6, 5:15, 10:20] = 1   # 4 x 10 x 10 = 400 voxels
    ref[4:8, 5:15, 10:20] = 1    # 400 voxels, overlap 2 x 10 x 10 = 200
    m = metrics.segmentation_metrics(pred, ref, (0.5, 0.5, 2.0), {1: "Liver"})["Liver"]
    assert m["dice"] == pytest.approx(0.5)
    assert m["jaccard"] == pytest.approx(200 / 600)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    # 400 voxels x 0.5 x 0.5 x 2 mm^3 = 200 mm^3 = 0.2 mL
    assert m["volume_pred_ml"] == pytest.approx(0.2) and m["volume_ref_ml"] == pytest.approx(0.2)


def test_hd95_uses_spacing_in_itk_order():
    # two single voxels two slices apart along z (numpy axis 0); spacing is given (x, y, z)
    pred = np.zeros((5, 6, 7), np.uint8)
    ref = np.zeros_like(pred)
    pred[0, 1, 1] = 1
    ref[2, 1, 1] = 1
    assert metrics.segmentation_metrics(pred, ref, (1.0, 1.0, 3.0), {1: "a"})["a"]["hd95_mm"] == pytest.approx(6.0)
    # same along x (numpy axis 2): x spacing 0.5 mm, four voxels apart -> 2 mm
    pred[:] = 0
    ref[:] = 0
    pred[1, 1, 0] = 1
    ref[1, 1, 4] = 1
    assert metrics.segmentation_metrics(pred, ref, (0.5, 1.0, 3.0), {1: "a"})["a"]["hd95_mm"] == pytest.approx(2.0)


def test_hd95_of_shifted_boxes_anisotropic():
    # boxes shifted by one slice of 2.5 mm: the farthest surface points are 2.5 mm apart, and they are far more
    # than 5 % of the surface (the two caps), so HD95 is exactly 2.5 mm; the x/y spacings (0.8 mm) must not leak in
    pred = np.zeros((12, 16, 16), np.uint8)
    ref = np.zeros_like(pred)
    pred[3:7, 4:12, 4:12] = 1
    ref[4:8, 4:12, 4:12] = 1
    m = metrics.segmentation_metrics(pred, ref, (0.8, 0.8, 2.5), {1: "a"})["a"]
    assert m["hd95_mm"] == pytest.approx(2.5)
    # the box grown by one voxel along x only: every differing surface point is 0.8 mm away
    big = np.zeros_like(pred)
    big[4:8, 4:12, 3:13] = 1
    m = metrics.segmentation_metrics(big, ref, (0.8, 0.8, 2.5), {1: "a"})["a"]
    assert m["hd95_mm"] == pytest.approx(0.8)


def test_empty_cases():
    z = np.zeros((4, 4, 4), np.uint8)
    one = z.copy()
    one[1, 1, 1] = 1
    both = metrics.segmentation_metrics(z, z, (1, 1, 1), {1: "a"})["a"]
    assert both["dice"] == 1.0 and both["jaccard"] == 1.0 and both["hd95_mm"] is None
    missed = metrics.segmentation_metrics(z, one, (1, 1, 1), {1: "a"})["a"]
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["precision"] is None
    assert missed["hd95_mm"] is None
    false_alarm = metrics.segmentation_metrics(one, z, (1, 1, 1), {1: "a"})["a"]
    assert false_alarm["dice"] == 0.0 and false_alarm["precision"] == 0.0 and false_alarm["recall"] is None


def test_multiple_labels_are_separate():
    pred = np.array([[0, 1, 1, 2], [2, 2, 0, 0]])
    ref = np.array([[0, 1, 2, 2], [2, 0, 0, 0]])
    m = metrics.segmentation_metrics(pred, ref, (0.3, 0.3), {1: "Liver", 2: "Liver tumor"})
    assert m["Liver"]["dice"] == pytest.approx(2 * 1 / 3)
    assert m["Liver tumor"]["dice"] == pytest.approx(2 * 2 / 6)
    # 2D with physical spacing: areas, no volume
    assert m["Liver"]["area_pred_px"] == 2 and m["Liver"]["area_pred_mm2"] == pytest.approx(2 * 0.09)
    assert m["Liver"]["volume_pred_ml"] is None


def test_photo_reports_pixels_only_and_mask_restricts():
    pred = np.zeros((6, 8), np.uint8)
    ref = np.zeros_like(pred)
    pred[:, :4] = 1
    ref[:, 2:6] = 1
    fov = np.zeros_like(pred, bool)
    fov[:, 2:] = True  # only columns 2.. count
    m = metrics.segmentation_metrics(pred, ref, (1.0, 1.0), {1: "Retinal vessels"}, mask=fov)["Retinal vessels"]
    # inside the FOV: pred = cols 2-3 (12 px), ref = cols 2-5 (24 px), overlap 12
    assert m["dice"] == pytest.approx(2 * 12 / 36)
    assert m["area_pred_px"] == 12 and m["area_ref_px"] == 24
    assert "area_pred_mm2" not in m


def test_single_slice_volume_matches_2d_reference():
    pred = np.zeros((1, 5, 5), np.uint8)
    pred[0, 1:3, 1:3] = 1
    ref = pred[0].copy()
    m = metrics.segmentation_metrics(pred, ref, (1.0, 1.0, 1.0), {1: "v"})["v"]
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0
    with pytest.raises(ValueError, match="different grids"):
        metrics.segmentation_metrics(np.zeros((4, 5)), np.zeros((5, 4)), (1, 1), {1: "v"})


def test_average_precision_and_auc_known_ranking():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = np.array([1, 0, 1, 0, 0], bool)
    # precision at the two positives: 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.average_precision(scores, truth) == pytest.approx((1 + 2 / 3) / 2)
    # positive-negative pairs ranked correctly: 0.9 beats 3 negatives, 0.7 beats 2 of 3 -> 5 / 6
    assert metrics.roc_auc(scores, truth) == pytest.approx(5 / 6)


def test_ties_are_handled():
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    truth = np.array([1, 0, 1, 0], bool)
    assert metrics.roc_auc(scores, truth) == pytest.approx(0.5)
    assert metrics.average_precision(scores, truth) == pytest.approx(0.5)  # one threshold: precision 2/4
    # a tie between a positive and a negative at the top counts as one step of precision 1/2
    scores = np.array([0.9, 0.9, 0.1])
    truth = np.array([1, 0, 1], bool)
    assert metrics.average_precision(scores, truth) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert metrics.roc_auc(scores, truth) == pytest.approx(0.25)  # pairs: tie (0.5) and loss (0) -> 0.5 / 2
    assert metrics.roc_auc(scores, np.ones(3, bool)) is None
    assert metrics.average_precision(scores, np.zeros(3, bool)) is None


def test_probabilities_in_segmentation_metrics_with_mask():
    ref = np.array([[1, 0, 1, 0, 0, 1]])
    prob = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.99]])
    fov = np.array([[True, True, True, True, True, False]])  # last pixel (a confident hit) is outside the FOV
    m = metrics.segmentation_metrics(ref, ref, (1, 1), {1: "v"}, prob={1: prob}, mask=fov)["v"]
    assert m["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(5 / 6)


def test_mean_metrics_skips_none():
    cases = [
        {"Liver": {"dice": 0.8, "hd95_mm": 4.0}, "Liver tumor": {"dice": 0.0, "hd95_mm": None}},
        {"Liver": {"dice": 0.9, "hd95_mm": 6.0}, "Liver tumor": {"dice": 0.5, "hd95_mm": 10.0}},
        {"Liver": {"dice": 1.0, "hd95_mm": None}},
    ]
    agg = metrics.mean_metrics(cases)
    assert agg["Liver"]["dice"]["mean"] == pytest.approx(0.9)
    assert agg["Liver"]["dice"]["sd"] == pytest.approx(0.1)
    assert agg["Liver"]["dice"]["n"] == 3
    assert agg["Liver"]["hd95_mm"]["mean"] == pytest.approx(5.0) and agg["Liver"]["hd95_mm"]["n"] == 2
    assert agg["Liver tumor"]["hd95_mm"] == {"mean": 10.0, "sd": None, "n": 1}
    assert metrics.mean_metrics([]) == {}


def test_an_organ_is_scored_with_the_lesions_inside_it():
    """A liver segmented whole (its tumour not told apart) is a perfect liver, as LiTS scores it; the tumour
    itself is then missed."""
    ref = np.zeros((6, 20, 20), np.uint8)
    ref[1:5, 2:18, 2:18] = 1
    ref[2:4, 8:12, 8:12] = 2              # the tumour inside the liver
    pred = (ref > 0).astype(np.uint8)     # the organ, tumour included, all labelled liver
    labels = {1: "Liver", 2: "Liver tumor"}
    whole = metrics.segmentation_metrics(pred, ref, (1.0, 1.0, 2.0), labels, contains={1: [2]})
    assert whole["Liver"]["dice"] == 1.0 and whole["Liver tumor"]["dice"] == 0.0
    strict = metrics.segmentation_metrics(pred, ref, (1.0, 1.0, 2.0), labels)
    assert strict["Liver"]["dice"] < 0.99 and strict["Liver"]["precision"] < 1.0
    from KDSegmentationLib.evaluation.evaluate import organ_contents
    from KDSegmentationLib.tasks import get_task

    assert organ_contents(get_task("liver")) == {1: [2]} and organ_contents(get_task("retina")) == {}
