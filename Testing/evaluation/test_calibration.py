"""Decision-threshold calibration: the Dice table, the refusal cases, the stored threshold and its use by
``kdseg segment``; on real data, that the shipped nodule threshold is what ``kdseg calibrate`` picks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, require
from KDSegmentationLib.evaluation.calibrate import calibrate, choose_threshold, dice_at_thresholds, store_threshold
from KDSegmentationLib.cli.main import main
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.files import load_model, read_header

MODELS = REPO / "Resources" / "Models"
SAMPLE = REPO / "Resources" / "Samples" / "lung_nodule"


def _model(name):
    path = MODELS / f"{name}.kdseg.pt"
    if not path.is_file():
        pytest.skip(f"{path.name} is not installed")
    return path


def test_dice_at_thresholds_counts_only_inside_the_mask_and_the_selected_part():
    prob = np.array([[0.9, 0.6, 0.4, 0.2]])
    ref = np.array([[1, 1, 0, 0]])
    # t=0.5: pred {0,1} = ref -> 1; t=0.3: pred {0,1,2} -> 2*2/(3+2); t=0.7: pred {0} -> 2*1/(1+2)
    np.testing.assert_allclose(dice_at_thresholds(prob, ref, [0.3, 0.5, 0.7]), [0.8, 1.0, 2 / 3])
    mask = np.array([[True, True, False, True]])
    np.testing.assert_allclose(dice_at_thresholds(prob, ref, [0.3], mask=mask), [1.0])
    only_first = lambda fg: np.array([[fg[0, 0], 0, 0, 0]])  # noqa: E731
    np.testing.assert_allclose(dice_at_thresholds(prob, ref, [0.3], select=only_first), [2 / 3])


def test_one_standard_error_rule_keeps_0_5_on_a_flat_curve_and_moves_for_a_clear_gain():
    thresholds = [0.3, 0.4, 0.5, 0.6]
    # six cases that vary by about 0.02: the top at 0.3 beats 0.5 by 0.004, well inside one standard error
    spread = np.array([-0.02, 0.01, 0.02, -0.01, 0.0, 0.015])[:, None]
    flat = np.array([0.810, 0.808, 0.806, 0.790]) + spread
    mean, best, se = choose_threshold(flat, thresholds)
    assert thresholds[int(np.argmax(mean))] == 0.3 and 0.004 < se and thresholds[best] == 0.5
    # the same cases with 0.3 better by 0.05 on every one: beyond the error, so 0.3 is taken
    clear = np.array([0.85, 0.80, 0.80, 0.79]) + spread
    assert thresholds[choose_threshold(clear, thresholds)[1]] == 0.3
    # within the error but on the far side of 0.5: the nearest to 0.5 wins, not the top
    far = np.array([0.700, 0.801, 0.806, 0.810]) + spread
    assert thresholds[choose_threshold(far, thresholds)[1]] == 0.5
    # one case: no error estimate, the top is taken
    assert thresholds[choose_threshold(np.array([[0.7, 0.9, 0.8, 0.6]]), thresholds)[1]] == 0.4


def test_calibrate_refuses_what_it_cannot_calibrate(tmp_path):
    with pytest.raises(InputError, match="not a model file"):
        calibrate(str(tmp_path / "missing.kdseg.pt"), str(tmp_path))
    with pytest.raises(InputError, match="argmax"):
        calibrate(str(_model("liver_student")), str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="prepared training cache"):
        calibrate(str(_model("lung_nodule_student")), str(tmp_path))


def test_cli_calibrate_bad_input_exits_2(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path / "none.kdseg.pt"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model file" in err[0]


def _segment_sample_volume(model, out):
    seed = json.loads((SAMPLE / "sample.json").read_text())["seed_ras"]
    assert main(["segment", "--task", "lung_nodule", "--input", str(SAMPLE / "chest_ct_LIDC-IDRI-0001_crop.nii.gz"),
                 "--output", str(out), "--model", str(model), "--threads", "2", "--progress", "none",
                 f"--seed-ras={','.join(map(str, seed))}"]) == 0
    return int((sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0).sum())


def test_stored_threshold_keeps_the_weights_and_changes_the_mask(tmp_path):
    src = _model("lung_nodule_student")
    low, high = tmp_path / "low.kdseg.pt", tmp_path / "high.kdseg.pt"
    shutil.copy(src, low)
    shutil.copy(src, high)
    table = {"n_cases": 1, "thresholds": [0.5], "mean_dice": [0.5], "best_dice": 0.5}
    store_threshold(str(low), dict(table, best_threshold=0.2))
    store_threshold(str(high), dict(table, best_threshold=0.9))
    a, b = load_model(low), load_model(high)  # verified checksum, weights_only loading
    assert (a.decision_threshold, b.decision_threshold) == (0.2, 0.9)
    assert read_header(high)["card"]["calibration"]["best_threshold"] == 0.9
    for (ka, va), (kb, vb) in zip(a.network.state_dict().items(), b.network.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert _segment_sample_volume(low, tmp_path / "low.nii.gz") > _segment_sample_volume(high, tmp_path / "high.nii.gz")


def test_shipped_nodule_threshold_is_what_calibrate_picks(shared_data):
    data = require(shared_data / "lung" / "LIDC-IDRI-slices")
    model = _model("lung_nodule_student")
    shipped = read_header(model)
    result = calibrate(str(model), str(data), threads=2)
    assert result["n_cases"] == len({c for c in shipped["card"]["split"]["val_cases"]})
    assert result["best_threshold"] == shipped["preprocessing"]["decision_threshold"]
    assert result["mean_dice"] == pytest.approx(shipped["card"]["calibration"]["mean_dice"], abs=2e-3)
