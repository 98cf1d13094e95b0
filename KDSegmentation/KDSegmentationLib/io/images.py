"""Read input images with their geometry and check that they suit a task.

Volumes come back as SimpleITK images in LPS millimetres (origin, spacing (x, y, z), direction); photographs come back
as 2D images with 3-component uint8 pixels (RGB), spacing (1, 1) and origin (0, 0), which is what ITK (and therefore
3D Slicer) assigns to a photo. Arrays taken from these images are (z, y, x) or (y, x, channel).
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import re
import stat
import sys
import struct
import tempfile
import warnings as _pywarnings
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.errors import InputError

Warn = Optional[Callable[[str], None]]

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".gif")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima", "")

# Metadata key of photos read with Pillow: the file's Pillow mode (the pixels themselves are always RGB uint8)
PHOTO_MODE_KEY = "kdseg_photo_mode"

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
        _warn_fn(warn)(message)
    return image


def _read_image_checked(path: Path, warn: Callable[[str], None], task, max_voxels: int) -> sitk.Image:
    if path.is_dir():
        return read_dicom_folder(path, warn, task=task, max_voxels=max_voxels)
    ext = _suffix(path)
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


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line location; the reason is usually on the last line
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _read_with_sitk(path: Path, warn: Warn = None, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    _check_detached_data_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _library_output_to_log() as said:
            reader.ReadImageInformation()
        check_geometry(reader.GetSpacing(), reader.GetDirection(), path.name)
        if not _orthonormal_orientation(reader):
            raise InputError(f"{path.name} has sheared or scaled axes (its DICOM image orientation is not two "
                             f"orthogonal unit vectors), so positions and volumes would be wrong; export it again")
        check_size(reader.GetSize(), reader.GetNumberOfComponents(), task, max_voxels,
                   _component_bytes(reader.GetPixelID()))
        with _library_output_to_log() as said_reading:
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"cannot read {path.name}: the file is unreadable or corrupt ({_first_line(exc)}); "
            f"check the file or export it again (e.g. as NRRD from 3D Slicer)") from None
    if _suffix(path) in (".nii", ".nii.gz"):
        if "unexpected scales in sform" in said.text + said_reading.text:
            _warn_fn(warn)(f"the sform of {path.name} is not a rotation with the voxel spacing (sheared or scaled), so "
                           f"its qform was used; check the image's position and orientation")
        _check_nifti_data(path, image)
    return image


def _read_photo(path: Path, warn: Warn, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    """Photo -> 2D image of RGB uint8 pixels. The pixel grid is kept as stored (no EXIF rotation), as ITK/Slicer do.

    The Pillow mode of the file (e.g. ``L``, ``I;16``, ``F``) is kept in the image's metadata under
    :data:`PHOTO_MODE_KEY`, so that a task can tell a photograph from a 16-bit or float picture such as a CT slice.
    """
    from PIL import Image, UnidentifiedImageError

    frames = 1
    try:
        with _library_output_to_log(), _pywarnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; such a picture is no fundus photo either
            _pywarnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_size(im.size, 3, task, max_voxels, 1)
                frames = getattr(im, "n_frames", 1)
                mode = im.mode
                im.seek(0)
                rgb = _pil_to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path.name} claims more pixels than a photo can have ({_first_line(exc)}); it is damaged "
                         f"or a decompression bomb: use the original photo, downscaled if it is really that large") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise InputError(
            f"cannot read {path.name}: the photo is unreadable or corrupt ({_first_line(exc)}); "
            f"check the file or save it again as PNG") from None
    if frames > 1:
        _warn_fn(warn)(f"{path.name} holds {frames} frames; only the first one is used")
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
# validation before and after reading
# ---------------------------------------------------------------------------------------------------------------------
def _shown(path, limit: int = 160) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def check_input_type(path, what: str = "input") -> None:
    """Refuse anything but a regular file or a folder, before it is opened.

    Reading a named pipe or a socket blocks until someone writes to it, and a device such as /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot access {what} {_shown(path)} ({exc.strerror}); check the path and its permissions") \
            from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    raise InputError(f"{what} {_shown(path)} is {_special_kind(mode)}, not an image file or a folder; give an image "
                     f"file or a DICOM folder")


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _check_detached_data_file(path: Path) -> None:
    """A MetaImage or NRRD header may name its voxel file elsewhere; that file must be a regular file too."""
    if _suffix(path) not in (".mha", ".mhd", ".nhdr", ".nrrd"):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(65536).decode("latin-1")
    except OSError:
        return  # the reader reports it
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        head = re.split(r"\r?\n\r?\n", head, maxsplit=1)[0]  # the header ends at the first blank line
    found = re.search(r"^[ \t]*(?:ElementDataFile[ \t]*=|data ?file[ \t]*:)[ \t]*(.*?)[ \t]*$", head,
                      re.IGNORECASE | re.MULTILINE)
    value = found.group(1) if found else ""
    # LOCAL: data after the header; LIST or a printf pattern: several files, each opened by the reader itself
    if not value or value.upper() == "LOCAL" or value.upper().startswith("LIST") or "%" in value:
        return
    data = Path(value) if os.path.isabs(value) else path.parent / value
    if data.exists():
        check_input_type(data, what=f"the voxel data file named in {path.name},")


