#!/usr/bin/env python3
"""Are the results identical before and after a change? Segments the same CTs with the engine of another commit and
with this checkout's, in one process each, and counts the voxels whose label differs (and the post-processing time).

    python benchmarks/compare_labelmaps.py --before COMMIT [--models student,teacher] [--data ../shared/data]

CTs: every ``liver/RadCTTACEomics/*/ct.nii.gz``, the TotalSegmentator example and the case with the most voxels
resampled to 300 slices over the same extent (the speed benchmark's input). The other commit's engine is checked out
into a temporary git worktree; the models are this checkout's shipped ones for both. Prints a table; exit code 1 when
any voxel differs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _inputs(data: Path, tmp: Path):
    import SimpleITK as sitk

    from run_benchmarks import resample_slices  # the script's own folder is on sys.path

    cts = sorted((data / "liver" / "RadCTTACEomics").glob("*/ct.nii.gz"))
    cts += sorted((data / "liver" / "TotalSegmentator_example").glob("*ct*.nii.gz"))
    if cts:
        big = max(cts, key=lambda p: sitk.ReadImage(str(p)).GetNumberOfPixels())
        out = tmp / f"{big.parent.name}_300slices.nrrd"
        resample_slices(big, out, 300)
        cts.append(out)
    return cts


CHILD = r"""
import sys, numpy as np, SimpleITK as sitk, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.inference.segment import load_task_model, segment_image
task, dev = get_task("liver"), torch.device("cpu")
loaded = load_task_model(task, sys.argv[2], dev)
for i, path in enumerate(sys.argv[4:]):
    r = segment_image(sitk.ReadImage(path), task, loaded, dev)
    np.save(f"{sys.argv[3]}/{i}.npy", sitk.GetArrayFromImage(r.labelmap))
    print(path, r.timings["postprocess"], flush=True)
"""


def _run(engine: Path, model: str, out: Path, cts) -> list:
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", CHILD, str(engine), model, str(out), *map(str, cts)], env=env,
                         capture_output=True, text=True, check=True)
    return [float(line.rsplit(" ", 1)[1]) for line in res.stdout.splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit to compare with (e.g. HEAD~3)")
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("KDSEG_SHARED_DATA", REPO.parent / "shared" / "data")))
    args = p.parse_args(argv)
    import numpy as np

    differ = 0
    with tempfile.TemporaryDirectory(prefix="kdseg-compare-") as t:
        tmp = Path(t)
        worktree = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
        try:
            cts = _inputs(args.data, tmp)
            print("| model | CT | grid (z, y, x) | voxels that differ | foreground voxels | post-process s before -> after |")
            print("|---|---|---|---:|---:|---|")
            for model in args.models.split(","):
                t_before = _run(worktree / "KDSegmentation", model, tmp / f"{model}_before", cts)
                t_after = _run(REPO / "KDSegmentation", model, tmp / f"{model}_after", cts)
                for i, ct in enumerate(cts):
                    a, b = np.load(tmp / f"{model}_before" / f"{i}.npy"), np.load(tmp / f"{model}_after" / f"{i}.npy")
                    n = int((a != b).sum())
                    differ += n
                    name = ct.parent.name if ct.name.startswith("ct") or "example" in ct.name else ct.stem
                    print(f"| {model} | {name} | {a.shape} | {n} | {int((b > 0).sum())} | "
                          f"{t_before[i]:.2f} -> {t_after[i]:.2f} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
