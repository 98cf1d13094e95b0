"""CT preprocessing shared by the CT tasks, each step with its exact inverse.

The volume is resampled to ``task.spacing_mm`` keeping origin and direction (so the model grid is the input grid with
another spacing, both LPS) and windowed to [0, 1] with ``task.hu_window`` (HU); predictions go back to the input
grid with :func:`labels_on_input_grid`. Arrays are (z, y, x); spacings (x, y, z) mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.tasks.linear_argmax import argmax_on_input_box, shares_axes


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


def _input_box(prepared: PreparedVolume, lo_zyx, hi_zyx, start=None, stop=None):
    """Model-grid box (z, y, x) first/last indices -> (start, stop) (x, y, z) of the input-grid voxels it covers.

    One input voxel of slack on each side (the corners' continuous indices are rounded outwards), the outer half
    voxel of the model image's edge voxels included, clipped to the input grid and to ``start``/``stop`` when given; None when nothing is left.
    """
    original = prepared.original
    # a model image's edge voxel is read by interpolation out to half a voxel beyond its centre
    n_zyx = prepared.grid.GetSize()[::-1]
    lo_c = [v - 0.5 if v <= 0 else float(v) for v in lo_zyx]
    hi_c = [v + 0.5 if v >= n - 1 else float(v) for v, n in zip(hi_zyx, n_zyx)]
    corners = [prepared.grid.TransformContinuousIndexToPhysicalPoint((x, y, z))
               for z in (lo_c[0], hi_c[0]) for y in (lo_c[1], hi_c[1]) for x in (lo_c[2], hi_c[2])]
    cidx = np.array([original.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    lo = np.maximum(np.floor(cidx.min(0)).astype(int) - 1, 0 if start is None else start)
    hi = np.minimum(np.ceil(cidx.max(0)).astype(int) + 1, np.array(original.GetSize()) - 1 if stop is None else stop)
    return None if np.any(hi < lo) else (lo, hi)


def _model_slices(prepared: PreparedVolume, start, stop) -> Tuple[int, int]:
    """Input-grid box (x, y, z) -> the model-grid z slices (first, last) whose values interpolation reads there."""
    original, grid = prepared.original, prepared.grid
    cz = [grid.TransformPhysicalPointToContinuousIndex(original.TransformIndexToPhysicalPoint(
        (int(x), int(y), int(z))))[2] for z in (start[2], stop[2]) for y in (start[1], stop[1])
        for x in (start[0], stop[0])]
    return max(int(np.floor(min(cz))), 0), min(int(np.floor(max(cz))) + 1, grid.GetSize()[2] - 1)


def _argmax_into(out: np.ndarray, maps, classes, prepared: PreparedVolume, start, stop, at) -> None:
    """Write the argmax over the classes' linear interpolations on the input box ``start..stop`` (x, y, z) into
    ``out`` (uint8, (z, y, x)) at ``at`` (its (x, y, z) offset). ``maps``: one float32 model-grid image per class;
    ``classes``: those that can win there (0 first; a class that cannot beat the others changes no label)."""
    import SimpleITK as sitk

    original = prepared.original
    size = [int(v) for v in (stop - start + 1)]
    view = out[at[2]:at[2] + size[2], at[1]:at[1] + size[1], at[0]:at[0] + size[0]]
    # one filter for all classes: building a filter and its transform per call costs as much as a small slab
    resample = sitk.ResampleImageFilter()
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetOutputPixelType(sitk.sitkFloat32)
    resample.SetOutputSpacing(original.GetSpacing())
    resample.SetOutputDirection(original.GetDirection())
    resample.SetOutputOrigin(original.TransformIndexToPhysicalPoint([int(v) for v in start]))
    resample.SetSize(size)
    best = None
    for c in classes:
        resample.SetDefaultPixelValue(1.0 if c == 0 else 0.0)
        res = resample.Execute(maps[c])
        p = sitk.GetArrayViewFromImage(res)
        if best is None:
            best = np.array(p, dtype=np.float32)
            continue
        better = p > best  # strictly: the first class wins ties, as with argmax
        np.copyto(view, np.uint8(c), where=better)
        np.maximum(best, p, out=best)


def _possible_classes(prob_zyx: np.ndarray, k0: int, k1: int, normalised: bool):
    """Classes whose interpolation can be the argmax somewhere between model slices ``k0..k1`` (0 always first).

    Why exact: an interpolation is a convex combination of model voxels, so it never exceeds their maximum; where a
    class stays below 1/C - 0.001 and the probabilities sum to 1, the other classes share more than 1 - 1/C, and one
    of them is above it. Unnormalised probabilities: every class.
    """
    n = prob_zyx.shape[0]
    if not normalised:
        return list(range(n))
    return [0] + [c for c in range(1, n) if float(prob_zyx[c, k0:k1 + 1].max()) >= 1.0 / n - 1e-3]


def labels_on_input_grid(prob_zyx: np.ndarray, prepared: PreparedVolume, margin_vox: int = 1,
                         min_prob: float = 0.3, slab_vox: int = 2,
                         min_slab_voxels: int = 1 << 18) -> np.ndarray:
    """Class probabilities (C, z, y, x) on the model grid -> argmax labels uint8 (Z, Y, X) on the input grid.

    Each class's probability is interpolated (linear) onto the input grid and the argmax taken, so the boundaries
    are sub-voxel accurate although the model grid is coarser. Only input voxels near model-grid voxels whose
    foreground probability reaches ``min_prob`` are looked at: elsewhere the answer is background. Why 0.3 is safe:
    where all model-grid neighbours of an input voxel have foreground below 0.3, their background exceeds 0.7, and
    so does its interpolation, which then beats every foreground class. Linear interpolation reads the two model
    voxels around a point on each axis, so ``margin_vox`` = 1 model voxel around them is exact. Grids that share
    their axes (the CT pipeline's) interpolate only where the label can change (:mod:`linear_argmax`); others are
    resampled by ITK in slabs of ``slab_vox`` model slices (at least ``min_slab_voxels`` input voxels), each in its
    own (y, x) box and only for the classes that can win there. Organ post-processing belongs on the model grid,
    before this (``liver.keep_organ``).
    """
    labels = np.zeros(prepared.original.GetSize()[::-1], np.uint8)
    fg = (1.0 - prob_zyx[0]) >= min_prob
    if not fg.any():
        return labels
    idx = np.argwhere(fg)
    box = _input_box(prepared, np.maximum(idx.min(0) - margin_vox, 0),
                     np.minimum(idx.max(0) + margin_vox, np.array(fg.shape) - 1))
    if box is None:
        return labels
    start, stop = box
    if shares_axes(prepared.grid, prepared.original):
        box_labels = argmax_on_input_box(prob_zyx, prepared.grid, prepared.original, start, stop)
    else:
        box_labels = _resampled_argmax(prob_zyx, prepared, fg, start, stop, margin_vox, slab_vox, min_slab_voxels)
    labels[start[2]:stop[2] + 1, start[1]:stop[1] + 1, start[0]:stop[0] + 1] = box_labels
    return labels


def _resampled_argmax(prob_zyx: np.ndarray, prepared: PreparedVolume, fg: np.ndarray, start, stop, margin_vox: int,
                      slab_vox: int, min_slab_voxels: int) -> np.ndarray:
    """Labels of the input box ``start..stop`` by ITK resampling, slab by slab (any pair of grids)."""
    box_labels = np.zeros(tuple((stop - start + 1)[::-1]), np.uint8)
    maps = _model_maps(prob_zyx, prepared)
    normalised = bool(np.abs(prob_zyx.sum(axis=0, dtype=np.float64) - 1.0).max() < 1e-4)
    z_edges = _slab_edges(prepared, start, stop, slab_vox, min_slab_voxels)
    for z0, z1 in zip(z_edges[:-1], z_edges[1:]):
        slab_start, slab_stop = np.array([start[0], start[1], z0]), np.array([stop[0], stop[1], z1 - 1])
        k0, k1 = _model_slices(prepared, slab_start, slab_stop)
        near = fg[k0:k1 + 1].any(axis=0)  # the (y, x) of the model voxels interpolation reads in this slab
        if not near.any():
            continue
        yx = np.argwhere(near)
        sub = _input_box(prepared, (k0, *np.maximum(yx.min(0) - margin_vox, 0)),
                         (k1, *np.minimum(yx.max(0) + margin_vox, np.array(near.shape) - 1)), slab_start, slab_stop)
        classes = _possible_classes(prob_zyx, k0, k1, normalised)
        if sub is not None and len(classes) > 1:
            _argmax_into(box_labels, maps, classes, prepared, sub[0], sub[1], sub[0] - start)
    return box_labels


def _model_maps(prob_zyx: np.ndarray, prepared: PreparedVolume) -> list:
    """One float32 SimpleITK image per class on the model grid."""
    import SimpleITK as sitk

    maps = []
    for c in range(prob_zyx.shape[0]):
        img = sitk.GetImageFromArray(np.ascontiguousarray(prob_zyx[c], dtype=np.float32))
        img.CopyInformation(prepared.grid)
        maps.append(img)
    return maps


def _slab_edges(prepared: PreparedVolume, start, stop, slab_vox: int, min_voxels: int = 1 << 18) -> np.ndarray:
    """Input z indices cutting ``start..stop`` (x, y, z) into slabs of about ``slab_vox`` model slices, each of at
    least ``min_voxels`` input voxels (a small box stays whole: each slab costs a few resampling calls); the last
    edge is stop + 1."""
    ratio = prepared.grid.GetSpacing()[2] / prepared.original.GetSpacing()[2]
    plane = int((stop[0] - start[0] + 1) * (stop[1] - start[1] + 1))
    step = max(int(round(slab_vox * ratio)), -(-min_voxels // plane), 1)
    return np.append(np.arange(start[2], stop[2] + 1, step), stop[2] + 1)


def segment_volumes(labels: np.ndarray, task: TaskSpec, spacing) -> Dict[str, dict]:
    """Per-segment voxel counts and volumes in mL of uint8 ``labels`` (``spacing`` in mm, x/y/z).

    Counted in the labels' bounding box only, one comparison per label: a histogram of a whole 512 x 512 x N grid
    (mostly background) costs more than finding the box.
    """
    from KDSegmentationLib.tasks.components import mask_box

    voxel_ml = float(np.prod(spacing)) / 1000.0
    box = mask_box(labels)
    inside = labels[box] if box is not None else labels[:0]
    counts = {lab.name: np.int64(np.count_nonzero(inside == lab.value)) for lab in task.labels}
    # numpy's rounding of a numpy float, as the recorded results were rounded
    return {name: {"voxels": int(n), "volume_ml": round(n * voxel_ml, 2)} for name, n in counts.items()}
