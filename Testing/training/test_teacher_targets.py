"""Soft labels generated once (``--teacher-targets stored``): the stored teacher output follows every crop, rotation,
zoom and flip of the student's view, the teacher then runs once per image instead of once per step, and what stored
targets cannot give (teacher features) is refused."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.files import load_model, read_header
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.training.augment import default_policy, warp_batch
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.sampling import PatchDataset
from KDSegmentationLib.training.teacher_targets import store_teacher_logits, warp_logits
from KDSegmentationLib.training.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer_step import _photo_cache, _tiny_teacher  # noqa: E402

from conftest import require  # noqa: E402

RETINA = get_task("retina")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _drive_case(drive: Path, factor: int = 2) -> dict:
    """One DRIVE training photo at 1/``factor`` size as cache arrays (image, fov, label)."""
    from PIL import Image

    from KDSegmentationLib.tasks.retina import fov_mask

    f = sorted((drive / "training" / "images").glob("*.tif"))[0]
    with Image.open(f) as im:
        rgb = np.asarray(im.convert("RGB").resize((im.size[0] // factor, im.size[1] // factor), Image.BILINEAR))
    return {"image": rgb, "fov": fov_mask(rgb), "label": np.zeros(rgb.shape[:2], np.uint8)}


def _views(dataset: PatchDataset, seeds):
    """Collated items of case 0 for each seed."""
    items = [dataset[(0, (s,))] for s in seeds]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "theta", "teacher")}


def test_stored_soft_labels_follow_the_students_view(shared_data, repo_root):
    """The shipped retina teacher on a real DRIVE photo: its stored output, cropped and warped with a sample's
    affine, matches the teacher run on that sample's (rotated, zoomed, flipped) view, away from the patch border;
    the same stored output under another sample's affine does not."""
    teacher = load_model(str(repo_root / "Resources" / "Models" / "retina_teacher.kdseg.pt"), device="cpu").network
    case = _drive_case(require(shared_data / "retina" / "DRIVE"))
    store_teacher_logits([case], RETINA, teacher, torch.device("cpu"))
    assert case["teacher"].dtype == np.float16 and case["teacher"].shape == (2,) + case["fov"].shape
    # camera jitter off: the student's view then has no intensity change, so only geometry can differ
    policy = dataclasses.replace(default_policy(RETINA), camera_p=0.0, pos_fraction=1.0)
    patch = (96, 96)
    dataset = PatchDataset([case], [True], RETINA, patch, policy=policy)
    batch = _views(dataset, range(6))
    x, _, _ = warp_batch(batch["image"], batch["theta"], patch, pad_mode=policy.pad_mode)
    with torch.no_grad():
        online = torch.softmax(teacher(x), 1)[:, 1]
    stored = warp_logits(batch["teacher"], batch["theta"], patch).exp()[:, 1]
    wrong = warp_logits(batch["teacher"], batch["theta"].flip(0), patch).exp()[:, 1]
    inner = (slice(None), slice(16, -16), slice(16, -16))  # the teacher's view of the border differs (padding)
    err = (online - stored)[inner].abs().mean().item()
    agree = ((online > 0.5) == (stored > 0.5))[inner].float().mean().item()
    err_wrong = (online - wrong)[inner].abs().mean().item()
    # what remains is the teacher itself: it is not exactly equivariant to rotation and zoom
    assert err < 0.05 and agree > 0.96, (err, agree)
    assert err_wrong > 3 * err, (err, err_wrong)


def _cfg(tmp_path, mode, **kw) -> TrainConfig:
    base = dict(task="retina", data=str(_photo_cache(tmp_path / "lab")),
                unlabelled=str(_photo_cache(tmp_path / "unl", labelled=False)),
                teacher=str(_tiny_teacher(tmp_path / "t.kdseg.pt")), losses="kd=1",
                output=str(tmp_path / "s.kdseg.pt"), arch_args={"width": 8}, steps=4, batch_size=4,
                patch=(32, 32), val_fraction=0, device="cpu", workers=0, teacher_targets=mode, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("mode", ["online", "stored"])
def test_stored_targets_run_the_teacher_once_per_image(tmp_path, monkeypatch, mode):
    from KDSegmentationLib.training import distiller

    calls = []
    real_load = distiller._load

    def load_counting(path, what, task, device):
        loaded = real_load(path, what, task, device)
        if what == "teacher":
            loaded.network.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
        return loaded

    monkeypatch.setattr(distiller, "_load", load_counting)
    out = train(_cfg(tmp_path, mode), progress=Progress("none"))
    if mode == "stored":
        # 3 labelled + 3 unlabelled photos, each once, whole (48 x 48); no forward per training step
        assert calls == [(1, 3, 48, 48)] * 6
    else:
        assert calls == [(4, 3, 32, 32)] * 4
    recipe = read_header(out)["card"]["recipe"]
    assert recipe["teacher_targets"] == mode and recipe["steps"] == 4


def test_stored_targets_refuse_feature_losses(tmp_path):
    with pytest.raises(InputError, match="teacher-targets online"):
        train(_cfg(tmp_path, "stored", losses="kd=1,hint=0.5"), progress=Progress("none"))
    assert not (tmp_path / "s.kdseg.pt").exists()


def test_stored_targets_and_image_share_one_geometry_in_3d(monkeypatch):
    """A CT whose 'teacher' output is its own window value: after crop and warp (rotation about three axes, zoom,
    anisotropic scale) the stored target equals the student's image voxel for voxel, inside the region."""
    from KDSegmentationLib.tasks.ct import ct_window
    from KDSegmentationLib.training import sampling
    from KDSegmentationLib.training.augment import ct_intensity
    from KDSegmentationLib.training.teacher_targets import LOG_FLOOR

    liver = get_task("liver")
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :70, :90]
    hu = (400 * np.sin(zz / 5.0) * np.cos(yy / 7.0) + 3 * xx - 200 + rng.normal(0, 20, zz.shape)).astype(np.int16)
    case = {"image": hu}
    p1 = np.asarray(ct_window(hu, liver), np.float64)
    case["teacher"] = np.log(np.clip(np.stack([1 - p1, p1]), np.exp(LOG_FLOOR), 1)).astype(np.float16)
    monkeypatch.setattr(sampling, "ct_intensity", lambda h, t, r, aug: ct_intensity(h, t, r, False))
    policy = dataclasses.replace(default_policy(liver), p_spatial=1.0, pad_mode="zeros")
    patch = (16, 32, 32)
    dataset = PatchDataset([case], [False], liver, patch, policy=policy)
    batch = _views(dataset, range(5))
    x, _, _ = warp_batch(batch["image"], batch["theta"], patch, pad_mode="zeros")
    stored = warp_logits(batch["teacher"], batch["theta"], patch).exp()[:, 1]
    assert torch.allclose(stored, x[:, 0], atol=2e-3), (stored - x[:, 0]).abs().max()
    other = warp_logits(batch["teacher"], batch["theta"].flip(0), patch).exp()[:, 1]
    assert (other - x[:, 0]).abs().mean() > 0.02  # another sample's affine: far off

