"""The trainer on a few real DRIVE photos (downscaled 4x so that it runs in seconds on 2 CPU cores): it learns,
resumes exactly, survives SIGTERM without touching the previous model, and refuses to overwrite."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from KDSegmentationLib.training import cache as caches, sampling, splits
from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.models.files import load_model, read_header
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.protocol import parse_event
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.trainer import train
from KDSegmentationLib.training.validation import dice_per_label, predict_labels

from conftest import LIB_PARENT, require

RETINA = get_task("retina")
PATCH = (48, 48)
# a small, fast teacher (a wide student): these tests are about the trainer, not about teacher quality
TEACHER = dict(arch="student_mobile", arch_args={"width": 16})


class Events:
    """A Progress stream that keeps the parsed JSON events (and can stop a run at a given step)."""

    def __init__(self, stop_at_step=None):
        self.events = []
        self.stop_at_step = stop_at_step

    def write(self, text):
        for line in text.splitlines():
            ev = parse_event(line)
            if ev:
                self.events.append(ev)

    def flush(self):
        pass

    def last_step(self):
        steps = [e["step"] for e in self.events if e["event"] == "metric" and "loss" in e]
        return steps[-1] if steps else 0

    def should_stop(self):
        return self.stop_at_step is not None and self.last_step() >= self.stop_at_step

    def losses(self):
        return [e["loss"] for e in self.events if e["event"] == "metric" and "loss" in e]

    def dice(self):
        return [e["val_dice"] for e in self.events if e["event"] == "metric" and "val_dice" in e]


def _make_small_drive_cache(drive: Path, out: Path, n: int = 8, factor: int = 4) -> Path:
    """A prepared retina cache of ``n`` DRIVE training photos at 1/``factor`` size (~146 x 141 px)."""
    from KDSegmentationLib.tasks.retina import fov_mask

    out.mkdir(parents=True)
    entries = []
    for f in sorted((drive / "training" / "images").glob("*.tif"))[:n]:
        key = f.name.split("_")[0]
        with Image.open(f) as im:
            size = (im.size[0] // factor, im.size[1] // factor)
            rgb = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
        with Image.open(drive / "training" / "1st_manual" / f"{key}_manual1.gif") as im:
            # thin vessels survive the downscale: keep pixels at least a quarter covered
            label = (np.asarray(im.convert("L").resize(size, Image.BILINEAR)) > 64).astype(np.uint8)
        np.savez_compressed(out / f"{key}.npz", image=rgb, fov=fov_mask(rgb), label=label)
        entries.append({"case_id": key, "file": f"{key}.npz", "split": None, "group": key, "labelled": True,
                        "shape": list(rgb.shape)})
    (out / "manifest.json").write_text(json.dumps({"format": caches.CACHE_FORMAT, "task": "retina",
                                                   "layout": "drive", "source": str(drive), "cases": entries}))
    return out


@pytest.fixture(scope="module")
def small_drive(shared_data, tmp_path_factory) -> Path:
    drive = require(shared_data / "retina" / "DRIVE")
    return _make_small_drive_cache(drive, tmp_path_factory.mktemp("drive") / "cache")


def _cfg(small_drive, output, **kw) -> TrainConfig:
    base = dict(task="retina", data=str(small_drive), output=str(output), batch_size=8, patch=PATCH,
                val_fraction=0.25, log_every=5, device="cpu", workers=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def teacher(small_drive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.kdseg.pt"
    train(_cfg(small_drive, out, role="teacher", steps=30, lr=5e-3, **TEACHER, val_every=30))
    return out


def _val_dice(net, small_drive) -> float:
    """Dice inside the FOV on the validation photos of the default split, as the trainer computes it."""
    cache = caches.load_cache(small_drive)
    _, val, _ = splits.split_cases(cache.cases, 0.25, 0)
    scores = []
    for c in val:
        a = caches.load_arrays(c)
        x = torch.from_numpy(sampling.network_input(a, RETINA))[None]
        pred = predict_labels(net.eval(), x, (256, 256), torch.device("cpu"))[0]
        scores.append(dice_per_label(pred, a["label"], [1], a["fov"])[1])
    return float(np.mean(scores))


def test_distillation_lowers_loss_and_raises_dice(small_drive, teacher, tmp_path):
    from KDSegmentationLib.models import networks

    torch.manual_seed(0)
    arch, args = networks.default_arch_args("retina", "student")
    untrained = _val_dice(networks.build_network(arch, **args), small_drive)
    ev = Events()
    t0 = time.perf_counter()
    out = train(_cfg(small_drive, tmp_path / "student.kdseg.pt", teacher=str(teacher), losses="kd=1", alpha=0.5,
                     temperature=2.0, steps=45, lr=5e-3, val_every=15), progress=Progress("json", stream=ev))
    seconds = time.perf_counter() - t0
    losses = ev.losses()
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    assert {"kd", "loss", "lr", "eta_s", "epoch"} <= set(next(e for e in ev.events if "kd" in e))
    best = max(ev.dice())
    # untrained, the student marks about everything as vessel (Dice ~0.3 inside the FOV at this vessel share)
    assert best > untrained + 0.15 and best > 0.45, (untrained, ev.dice())
    model = load_model(out)
    assert model.role == "student" and model.header["version"] == "1"
    card = model.card
    assert card["recipe"]["losses"] == "kd=1" and card["seed"] == 0 and card["parameters"] > 1000
    assert card["teacher"]["file"] == "teacher.kdseg.pt" and card["split"]["val_cases"]
    assert abs(card["metrics"]["validation"]["best"] - best) < 1e-4 and card["version"]["kdsegmentation"]
    assert card["training_time_s"] <= seconds + 1
    # the student saved is the best validated one, and it is as good as reported
    assert abs(_val_dice(model.network, small_drive) - best) < 0.02
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["history"] and report["validation"]
    assert Path(str(out) + ".report.png").stat().st_size > 1000
    assert not Path(str(out) + ".ckpt").exists()  # cleaned up after success
    assert ev.events[-1]["event"] == "result" and ev.events[-1]["path"] == str(out)


def test_resumed_run_matches_uninterrupted_run(small_drive, teacher, tmp_path):
    common = dict(teacher=str(teacher), losses="kd=1", steps=12, val_fraction=0, ckpt_every=3, log_every=1)
    whole = train(_cfg(small_drive, tmp_path / "whole.kdseg.pt", **common))

    out = tmp_path / "parts.kdseg.pt"
    ev = Events(stop_at_step=5)
    with pytest.raises(CancelledError):
        train(_cfg(small_drive, out, **common), progress=Progress("json", stream=ev), should_stop=ev.should_stop)
    assert not out.exists() and (tmp_path / "parts.kdseg.pt.ckpt" / "last.pt").is_file()
    stopped_at = [e["step"] for e in ev.events if e.get("stage") == "checkpoint"][-1]
    assert 5 <= stopped_at < 12
    ev2 = Events()
    train(_cfg(small_drive, out, resume=True, **common), progress=Progress("json", stream=ev2))
    assert min(e["step"] for e in ev2.events if e["event"] == "metric") == stopped_at + 1  # continued

    a, b = load_model(whole).network.state_dict(), load_model(out).network.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k


def _cli(*args):
    return [sys.executable, "-m", "KDSegmentationLib", *map(str, args)]


def _env():
    return dict(os.environ, PYTHONPATH=str(LIB_PARENT), PYTHONUNBUFFERED="1")


def test_sigterm_keeps_previous_model_and_resume_completes(small_drive, teacher, tmp_path):
    out = tmp_path / "student.kdseg.pt"
    out.write_bytes(Path(teacher).read_bytes())  # a previous model at the output path
    before = out.read_bytes()
    args = ["distill", "--task", "retina", "--teacher", teacher, "--data", small_drive, "--output", out,
            "--overwrite", "--batch-size", 4, "--patch", "32,32", "--ckpt-every", 2, "--log-every", 1,
            "--val-fraction", 0, "--device", "cpu", "--workers", 0, "--progress", "json"]
    proc = subprocess.Popen(_cli(*args, "--steps", 1000), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            ev = parse_event(line)
            if ev and ev.get("stage") == "checkpoint" and ev.get("step", 0) >= 2:
                break
            assert time.monotonic() < deadline, "no checkpoint event in time"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "cancelled" in err and "--resume" in err
    assert out.read_bytes() == before  # the previous model is untouched
    assert (tmp_path / "student.kdseg.pt.ckpt" / "last.pt").is_file()

    res = subprocess.run(_cli(*args, "--steps", 8, "--resume"), env=_env(), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    events = [e for e in map(parse_event, res.stdout.splitlines()) if e]
    assert any(e["event"] == "log" and "resuming from step" in e["message"] for e in events)
    assert events[-1]["event"] == "result"
    assert out.read_bytes() != before and read_header(out)["role"] == "student"
    assert "distill" in read_header(out)["card"]["command"]


def test_existing_output_without_overwrite_exits_2(small_drive, teacher, tmp_path):
    out = tmp_path / "taken.kdseg.pt"
    out.write_bytes(b"previous")
    res = subprocess.run(_cli("distill", "--task", "retina", "--teacher", teacher, "--data", small_drive,
                              "--output", out, "--steps", 2), env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--overwrite" in res.stderr
    assert out.read_bytes() == b"previous" and not Path(str(out) + ".ckpt").exists()
    with pytest.raises(InputError, match="must end with"):
        train(_cfg(small_drive, tmp_path / "model.pt", teacher=str(teacher), steps=1))


def test_local_distillation_on_unlabelled_images(small_drive, teacher, tmp_path, monkeypatch):
    """--unlabelled without --data and without --output: the student learns from the teacher alone, is validated
    against the teacher, and lands as a new version in the user's model folder."""
    monkeypatch.setenv("KDSEG_USER_MODELS", str(tmp_path / "models"))
    cfg = dict(task="retina", data=None, unlabelled=str(small_drive), output=None, teacher=str(teacher),
               steps=3, batch_size=4, patch=(32, 32), device="cpu", workers=0, log_every=1)
    first = train(TrainConfig(**cfg))
    second = train(TrainConfig(**cfg))
    assert first.name == "retina_student_local_v1.kdseg.pt" and second.name == "retina_student_local_v2.kdseg.pt"
    header = read_header(second)
    assert header["version"] == "local-v2" and header["card"]["version"]["model"] == "local-v2"
    card = header["card"]
    assert card["split"]["unlabelled_cases"] and not card["split"]["train_cases"]
    assert card["split"]["val_cases_vs_teacher"] and "teacher" in card["metrics"]["validation"]["metric"]


