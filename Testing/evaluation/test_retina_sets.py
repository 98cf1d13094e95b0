"""The retina training set of two cameras and the new-site halves (scripts/retina_sets.py), on the real photographs:
the training folder reads as labelled cases, and no held-out photograph lands in it."""
from __future__ import annotations

import importlib.util

from conftest import REPO, require


def _script():
    spec = importlib.util.spec_from_file_location("retina_sets", REPO / "scripts" / "retina_sets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drive_chase_holds_both_cameras_training_photographs_with_their_masks(shared_data, tmp_path):
    from KDSegmentationLib.tasks import get_task
    from KDSegmentationLib.training.layouts import find_cases

    retina = require(shared_data / "retina" / "CHASE_DB1").parent
    folder = _script().link_drive_chase(retina, tmp_path / "DRIVE_CHASE")
    cases = find_cases(folder, get_task("retina"))
    ids = {c.case_id for c in cases}
    assert len(cases) == 40 and all(c.label for c in cases)
    assert sum(i.startswith("drive_") for i in ids) == 20
    # CHASE_DB1 children 11-14 are its held-out test set: never in training
    assert {f"chase_{n:02d}{eye}" for n in range(1, 11) for eye in "LR"} <= ids
    assert not any(i.startswith(("chase_11", "chase_12", "chase_13", "chase_14")) for i in ids)
    assert all(c.fov for c in cases if c.case_id.startswith("drive_"))


def test_hrf_halves_are_disjoint_and_the_unlabelled_half_has_no_masks(shared_data, tmp_path):
    script = _script()
    retina = require(shared_data / "retina" / "HRF").parent
    test_ids = script.hrf_test_ids(retina)
    folder = script.link_hrf_unlabelled(retina, tmp_path / "HRF_unlabelled")
    unlabelled = {p.stem for p in folder.iterdir()}
    assert len(test_ids) == 21 and len(unlabelled) == 24
    assert not unlabelled & set(test_ids)
    assert not any((folder / sub).exists() for sub in ("labels", "vessel", "manual"))
    # running it twice keeps the same links (a second training run reuses the folders)
    assert script.link_hrf_unlabelled(retina, folder) == folder and len(list(folder.iterdir())) == 24
