"""Helpers shared by every network: pad any input to the network's size multiple, crop outputs and features back.

Feature naming convention (used to pair teacher and student features by name in the distillation losses):

    'enc{k}'      encoder output at stride 2**k (k = 0 is full resolution)
    'bottleneck'  deepest encoder output, stride 2**depth
    'dec{k}'      decoder output at stride 2**k, after fusing the skip 'enc{k}'

A feature at stride ``s`` of an input of spatial size ``n`` (per axis) is returned with size ``ceil(n / s)``: the
networks pad at the end of each axis to their own multiple, and cropping every feature back to ``ceil(n / s)`` makes
the features of two networks with different multiples (teacher and student) the same size and aligned voxel for voxel.

Plain torch only: the student must not import MONAI (importing it costs about 2 s of start-up on 2 CPU cores).
While a network is traced for export (``models/onnx_export.py``) sizes are traced values, not ints: the helpers
keep them symbolic then, so the exported graph accepts any input size.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Pad ``x`` (B, C, *spatial) at the end of each spatial axis up to a multiple of ``multiple``.

    Replicate padding (not zeros) so that no artificial edge appears at the border of a CT window or a fundus photo.
    Returns the padded tensor and the original spatial size.
    """
    size = tuple(x.shape[2:])
    extra = [(-n) % multiple for n in size]
    if not torch.jit.is_tracing() and not any(extra):
        return x, size
    pads = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pads += [0, e]
    # replicate, unlike reflect, accepts a pad larger than the axis (a 1-pixel-wide input is valid)
    return F.pad(x, pads, mode="replicate"), size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (B, C, *spatial) to ``size`` (keeping the start of each axis)."""
    if torch.jit.is_tracing():
        for axis, n in enumerate(size):
            x = x.narrow(2 + axis, 0, n)
        return x
    if tuple(x.shape[2:]) == tuple(size):
        return x
    index = (slice(None), slice(None)) + tuple(slice(0, int(n)) for n in size)
    return x[index]


def feature_size(size: Sequence[int], stride: int) -> Tuple[int, ...]:
    """Spatial size of a feature at ``stride`` for an input of ``size``: ceil(n / stride) per axis."""
    return tuple(int(math.ceil(n / stride)) for n in size)


def upsample(x: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize (B, C, *spatial) to ``size``: mode 'linear' ((bi/tri)linear, smooth for thin structures) or 'nearest'
    (several times cheaper on large 3D maps)."""
    size = tuple(size) if torch.jit.is_tracing() else tuple(int(n) for n in size)
    if mode == "linear":
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    raise ValueError(f"unknown upsampling mode {mode!r}; choose linear or nearest")