def test_fine_tuning_keeps_the_calibrated_threshold(small_drive, teacher, tmp_path):
    from KDSegmentationLib.evaluation.calibrate import store_threshold

    calibrated = tmp_path / "calibrated.kdseg.pt"
    shutil.copy(teacher, calibrated)
    store_threshold(str(calibrated), {"n_cases": 1, "thresholds": [0.65], "mean_dice": [0.7], "best_threshold": 0.65,
                                      "best_dice": 0.7})
    tuned = train(_cfg(small_drive, tmp_path / "tuned.kdseg.pt", init=str(calibrated), steps=2, val_every=100))
    assert load_model(tuned).decision_threshold == 0.65
    assert read_header(tuned)["card"]["decision_threshold_from"] == "calibrated.kdseg.pt"
    fresh = train(_cfg(small_drive, tmp_path / "fresh.kdseg.pt", steps=1, val_every=100))
    assert load_model(fresh).decision_threshold == 0.5


def test_cancel_file_stops_cleanly(small_drive, tmp_path):
    flag = tmp_path / "cancel"

    class TouchAtStep3(Events):  # the file appears while the run is under way, as a panel would create it
        def write(self, text):
            super().write(text)
            if self.last_step() >= 3:
                flag.write_text("")

    ev = TouchAtStep3()
    with pytest.raises(CancelledError, match="cancel file"):
        train(_cfg(small_drive, tmp_path / "m.kdseg.pt", role="teacher", steps=50, log_every=1, **TEACHER,
                   cancel_file=str(flag)), progress=Progress("json", stream=ev))
    assert ev.last_step() <= 5  # stopped after the step under way
    assert not (tmp_path / "m.kdseg.pt").exists() and (tmp_path / "m.kdseg.pt.ckpt" / "last.pt").is_file()
    flag.write_text("")  # present from the start: stops before any work, nothing written
    with pytest.raises(CancelledError):
        train(_cfg(small_drive, tmp_path / "n.kdseg.pt", role="teacher", steps=50, **TEACHER,
                   cancel_file=str(flag)))
    assert not (tmp_path / "n.kdseg.pt").exists() and not (tmp_path / "n.kdseg.pt.ckpt").exists()