class _LibraryOutput:
    text = ""


_capturing = [0]


@contextlib.contextmanager
def _library_output_to_log():
    """Send what ITK, GDCM, niftilib, VNL and Pillow print while reading to the debug log instead of stderr.

    These libraries write warnings straight to file descriptor 2 (or as Python warnings); on stderr they would break
    the one-line error that a refused input must give. The captured text is kept in ``.text`` for the caller.
    """
    out = _LibraryOutput()
    if _capturing[0]:
        yield out
        return
    _capturing[0] += 1
    itk_display = sitk.ProcessObject.GetGlobalWarningDisplay()
    saved_fd, tmp, caught = None, None, []
    try:
        try:
            sys.stderr.flush()
            tmp = tempfile.TemporaryFile()
            saved_fd = os.dup(2)
            os.dup2(tmp.fileno(), 2)
        except (OSError, ValueError, AttributeError):
            # no stderr descriptor to redirect (e.g. inside an application): at least keep ITK quiet
            saved_fd = None
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        with _pywarnings.catch_warnings(record=True) as caught:
            _pywarnings.simplefilter("always")
            yield out
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        sitk.ProcessObject.SetGlobalWarningDisplay(itk_display)
        text = ""
        if tmp is not None:
            tmp.seek(0)
            text = tmp.read(1 << 16).decode("utf-8", "replace")
            tmp.close()
        text += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught or ())
        out.text = text
        if text.strip():
            _log.debug("library output while reading: %s", text.strip())
        _capturing[0] -= 1


