"""DICOM series folders: one series chosen, slices ordered by position, gaps and unreadable slices refused."""
from __future__ import annotations

import math
import os
import stat
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.input_checks import (DEFAULT_MAX_VOXELS, Warn, check_geometry, check_size, first_line,
                                              library_output_to_log, shown_path, special_kind, warn_fn)


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
        if sheared is not None and not orthonormal_orientation(reader):
            sheared.append(f)
        infos.append((f, np.array(reader.GetOrigin()), np.array(reader.GetDirection()).reshape(3, 3),
                      tuple(reader.GetSize()[:2])))
    return infos


def orthonormal_orientation(reader: sitk.ImageFileReader) -> bool:
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
    w = warn_fn(warn)
    dirpath, uid, files, series = _largest_series(folder)
    n_series = len(series)
    if n_series > 1:
        w(f"{n_series} DICOM series found in {folder.name}; loading the largest ({len(files)} files, series {uid})")
    infos = _readable_slice_infos(folder, files)
    listed = {os.path.normpath(f) for names in series.values() for f in names}
    broken = _unreadable_series_files(dirpath, uid, _sop_class(infos[0][0]), listed)
    if broken:
        raise InputError(f"{len(broken)} file(s) of the DICOM series in {folder.name} are damaged and cannot be read: "
                         f"{_names(broken)}; copy or export the series again")
    check_geometry((1.0, 1.0, 1.0), infos[0][2].ravel(), f"the DICOM series in {folder.name}")
    if len(infos) > 1:
        files = _files_on_the_slice_grid(infos, folder.name, w)
    check_size((*infos[0][3], len(files)), 1, task, max_voxels, 2)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with library_output_to_log():
            image = reader.Execute()
    except RuntimeError as exc:
        bad = _first_unreadable(files)
        which = f"{Path(bad).name} cannot be read" if bad else first_line(exc)
        raise InputError(f"cannot read the DICOM series in {folder}: {which}; export the series again") from None
    check_geometry(image.GetSpacing(), image.GetDirection(), f"the DICOM series in {folder.name}")
    return image


def _largest_series(folder: Path):
    """(directory, series UID, its files, every series found) of the series with the most files."""
    _check_folder_entries(folder)
    try:
        with library_output_to_log():
            series = _series_in_folder(folder)
    except RuntimeError as exc:
        raise InputError(f"cannot scan DICOM folder {folder}: {first_line(exc)}; check the folder") from None
    if not series:
        raise InputError(f"no DICOM series found in {folder}; choose a folder that holds the DICOM files of one scan")
    (dirpath, uid), files = max(series.items(), key=lambda kv: len(kv[1]))
    return dirpath, uid, files, series


def _readable_slice_infos(folder: Path, files: Sequence[str]):
    """Position and orientation of every slice; refused when a file is unreadable or its axes are sheared."""
    failed: List[str] = []
    sheared: List[str] = []
    with library_output_to_log():
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
    return infos


def _files_on_the_slice_grid(infos, folder_name: str, warn) -> List[str]:
    """The files of the majority's in-plane size and orientation (drops localisers) on one regular slice grid, in
    slice order; the others are left out with a warning naming them."""
    keys = [(size, tuple(np.round(d[:, :2].ravel(), 4))) for _f, _o, d, size in infos]
    major = max(set(keys), key=keys.count)
    kept = [info for info, k in zip(infos, keys) if k == major]
    normal = kept[0][2][:, 2]
    kept.sort(key=lambda t: float(np.dot(t[1], normal)))
    pos = np.array([float(np.dot(t[1], normal)) for t in kept])
    run, _left_out = _regular_slices(pos, [f for f, *_ in kept], folder_name)
    dropped = sorted(set(f for f, *_ in infos) - set(run))
    if dropped:
        warn(f"left out {len(dropped)} DICOM slice(s) that are off the regular slice grid of the series: "
             f"{_names(dropped)}")
    return run


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
                raise InputError(f"{shown_path(os.path.relpath(full, folder))} in the DICOM folder {folder.name} is "
                                 f"{special_kind(mode)}, not a file; remove it or choose the folder of the scan's "
                                 f"files only")


def _sop_class(path: str) -> Optional[str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with library_output_to_log():
            reader.ReadImageInformation()
        return reader.GetMetaData("0008|0016").rstrip("\0 ") if reader.HasMetaDataKey("0008|0016") else None
    except RuntimeError:
        return None


def _first_unreadable(files: Sequence[str]) -> Optional[str]:
    reader = sitk.ImageFileReader()
    for f in files:
        reader.SetFileName(f)
        try:
            with library_output_to_log():
                reader.Execute()
        except RuntimeError:
            return f
    return None