def _two_drive_test_photos(shared_data, folder: Path) -> Path:
    """Two DRIVE test photos with their masks, in DRIVE's own layout (original images, linked)."""
    src = require(shared_data / "retina" / "DRIVE" / "test")
    for sub in ("images", "1st_manual", "mask"):
        (folder / "test" / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:2]:
            (folder / "test" / sub / f.name).symlink_to(f)
    return folder


def test_ablation_script_tabulates_methods_over_seeds(small_drive, teacher, shared_data, tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    out = tmp_path / "abl"
    ablation.main(["--task", "retina", "--data", str(small_drive), "--teacher", str(teacher),
                   "--test-data", str(_two_drive_test_photos(shared_data, tmp_path / "DRIVE")), "--out", str(out),
                   "--methods", "seg,kd",
                   "--spec", "hint:seg=1,hint=0.5", "--seeds", "0,1", "--steps", "2", "--batch-size", "4",
                   "--patch", "32,32", "--val-fraction", "0", "--device", "cpu", "--workers", "0"])
    result = json.loads((out / "ablation.json").read_text())
    assert result["test_cases"] == ["01_test", "02_test"]
    assert [r["method"] for r in result["table"]] == ["seg", "kd", "hint"]
    assert all(r["n"] == 2 for r in result["table"]) and "delta_vs_seg" in result["table"][1]
    assert read_header(out / "seg_seed0.kdseg.pt")["card"]["teacher"] is None  # the baseline has no teacher
    assert read_header(out / "kd_seed1.kdseg.pt")["card"]["seed"] == 1
    table = (out / "ablation.md").read_text(encoding="utf-8")
    assert "| kd | `kd=1` |" in table and "±" in table


def test_a_run_from_a_student_is_scored_before_its_first_step(small_drive, teacher, tmp_path):
    """Local distillation starts from an existing student: it is validated before the first step (the card's
    "before", the first point of the Dice curve), and the model written is the best trained one (the starting
    weights do not compete: validation cases from another site than the adaptation images would keep them)."""
    ev = Events()
    out = train(_cfg(small_drive, tmp_path / "tuned.kdseg.pt", init=str(teacher), teacher=str(teacher),
                     losses="kd=1", steps=3, lr=0.5, val_every=100), progress=Progress("json", stream=ev))
    dice = ev.dice()
    steps = [e["step"] for e in ev.events if e["event"] == "metric" and "val_dice" in e]
    assert steps == [0, 3] and dice[1] < dice[0], dice  # a learning rate that damages the weights
    validation = read_header(out)["card"]["metrics"]["validation"]
    assert validation["before"] == round(dice[0], 5) and validation["best"] == round(dice[1], 5)
    assert validation["best_step"] == 3
    start, written = load_model(teacher).network.state_dict(), load_model(out).network.state_dict()
    assert not all(torch.allclose(start[k].float(), written[k].float(), atol=1e-3) for k in start)


def test_a_diverged_run_writes_no_model(small_drive, teacher, tmp_path, monkeypatch):
    """Weights that became NaN/Inf would make a model file that can never be loaded: refused, nothing written. A
    BatchNorm running variance is what a too-high learning rate turns to NaN first, while the training loss (batch
    statistics) stays finite; it is set to NaN here after the first step."""
    from KDSegmentationLib.training.trainer import Trainer

    real_step = Trainer.step

    def step(self, batch):
        out = real_step(self, batch)
        for name, buf in self.student.named_buffers():
            if name.endswith("running_var"):
                buf.fill_(float("nan"))
                break
        return out

    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "diverged.kdseg.pt"
    with pytest.raises(InputError, match="diverged"):
        train(_cfg(small_drive, out, init=str(teacher), teacher=str(teacher), losses="kd=1", steps=2,
                   val_fraction=0))
    assert not out.exists()
