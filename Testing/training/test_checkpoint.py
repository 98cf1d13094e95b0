"""Checkpoints: written atomically, resumable, and checked against the run's settings (old key spellings too)."""
from __future__ import annotations

import pytest
import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.training.checkpoint import load_checkpoint, restore, save_checkpoint, student_state

RUN = {"step": 3, "elapsed": 1.5, "history": [{"step": 3}], "val_history": [], "best": None, "best_state": None}


def _parts():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    return net, torch.nn.Linear(1, 1), torch.optim.AdamW(net.parameters())


def test_checkpoint_round_trip_leaves_no_temporary_file(tmp_path):
    net, crit, opt = _parts()
    path = tmp_path / "run.kdseg.pt.ckpt" / "last.pt"
    save_checkpoint(path, {"task": "retina"}, student_state(net), crit, opt, RUN)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    other, crit2, opt2 = _parts()
    with torch.no_grad():
        other.weight.add_(1.0)
    state = {}
    restore(load_checkpoint(path, {"task": "retina"}), other, crit2, opt2, state)
    assert torch.equal(other.weight, net.weight) and state["step"] == 3 and state["history"] == [{"step": 3}]


def test_checkpoint_with_the_old_spelling_still_resumes(tmp_path):
    net, crit, opt = _parts()
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"task": "retina", "unlabeled_cases": ["a"]}, student_state(net), crit, opt, RUN)
    assert load_checkpoint(path, {"task": "retina", "unlabelled_cases": ["a"]})["step"] == 3
    with pytest.raises(InputError, match="other settings \\(unlabelled_cases\\)"):
        load_checkpoint(path, {"task": "retina", "unlabelled_cases": ["b"]})
