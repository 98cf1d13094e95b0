"""The training commands under torchrun: 2 CPU processes with the gloo backend on a tiny synthetic problem."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from KDSegmentationLib.training import cache as caches
from KDSegmentationLib.models.files import read_header
from KDSegmentationLib.protocol import parse_event

from conftest import LIB_PARENT


def _tiny_retina_cache(out: Path, n: int = 4, size: int = 72) -> Path:
    """Synthetic photos (bright disc, dark diagonal 'vessels') written straight into the cache format."""
    out.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    entries = []
    for i in range(n):
        vessels = fov & ((np.abs(yy - xx - 4 * i) < 2) | (np.abs(yy + xx - size - 3 * i) < 2))
        rgb = np.zeros((size, size, 3), np.uint8)
        rgb[fov] = (180, 95, 40)
        rgb[vessels] = (100, 45, 20)
        np.savez_compressed(out / f"c{i}.npz", image=rgb, fov=fov, label=vessels.astype(np.uint8))
        entries.append({"case_id": f"c{i}", "file": f"c{i}.npz", "split": None, "group": f"c{i}", "labelled": True,
                        "shape": [size, size, 3]})
    (out / "manifest.json").write_text(json.dumps({"format": caches.CACHE_FORMAT, "task": "retina",
                                                   "layout": "generic", "source": "synthetic", "cases": entries}))
    return out


def test_torchrun_two_cpu_processes_write_one_model(tmp_path):
    pytest.importorskip("torch.distributed.run")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch without the gloo backend")
    cache = _tiny_retina_cache(tmp_path / "cache")
    out = tmp_path / "ddp.kdseg.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "KDSegmentationLib", "train-teacher", "--task", "retina", "--data", str(cache),
           "--output", str(out), "--arch", "student_mobile", "--arch-args", '{"width": 8}', "--steps", "6",
           "--batch-size", "2", "--patch", "32,32", "--val-fraction", "0.25", "--val-every", "3",
           "--ckpt-every", "2", "--log-every", "2", "--device", "cpu", "--workers", "0", "--progress", "json"]
    env = dict(os.environ, PYTHONPATH=str(LIB_PARENT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    events = [e for e in map(parse_event, res.stdout.splitlines()) if e]
    results = [e for e in events if e["event"] == "result"]
    assert len(results) == 1 and results[0]["path"] == str(out)  # rank 0 alone reports and writes
    assert any("val_dice" in e for e in events)
    card = read_header(out)["card"]
    assert card["recipe"]["processes"] == 2 and card["recipe"]["steps"] == 6
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cache", "ddp.kdseg.pt", "ddp.kdseg.pt.report.json", "ddp.kdseg.pt.report.png"]
