"""``kdseg segment``, ``sample`` and ``demo``: one image in, one segmentation out."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from KDSegmentationLib.cli.arguments import (check_not_input, check_output_path, check_path_text, parse_seed,
                                             set_threads)
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.inference.device import DEVICE_CHOICES
from KDSegmentationLib.progress import PROGRESS_MODES

def run_segment(task_name: str, input_path: str, output_path: str, model: str = "student", device: str = "auto",
                seed_ras=None, threads: Optional[int] = None, progress=None, one_shot: bool = False) -> dict:
    """Segment one image and write the result; returns the summary (the ``result`` event's payload).

    ``one_shot``: this process segments and exits (``kdseg segment``, ``demo``), so a compiled model that spares
    torch's import is preferred; a persistent worker runs torch (see :func:`inference.segment.load_for_inference`).
    """
    from KDSegmentationLib.inference.segment import load_for_inference, segment_image
    from KDSegmentationLib.io.segmentations import write_segmentation
    from KDSegmentationLib.progress import Progress

    progress = progress or Progress("none")
    t_start = time.perf_counter()
    task, out = _checked_request(task_name, input_path, output_path, model, seed_ras)
    timings = {}
    t0 = time.perf_counter()
    image, warnings = _read_input(input_path, task, progress)
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    set_threads(threads)
    loaded, dev = load_for_inference(task, model, device, log=lambda m: progress.log(m, "info"), compiled=one_shot)
    timings["model_load"] = time.perf_counter() - t0
    result = segment_image(image, task, loaded, dev, seed_ras=seed_ras,
                           progress=lambda stage, f: progress.progress(stage, f))
    timings.update(result.timings)
    for w in result.warnings:
        progress.log(w, "warning")
    t0 = time.perf_counter()
    progress.progress("writing", 0.0)
    write_segmentation(result.labelmap, result.task or task, out)
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    progress.progress("done", 1.0)
    return {"task": task.name, "input": str(input_path), "path": str(out),
            "model": loaded.header.get("card", {}).get("name", Path(loaded.path).name),
            "device": str(dev), "runtime": loaded.runtime, "segments": result.stats, "withheld": result.withheld,
            "warnings": warnings + result.warnings,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}


def _checked_request(task_name: str, input_path: str, output_path: str, model: str, seed_ras):
    """(task, output path) once every value of the request is valid; a missing model is said before slow work."""
    from KDSegmentationLib.models.catalog import resolve_models
    from KDSegmentationLib.tasks import get_task

    task = get_task(task_name)
    check_path_text(input_path, "input")
    check_path_text(output_path, "output")
    check_path_text(model, "model")
    out = check_output_path(output_path)
    if task.needs_seed and seed_ras is None:
        raise InputError(f"task {task.name} needs --seed-ras X,Y,Z (a point inside the nodule, RAS mm as shown "
                         "in Slicer)")
    if not Path(input_path).exists():
        raise InputError(f"input {input_path} does not exist; give an image file or a DICOM folder")
    check_not_input(input_path, out)
    resolve_models(task, model)
    return task, out


def _read_input(input_path: str, task, progress):
    """(image, warnings): the input read and checked for the task; warnings are also reported as they come."""
    from KDSegmentationLib.io.images import read_image
    from KDSegmentationLib.io.suitability import check_image_for_task

    progress.progress("reading", 0.0)
    image = read_image(input_path, warn=lambda m: progress.log(m, "warning"))
    warnings = list(check_image_for_task(image, task) or [])
    for w in warnings:
        progress.log(w, "warning")
    return image, warnings


def format_summary(summary: dict) -> str:
    lines = [f"{summary['task']}: {summary['input']} -> {summary['path']}  "
             f"({summary['timings_s']['total']:.2f} s, {summary['model']} on {summary['device']}, "
             f"{summary.get('runtime', 'torch')})"]
    for name, st in summary["segments"].items():
        if "volume_ml" in st:
            extra = ""
            if "longest_axial_diameter_mm" in st:
                extra = (f", longest axial diameter (RECIST) {st['longest_axial_diameter_mm']} mm, "
                         f"maximum 3D diameter {st['max_3d_diameter_mm']} mm")
            lines.append(f"    {name}: {st['volume_ml']:.1f} mL{extra}")
        else:
            lines.append(f"    {name}: {st['area_px']} px ({100 * st['fraction_of_fov']:.1f}% of the field of view)")
    for name, reason in (summary.get("withheld") or {}).items():
        lines.append(f"    {name}: not available with this model ({reason})")
    return "\n".join(lines)  # warnings already went to stderr as they happened


def cmd_segment(args) -> int:
    from KDSegmentationLib.progress import Progress

    progress = Progress(args.progress)
    summary = run_segment(args.task, args.input, args.output, model=args.model, device=args.device,
                          seed_ras=parse_seed(args.seed_ras), threads=args.threads, progress=progress,
                          one_shot=True)
    if progress.mode == "json":
        progress.result(**summary)
    else:
        print(format_summary(summary))
    return 0


def cmd_sample(args) -> int:
    from KDSegmentationLib.io.samples import write_sample

    info = write_sample(args.task, Path(args.output))
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo(args) -> int:
    """The main job on the bundled samples: segment each with its student and print a summary."""
    from KDSegmentationLib.io.samples import list_samples, write_sample

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [args.task] if args.task else list_samples()
    for name in tasks:
        info = write_sample(name, out_dir / "inputs")
        seed = info.get("seed_ras")
        out = out_dir / f"{name}.seg.nrrd"
        summary = run_segment(name, info["path"], str(out), model=args.model, device=args.device,
                              seed_ras=tuple(seed) if seed else None, threads=args.threads, one_shot=True)
        print(format_summary(summary), flush=True)
    return 0


def add_parsers(sub, task_names) -> None:
    """``segment``, ``sample`` and ``demo``."""
    s = sub.add_parser("segment", help="segment one image or DICOM folder")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--input", required=True, help="image file (NRRD, NIfTI, MHA, PNG, JPG, TIFF...) or DICOM folder")
    s.add_argument("--output", required=True, help="OUT.seg.nrrd (Slicer segmentation) or OUT.nii.gz (labelmap)")
    s.add_argument("--model", default="student", help="student (default), teacher, a model file or a local name, or an ensemble of them joined by commas")
    s.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    s.add_argument("--seed-ras", help="X,Y,Z point in RAS mm (lung_nodule)")
    s.add_argument("--threads", type=str, help="CPU threads for torch")
    s.add_argument("--progress", default="auto", choices=PROGRESS_MODES)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("sample", help="write the bundled sample input of a task")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--output", required=True, help="folder")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("demo", help="segment the bundled samples with the shipped students and print a summary")
    s.add_argument("--task", choices=task_names, help="only this task (default: all)")
    s.add_argument("--output", default="kdseg-demo", help="folder for the inputs and results")
    s.add_argument("--model", default="student")
    s.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_demo)