def check_geometry(spacing, direction, name: str = "the image") -> None:
    """Refuse a voxel spacing that is not a positive number and a direction matrix that is not orthonormal.

    Volumes are counted as voxels times the product of the spacings, and Slicer places the result with these
    directions: with sheared or scaled axes both would be wrong.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(f"{name} has an invalid voxel spacing {tuple(float(v) for v in spacing)}; fix the spacing in "
                         f"the header or export the image again")
    d = len(spacing)
    m = np.asarray(direction, dtype=np.float64)
    if m.size != d * d or not np.isfinite(m).all():
        raise InputError(f"{name} has an invalid direction matrix; fix the header or export the image again")
    m = m.reshape(d, d)
    err = float(np.abs(m.T @ m - np.eye(d)).max())
    if err > 1e-3:
        cosines = ", ".join(f"{float(v):.3g}" for v in m.ravel())
        raise InputError(f"{name} has sheared or scaled axes (direction matrix {cosines} is not orthonormal), so "
                         f"positions and volumes would be wrong; resample it onto an orthogonal grid (e.g. with "
                         f"Resample Scalar Volume in 3D Slicer) or fix its header")


def _component_bytes(pixel_id: int) -> int:
    name = sitk.GetPixelIDValueAsString(pixel_id)
    for key, size in (("64-bit", 8), ("32-bit", 4), ("16-bit", 2), ("8-bit", 1)):
        if key in name:
            return size * (2 if "complex" in name else 1)
    return 4


# the fewest classes of any task (background and one structure), for a size check made before the task is known
_FEWEST_CLASSES = 2


def check_size(size, components: int = 1, task=None, max_voxels: int = DEFAULT_MAX_VOXELS,
               component_bytes: int = 4) -> None:
    """Refuse an image of ``size`` (from its header) that is larger than ``max_voxels`` or than the free memory.

    Called before the voxels are read: a header may announce any size, and reading it first could exhaust memory.
    """
    nvox = math.prod(int(v) for v in size)
    comps = max(1, int(components))
    classes = task.num_classes if task is not None else _FEWEST_CLASSES
    est = max(nvox * comps * 4 * (2 + classes), nvox * comps * component_bytes)
    avail = _available_memory_bytes()
    if nvox > max_voxels or (avail is not None and est > avail):
        limit = f"{max_voxels:,} voxels" if nvox > max_voxels else f"the {_gb(avail)} of free memory"
        raise InputError(f"the image is too large ({nvox:,} voxels, about {_gb(est)} for float32 processing, more than "
                         f"{limit}); crop or downsample it first (e.g. Crop Volume in 3D Slicer)")


# NIfTI datatype code -> bytes per voxel
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16,
                1792: 16, 2048: 32, 2304: 4}
# floating-point codes -> numpy type of one float (complex voxels are checked as pairs of floats)
_NIFTI_FLOATS = {16: "f4", 32: "f4", 64: "f8", 1792: "f8"}
# integer codes -> numpy type of one stored component (RGB and RGBA as bytes)
_NIFTI_INTEGERS = {2: "u1", 4: "i2", 8: "i4", 128: "u1", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8",
                   2304: "u1"}


def _nifti_header(path: Path, gz: bool) -> Optional[dict]:
    """The fields of a NIfTI-1/2 header that say how many voxel bytes follow where; None if it cannot be parsed."""
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(544)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype = struct.unpack(order + "h", head[70:72])[0]
            offset = struct.unpack(order + "f", head[108:112])[0]
            slope, inter = struct.unpack(order + "2f", head[112:120])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype = struct.unpack(order + "h", head[12:14])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            slope, inter = struct.unpack(order + "2d", head[176:192])
            break
    else:
        return None
    ndim = dims[0]
    if not (1 <= ndim <= 7 and datatype in _NIFTI_BYTES and math.isfinite(offset) and offset >= 0
            and all(v >= 1 for v in dims[1:ndim + 1])):
        return None
    nbytes = math.prod(int(v) for v in dims[1:ndim + 1]) * _NIFTI_BYTES[datatype]
    unscaled = slope in (0.0, 1.0) and inter == 0.0
    return {"order": order, "datatype": datatype, "offset": int(offset), "nbytes": nbytes, "unscaled": unscaled}


def _check_nifti_data(path: Path, image: sitk.Image) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header says or holds NaN/infinite floats.

    Why here: ITK's NIfTI reader (niftilib) silently sets missing voxels and non-finite floats to 0, which would give
    a plausible but wrong result. Checking costs almost nothing for integer data (a truncated gzip stream is caught by
    its trailer and by the zero-filled last voxel); only doubtful cases and float data holding zeros are inflated
    again in full.
    """
    gz = path.name.lower().endswith(".gz")
    hdr = _nifti_header(path, gz)
    if hdr is None:
        return
    need = hdr["offset"] + hdr["nbytes"]
    order, dt = hdr["order"], hdr["datatype"]
    fdtype = np.dtype(order + _NIFTI_FLOATS[dt]) if dt in _NIFTI_FLOATS else None
    # niftilib writes 0 for each non-finite float (then scales it): only a float image holding that value can hide one
    scan_floats = fdtype is not None and (not hdr["unscaled"] or _holds_zero(image))
    got, bad = None, 0
    if not gz:
        got = path.stat().st_size
        if got >= need and scan_floats:
            bad = _nonfinite_in_file(path, hdr["offset"], hdr["nbytes"], fdtype)
    elif scan_floats or not (_gzip_isize(path) == need % (1 << 32) and _last_byte_nonzero(image, hdr)):
        got, bad = _inflate_nifti(path, hdr["offset"], hdr["nbytes"], fdtype if scan_floats else None)
    if got is not None and got < need:
        have = max(0, got - hdr["offset"])
        raise InputError(f"{path.name} is truncated: it holds {have:,} of the {hdr['nbytes']:,} bytes of voxel data "
                         f"its header announces (an interrupted download or copy); copy or export the file again")
    if bad:
        raise InputError(f"{path.name} contains {bad:,} NaN or infinite voxel values; fix or re-export the image "
                         f"(e.g. replace NaN by the background value)")


