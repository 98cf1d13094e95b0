"""Read input images with their geometry and check that they suit a task.

Volumes come back as SimpleITK images in LPS millimetres (origin, spacing (x, y, z), direction); photographs come back
as 2D images with 3-component uint8 pixels (RGB), spacing (1, 1) and origin (0, 0), which is what ITK (and therefore
3D Slicer) assigns to a photo. Arrays taken from these images are (z, y, x) or (y, x, channel).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

Warn = Optional[Callable[[str], None]]

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".gif")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima", "")

# Default ceiling for check_image_for_task: 400 M voxels is 1.6 GB per float32 copy (e.g. 512 x 512 x 1500).
DEFAULT_MAX_VOXELS = 400_000_000

_log = logging.getLogger(__name__)


def _warn_fn(warn: Warn) -> Callable[[str], None]:
    return warn if warn is not None else _log.warning


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in VOLUME_EXTENSIONS + PHOTO_EXTENSIONS + DICOM_EXTENSIONS[:-1]:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------
def read_image(path, warn: Warn = None) -> sitk.Image:
    """Read a volume, a DICOM series folder, a single DICOM file or a photograph.

    ``warn(message)`` receives soft problems (e.g. a stray DICOM slice that was left out).
    Raises :class:`InputError` with a one-line message for a missing, unreadable or unsupported input.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}; check the path (a volume file, a photo or a DICOM folder)")
    if path.is_dir():
        return read_dicom_folder(path, warn)
    ext = _suffix(path)
    if ext in PHOTO_EXTENSIONS:
        return _read_photo(path, warn)
    if ext in VOLUME_EXTENSIONS:
        return _read_with_sitk(path)
    if ext in DICOM_EXTENSIONS or _looks_like_dicom(path):
        return _read_with_sitk(path)
    raise InputError(
        f"unsupported file type {path.suffix or path.name!r} for {path.name}; use NRRD, NIfTI, MHA/MHD, a DICOM folder "
        f"or a PNG/JPG/TIFF/PPM/GIF photo")


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line location; the reason is usually on the last line
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _read_with_sitk(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(
            f"cannot read {path.name}: the file is unreadable or corrupt ({_first_line(exc)}); "
            f"check the file or export it again (e.g. as NRRD from 3D Slicer)") from None


def _read_photo(path: Path, warn: Warn) -> sitk.Image:
    """Photo -> 2D image of RGB uint8 pixels. The pixel grid is kept as stored (no EXIF rotation), as ITK/Slicer do."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                _warn_fn(warn)(f"{path.name} holds {im.n_frames} frames; only the first one is used")
            im.seek(0)
            rgb = _pil_to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"cannot read {path.name}: the photo is unreadable or corrupt ({_first_line(exc)}); "
            f"check the file or save it again as PNG") from None
    return array_to_photo(rgb)


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: stretch to 8 bits (Pillow's convert("RGB") would clip, not scale)
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    # palette, grey, RGBA, LA, CMYK...: convert("RGB") drops alpha and repeats grey to three channels
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------------------------------
def _series_in_folder(folder: Path) -> Dict[Tuple[str, str], List[str]]:
    """(directory, series UID) -> file names, for the folder and its sub-folders."""
    found: Dict[Tuple[str, str], List[str]] = {}
    for dirpath, _dirs, files in os.walk(folder):
        if not files:
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath) or ():
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, uid)
            if names:
                found[(dirpath, uid)] = list(names)
    return found


def _slice_info(files: Sequence[str]):
    reader = sitk.ImageFileReader()
    infos = []
    for f in files:
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        infos.append((f, np.array(reader.GetOrigin()), np.array(reader.GetDirection()).reshape(3, 3),
                      tuple(reader.GetSize()[:2])))
    return infos


def _longest_even_run(pos: np.ndarray) -> Tuple[int, int]:
    """Longest run [start, stop) of sorted positions (mm) with one constant gap (> 0)."""
    best = (0, min(1, len(pos)))
    start = 0
    while start < len(pos) - 1:
        gap = pos[start + 1] - pos[start]
        stop = start + 1
        if gap > 1e-3:
            tol = max(1e-3, 0.01 * gap)
            while stop < len(pos) - 1 and abs((pos[stop + 1] - pos[stop]) - gap) <= tol:
                stop += 1
            if stop + 1 - start > best[1] - best[0]:
                best = (start, stop + 1)
        start = stop
    return best


def read_dicom_folder(folder, warn: Warn = None) -> sitk.Image:
    """Load the DICOM series with the most files under ``folder`` on one regular slice grid.

    Slices whose position breaks the even spacing (a stray localiser, a slice 60 mm away, a duplicate) are left out:
    the longest evenly spaced run is kept and ``warn`` says which files were dropped.
    """
    folder = Path(folder)
    w = _warn_fn(warn)
    try:
        series = _series_in_folder(folder)
    except RuntimeError as exc:
        raise InputError(f"cannot scan DICOM folder {folder}: {_first_line(exc)}; check the folder") from None
    if not series:
        raise InputError(f"no DICOM series found in {folder}; choose a folder that holds the DICOM files of one scan")
    (_dir, uid), files = max(series.items(), key=lambda kv: len(kv[1]))
    if len(series) > 1:
        w(f"{len(series)} DICOM series found in {folder.name}; loading the largest ({len(files)} files, series {uid})")

    infos = _slice_info(files)
    if not infos:
        raise InputError(f"the DICOM files in {folder} are unreadable or corrupt; export the series again")
    if len(infos) > 1:
        # keep the slices that share the majority's in-plane size and orientation (drops localisers)
        keys = [(size, tuple(np.round(d[:, :2].ravel(), 4))) for _f, _o, d, size in infos]
        major = max(set(keys), key=keys.count)
        kept = [info for info, k in zip(infos, keys) if k == major]
        normal = kept[0][2][:, 2]
        kept.sort(key=lambda t: float(np.dot(t[1], normal)))
        pos = np.array([float(np.dot(t[1], normal)) for t in kept])
        a, b = _longest_even_run(pos)
        run = kept[a:b]
        dropped = sorted(set(f for f, *_ in infos) - set(f for f, *_ in run))
        if dropped:
            names = ", ".join(Path(f).name for f in dropped[:5]) + (" ..." if len(dropped) > 5 else "")
            w(f"left out {len(dropped)} DICOM slice(s) that are off the regular slice grid of the series: {names}")
        files = [f for f, *_ in run]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {_first_line(exc)}; "
                         f"export the series again") from None


# ---------------------------------------------------------------------------------------------------------------------
# photos
# ---------------------------------------------------------------------------------------------------------------------
def photo_to_array(image: sitk.Image) -> np.ndarray:
    """2D photo (or a single-slice 3D volume as Slicer saves a photo) -> (H, W, 3) uint8 RGB array.

    Grey images are repeated to three channels, alpha is dropped, 16-bit and float pixels are scaled to 0..255.
    """
    if image.GetDimension() == 3:
        if image.GetSize()[2] != 1:
            raise ValueError(f"expected a 2D photo or a single-slice volume, got size {image.GetSize()}")
        image = image[:, :, 0]
    if image.GetDimension() != 2:
        raise ValueError(f"expected a 2D photo, got a {image.GetDimension()}D image")
    a = sitk.GetArrayFromImage(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 2:  # grey + alpha
        a = np.repeat(a[..., :1], 3, axis=2)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
        a = a * 255.0
    elif a.dtype == np.uint16 or (a.size and float(a.max()) > 255):
        a = a.astype(np.float64) * (255.0 / max(float(a.max()), 1.0))
    return np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)


def array_to_photo(arr: np.ndarray, reference: Optional[sitk.Image] = None) -> sitk.Image:
    """(H, W, C) array -> 2D image with C-component pixels; (H, W) -> scalar 2D image (e.g. a labelmap).

    With ``reference`` the origin, spacing and direction are copied from it; a single-slice 3D reference
    (Slicer's photo volume) gives a single-slice 3D result.
    """
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, C) array, got shape {arr.shape}")
    vector = arr.ndim == 3
    if reference is not None and reference.GetDimension() == 3:
        img = sitk.GetImageFromArray(arr[None], isVector=vector)
    else:
        img = sitk.GetImageFromArray(arr, isVector=vector)
    if reference is not None:
        if tuple(img.GetSize()) != tuple(reference.GetSize()):
            raise ValueError(f"array size {img.GetSize()} does not match the reference size {reference.GetSize()}")
        img.CopyInformation(reference)
    return img


# ---------------------------------------------------------------------------------------------------------------------
# suitability for a task
# ---------------------------------------------------------------------------------------------------------------------
def estimate_memory_bytes(image: sitk.Image, task) -> int:
    """Rough peak memory of processing ``image`` for ``task``: float32 input + one working copy + class maps."""
    n = int(np.prod(image.GetSize(), dtype=np.int64)) * max(1, image.GetNumberOfComponentsPerPixel())
    return n * 4 * (2 + task.num_classes)


def _available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


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
    if task.input_kind == "2d-rgb":
        _check_photo(dim, size, ncomp, task, warnings)
    else:
        _check_ct_shape(dim, size, ncomp, task, warnings)

    nvox = int(np.prod(size, dtype=np.int64))
    est = estimate_memory_bytes(image, task)
    avail = _available_memory_bytes()
    if nvox > max_voxels or (avail is not None and est > avail):
        limit = f"{max_voxels:,} voxels" if nvox > max_voxels else f"the {_gb(avail)} of free memory"
        raise InputError(f"the image is too large ({nvox:,} voxels, about {_gb(est)} for float32 processing, more than "
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
