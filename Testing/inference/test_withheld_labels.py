"""A segment the model does not segment reliably is never shown: not written, not measured, merged into its organ,
and the result says why it is absent."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import REPO
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.header_checks import validate_header
from KDSegmentationLib.tasks import LIVER, RETINA
from KDSegmentationLib.tasks.base import InputGridOutput, withhold


def _output(labels: np.ndarray) -> InputGridOutput:
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.8, 0.8, 2.5))
    return InputGridOutput(labels=labels, labelmap=image)


def test_a_withheld_tumour_goes_to_its_organ_and_leaves_the_offered_labels():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:6, 2:6] = 1
    labels[2, 3:5, 3:5] = 2
    original = labels.copy()
    out, offered = withhold(_output(labels), LIVER, {2})
    labels = original
    assert [lab.name for lab in offered.labels] == ["Liver"]
    assert set(np.unique(out.labels)) == {0, 1} and int((out.labels == 1).sum()) == int((labels > 0).sum())
    assert np.array_equal(sitk.GetArrayFromImage(out.label_image()), out.labels)
    assert out.label_image().GetSpacing() == (0.8, 0.8, 2.5)
    same, task = withhold(_output(labels), LIVER, set())
    assert task is LIVER and same.labels is labels


@pytest.mark.parametrize("withheld, problem", [
    ({"1": "x", "2": "y"}, "some, not all"),
    ({"7": "x"}, "some, not all"),
    ({"2": ""}, "short reasons"),
    ({"2": 3}, "short reasons"),
    (["2"], "short reasons"),
])
def test_a_header_withholding_nonsense_is_refused(withheld, problem):
    header = {"task": "liver", "arch": "student_mobile", "arch_args": {"spatial_dims": 3, "in_channels": 1,
                                                                      "out_channels": 3},
              "preprocessing": {"withheld_labels": withheld}}
    with pytest.raises(InputError) as info:
        validate_header(header, "m.kdseg.pt")
    assert problem in str(info.value)


def test_the_shipped_liver_model_offers_the_liver_only_and_says_why(tmp_path):
    from KDSegmentationLib.cli.segment import format_summary, run_segment
    from KDSegmentationLib.io.samples import write_sample

    sample = write_sample("liver", tmp_path)
    summary = run_segment("liver", sample["path"], str(tmp_path / "l.seg.nrrd"))
    assert list(summary["segments"]) == ["Liver"] and "Dice" in summary["withheld"]["Liver tumor"]
    assert [s["name"] for s in slicerio.read_segmentation(str(tmp_path / "l.seg.nrrd"), skip_voxels=True)
            ["segments"]] == ["Liver"]
    assert "Liver tumor: not available with this model" in format_summary(summary)
    run_segment("liver", sample["path"], str(tmp_path / "l.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz"))))) <= {0, 1}


def test_the_panel_says_a_segment_is_not_available():
    from KDSegmentationLib.client.display import format_volumes

    text = format_volumes({"event": "result", "segments": {"Liver": {"volume_ml": 1500.0}},
                           "withheld": {"Liver tumor": "cross-validation Dice 0.00"}})
    assert "Liver: 1500.0 mL" in text and "Liver tumor: not available with this model (cross-validation" in text


def test_the_card_numbers_behind_each_withheld_label_are_in_the_evaluation():
    """The reason in a shipped model is what scripts/withhold_labels.py derives from the committed evaluation."""
    import importlib.util

    from KDSegmentationLib.models.files import read_header

    spec = importlib.util.spec_from_file_location("withhold_labels", REPO / "scripts" / "withhold_labels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    summary = json.loads((REPO / "Resources" / "Models" / "evaluation.json").read_text())
    for entry in summary["models"]:
        task = {"liver": LIVER, "retina": RETINA}.get(entry["name"].rsplit("_", 1)[0])
        if task is None:
            continue
        header = read_header(REPO / "Resources" / "Models" / f"{entry['name']}.kdseg.pt")
        assert (header.get("preprocessing") or {}).get("withheld_labels", {}) == script.withheld_for(entry, task)
