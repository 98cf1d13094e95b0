"""The dataset layout registry: detection order, task restrictions, and a layout added from outside."""
from __future__ import annotations

import pytest

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.training import layouts
from KDSegmentationLib.training.layouts import LAYOUTS, Case, find_cases, register_layout


def test_builtin_layouts_in_detection_order():
    assert list(LAYOUTS)[:7] == ["drive", "chase_db1", "lidc_slices", "case_folders", "msd", "generic",
                                 "unlabelled"]
    assert LAYOUTS["drive"].tasks == ("retina",) and LAYOUTS["generic"].tasks == ()
    assert all(layout.description and callable(layout.detect) for layout in LAYOUTS.values())


@pytest.fixture
def extra_layout(monkeypatch):
    """A registered layout recognising folders holding a 'LAYOUT_X' marker; removed afterwards."""
    monkeypatch.setattr(layouts, "LAYOUTS", dict(LAYOUTS))

    @register_layout("x_marker", "folders with a LAYOUT_X marker file", tasks=("liver",))
    def detect(root, task):
        if not (root / "LAYOUT_X").is_file():
            return None
        return [Case(case_id="a b", image=str(root / "LAYOUT_X"), label=str(root / "LAYOUT_X"), layout="x_marker"),
                Case(case_id="a b", image=str(root / "LAYOUT_X"), layout="x_marker")]

    # first in detection order: the built-in 'unlabelled' layout would otherwise take any folder of files
    monkeypatch.setattr(layouts, "LAYOUTS", {"x_marker": layouts.LAYOUTS.pop("x_marker"), **layouts.LAYOUTS})
    return detect


def test_registered_layout_is_detected_and_its_ids_made_unique(extra_layout, tmp_path):
    (tmp_path / "LAYOUT_X").write_text("")
    cases = find_cases(tmp_path, get_task("liver"))
    assert [c.case_id for c in cases] == ["a_b", "a_b_1"] and [c.labelled for c in cases] == [True, False]
    with pytest.raises(InputError, match="x_marker dataset, which is for task liver"):
        find_cases(tmp_path, get_task("retina"))


def test_unrecognised_folder_lists_every_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(InputError) as err:
        find_cases(tmp_path, get_task("liver"))
    message = str(err.value)
    assert "prepared cache" in message
    assert all(layout.description in message for layout in LAYOUTS.values())


def test_case_folders_without_labels_are_unlabelled_cases(tmp_path):
    """Another hospital's scans as <case>/ct.nii.gz without label files (a folder clinicians have): found, as
    unlabelled cases beside labelled ones; folders without an image are skipped."""
    for name, files in (("a", ("ct.nii.gz", "liver.nii.gz")), ("b", ("ct.nii.gz",)), ("c", ("notes.txt",))):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
    cases = find_cases(tmp_path, get_task("liver"))
    assert [(c.case_id, c.labelled, c.layout) for c in cases] == [("a", True, "case_folders"),
                                                                 ("b", False, "case_folders")]
