"""Resampling between the input grid and the model grid, with an exact way back.

All positions are LPS millimetres; spacings are (x, y[, z]) mm in ITK order. The model grid keeps the input's origin
and direction (so oblique and flipped scans are never re-oriented, only re-sampled), and :func:`resample_like` maps any
result back onto exactly the input grid.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def _interpolator(name: str) -> int:
    try:
        return _INTERPOLATORS[name]
    except KeyError:
        raise ValueError(f"unknown interpolator {name!r}; use one of {', '.join(_INTERPOLATORS)}") from None


def grid_size_for_spacing(size: Sequence[int], spacing: Sequence[float],
                          new_spacing: Sequence[float]) -> Tuple[int, ...]:
    """Number of voxels on the new grid so that it spans at least the input's extent (size x spacing mm) per axis."""
    # the small tolerance keeps 10 x 3 mm -> 30 / 3 = 10 voxels, not 11 because of floating-point noise
    return tuple(max(1, int(math.ceil(n * s / ns - 1e-6))) for n, s, ns in zip(size, spacing, new_spacing))


def resample_to_spacing(image: sitk.Image, spacing_mm: Sequence[Optional[float]], interpolator: str = "linear",
                        default_value: float = 0.0) -> sitk.Image:
    """Resample onto a grid with ``spacing_mm`` (x, y[, z]) mm; ``None`` in an axis keeps the input spacing there.

    Origin (centre of voxel 0) and direction are those of the input; the size covers the input's physical extent.
    The pixel type is kept (use ``'nearest'`` for labelmaps).
    """
    dim = image.GetDimension()
    if len(spacing_mm) != dim:
        raise ValueError(f"spacing {tuple(spacing_mm)} has {len(spacing_mm)} values for a {dim}D image")
    old = image.GetSpacing()
    new = tuple(float(o if s is None else s) for s, o in zip(spacing_mm, old))
    if any(s <= 0 for s in new):
        raise ValueError(f"spacing must be positive, got {new}")
    size = grid_size_for_spacing(image.GetSize(), old, new)
    return sitk.Resample(image, size, sitk.Transform(), _interpolator(interpolator), image.GetOrigin(), new,
                         image.GetDirection(), float(default_value), image.GetPixelID())


def resample_like(image: sitk.Image, reference: sitk.Image, interpolator: str = "linear",
                  default_value: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto exactly ``reference``'s grid (size, origin, spacing, direction); pixel type kept."""
    if image.GetDimension() != reference.GetDimension():
        raise ValueError(f"cannot resample a {image.GetDimension()}D image onto a {reference.GetDimension()}D grid")
    out = sitk.Resample(image, reference, sitk.Transform(), _interpolator(interpolator), float(default_value),
                        image.GetPixelID())
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when two images share size, origin, spacing and direction (within ``tol`` mm / cosine)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def crop_to_foreground(image: sitk.Image, foreground: sitk.Image, margin_mm: float = 0.0
                       ) -> Tuple[sitk.Image, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Crop ``image`` to the bounding box of ``foreground`` (non-zero voxels, same grid) plus ``margin_mm``.

    Returns the cropped image (its origin moves with the crop, so physical positions are unchanged) and the
    (index, size) of the box in input voxels. :func:`resample_like` with the input as reference undoes the crop.
    An empty foreground returns the whole image.
    """
    if not same_grid(image, foreground):
        raise ValueError("foreground must be on the image's grid")
    fg = sitk.GetArrayViewFromImage(foreground)
    if fg.ndim > image.GetDimension():
        fg = fg.any(axis=-1)
    nz = np.nonzero(fg)
    size = image.GetSize()
    if len(nz[0]) == 0:
        return image, (tuple([0] * len(size)), tuple(size))
    spacing = image.GetSpacing()
    # numpy axes are (z, y, x); ITK index order is (x, y, z)
    lo = [int(a.min()) for a in nz][::-1]
    hi = [int(a.max()) for a in nz][::-1]
    index, box = [], []
    for d in range(len(size)):
        m = int(math.ceil(margin_mm / spacing[d] - 1e-9))
        a, b = max(0, lo[d] - m), min(size[d] - 1, hi[d] + m)
        index.append(a)
        box.append(b - a + 1)
    return sitk.RegionOfInterest(image, box, index), (tuple(index), tuple(box))
