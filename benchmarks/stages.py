"""Time each stage of ``kdseg segment`` (read, preprocess, inference, postprocess, write) on the liver task.

Runs the same calls as ``kdseg segment`` (``io.images.read_image``, ``inference.segment.segment_image``,
``io.segmentations.write_segmentation``) in one process, so the per-stage medians are not blurred by start-up and
model loading. Inputs: the bundled liver sample (``Resources/Samples/liver``) and, when present, a 512 x 512 x N CT
from ``../shared/data/liver`` (the RadCTTACEomics case with the most slices).

    python benchmarks/stages.py                        # 5 repeats, 2 threads, results to benchmarks/results/
    python benchmarks/stages.py --repeats 3 --out /tmp/x --label before
    python benchmarks/stages.py --before /tmp/x/stages.json  # adds a before -> after table

Writes ``stages.json`` (every run, medians, machine load) and ``stages.md`` (the median table) to ``--out``. The
machine may be shared: the load average at start and end is recorded, and only medians of several runs are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("read", "preprocess", "inference", "postprocess", "write")


def _inputs(data_dir: Path, tmp: Path):
    """[(name, path)]: the bundled sample, then the RadCTTACEomics CT with the most slices and the same CT resampled
    to twice as many slices over the same extent (a 512 x 512 x ~170 CT, the size of the speed issue's example),
    when the shared data is there."""
    found = [("sample abdomen_ct_3mm", ROOT / "Resources" / "Samples" / "liver" / "abdomen_ct_3mm.nii.gz")]
    cts = sorted((data_dir / "liver" / "RadCTTACEomics").glob("*/ct.nii.gz"))
    if cts:
        import SimpleITK as sitk

        def slices(p):
            r = sitk.ImageFileReader()
            r.SetFileName(str(p))
            r.ReadImageInformation()
            return r.GetSize()[2]

        big = max(cts, key=slices)
        found.append((f"{big.parent.name} ct", big))
        image = sitk.ReadImage(str(big))
        size = list(image.GetSize())
        spacing = list(image.GetSpacing())
        size[2], spacing[2] = 2 * size[2], spacing[2] / 2
        finer = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024.0, image.GetPixelID())
        sitk.WriteImage(finer, str(tmp / "finer_ct.nii.gz"))
        found.append((f"{big.parent.name} ct, 2x slices", tmp / "finer_ct.nii.gz"))
    return found


def _compression_levels(seg_path: Path, levels=(1, 2, 3, 9), repeats: int = 3) -> dict:
    """Seconds (best of ``repeats``) and bytes of gzip at each level for the voxels stored in ``seg_path``, the
    way the NRRD writer compresses them (gzip stream, 1 MiB chunks)."""
    import zlib

    import nrrd

    voxels, _ = nrrd.read(str(seg_path))
    raw = voxels.tobytes(order="F")
    out = {}
    for level in levels:
        best, size = float("inf"), 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            c = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS | 16)
            size = sum(len(c.compress(raw[i:i + 2 ** 20])) for i in range(0, len(raw), 2 ** 20)) + len(c.flush())
            best = min(best, time.perf_counter() - t0)
        out[str(level)] = {"seconds": round(best, 4), "bytes": size}
    return out


def _one_run(path: Path, task, loaded, dev, out_dir: Path) -> dict:
    """Seconds per stage for one segmentation of ``path``; plus the written file's size (bytes) and the grids."""
    import nrrd

    from KDSegmentationLib.inference.segment import segment_image
    from KDSegmentationLib.io.images import read_image
    from KDSegmentationLib.io.segmentations import write_segmentation

    t = {}
    t0 = time.perf_counter()
    image = read_image(path, task=task)
    t["read"] = time.perf_counter() - t0
    result = segment_image(image, task, loaded, dev)
    t.update({k: result.timings[k] for k in ("preprocess", "inference", "postprocess")})
    out = out_dir / "out.seg.nrrd"
    t0 = time.perf_counter()
    write_segmentation(result.labelmap, task, out)
    t["write"] = time.perf_counter() - t0
    t["total"] = sum(t[s] for s in STAGES)
    return {"seconds": t, "seg_nrrd_bytes": out.stat().st_size, "size_xyz": list(image.GetSize()),
            "stored_xyz": [int(v) for v in nrrd.read_header(str(out))["sizes"]], "path": out}


def _git_commit() -> str:
    """The commit of the engine that was measured (the checkout KDSegmentationLib is imported from)."""
    import KDSegmentationLib

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(KDSegmentationLib.__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(repeats: int, threads: int, data_dir: Path) -> dict:
    """Every run of every input, with the median per stage (s)."""
    import torch

    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.inference.segment import load_task_model
    from KDSegmentationLib.tasks import LIVER

    torch.set_num_threads(threads)
    dev = pick_device("cpu")
    loaded = load_task_model(LIVER, "student", dev)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _inputs(data_dir, Path(tmp)):
            _one_run(path, LIVER, loaded, dev, Path(tmp))  # warm-up: file cache, first-call costs
            runs = [_one_run(path, LIVER, loaded, dev, Path(tmp)) for _ in range(repeats)]
            med = {s: round(statistics.median(r["seconds"][s] for r in runs), 4) for s in STAGES + ("total",)}
            results[name] = {"path": str(path), "size_xyz": runs[0]["size_xyz"], "stored_xyz": runs[0]["stored_xyz"],
                             "seg_nrrd_bytes": runs[0]["seg_nrrd_bytes"], "median_s": med,
                             "gzip_levels": _compression_levels(runs[-1]["path"]),
                             "runs_s": [{k: round(v, 4) for k, v in r["seconds"].items()} for r in runs]}
            print(f"{name}: " + ", ".join(f"{s} {med[s]:.3f}" for s in STAGES + ("total",)), flush=True)
    return results


def _markdown(doc: dict) -> str:
    lines = [f"# Stage timings of `kdseg segment` (liver, student, {doc['threads']} threads, CPU)", "",
             f"Generated by `benchmarks/stages.py` ({doc['label']}, commit {doc['commit']}, {doc['repeats']} repeats "
             f"after one warm-up, medians in seconds; load average {doc['load_start']} at start, {doc['load_end']} "
             "at end).", "",
             "| input | grid (x, y, z) | " + " | ".join(STAGES) + " | total | .seg.nrrd stored (x, y, z) | size |",
             "|---|---|" + "---:|" * (len(STAGES) + 1) + "---|---:|"]
    for name, r in doc["inputs"].items():
        grid = " x ".join(str(v) for v in r["size_xyz"])
        stored = " x ".join(str(v) for v in r.get("stored_xyz", r["size_xyz"]))
        cells = " | ".join(f"{r['median_s'][s]:.3f}" for s in STAGES + ("total",))
        lines.append(f"| {name} | {grid} | {cells} | {stored} | {r['seg_nrrd_bytes'] / 1024:.0f} KiB |")
    lines += ["", "gzip of the stored voxels by level (seconds, best of 3 / KiB):", "",
              "| input | " + " | ".join(f"level {k}" for k in next(iter(doc["inputs"].values()))["gzip_levels"]) + " |",
              "|---|" + "---:|" * len(next(iter(doc["inputs"].values()))["gzip_levels"])]
    for name, r in doc["inputs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['seconds']:.4f} / {v['bytes'] / 1024:.0f}"
                                                 for v in r["gzip_levels"].values()) + " |")
    if doc.get("before"):
        lines += _comparison(doc["before"], doc)
    return "\n".join(lines) + "\n"


def _comparison(before: dict, after: dict) -> list:
    """Markdown lines: before -> after medians per stage, for the inputs measured in both runs."""
    lines = ["", f"Before -> after ({before['label']}, commit {before['commit']}, {before['repeats']} repeats, load "
             f"average {before['load_start']} / {before['load_end']}; the same machine, run just before):", "",
             "| input | " + " | ".join(STAGES + ("total",)) + " |", "|---|" + "---:|" * (len(STAGES) + 1)]
    for name, r in after["inputs"].items():
        if name in before["inputs"]:
            b = before["inputs"][name]["median_s"]
            lines.append(f"| {name} | " + " | ".join(f"{b[s]:.3f} -> {r['median_s'][s]:.3f}"
                                                     for s in STAGES + ("total",)) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("KDSEG_SHARED_DATA", ROOT.parent / "shared"
                                                                         / "data")))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--label", default="current tree", help="what was measured (written into the results)")
    parser.add_argument("--before", type=Path, help="a stages.json of an earlier run, shown as before -> after")
    args = parser.parse_args(argv)
    load_start = round(os.getloadavg()[0], 2)
    inputs = run(args.repeats, args.threads, args.data)
    doc = {"label": args.label, "commit": _git_commit(), "threads": args.threads, "repeats": args.repeats,
           "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(),
           "load_start": load_start, "load_end": round(os.getloadavg()[0], 2), "inputs": inputs}
    if args.before:
        before = json.loads(args.before.read_text())
        doc["before"] = {k: v for k, v in before.items() if k != "before"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stages.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "stages.md").write_text(_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
