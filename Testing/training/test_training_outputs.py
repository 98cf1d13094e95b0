"""Where a training run writes: its output is locked for the whole run (by the OS, so a killed run never leaves a
stale lock behind), and a write that fails (no space, read-only folder) ends the run with one line and exit 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LIB_PARENT
from KDSegmentationLib.io.locks import OutputLock, OutputLocked
from KDSegmentationLib.models.naming import versioned_model_name
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.output import locked_output

_HOLDER = """
import sys, time
sys.path.insert(0, {lib!r})
from KDSegmentationLib.io.locks import OutputLock
lock = OutputLock({out!r}).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold(output: Path) -> subprocess.Popen:
    """Another process holding the lock of ``output`` (the way a running training holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(lib=str(LIB_PARENT), out=str(output))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_output_is_refused_and_freed_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "m.kdseg.pt"
    holder = _hold(out)
    try:
        with pytest.raises(OutputLocked) as info:
            OutputLock(out).acquire()
        assert "another training run" in str(info.value) and "\n" not in str(info.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with OutputLock(out) as locked:  # the OS released the dead run's lock
        assert locked == out and Path(str(out) + ".lock").exists()
    assert not Path(str(out) + ".lock").exists()  # nothing left beside the model


def test_explicit_output_in_use_is_refused_and_a_versioned_one_moves_on(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEG_USER_MODELS", str(tmp_path))
    explicit = TrainConfig(task="retina", data="d", output=str(tmp_path / "x.kdseg.pt"), role="student")
    holder = _hold(tmp_path / "x.kdseg.pt")
    try:
        with pytest.raises(OutputLocked):
            with locked_output(explicit):
                pass
    finally:
        holder.kill()
        holder.wait()
    versioned = TrainConfig(task="retina", data="d", output=None, role="student")
    first = tmp_path / versioned_model_name("retina", 1)
    holder = _hold(first)
    try:
        with locked_output(versioned) as output:
            assert output == tmp_path / versioned_model_name("retina", 2)
    finally:
        holder.kill()
        holder.wait()


def test_kdseg_distill_onto_an_output_being_written_exits_2_with_one_line(tmp_path):
    out = tmp_path / "s.kdseg.pt"
    teacher = tmp_path / "t.kdseg.pt"
    teacher.write_bytes(b"")
    holder = _hold(out)
    try:
        env = dict(os.environ, PYTHONPATH=str(LIB_PARENT))
        proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "distill", "--task", "retina", "--data",
                               str(tmp_path), "--teacher", str(teacher), "--output", str(out)],
                              capture_output=True, text=True, env=env, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another training run" in lines[0]
    assert not out.exists() and not Path(str(out) + ".ckpt").exists()  # refused before any training step


_TRAIN_ON_A_FULL_DISK = """
import errno, os, sys
sys.path.insert(0, {lib!r})
from KDSegmentationLib.models import files
def no_space(obj, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
files.torch.save = no_space
from KDSegmentationLib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_training_run_that_cannot_write_exits_2_with_one_line(tmp_path):
    from test_ddp import _tiny_retina_cache

    cache = _tiny_retina_cache(tmp_path / "cache")
    driver = tmp_path / "driver.py"
    driver.write_text(_TRAIN_ON_A_FULL_DISK.format(lib=str(LIB_PARENT)))
    out = tmp_path / "t.kdseg.pt"
    proc = subprocess.run([sys.executable, str(driver), "train-teacher", "--task", "retina", "--data", str(cache),
                           "--output", str(out), "--steps", "2", "--batch-size", "2", "--patch", "32,32",
                           "--val-fraction", "0", "--workers", "0", "--device", "cpu", "--progress", "none"],
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "No space left" in lines[0] and "t.kdseg.pt" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("arch_args, problem", [
    ({"width": 100000}, "width must be an integer"),   # would allocate tens of GB before failing
    ({"expansion": 1e9}, "expansion"),
    ({"no_such_option": 1}, "unknown"),
])
def test_training_refuses_an_architecture_no_model_file_may_hold(arch_args, problem):
    import torch

    from KDSegmentationLib.errors import InputError
    from KDSegmentationLib.tasks import RETINA
    from KDSegmentationLib.training.distiller import build_student

    cfg = TrainConfig(task="retina", data="d", output="o.kdseg.pt", role="student", arch_args=arch_args)
    with pytest.raises(InputError) as info:
        build_student(cfg, RETINA, torch.device("cpu"))
    assert problem in str(info.value) and "--arch-args" in str(info.value) and "\n" not in str(info.value)
