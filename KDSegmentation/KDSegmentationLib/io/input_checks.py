"""Checks made on an input before and after its voxels are read: file type, geometry, size, NIfTI completeness.

Every refusal is an :class:`InputError` with one line saying what is wrong and what to do; library messages (ITK,
Pillow, numpy) are captured so that they never break that line.
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
from typing import Callable, Optional, Tuple

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


def warn_fn(warn: Warn) -> Callable[[str], None]:
    return warn if warn is not None else _log.warning


def image_suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in VOLUME_EXTENSIONS + PHOTO_EXTENSIONS + DICOM_EXTENSIONS[:-1]:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line location; the reason is usually on the last line
    return (lines[-1] if lines else type(exc).__name__)[:200]


# ---------------------------------------------------------------------------------------------------------------------
# validation before and after reading
# ---------------------------------------------------------------------------------------------------------------------
def shown_path(path, limit: int = 160) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def check_input_type(path, what: str = "input") -> None:
    """Refuse anything but a regular file or a folder, before it is opened.

    Reading a named pipe or a socket blocks until someone writes to it, and a device such as /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot access {what} {shown_path(path)} ({exc.strerror}); check the path and its permissions") \
            from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    raise InputError(f"{what} {shown_path(path)} is {special_kind(mode)}, not an image file or a folder; give an image "
                     f"file or a DICOM folder")


def special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_detached_data_file(path: Path) -> None:
    """A MetaImage or NRRD header may name its voxel file elsewhere; that file must be a regular file too."""
    if image_suffix(path) not in (".mha", ".mhd", ".nhdr", ".nrrd"):
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
def library_output_to_log():
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


def component_bytes(pixel_id: int) -> int:
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
    avail = available_memory_bytes()
    if nvox > max_voxels or (avail is not None and est > avail):
        limit = f"{max_voxels:,} voxels" if nvox > max_voxels else f"the {gigabytes(avail)} of free memory"
        raise InputError(f"the image is too large ({nvox:,} voxels, about {gigabytes(est)} for float32 processing, more than "
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


def check_nifti_data(path: Path, image: sitk.Image) -> None:
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


def available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
