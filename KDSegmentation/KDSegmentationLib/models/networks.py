"""Network registry: teacher and student architectures by name, and the shipped configuration of each task.

Every network built here follows one contract (used by inference, the trainer and the distillation losses):

- ``forward(x)`` with x (B, in_channels, *S) returns logits (B, out_channels, *S) for ANY spatial size S (the
  network pads to its own multiple and crops back), so whole images can be run without sliding windows;
- ``forward(x, return_features=True)`` returns ``(logits, OrderedDict[name, Tensor])``;
- attributes ``spatial_dims``, ``feature_channels`` (name -> channels) and ``feature_strides`` (name -> stride).

Feature names encode the stride, so teacher and student features pair by name ('enc{k}' and 'dec{k}' at stride
2**k, 'bottleneck' at the deepest stride; see ``common``). The shipped pairs have the same depth, so 'bottleneck' is
at the same stride in both. Teacher features: enc0..enc3, bottleneck, dec3..dec0. Student features: enc0 (full-res
input skip), enc1..enc3, bottleneck, dec3..dec1, dec0 (full-res refinement); enc0/dec0 are absent when the student
is built with ``full_res_channels=0``.

``arch_args`` are plain JSON values: the model file stores them and rebuilds the network with
``build_network(header['arch'], **header['arch_args'])``. Importing this package does not import MONAI (the teacher
imports it when one is built), so student-only inference starts fast.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Tuple

import torch

from KDSegmentationLib.models.student import MobileStudent
from KDSegmentationLib.models.teacher import TeacherUNet

ARCHITECTURES: Dict[str, Callable[..., torch.nn.Module]] = {
    "teacher_unet": TeacherUNet,
    "student_mobile": MobileStudent,
}

# Shipped configurations. Parameter counts (count_parameters): teacher / student, ratio
#   liver        5.69M / 224k  (1/25)   3D
#   lung_nodule  5.80M /  76k  (1/76)   2D
#   retina       5.81M /  76k  (1/76)   2D
# All pad their inputs to multiples of 16 (depth 4).
_TEACHER_2D = {"filters": [32, 64, 128, 256, 320], "norm": "instance"}
_DEFAULTS: Dict[str, Dict[str, Tuple[str, Dict[str, Any]]]] = {
    "liver": {
        "teacher": ("teacher_unet", {"filters": [16, 32, 64, 128, 256], "norm": "instance"}),
        # wider than the 2D students (3D context, two foreground classes); a 4-channel full-resolution path sharpens
        # small tumours for ~+35% run time over none (measured: 0.36 s without, 0.49 s with 4, 0.58 s with 8
        # channels on a 160x160x128 grid, 2 threads)
        "student": ("student_mobile", {"width": 20, "depth": 4, "expansion": 4, "stem_stride": 2, "blocks": 1,
                                       "decoder_expansion": 2, "full_res_channels": 4, "norm": "batch"}),
    },
    "lung_nodule": {
        "teacher": ("teacher_unet", _TEACHER_2D),
        "student": ("student_mobile", {"width": 12, "depth": 4, "expansion": 4, "stem_stride": 2, "blocks": 1,
                                       "decoder_expansion": 2, "full_res_channels": 8, "norm": "batch"}),
    },
    "retina": {
        "teacher": ("teacher_unet", _TEACHER_2D),
        # <= 100k parameters and ~30-50 ms per 584x565 photo on 2 CPU threads; the full-resolution path keeps
        # the 1-3 px vessels
        "student": ("student_mobile", {"width": 12, "depth": 4, "expansion": 4, "stem_stride": 2, "blocks": 1,
                                       "decoder_expansion": 2, "full_res_channels": 8, "norm": "batch"}),
    },
}


def build_network(arch: str, **arch_args: Any) -> torch.nn.Module:
    """Build a registered architecture: ``build_network('student_mobile', spatial_dims=2, in_channels=3, ...)``."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        from KDSegmentationLib.errors import InputError

        raise InputError(f"unknown network architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}. "
                         "The model file may come from a newer KDSegmentation: update the extension") from None
    return factory(**arch_args)


def count_parameters(net: torch.nn.Module) -> int:
    """Number of parameters (each shared tensor counted once), trainable or not."""
    return sum(p.numel() for p in net.parameters())


def default_arch_args(task_name: str, role: str) -> Tuple[str, Dict[str, Any]]:
    """The shipped (arch, arch_args) for ``role`` ('teacher' or 'student') of a task, complete with spatial_dims,
    in_channels and out_channels from the task registry. Returns fresh copies (safe to modify)."""
    from KDSegmentationLib.tasks import get_task

    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    task = get_task(task_name)
    if task.name not in _DEFAULTS:
        raise ValueError(f"no default networks for task {task.name!r}")
    arch, args = _DEFAULTS[task.name][role]
    args = copy.deepcopy(args)
    args.update(spatial_dims=task.spatial_dims, in_channels=task.input_channels,
                out_channels=task.num_classes)
    return arch, args


__all__ = ["ARCHITECTURES", "MobileStudent", "TeacherUNet", "build_network", "count_parameters",
           "default_arch_args"]
