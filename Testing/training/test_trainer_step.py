"""Training goes through the Distiller: one real Trainer step on tiny synthetic data (labelled and unlabelled
photos in one batch) trains the student and never touches the teacher."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from KDSegmentationLib.models import networks
from KDSegmentationLib.models.files import save_model
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.training.cache import CACHE_FORMAT
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.distiller import Distiller
from KDSegmentationLib.training.losses import build_losses
from KDSegmentationLib.training.stopping import Distributed, Stopper
from KDSegmentationLib.training.trainer import Trainer

RETINA = get_task("retina")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo_cache(out: Path, n: int = 3, size: int = 48, labelled: bool = True) -> Path:
    """Synthetic fundus photos (bright disc, dark diagonal 'vessels') written straight into the cache format."""
    out.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    entries = []
    for i in range(n):
        vessels = fov & (np.abs(yy - xx - 3 * i) < 2)
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[fov] = (180, 95, 40)
        rgb[vessels] = (100, 45, 20)
        arrays = dict(image=rgb, fov=fov, **({"label": vessels.astype(np.uint8)} if labelled else {}))
        np.savez_compressed(out / f"c{i}.npz", **arrays)
        entries.append({"case_id": f"c{i}", "file": f"c{i}.npz", "split": None, "group": f"c{i}",
                        "labelled": labelled, "shape": [size, size, 3]})
    (out / "manifest.json").write_text(json.dumps({"format": CACHE_FORMAT, "task": "retina", "layout": "generic",
                                                   "source": "synthetic", "cases": entries}))
    return out


def _tiny_teacher(path: Path) -> Path:
    arch, args = networks.default_arch_args("retina", "student")
    args.update(width=8)
    torch.manual_seed(1)
    save_model(path, networks.build_network(arch, **args), arch=arch, arch_args=args, task="retina",
               role="teacher", half=False)
    return path


def test_a_trainer_step_trains_the_student_and_never_the_teacher(tmp_path):
    cfg = TrainConfig(task="retina", data=str(_photo_cache(tmp_path / "lab")),
                      unlabelled=str(_photo_cache(tmp_path / "unl", labelled=False)),
                      teacher=str(_tiny_teacher(tmp_path / "t.kdseg.pt")), losses="kd=1,hint=0.5",
                      output=str(tmp_path / "s.kdseg.pt"), arch_args={"width": 8}, steps=2, batch_size=4,
                      patch=(32, 32), val_fraction=0, device="cpu", workers=0, augment=False)
    stopper = Stopper()
    try:
        trainer = Trainer(cfg, RETINA, Path(cfg.output), torch.device("cpu"), Distributed(), Progress("none"),
                          stopper).setup()
    finally:
        stopper.close()
    teacher = trainer.distiller.teacher
    assert isinstance(trainer.distiller, Distiller) and teacher is not None
    teacher.train()  # even switched to training mode by someone, the step must run it in eval mode
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    batch = next(iter(trainer.loader))
    assert batch["labelled"].tolist() == [True, True, False, False]

    total, parts, _lr = trainer.step(batch)

    assert set(parts) == {"kd", "hint"} and torch.isfinite(total) and trainer.state["step"] == 1
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(v, teacher_before[k]), k
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed and all(p.grad is not None for p in trainer.student.parameters() if p.requires_grad)


def test_distiller_splits_labelled_and_unlabelled_samples():
    torch.manual_seed(0)
    student = networks.build_network("student_mobile", spatial_dims=2, in_channels=1, out_channels=2, width=4)
    teacher = networks.build_network("student_mobile", spatial_dims=2, in_channels=1, out_channels=2, width=4)
    distiller = Distiller(student, teacher, build_losses("seg=1,kd=1", alpha=0.5, temperature=2.0)).eval()
    x, target = torch.rand(4, 1, 16, 16), torch.randint(0, 2, (4, 16, 16))
    with torch.no_grad():
        _, parts, total = distiller(x, target, [True, False, False, False])
        _, lab_parts, lab_total = distiller(x[:1], target[:1])
        _, unl_parts, unl_total = distiller(x[1:], None)
    # labelled samples: seg + kd with labels; unlabelled: teacher terms only (seg 0); weights = shares of the batch
    assert unl_parts["seg"] == 0
    assert torch.allclose(total, 0.25 * lab_total + 0.75 * unl_total, atol=1e-5)
    assert torch.allclose(parts["seg"], 0.25 * lab_parts["seg"], atol=1e-6)
    with torch.no_grad():
        _, none_parts, _ = distiller(x, target, [False] * 4)
        _, all_parts, _ = distiller(x, target)
    assert none_parts["seg"] == 0 and all_parts["seg"] > 0


def _card(**dice_by_title):
    return {"card": {"evaluation": [{"title": t, "mean": {"Vessels": {"dice": {"mean": d}}}}
                                    for t, d in dice_by_title.items()]}}


def test_a_teacher_weaker_than_the_student_is_flagged(repo_root):
    """A teacher whose held-out Dice, averaged over the sets both cards hold, is below the student's warns (it
    teaches a student at a new camera to be worse, docs/new_site_hrf.md); a tie on one set does not decide; the other
    way round, or without recorded evaluations, nothing. On the shipped cards: the lung nodule teacher warns."""
    from KDSegmentationLib.models.files import read_header
    from KDSegmentationLib.training.distiller import weaker_teacher_warning

    student = _card(drive=0.804, chase=0.782, hrf=0.674)
    assert weaker_teacher_warning(_card(drive=0.803, chase=0.790, hrf=0.691), student) is None
    warning = weaker_teacher_warning(_card(drive=0.79, chase=0.70, hrf=0.65, other=0.99), student)
    assert warning and "Dice 0.713 on 3 held-out sets" in warning and "student's 0.753" in warning
    assert "Dice 0.700 on drive," in weaker_teacher_warning(_card(drive=0.70), student)
    assert weaker_teacher_warning({"card": {}}, student) is None and weaker_teacher_warning(student, None) is None
    models = repo_root / "Resources" / "Models"
    teacher, shipped = (read_header(models / f"lung_nodule_{r}.kdseg.pt") for r in ("teacher", "student"))
    assert "held-out sets, below the starting student's" in weaker_teacher_warning(teacher, shipped)
    assert weaker_teacher_warning(shipped, teacher) is None
