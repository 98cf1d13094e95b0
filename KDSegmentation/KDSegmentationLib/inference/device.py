"""The one device choice of the engine (segmenting, evaluating, training alike), and the CPU thread count."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from KDSegmentationLib.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")

_THREADS: Optional[int] = None  # asked for with --threads; None: each runtime's default (one per physical core)


def pick_device(name: str = "auto", local_rank: int = 0):
    """``auto`` -> the CUDA GPU of this process's rank when there is one, else the CPU; ``cuda`` without a GPU is
    bad input (exit 2), never a silent fall-back to a 30x slower device."""
    import torch

    check_device_name(name)
    use_threads_in_torch()
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def check_device_name(name: str) -> None:
    if name not in DEVICE_CHOICES:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")


def surely_cpu(name: str) -> bool:
    """True when ``name`` can only mean the CPU, decided without importing torch: ``cpu``, or ``auto`` on a machine
    with no NVIDIA driver (where torch could not find a CUDA GPU either)."""
    check_device_name(name)
    return name == "cpu" or (name == "auto" and not _nvidia_driver_present())


def _nvidia_driver_present() -> bool:
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")
        return gpus.is_dir() and any(gpus.iterdir())
    if os.name == "nt":
        return (Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvcuda.dll").exists()
    return False  # macOS: no CUDA


def set_cpu_threads(threads: Optional[int]) -> None:
    """Remember ``--threads`` for every runtime; applied to torch now if it is loaded, else when it is. None keeps
    the earlier choice (a worker's requests inherit the worker's ``--threads``)."""
    global _THREADS
    if not threads:
        return
    _THREADS = int(threads)
    if "torch" in sys.modules:
        use_threads_in_torch()


def cpu_threads() -> Optional[int]:
    return _THREADS


def use_threads_in_torch() -> None:
    if _THREADS:
        import torch

        torch.set_num_threads(_THREADS)
