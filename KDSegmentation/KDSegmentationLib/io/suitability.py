"""Whether an image that was read suits a task: dimensions, channels, pixel values, memory (warnings or refusal)."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.input_checks import (DEFAULT_MAX_VOXELS, PHOTO_MODE_KEY, available_memory_bytes,
                                              check_geometry, gigabytes)


# ---------------------------------------------------------------------------------------------------------------------
# suitability for a task
# ---------------------------------------------------------------------------------------------------------------------
def estimate_memory_bytes(image: sitk.Image, task) -> int:
    """Rough peak memory of processing ``image`` for ``task``: float32 input + one working copy + class maps."""
    n = int(np.prod(image.GetSize(), dtype=np.int64)) * max(1, image.GetNumberOfComponentsPerPixel())
    return n * 4 * (2 + task.num_classes)


def check_image_for_task(image: sitk.Image, task, max_voxels: int = DEFAULT_MAX_VOXELS) -> List[str]:
    """Refuse images that cannot be what ``task`` expects; return warnings for soft problems.

    Raises :class:`InputError` (one line: what is wrong, what to do) for a photo given to a CT task and the reverse,
    4D / multi-component CT, constant images, NaN/inf voxels, non-HU intensities for CT, and images too large.
    """
    warnings: List[str] = []
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    ncomp = image.GetNumberOfComponentsPerPixel()
    if dim > 3:
        raise InputError(f"the input is a {dim}D image (size {size}); {task.name} needs a single 3D volume or photo: "
                         f"extract one time point/volume first")
    check_geometry(image.GetSpacing(), image.GetDirection())
    if task.input_kind == "2d-rgb":
        _check_photo(dim, size, ncomp, task, warnings)
        _check_photo_pixels(image, task, warnings)
    else:
        _check_ct_shape(dim, size, ncomp, task, warnings)
        _check_ct_spacing(image.GetSpacing(), warnings)

    nvox = int(np.prod(size, dtype=np.int64))
    est = estimate_memory_bytes(image, task)
    avail = available_memory_bytes()
    if nvox > max_voxels or (avail is not None and est > avail):
        limit = f"{max_voxels:,} voxels" if nvox > max_voxels else f"the {gigabytes(avail)} of free memory"
        raise InputError(f"the image is too large ({nvox:,} voxels, about {gigabytes(est)} for float32 processing, more than "
                         f"{limit}); crop or downsample it first (e.g. Crop Volume in 3D Slicer)")

    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError("the image contains NaN or infinite voxel values; fix or re-export the image "
                         "(e.g. replace NaN by the background value)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise InputError(f"the image is empty (every voxel is {lo:g}); choose the image that holds the scan")
    if task.modality == "CT":
        _check_hu(arr, lo, hi, warnings)
    return warnings


def _check_photo(dim, size, ncomp, task, warnings):
    if dim == 3 and size[2] != 1:
        raise InputError(f"{task.name} needs a 2D colour fundus photograph, but the input is a 3D volume (size "
                         f"{size}); choose the photo (PNG/JPG/TIFF) or pick a CT task")
    if ncomp not in (1, 3, 4):
        raise InputError(f"{task.name} needs an RGB photograph, but the pixels have {ncomp} components; "
                         f"save the photo as an RGB PNG or JPG")
    if ncomp == 1:
        warnings.append("the photo is greyscale; the model expects colour fundus photographs and may do worse")
    h, w = size[1], size[0]
    if min(h, w) < 256:
        warnings.append(f"the photo is small ({w} x {h} px); vessels may be too thin to segment reliably")


_HIGH_DEPTH_PHOTO_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _check_photo_pixels(image: sitk.Image, task, warnings: List[str]) -> None:
    """A fundus photograph has 8-bit colour (or at least 8-bit grey) pixels; 16-bit, float or signed single-channel
    pixels are a CT/MR slice or a scientific image, which the model would segment as if it were a photo."""
    mode = image.GetMetaData(PHOTO_MODE_KEY) if image.HasMetaDataKey(PHOTO_MODE_KEY) else None
    ncomp = image.GetNumberOfComponentsPerPixel()
    if mode in _HIGH_DEPTH_PHOTO_MODES or (ncomp == 1 and image.GetPixelID() != sitk.sitkUInt8):
        if mode is None:
            arr = sitk.GetArrayViewFromImage(image)
            kind = f"{sitk.GetPixelIDValueAsString(image.GetPixelID())} image ({float(arr.min()):g}..{float(arr.max()):g})"
        else:
            kind = "16-bit or floating-point picture"
        raise InputError(f"{task.name} needs a colour fundus photograph, but the input is a single-channel {kind}, "
                         f"such as a CT or MR slice; choose the fundus photo (an 8-bit RGB PNG/JPG/TIFF) or pick a CT "
                         f"task")
    if ncomp >= 3 and image.GetPixelID() in (sitk.sitkVectorUInt8,):
        arr = sitk.GetArrayViewFromImage(image)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            warnings.append("the photo is greyscale; the model expects colour fundus photographs and may do worse")


# CT voxel spacing (mm) outside these bounds is a damaged header, not a scan
CT_SPACING_RANGE_MM = (0.05, 30.0)
# coarser than this is a usable but unusual CT
CT_COARSE_SPACING_MM = 10.0


def _check_ct_spacing(spacing, warnings: List[str]) -> None:
    shown = " x ".join(f"{float(v):.3g}" for v in spacing)
    lo, hi = CT_SPACING_RANGE_MM
    if min(spacing) < lo or max(spacing) > hi:
        raise InputError(f"the voxel spacing ({shown} mm) is not plausible for CT (each axis must be {lo:g} to {hi:g} "
                         f"mm), so volumes would be wrong; fix the spacing in the header or export the CT again")
    if max(spacing) > CT_COARSE_SPACING_MM:
        warnings.append(f"the voxel spacing ({shown} mm) is coarse: with voxels over {CT_COARSE_SPACING_MM:g} mm, "
                        f"volumes and small structures are less accurate")


def _check_ct_shape(dim, size, ncomp, task, warnings):
    if dim == 2:
        raise InputError(f"{task.name} needs a 3D CT volume, but the input is a 2D image (size {size}); "
                         f"load the CT series (DICOM folder, NRRD or NIfTI) or pick the retina task")
    if ncomp != 1:
        raise InputError(f"{task.name} needs a single-channel CT volume, but each voxel has {ncomp} components "
                         f"(colour or multi-channel image); load the original CT series")
    if size[2] == 1 and task.spatial_dims == 3:
        raise InputError(f"{task.name} needs a 3D CT volume, but the input has a single slice; "
                         f"load the whole series (the DICOM folder), not one file")


def _check_hu(arr: np.ndarray, lo: float, hi: float, warnings: List[str]) -> None:
    """CT in Hounsfield units has air near -1000 (padding may be -1024, -2048, -3024) and tissue -100..100."""
    if arr.dtype == np.uint8 or (lo >= 0 and hi <= 255):
        raise InputError(f"the image holds 8-bit values ({lo:g}..{hi:g}), not CT Hounsfield units; "
                         f"load the original CT (DICOM/NRRD/NIfTI in HU), not a screenshot or exported picture")
    if lo > -500:
        hint = ("; if it is a CT stored without its rescale intercept, subtract 1024"
                if lo >= -50 and 800 <= hi <= 5000 else "")
        raise InputError(f"the intensities ({lo:g}..{hi:g}) are not CT Hounsfield units (CT has air at about -1000 "
                         f"HU; this looks like MR or a normalised image){hint}; load a CT in HU")
    if lo < -10000 or hi > 60000:
        raise InputError(f"the intensities ({lo:g}..{hi:g}) are far outside the Hounsfield range; "
                         f"load a CT in HU (check the rescale slope/intercept)")
    if hi < 0:
        raise InputError(f"the image has no voxel above 0 HU ({lo:g}..{hi:g}), so it holds no soft tissue; "
                         f"choose the CT scan of the patient")
    # percentiles on a subsample: exact quantiles are not needed and the full volume would take seconds
    step = max(1, int(math.ceil((arr.size / 2e6) ** (1 / 3))))
    sub = arr[::step, ::step, ::step] if arr.ndim == 3 else arr
    p50 = float(np.percentile(sub, 50))
    if p50 > 400:
        warnings.append(f"the median intensity is {p50:.0f} HU, unusually high for CT; check that the image is in HU")
    if hi > 4000:
        warnings.append(f"the image has intensities up to {hi:.0f} HU (metal or extended-range CT); "
                        f"results near those voxels may be poor")
