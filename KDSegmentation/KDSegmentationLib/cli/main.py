"""The ``kdseg`` command line (contract in the project's design notes; keep it stable, extend it compatibly).

Exit codes: 0 success; 2 bad input (one line on stderr, and an ``error`` event with ``--progress json``);
130/143 cancelled by SIGINT/SIGTERM; 1 unexpected internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from KDSegmentationLib.errors import CancelledError, InputError

OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


# ---------------------------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------------------------

def parse_seed(text: Optional[str]):
    if text is None:
        return None
    parts = text.replace(";", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v != v for v in values):
        raise InputError(f"--seed-ras must be three numbers X,Y,Z in RAS millimetres (got {text!r})")
    return tuple(values)


def check_output_path(path: str) -> Path:
    out = Path(path)
    if not str(out).lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"output {out} must end with one of {', '.join(OUTPUT_SUFFIXES)} "
                         "(.seg.nrrd gives a Slicer segmentation)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist; create it or choose another --output")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable; choose another --output")
    if out.is_dir():
        raise InputError(f"output {out} is a folder; give a file name such as {out / 'result.seg.nrrd'}")
    return out


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_threads(value) -> tuple:
    """``--threads`` -> (count or None, warning or None). Over the CPU count is capped: each torch thread is an OS
    thread, and 100000 of them starve the whole machine instead of going faster."""
    if value is None:
        return None, None
    text = str(value).strip()
    try:
        count = int(text)
    except ValueError:
        count = None
    if count is None or isinstance(value, bool) or isinstance(value, float) or count < 1:
        raise InputError(f"--threads must be a whole number of CPU threads, 1 or more (got {bound_text(text, 40)!r})")
    cpus = available_cpus()
    if count > cpus:
        return cpus, f"--threads {count} is more than the {cpus} CPUs available; using {cpus}"
    return count, None


def check_not_input(input_path, out: Path) -> None:
    """Refuse an output that would overwrite the input (same file through any path or link, or a file inside the
    input DICOM folder): the labelmap would replace the patient's image, and a later run would read it as a slice."""
    inp = Path(os.path.realpath(str(input_path)))
    target = Path(os.path.realpath(str(out)))
    same = target == inp
    if not same and out.exists() and inp.exists():
        try:
            same = os.path.samefile(str(out), str(inp))  # hard links
        except OSError:
            same = False
    if same:
        raise InputError(f"--output {bound_text(str(out))} is the input image itself; choose another output name "
                         "(the input is never overwritten)")
    if inp.is_dir() and inp in target.parents:
        raise InputError(f"--output {bound_text(str(out))} is inside the input folder {bound_text(str(inp))}; write "
                         "the result outside it (the input is never modified)")


def check_path_text(value, what: str) -> None:
    """A path the OS cannot even look up (NUL byte, name too long, link loop) is a bad input, not an internal
    error."""
    text = str(value)
    if "\x00" in text:
        raise InputError(f"{what} path {bound_text(repr(text))} contains a NUL character; give a real file name")
    try:
        os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise InputError(f"{what} path {bound_text(text)} cannot be used ({exc.strerror or type(exc).__name__}); "
                         "give a shorter or valid path") from None


