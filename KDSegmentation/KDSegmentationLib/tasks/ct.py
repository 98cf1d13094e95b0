"""CT preprocessing shared by the CT tasks, each step with its exact inverse.

The volume is resampled to ``task.spacing_mm`` keeping origin and direction (so the model grid is the input grid with
another spacing, both LPS) and windowed to [0, 1] with ``task.hu_window`` (HU); predictions go back to the input
grid with :func:`labels_on_input_grid`. Arrays are (z, y, x); spacings (x, y, z) mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from KDSegmentationLib.tasks import TaskSpec


@dataclass
class PreparedVolume:
    hu: np.ndarray          # int16 (z, y, x) HU on the model grid
    grid: object            # SimpleITK.Image: the model grid (geometry reference for labels and the inverse)
    original: object        # SimpleITK.Image: the input grid (geometry only is used)


def prepare_ct_volume(image, task: TaskSpec) -> PreparedVolume:
    """Resample a CT (any direction, HU) to the task's model spacing; linear interpolation, air outside."""
    import SimpleITK as sitk

    from KDSegmentationLib.io.geometry import resample_to_spacing

    # resample the integer HU image as it is: a float32 copy of a full-size CT would cost 4 bytes a voxel for nothing
    grid = resample_to_spacing(image, task.spacing_mm, interpolator="linear", default_value=-1024.0)
    hu = sitk.GetArrayFromImage(grid)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return PreparedVolume(hu=hu, grid=grid, original=image)


def prepare_ct_label(label, prepared: PreparedVolume) -> np.ndarray:
    """Labelmap (on the input grid) -> uint8 (z, y, x) on the model grid (nearest neighbour)."""
    import SimpleITK as sitk

    from KDSegmentationLib.io.geometry import resample_like

    lab = resample_like(sitk.Cast(label, sitk.sitkUInt8), prepared.grid, interpolator="nearest")
    return sitk.GetArrayFromImage(lab).astype(np.uint8)


def ct_window(hu: np.ndarray, task: TaskSpec) -> np.ndarray:
    """HU -> float32 [0, 1] with the task's window (values outside are clipped)."""
    lo, hi = task.hu_window
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def labels_on_input_grid(prob_zyx: np.ndarray, prepared: PreparedVolume, margin_vox: int = 2,
                         min_prob: float = 0.3, postprocess=None) -> np.ndarray:
    """Class probabilities (C, z, y, x) on the model grid -> argmax labels uint8 (Z, Y, X) on the input grid.

    Each class's probability is interpolated (linear) onto the input grid and the argmax is kept as it goes, so the
    boundaries are sub-voxel accurate although the model grid is coarser, while only one float map is alive at a
    time. Only the input-grid box around the model-grid voxels whose foreground probability reaches ``min_prob``
    (plus ``margin_vox`` model voxels) is resampled: elsewhere the answer is background, and an organ fills a fifth
    of a CT, so this is most of the cost saved. Why 0.3 is safe: where all model-grid neighbours of an input voxel
    have foreground below 0.3, their background exceeds 0.7, and so does its interpolation, which then beats every
    foreground class. ``postprocess`` (labels -> labels) runs on that box only.
    """
    import SimpleITK as sitk

    original = prepared.original
    size = original.GetSize()
    labels = np.zeros(size[::-1], np.uint8)
    fg = (1.0 - prob_zyx[0]) >= min_prob
    if not fg.any():
        return labels
    idx = np.argwhere(fg)
    lo = np.maximum(idx.min(0) - margin_vox, 0)
    hi = np.minimum(idx.max(0) + margin_vox, np.array(fg.shape) - 1)
    # the box's corners (model grid, x/y/z index order) -> continuous indices of the input grid
    corners = [prepared.grid.TransformContinuousIndexToPhysicalPoint(
        (float(x), float(y), float(z))) for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
    cidx = np.array([original.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    start = np.maximum(np.floor(cidx.min(0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(cidx.max(0)).astype(int) + 1, np.array(size) - 1)
    if np.any(stop < start):
        return labels
    box_size = [int(v) for v in (stop - start + 1)]
    box_origin = original.TransformIndexToPhysicalPoint([int(v) for v in start])
    best = box_labels = None
    for c in range(prob_zyx.shape[0]):
        img = sitk.GetImageFromArray(np.ascontiguousarray(prob_zyx[c], dtype=np.float32))
        img.CopyInformation(prepared.grid)
        res = sitk.Resample(img, box_size, sitk.Transform(), sitk.sitkLinear, box_origin, original.GetSpacing(),
                            original.GetDirection(), 1.0 if c == 0 else 0.0, sitk.sitkFloat32)
        p = sitk.GetArrayViewFromImage(res)
        if best is None:
            best = np.array(p, dtype=np.float32)
            box_labels = np.zeros(best.shape, np.uint8)
            continue
        better = p > best
        box_labels[better] = c
        np.maximum(best, p, out=best)
        del res, p, better
    if postprocess is not None:
        box_labels = postprocess(box_labels)
    labels[start[2]:stop[2] + 1, start[1]:stop[1] + 1, start[0]:stop[0] + 1] = box_labels
    return labels


def segment_volumes(labels: np.ndarray, task: TaskSpec, spacing) -> Dict[str, dict]:
    """Per-segment voxel counts and volumes in mL (``spacing`` in mm, x/y/z)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=task.num_classes)
    return {lab.name: {"voxels": int(counts[lab.value]), "volume_ml": round(counts[lab.value] * voxel_ml, 2)}
            for lab in task.labels}
