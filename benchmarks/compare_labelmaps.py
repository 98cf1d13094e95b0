#!/usr/bin/env python3
"""Are the results identical before and after a change? Segments the same CTs with the engine of another commit and
with this checkout's (or with this checkout under torch and under ONNX Runtime), in one process each, and counts the
voxels whose label differs (and the post-processing time).

    python benchmarks/compare_labelmaps.py --before COMMIT [--models student,teacher] [--data ../shared/data]
    python benchmarks/compare_labelmaps.py --runtimes [--models student,teacher]

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
import time
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
import os, sys, numpy as np, SimpleITK as sitk, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(2)
from KDSegmentationLib.tasks import get_task
from KDSegmentationLib.inference import segment as engine
task, dev = get_task("liver"), torch.device("cpu")
if hasattr(engine, "load_for_inference"):  # engines that can run compiled models: as a request runs (KDSEG_RUNTIME)
    from KDSegmentationLib.inference.device import set_cpu_threads
    set_cpu_threads(2)
    loaded, dev = engine.load_for_inference(task, sys.argv[2], "cpu", log=lambda m: None)
else:
    loaded = engine.load_task_model(task, sys.argv[2], dev)
print("runtime", getattr(loaded, "runtime", "torch"), flush=True)
segment_image = engine.segment_image
for i, path in enumerate(sys.argv[4:]):
    r = segment_image(sitk.ReadImage(path), task, loaded, dev)
    np.save(f"{sys.argv[3]}/{i}.npy", sitk.GetArrayFromImage(r.labelmap))
    print(path, r.timings["postprocess"], flush=True)
"""


def _run(engine: Path, model: str, out: Path, cts, runtime: str = "auto"):
    """(runtime used, post-processing seconds per CT)."""
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", KDSEG_RUNTIME=runtime)
    res = subprocess.run([sys.executable, "-c", CHILD, str(engine), model, str(out), *map(str, cts)], env=env,
                         capture_output=True, text=True, check=True)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return lines[0].split()[1], [float(line.rsplit(" ", 1)[1]) for line in lines[1:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", help="the commit to compare with (e.g. HEAD~3)")
    which.add_argument("--runtimes", action="store_true", help="this checkout under torch vs under ONNX Runtime")
    p.add_argument("--models", default="student,teacher")
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("KDSEG_SHARED_DATA", REPO.parent / "shared" / "data")))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdseg-compare-") as t:
        tmp = Path(t)
        if args.runtimes:
            return _compare(args, tmp, (REPO / "KDSegmentation", "torch"), (REPO / "KDSegmentation", "auto"))
        worktree = tmp / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
        try:
            return _compare(args, tmp, (worktree / "KDSegmentation", "auto"), (REPO / "KDSegmentation", "auto"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)


def _compare(args, tmp: Path, before, after) -> int:
    """Print the table of ``before`` vs ``after`` (engine folder, KDSEG_RUNTIME); 1 when any voxel differs."""
    import numpy as np

    differ = 0
    cts = _inputs(args.data, tmp)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    what = "torch vs ONNX Runtime (compiled models)" if args.runtimes else f"the engine of {args.before} vs this one"
    print(f"# Labelmaps: {what}\n\nGenerated by `python benchmarks/compare_labelmaps.py "
          f"{'--runtimes' if args.runtimes else '--before ' + args.before}` (checkout at {commit}, shipped models, "
          f"2 threads, {time.strftime('%Y-%m-%d')}). Post-processing seconds are those of one run each; the speed "
          f"benchmark measures speed.\n")
    print("| model | CT | grid (z, y, x) | voxels that differ | foreground voxels | post-process s before -> after |")
    print("|---|---|---|---:|---:|---|")
    for model in args.models.split(","):
        r_before, t_before = _run(before[0], model, tmp / f"{model}_before", cts, before[1])
        r_after, t_after = _run(after[0], model, tmp / f"{model}_after", cts, after[1])
        for i, ct in enumerate(cts):
            a, b = np.load(tmp / f"{model}_before" / f"{i}.npy"), np.load(tmp / f"{model}_after" / f"{i}.npy")
            n = int((a != b).sum())
            differ += n
            name = ct.parent.name if ct.name.startswith("ct") or "example" in ct.name else ct.stem
            print(f"| {model} ({r_before} -> {r_after}) | {name} | {a.shape} | {n} | {int((b > 0).sum())} | "
                  f"{t_before[i]:.2f} -> {t_after[i]:.2f} |", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
