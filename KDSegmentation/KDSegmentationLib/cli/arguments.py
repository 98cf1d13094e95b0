"""Checks and parsing of command-line values shared by the commands (paths, seed point, threads, messages).

Every problem is an :class:`InputError` with one line (exit code 2), raised before anything is read or written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from KDSegmentationLib.errors import InputError

OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")



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
    """``--threads`` for torch and ONNX Runtime alike (torch is not imported for it)."""
    from KDSegmentationLib.inference.device import set_cpu_threads

    set_cpu_threads(threads)
