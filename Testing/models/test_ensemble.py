"""An ensemble of models as one teacher (or one model to segment with): probabilities averaged over the members and
the flipped inputs, usable wherever a model file is."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, save_tiny_student
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.ensemble import EnsembleNetwork, load_ensemble


def _tiny(task: str, path, seed: int):
    torch.manual_seed(seed)
    return save_tiny_student(task, path)


def test_the_ensemble_is_the_mean_probability_over_members_and_flips():
    torch.manual_seed(0)
    nets = [torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Conv2d(3, 2, 5, padding=2)]
    x = torch.randn(2, 3, 12, 10)
    views = [lambda t: t, lambda t: torch.flip(t, (2,)), lambda t: torch.flip(t, (3,))]
    expected = sum(v(torch.softmax(n(v(x)), 1)) for n in nets for v in views) / 6
    with torch.no_grad():
        out = EnsembleNetwork(nets)(x)
    torch.testing.assert_close(out.exp(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        EnsembleNetwork(nets)(x, return_features=True)


def test_members_of_different_tasks_are_refused_in_one_line(tmp_path):
    a = _tiny("retina", tmp_path / "a.kdseg.pt", 0)
    b = _tiny("liver", tmp_path / "b.kdseg.pt", 1)
    with pytest.raises(InputError) as info:
        load_ensemble([a, b])
    assert "disagree" in str(info.value) and "\n" not in str(info.value)


def test_kdseg_segment_runs_an_ensemble_and_names_its_members(tmp_path):
    from KDSegmentationLib.cli.segment import run_segment

    a = _tiny("retina", tmp_path / "a.kdseg.pt", 0)
    b = _tiny("retina", tmp_path / "b.kdseg.pt", 1)
    photo = next((REPO / "Resources" / "Samples" / "retina").glob("*.jpg"))
    summary = run_segment("retina", str(photo), str(tmp_path / "e.seg.nrrd"), model=f"{a},{b}")
    assert summary["model"] == "a.kdseg.pt + b.kdseg.pt" and (tmp_path / "e.seg.nrrd").exists()


def test_an_ensemble_teacher_distils_with_output_losses_and_refuses_feature_losses(tmp_path):
    from KDSegmentationLib.tasks import RETINA
    from KDSegmentationLib.training.config import TrainConfig
    from KDSegmentationLib.training.distiller import build_distiller

    a = _tiny("retina", tmp_path / "a.kdseg.pt", 0)
    b = _tiny("retina", tmp_path / "b.kdseg.pt", 1)
    cfg = TrainConfig(task="retina", data="d", output=str(tmp_path / "s.kdseg.pt"), role="student",
                      teacher=f"{a},{b}", losses="kd=1", arch_args={"width": 4})
    distiller, *_rest, teacher_header, _ = build_distiller(cfg, RETINA, torch.device("cpu"))
    assert teacher_header["role"] == "ensemble" and len(teacher_header["card"]["members"]) == 2
    x = torch.rand(2, 3, 32, 32)
    _logits, parts, total = distiller(x, torch.zeros(2, 32, 32, dtype=torch.long))
    assert torch.isfinite(total) and "kd" in parts
    cfg.losses = "seg=1,hint=0.5"
    with pytest.raises(InputError):
        build_distiller(cfg, RETINA, torch.device("cpu"))