def _holds_zero(image: sitk.Image) -> bool:
    return bool((sitk.GetArrayViewFromImage(image) == 0).any())


def _gzip_isize(path: Path) -> Optional[int]:
    """The uncompressed size (mod 2**32) in the gzip trailer, which a cut file lacks."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    except (OSError, struct.error):
        return None


def _last_byte_nonzero(image: sitk.Image, hdr: dict) -> bool:
    """True when the last byte of voxel data was read from the file: niftilib zero-fills whatever the stream lacks."""
    dt = hdr["datatype"]
    if not hdr["unscaled"] or dt not in _NIFTI_INTEGERS:
        return False
    arr = sitk.GetArrayViewFromImage(image)
    stored = np.dtype(hdr["order"] + _NIFTI_INTEGERS[dt])
    if arr.size == 0 or arr.dtype.itemsize != stored.itemsize:
        return False
    return np.asarray(arr.reshape(-1)[-1]).astype(stored).tobytes()[-1] != 0


def _count_nonfinite(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _nonfinite_in_file(path: Path, offset: int, nbytes: int, fdtype: np.dtype) -> int:
    count = nbytes // fdtype.itemsize
    data = np.memmap(path, dtype=fdtype, mode="r", offset=offset, shape=(count,))
    step = 1 << 23
    bad = sum(_count_nonfinite(data[i:i + step]) for i in range(0, count, step))
    del data
    return bad


def _inflate_nifti(path: Path, offset: int, nbytes: int, fdtype: Optional[np.dtype]) -> Tuple[int, int]:
    """Inflate a .nii.gz up to the end of its voxel data: (bytes obtained, non-finite floats among the voxels).

    Concatenated gzip members are followed, as zlib's reader does; trailing bytes that are no gzip member are
    ignored.
    """
    need = offset + nbytes
    got, bad, carry = 0, 0, b""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        with open(path, "rb") as f:
            pending = b""
            while got < need:
                if not pending:
                    pending = f.read(1 << 20)
                    if not pending:
                        break
                if inflater.eof:
                    if not pending.startswith(b"\x1f\x8b"):
                        break
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = inflater.decompress(pending, 1 << 24)
                pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                if fdtype is not None and out:
                    lo, hi = max(offset - got, 0), min(need - got, len(out))
                    if hi > lo:
                        piece = carry + out[lo:hi]
                        whole = len(piece) - len(piece) % fdtype.itemsize
                        bad += _count_nonfinite(np.frombuffer(piece, fdtype, whole // fdtype.itemsize))
                        carry = piece[whole:]
                got += len(out)
    except zlib.error as exc:
        raise InputError(f"cannot read {path.name}: the compressed data is corrupt ({exc}); copy or export the file "
                         f"again") from None
    return got, bad


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


def _slice_info(files: Sequence[str], failed: Optional[List[str]] = None, sheared: Optional[List[str]] = None):
    reader = sitk.ImageFileReader()
    infos = []
    for f in files:
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            if failed is not None:
                failed.append(f)
            continue
        if sheared is not None and not _orthonormal_orientation(reader):
            sheared.append(f)
        infos.append((f, np.array(reader.GetOrigin()), np.array(reader.GetDirection()).reshape(3, 3),
                      tuple(reader.GetSize()[:2])))
    return infos


def _orthonormal_orientation(reader: sitk.ImageFileReader) -> bool:
    """Whether the slice's Image Orientation (Patient) holds two orthogonal unit vectors.

    GDCM silently replaces other orientations with orthonormal ones, which would place and measure the slices wrong.
    """
    if not reader.HasMetaDataKey("0020|0037"):
        return True
    try:
        values = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    except ValueError:
        return False
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return False
    row, col = np.array(values[:3]), np.array(values[3:])
    return max(abs(float(row @ row) - 1), abs(float(col @ col) - 1), abs(float(row @ col))) <= 1e-3


def _names(files: Sequence[str], most: int = 5) -> str:
    return ", ".join(Path(f).name for f in files[:most]) + (" ..." if len(files) > most else "")


def _dicom_uid(head: bytes, tag: bytes) -> Optional[str]:
    """First value of a UID element (explicit or implicit VR, little endian) in the raw bytes of a DICOM file."""
    i = head.find(tag)
    while 0 <= i <= len(head) - 8:
        if head[i + 4:i + 6] == b"UI":
            n, start = struct.unpack("<H", head[i + 6:i + 8])[0], i + 8
        else:
            n, start = struct.unpack("<I", head[i + 4:i + 8])[0], i + 8
        if 0 < n <= 64:
            return head[start:start + n].rstrip(b"\0 ").decode("ascii", "replace")
        i = head.find(tag, i + 1)
    return None


def _unreadable_series_files(dirpath: str, uid: str, sop_class: Optional[str], listed: set) -> List[str]:
    """Files in the series' folder that carry its series and SOP class UIDs but that GDCM could not take in.

    GDCM leaves a damaged slice (e.g. a truncated copy) out of the series without a word; the series would then
    look complete with one slice less, or have a gap.
    """
    broken = []
    for name in sorted(os.listdir(dirpath)):
        full = os.path.normpath(os.path.join(dirpath, name))
        if full in listed or name.upper() == "DICOMDIR":
            continue
        try:
            if not stat.S_ISREG(os.stat(full).st_mode):
                continue
            with open(full, "rb") as f:
                head = f.read(1 << 16)
        except OSError:
            continue
        if uid.encode() not in head:
            continue
        if sop_class is not None and _dicom_uid(head, b"\x08\x00\x16\x00") not in (sop_class, None):
            continue  # another kind of object that refers to the series (a segmentation, a report...)
        broken.append(full)
    return broken


def _regular_slices(pos: np.ndarray, files: List[str], where: str) -> Tuple[List[str], List[str]]:
    """Slices (sorted by position, mm) on one regular grid -> (kept files, left-out files).

    Left out, with the caller's warning: slices off the grid, and one or two slices far beyond either end (a stray
    slice of another range). Refused: two slices at one position, and missing slices inside the series.
    """
    n = len(pos)
    steps = np.diff(pos)
    positive = steps[steps > 0.01]  # DICOM positions are precise to about 1e-3 mm
    if positive.size == 0:
        raise InputError(f"all {n} slices of the DICOM series in {where} are at the same position; the folder does "
                         f"not hold a volume: export the series again")
    step = float(np.median(positive))
    tol = 0.05  # of a slice step
    best = None
    for a in (range(n) if n <= 200 else np.linspace(0, n - 1, 200).astype(int)):
        r = (pos - pos[a]) / step
        on = np.abs(r - np.rint(r)) <= tol
        if best is None or on.sum() > best[1].sum():
            best = (a, on)
    anchor, on = best
    idx = np.flatnonzero(on)
    k = np.rint((pos[idx] - pos[anchor]) / step).astype(np.int64)
    off_grid = [files[i] for i in np.flatnonzero(~on)]
    same = np.flatnonzero(np.diff(k) == 0)
    if same.size:
        i, j = idx[same[0]], idx[same[0] + 1]
        raise InputError(f"slices {Path(files[i]).name} and {Path(files[j]).name} of the DICOM series in {where} are "
                         f"at the same position ({pos[i]:.2f} mm): the folder mixes two acquisitions or holds a copy "
                         f"of a slice; export the one series again")
    blocks = np.split(np.arange(len(k)), np.flatnonzero(np.diff(k) > 1) + 1)
    strays: List[int] = []
    while len(blocks) > 1:
        largest = max(len(b) for b in blocks)
        first_gap = k[blocks[1][0]] - k[blocks[0][-1]] - 1
        last_gap = k[blocks[-1][0]] - k[blocks[-2][-1]] - 1
        if len(blocks[0]) <= 2 and 4 * len(blocks[0]) <= largest and first_gap >= 5:
            strays += list(blocks.pop(0))
        elif len(blocks[-1]) <= 2 and 4 * len(blocks[-1]) <= largest and last_gap >= 5:
            strays += list(blocks.pop())
        else:
            break
    if len(blocks) > 1:
        gaps = [(k[b[0]] - k[a[-1]] - 1, a[-1], b[0]) for a, b in zip(blocks[:-1], blocks[1:])]
        missing, left, right = gaps[0]
        i, j = idx[left], idx[right]
        more = (f" ({sum(g[0] for g in gaps)} slices missing in {len(gaps)} gaps)" if len(gaps) > 1 else "")
        raise InputError(f"the DICOM series in {where} is incomplete: {missing} slice(s) missing between "
                         f"{pos[i]:.2f} mm ({Path(files[i]).name}) and {pos[j]:.2f} mm ({Path(files[j]).name}), "
                         f"{step:.3g} mm apart{more}; copy or export the complete series again")
    kept = [files[idx[m]] for b in blocks for m in b]
    return kept, off_grid + [files[idx[m]] for m in strays]


def read_dicom_folder(folder, warn: Warn = None, task=None, max_voxels: int = DEFAULT_MAX_VOXELS) -> sitk.Image:
    """Load the DICOM series with the most files under ``folder`` on one regular slice grid.

    Slices of another size or orientation (a localiser), slices off the grid and one or two isolated slices far
    beyond an end of the series are left out, and ``warn`` says which files. A series with a missing, duplicated or
    unreadable slice is refused, naming the positions and files: on a regular grid the anatomy around the gap would
    be misplaced or lost. The size is checked from the headers before any pixel data is read.
    """
    folder = Path(folder)
    w = _warn_fn(warn)
    _check_folder_entries(folder)
    try:
        with _library_output_to_log():
            series = _series_in_folder(folder)
    except RuntimeError as exc:
        raise InputError(f"cannot scan DICOM folder {folder}: {_first_line(exc)}; check the folder") from None
    if not series:
        raise InputError(f"no DICOM series found in {folder}; choose a folder that holds the DICOM files of one scan")
    (dirpath, uid), files = max(series.items(), key=lambda kv: len(kv[1]))
    if len(series) > 1:
        w(f"{len(series)} DICOM series found in {folder.name}; loading the largest ({len(files)} files, series {uid})")

    failed: List[str] = []
    sheared: List[str] = []
    with _library_output_to_log():
        infos = _slice_info(files, failed, sheared)
    if failed:
        raise InputError(f"{len(failed)} file(s) of the DICOM series in {folder.name} cannot be read: "
                         f"{_names(failed)}; copy or export the series again")
    if sheared:
        raise InputError(f"the DICOM series in {folder.name} has sheared or scaled axes (the image orientation of "
                         f"{_names(sheared, 2)} is not two orthogonal unit vectors), so positions and volumes would be "
                         f"wrong; export the series again or resample it onto an orthogonal grid")
    if not infos:
        raise InputError(f"the DICOM files in {folder} are unreadable or corrupt; export the series again")
    listed = {os.path.normpath(f) for names in series.values() for f in names}
    broken = _unreadable_series_files(dirpath, uid, _sop_class(infos[0][0]), listed)
    if broken:
        raise InputError(f"{len(broken)} file(s) of the DICOM series in {folder.name} are damaged and cannot be read: "
                         f"{_names(broken)}; copy or export the series again")
    check_geometry((1.0, 1.0, 1.0), infos[0][2].ravel(), f"the DICOM series in {folder.name}")
    if len(infos) > 1:
        # keep the slices that share the majority's in-plane size and orientation (drops localisers)
        keys = [(size, tuple(np.round(d[:, :2].ravel(), 4))) for _f, _o, d, size in infos]
        major = max(set(keys), key=keys.count)
        kept = [info for info, k in zip(infos, keys) if k == major]
        normal = kept[0][2][:, 2]
        kept.sort(key=lambda t: float(np.dot(t[1], normal)))
        pos = np.array([float(np.dot(t[1], normal)) for t in kept])
        run, _left_out = _regular_slices(pos, [f for f, *_ in kept], folder.name)
        dropped = sorted(set(f for f, *_ in infos) - set(run))
        if dropped:
            w(f"left out {len(dropped)} DICOM slice(s) that are off the regular slice grid of the series: "
              f"{_names(dropped)}")
        files = run
    check_size((*infos[0][3], len(files)), 1, task, max_voxels, 2)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _library_output_to_log():
            image = reader.Execute()
    except RuntimeError as exc:
        bad = _first_unreadable(files)
        which = f"{Path(bad).name} cannot be read" if bad else _first_line(exc)
        raise InputError(f"cannot read the DICOM series in {folder}: {which}; export the series again") from None
    check_geometry(image.GetSpacing(), image.GetDirection(), f"the DICOM series in {folder.name}")
    return image


def _check_folder_entries(folder: Path) -> None:
    """Refuse a folder holding a pipe, socket or device: GDCM's scan opens every entry, and with such an entry present
    it was seen to leave ordinary slices out of the series."""
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            full = os.path.join(dirpath, name)
            try:
                mode = os.stat(full).st_mode
            except OSError:
                continue  # a dangling link: nothing to read
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputError(f"{_shown(os.path.relpath(full, folder))} in the DICOM folder {folder.name} is "
                                 f"{_special_kind(mode)}, not a file; remove it or choose the folder of the scan's "
                                 f"files only")


def _sop_class(path: str) -> Optional[str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with _library_output_to_log():
            reader.ReadImageInformation()
        return reader.GetMetaData("0008|0016").rstrip("\0 ") if reader.HasMetaDataKey("0008|0016") else None
    except RuntimeError:
        return None


def _first_unreadable(files: Sequence[str]) -> Optional[str]:
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(f)
        try:
            with _library_output_to_log():
                reader.Execute()
        except RuntimeError:
            return f
    return None


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
    check_geometry(image.GetSpacing(), image.GetDirection())
    if task.input_kind == "2d-rgb":
        _check_photo(dim, size, ncomp, task, warnings)
        _check_photo_pixels(image, task, warnings)
    else:
        _check_ct_shape(dim, size, ncomp, task, warnings)
        _check_ct_spacing(image.GetSpacing(), warnings)

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