def bound_text(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (head and tail kept): user-given paths and values are quoted in messages,
    and a 50 MB path must not become a 50 MB message."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(8, limit // 2 - 2)
    return f"{text[:keep]}...{text[-keep:]}"


def bound_message(message: str, word_limit: int = 300, total_limit: int = 2000) -> str:
    """One line of bounded length: every long word (a path, a value) cut, then the whole message."""
    words = [bound_text(w, word_limit) for w in str(message).split()]
    return bound_text(" ".join(words), total_limit)


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------------------------------------

def run_segment(task_name: str, input_path: str, output_path: str, model: str = "student", device: str = "auto",
                seed_ras=None, threads: Optional[int] = None, progress=None) -> dict:
    """Segment one image and write the result; returns the summary (the ``result`` event's payload)."""
    from KDSegmentationLib.progress import Progress
    from KDSegmentationLib.tasks import get_task

    progress = progress or Progress("none")
    t_start = time.perf_counter()
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

    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.inference.segment import load_task_model, segment_image
    from KDSegmentationLib.models.catalog import resolve_model

    resolve_model(task, model)  # a missing model is said before any slow work
    from KDSegmentationLib.io.images import read_image
    from KDSegmentationLib.io.suitability import check_image_for_task
    from KDSegmentationLib.io.segmentations import write_segmentation

    timings = {}
    t0 = time.perf_counter()
    progress.progress("reading", 0.0)
    image = read_image(input_path, warn=lambda m: progress.log(m, "warning"))
    warnings = list(check_image_for_task(image, task) or [])
    for w in warnings:
        progress.log(w, "warning")
    timings["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    set_threads(threads)
    dev = pick_device(device)
    loaded = load_task_model(task, model, dev)
    timings["model_load"] = time.perf_counter() - t0

    result = segment_image(image, task, loaded, dev, seed_ras=seed_ras,
                           progress=lambda stage, f: progress.progress(stage, f))
    timings.update(result.timings)
    for w in result.warnings:
        progress.log(w, "warning")

    t0 = time.perf_counter()
    progress.progress("writing", 0.0)
    write_segmentation(result.labelmap, task, out)
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    summary = {"task": task.name, "input": str(input_path), "path": str(out),
               "model": loaded.header.get("card", {}).get("name", Path(loaded.path).name),
               "device": str(dev), "segments": result.stats, "warnings": warnings + result.warnings,
               "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    progress.progress("done", 1.0)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['task']}: {summary['input']} -> {summary['path']}  "
             f"({summary['timings_s']['total']:.2f} s, {summary['model']} on {summary['device']})"]
    for name, st in summary["segments"].items():
        if "volume_ml" in st:
            extra = ""
            if "longest_axial_diameter_mm" in st:
                extra = (f", longest axial diameter (RECIST) {st['longest_axial_diameter_mm']} mm, "
                         f"maximum 3D diameter {st['max_3d_diameter_mm']} mm")
            lines.append(f"    {name}: {st['volume_ml']:.1f} mL{extra}")
        else:
            lines.append(f"    {name}: {st['area_px']} px ({100 * st['fraction_of_fov']:.1f}% of the field of view)")
    return "\n".join(lines)  # warnings already went to stderr as they happened


def cmd_segment(args) -> int:
    from KDSegmentationLib.progress import Progress

    progress = Progress(args.progress)
    summary = run_segment(args.task, args.input, args.output, model=args.model, device=args.device,
                          seed_ras=parse_seed(args.seed_ras), threads=args.threads, progress=progress)
    if progress.mode == "json":
        progress.result(**summary)
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# sample / demo
# ---------------------------------------------------------------------------------------------------------------

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
                              seed_ras=tuple(seed) if seed else None, threads=args.threads)
        print(format_summary(summary), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------

def cmd_models(args) -> int:
    from KDSegmentationLib.models.catalog import find_model, list_models

    if args.action == "show":
        if not args.name:
            raise InputError("'kdseg models show' needs a model name (see 'kdseg models list')")
        entry = find_model(args.name)
        print(json.dumps(entry, indent=2))
        return 0
    import contextlib

    # With --json stdout holds exactly one JSON document (the client parses it strictly): anything a library
    # prints while the model files are read goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        entries = list_models()
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        if not entries:
            print("no models installed")
        for e in entries:
            card = e.get("card", {})
            if e.get("error"):
                print(f"{e['name']:<40} {'?':<12} {'?':<8} {e['source']:<7} unusable: {e['error']}")
                continue
            print(f"{e['name']:<40} {e['task']:<12} {e['role']:<8} {e['source']:<7} "
                  f"{card.get('parameters', '?')} params")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from KDSegmentationLib.evaluation.evaluate import evaluate_dataset, evaluate_pair

    if args.output:
        out = Path(args.output)
        for given in (args.pred, args.ref):
            if given:
                check_not_input(given, out)
    if args.pred and args.ref:
        result = evaluate_pair(args.task, args.pred, args.ref)
    elif args.data:
        result = evaluate_dataset(args.task, args.data, model=args.model, device=args.device, split=args.split,
                                  threads=args.threads, progress_mode=args.progress,
                                  case_ids=[c for c in (args.cases or "").split(",") if c] or None)
    else:
        raise InputError("kdseg evaluate needs either --pred and --ref, or --data DIR")
    text = json.dumps(result, indent=2)
    if args.output:
        from KDSegmentationLib.io.atomic import write_json

        write_json(Path(args.output), result)
    print(text)
    return 0


def cmd_calibrate(args) -> int:
    from KDSegmentationLib.evaluation.calibrate import DEFAULT_GRID, calibrate, store_threshold

    grid = DEFAULT_GRID
    if args.thresholds:
        try:
            grid = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--thresholds {args.thresholds!r} is not a comma-separated list of numbers") from None
        # a stored threshold outside (0, 1) would make the model file unloadable (and its results empty or full)
        if not grid or not all(0.0 < t < 1.0 for t in grid):
            raise InputError(f"--thresholds {bound_text(args.thresholds, 200)!r}: every candidate must be a number "
                             "strictly between 0 and 1")
    result = calibrate(args.model, args.data, grid, device=args.device, threads=args.threads)
    if not args.dry_run:
        store_threshold(args.model, result)
        result["stored_in"] = str(args.model)
    print(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parser and main
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from KDSegmentationLib.tasks import TASKS

    p = argparse.ArgumentParser(prog="kdseg", description="Fast distilled segmentation of liver, lung nodule and "
                                "retinal vessels; teacher training and local distillation.")
    sub = p.add_subparsers(dest="command", required=True)
    task_names = list(TASKS)

    s = sub.add_parser("segment", help="segment one image or DICOM folder")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--input", required=True, help="image file (NRRD, NIfTI, MHA, PNG, JPG, TIFF...) or DICOM folder")
    s.add_argument("--output", required=True, help="OUT.seg.nrrd (Slicer segmentation) or OUT.nii.gz (labelmap)")
    s.add_argument("--model", default="student", help="student (default), teacher, a model file or a local name")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--seed-ras", help="X,Y,Z point in RAS mm (lung_nodule)")
    s.add_argument("--threads", type=str, help="CPU threads for torch")
    s.add_argument("--progress", default="auto", choices=["auto", "json", "bar", "none"])
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("sample", help="write the bundled sample input of a task")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--output", required=True, help="folder")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("demo", help="segment the bundled samples with the shipped students and print a summary")
    s.add_argument("--task", choices=task_names, help="only this task (default: all)")
    s.add_argument("--output", default="kdseg-demo", help="folder for the inputs and results")
    s.add_argument("--model", default="student")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("evaluate", help="metrics of one prediction, or of a model over a dataset")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--pred", help="predicted segmentation (.seg.nrrd or labelmap)")
    s.add_argument("--ref", help="reference segmentation or labelmap")
    s.add_argument("--data", help="dataset folder (any supported layout)")
    s.add_argument("--split", default="test", help="which split of the dataset to evaluate (test, val, train, all)")
    s.add_argument("--cases", help="comma-separated case ids to evaluate instead of a split")
    s.add_argument("--model", default="student")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=str)
    s.add_argument("--output", help="also write the metrics JSON here")
    s.add_argument("--progress", default="auto", choices=["auto", "json", "bar", "none"])
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("calibrate", help="choose a binary model's decision threshold on its validation cases "
                       "and store it in the model file")
    s.add_argument("--model", required=True, help="model file (rewritten in place, atomically)")
    s.add_argument("--data", required=True, help="the original dataset the model was trained on (not a prepared cache)")
    s.add_argument("--thresholds", help="comma-separated candidates (default 0.30,0.35,...,0.90)")
    s.add_argument("--dry-run", action="store_true", help="print the table, leave the model file as it is")
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("models", help="list installed and locally distilled models, or show one's card")
    s.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    from KDSegmentationLib.cli.serve import cmd_serve

    s = sub.add_parser("serve", help="persistent worker: JSON requests on stdin, JSON events on stdout")
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_serve)

    try:
        from KDSegmentationLib.cli.train import add_subcommands
    except ImportError:
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return p


def tune_malloc() -> None:
    """Keep large tensors on glibc's heap instead of fresh mmaps.

    Why: every mmap-backed tensor pays page faults on first touch; with many large temporaries (3D inference) that
    made the CPU pipeline about 3x slower. No effect elsewhere than glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    json_mode = getattr(args, "progress", None) == "json"
    restore = _install_cancel_handlers() if args.command in _CANCEL_COMMANDS else None
    try:
        if getattr(args, "threads", None) is not None:
            args.threads, warning = parse_threads(args.threads)
            if warning:
                _report_warning(warning, json_mode)
        return int(args.func(args) or 0)
    except InputError as exc:
        _report_error(str(exc), json_mode)
        return 2
    except CancelledError as exc:
        _report_error(f"cancelled: {exc}" if str(exc) else "cancelled", json_mode)
        return 128 + int(getattr(exc, "signal", None) or 2)
    except KeyboardInterrupt as exc:
        signum = int(getattr(exc, "signal", None) or 2)
        _report_error("cancelled" if signum == 2 else f"cancelled ({exc})", json_mode)
        return 128 + signum
    except MemoryError:
        _report_error("out of memory; use a machine with more memory, a smaller image, or --device cuda", json_mode)
        return 2
    except Exception as exc:
        if os.environ.get("KDSEG_DEBUG"):
            raise
        _report_error(f"internal error: {type(exc).__name__}: {exc} (set KDSEG_DEBUG=1 for a traceback)", json_mode)
        return 1
    finally:
        if restore:
            restore()


# Commands whose SIGTERM becomes a clean cancellation (exit 143, temp files removed by the writers' cleanup);
# training has its own handler that checkpoints first.
_CANCEL_COMMANDS = ("segment", "demo", "evaluate", "calibrate", "sample", "models")


class Signalled(KeyboardInterrupt):
    """SIGINT/SIGTERM as an exception. A KeyboardInterrupt, not an Exception, so that no library's broad
    ``except Exception`` turns a cancellation into an ordinary error and carries on."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def _install_cancel_handlers():
    """SIGTERM raises :class:`CancelledError` in the main thread (as Ctrl-C raises KeyboardInterrupt), so every
    ``finally`` runs and no hidden temp file is left beside the output. Returns a function restoring the old ones."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    fired = []

    def handler(signum, frame):
        if fired:  # a second signal during the cleanup must not interrupt the cleanup itself
            return
        fired.append(signum)
        raise Signalled(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass

    def restore():
        for sig, previous in old.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, OSError):
                pass
    return restore


def _report_warning(message: str, json_mode: bool) -> None:
    message = bound_message(message)
    if json_mode:
        print(json.dumps({"event": "log", "level": "warning", "message": message}), flush=True)
    print(f"kdseg: warning: {message}", file=sys.stderr, flush=True)


def _report_error(message: str, json_mode: bool) -> None:
    message = bound_message(message)  # one line, always, and bounded
    if json_mode:
        print(json.dumps({"event": "error", "message": message}), flush=True)
    print(f"kdseg: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
