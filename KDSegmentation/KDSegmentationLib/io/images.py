"""Read input images with their geometry and check that they suit a task.

Volumes come back as SimpleITK images in LPS millimetres (origin, spacing (x, y, z), direction); photographs come back
as 2D images with 3-component uint8 pixels (RGB), spacing (1, 1) and origin (0, 0), which is what ITK (and therefore
3D Slicer) assigns to a photo. Arrays taken from these images are (z, y, x) or (y, x, channel).
"""
from __future__ import annotations

import struct
import warnings as _pywarnings
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.dicom import orthonormal_orientation, read_dicom_folder
from KDSegmentationLib.io.input_checks import (DEFAULT_MAX_VOXELS, DICOM_EXTENSIONS, PHOTO_EXTENSIONS, PHOTO_MODE_KEY,
                                              VOLUME_EXTENSIONS, Warn, check_detached_data_file, check_geometry,
                                              check_input_type, check_nifti_data, check_size, component_bytes,
                                              first_line, image_suffix, library_output_to_log, warn_fn)


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------
def read_image(path, warn: Warn = None, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    """Read a volume, a DICOM series folder, a single DICOM file or a photograph.

    ``warn(message)`` receives soft problems (e.g. a stray DICOM slice that was left out); they are given only once
    the image is accepted, so that a refused input is reported in one line.
    Raises :class:`InputError` with a one-line message for a missing, unreadable, unsupported, incomplete or
    geometrically invalid input. The header is checked before any voxel is read: an image larger than ``max_voxels``
    or than the free memory (estimated for ``task`` when given) is refused without reading it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}; check the path (a volume file, a photo or a DICOM folder)")
    check_input_type(path)
    pending: List[str] = []
    image = _read_image_checked(path, pending.append, task, max_voxels)
    for message in pending:
        warn_fn(warn)(message)
    return image


def _read_image_checked(path: Path, warn: Callable[[str], None], task, max_voxels: int) -> sitk.Image:
    if path.is_dir():
        return read_dicom_folder(path, warn, task=task, max_voxels=max_voxels)
    ext = image_suffix(path)
    if ext in PHOTO_EXTENSIONS:
        return _read_photo(path, warn, task=task, max_voxels=max_voxels)
    if ext in VOLUME_EXTENSIONS:
        return _read_with_sitk(path, warn, task=task, max_voxels=max_voxels)
    if ext in DICOM_EXTENSIONS or _looks_like_dicom(path):
        return _read_with_sitk(path, warn, task=task, max_voxels=max_voxels)
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


def _read_with_sitk(path: Path, warn: Warn = None, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    check_detached_data_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with library_output_to_log() as said:
            reader.ReadImageInformation()
        check_geometry(reader.GetSpacing(), reader.GetDirection(), path.name)
        if not orthonormal_orientation(reader):
            raise InputError(f"{path.name} has sheared or scaled axes (its DICOM image orientation is not two "
                             f"orthogonal unit vectors), so positions and volumes would be wrong; export it again")
        check_size(reader.GetSize(), reader.GetNumberOfComponents(), task, max_voxels,
                   component_bytes(reader.GetPixelID()))
        with library_output_to_log() as said_reading:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"cannot read {path.name}: the file is unreadable or corrupt ({first_line(exc)}); "
            f"check the file or export it again (e.g. as NRRD from 3D Slicer)") from None
    if image_suffix(path) in (".nii", ".nii.gz"):
        if "unexpected scales in sform" in said.text + said_reading.text:
            warn_fn(warn)(f"the sform of {path.name} is not a rotation with the voxel spacing (sheared or scaled), so "
                           f"its qform was used; check the image's position and orientation")
        check_nifti_data(path, image)
    return image


def _read_photo(path: Path, warn: Warn, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    """Photo -> 2D image of RGB uint8 pixels. The pixel grid is kept as stored (no EXIF rotation), as ITK/Slicer do.

    The Pillow mode of the file (e.g. ``L``, ``I;16``, ``F``) is kept in the image's metadata under
    :data:`PHOTO_MODE_KEY`, so that a task can tell a photograph from a 16-bit or float picture such as a CT slice.
    """
    from PIL import Image, UnidentifiedImageError

    frames = 1
    try:
        with library_output_to_log(), _pywarnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; such a picture is no fundus photo either
            _pywarnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_size(im.size, 3, task, max_voxels, 1)
                frames = getattr(im, "n_frames", 1)
                mode = im.mode
                im.seek(0)
                rgb = _pil_to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path.name} claims more pixels than a photo can have ({first_line(exc)}); it is damaged "
                         f"or a decompression bomb: use the original photo, downscaled if it is really that large") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise InputError(
            f"cannot read {path.name}: the photo is unreadable or corrupt ({first_line(exc)}); "
            f"check the file or save it again as PNG") from None
    if frames > 1:
        warn_fn(warn)(f"{path.name} holds {frames} frames; only the first one is used")
    photo = array_to_photo(rgb)
    photo.SetMetaData(PHOTO_MODE_KEY, mode)
    return photo


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: stretch to 8 bits (Pillow's convert("RGB") would clip, not scale)
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InputError("the picture holds NaN or infinite pixel values; save the photo again as an 8-bit PNG "
                             "or JPG")
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    # palette, grey, RGBA, LA, CMYK...: convert("RGB") drops alpha and repeats grey to three channels
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


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


