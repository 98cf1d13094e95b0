"""Record the golden outputs: labelmap digests and segment statistics of every bundled sample, student and teacher.

Run from the repository root (``python3 Testing/golden/record_golden.py``) only when a behaviour change is intended
and explained in the commit; ``Testing/test_golden.py`` compares the engine's outputs with ``golden.json``. Recorded
with the default runtime (ONNX Runtime on the CPU), as a user runs them; torch differs from it by a voxel or two at
the decision boundary (``benchmarks/results/labelmaps_identical.md``).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

GOLDEN_FILE = Path(__file__).with_name("golden.json")
MODELS = ("student", "teacher")


def labelmap_digest(path: Path) -> dict:
    """sha256 of the labelmap's voxels (uint8, numpy z,y,x order) with its grid, so geometry changes show too."""
    image = sitk.ReadImage(str(path))
    voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image).astype(np.uint8))
    return {"sha256": hashlib.sha256(voxels.tobytes()).hexdigest(), "size": list(image.GetSize()),
            "labels": {str(v): int(n) for v, n in zip(*np.unique(voxels, return_counts=True))},
            "spacing": [round(s, 6) for s in image.GetSpacing()],
            "origin": [round(o, 4) for o in image.GetOrigin()]}


def segment_sample(task: str, model: str, folder: Path) -> dict:
    """Run ``kdseg segment`` on the bundled sample of ``task`` as a user would; returns digest and segments."""
    sample = json.loads(subprocess.run(
        [sys.executable, "-m", "KDSegmentationLib", "sample", "--task", task, "--output", str(folder)],
        check=True, capture_output=True, text=True).stdout)
    out = folder / f"{task}_{model}.nii.gz"
    command = [sys.executable, "-m", "KDSegmentationLib", "segment", "--task", task, "--input", sample["path"],
               "--output", str(out), "--model", model, "--device", "cpu", "--threads", "2", "--progress", "json"]
    if "seed_ras" in sample:
        command.append("--seed-ras=" + ",".join(str(v) for v in sample["seed_ras"]))
    events = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    result = [json.loads(line) for line in events if '"result"' in line][-1]
    return {"labelmap": labelmap_digest(out), "segments": result["segments"], "runtime": result.get("runtime")}


def record() -> dict:
    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("liver", "lung_nodule", "retina"):
            for model in MODELS:
                golden[f"{task}/{model}"] = segment_sample(task, model, Path(tmp) / task)
    return golden


if __name__ == "__main__":
    GOLDEN_FILE.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")
