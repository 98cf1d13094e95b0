"""The one device choice of the engine (segmenting, evaluating, training alike)."""
from __future__ import annotations

from KDSegmentationLib.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto", local_rank: int = 0):
    """``auto`` -> the CUDA GPU of this process's rank when there is one, else the CPU; ``cuda`` without a GPU is
    bad input (exit 2), never a silent fall-back to a 30x slower device."""
    import torch

    if name not in DEVICE_CHOICES:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
