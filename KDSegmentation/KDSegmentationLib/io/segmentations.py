"""Write and read segmentations: Slicer ``.seg.nrrd`` (names, colours, terminology) or a plain labelmap.

Geometry is taken from the labelmap image unchanged (LPS origin, spacing, direction), so the result lies exactly on the
input grid. A 2D photo labelmap is written as a single-slice 3D volume (z spacing 1 mm, z origin 0), as Slicer stores
photos. Every write goes to a temporary file in the target folder and is renamed into place, so a failed write never
leaves a partial file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from KDSegmentationLib.errors import InputError

SEG_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
METADATA_PREFIX = "KDSegmentation_"


def output_kind(path) -> str:
    """``'seg'`` for .seg.nrrd, ``'labelmap'`` for the plain formats; InputError otherwise."""
    name = Path(path).name.lower()
    if name.endswith(SEG_SUFFIX):
        return "seg"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise InputError(f"unsupported output file type for {Path(path).name}; use .seg.nrrd (Slicer segmentation) or "
                     f"{', '.join(LABELMAP_SUFFIXES)} (labelmap)")


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    for s in (SEG_SUFFIX,) + LABELMAP_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix


# ---------------------------------------------------------------------------------------------------------------------
# terminology
# ---------------------------------------------------------------------------------------------------------------------
def terminology_dict(term) -> dict:
    """tasks.Terminology -> slicerio terminology dict (serialised as Slicer's TerminologyEntry tag)."""
    d = {"contextName": term.context, "category": list(term.category), "type": list(term.type),
         "anatomicContextName": term.region_context}
    if term.region is not None:
        d["anatomicRegion"] = list(term.region)
    return d


def terminology_string(term) -> str:
    """The TerminologyEntry tag value Slicer stores for a segment, e.g. ``context~SCT^123037004^...~...``."""
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(terminology_dict(term))


# ---------------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------------
def _as_3d(labelmap: sitk.Image) -> sitk.Image:
    """A 2D labelmap becomes a single-slice 3D one with the same in-plane geometry (z origin 0, z spacing 1 mm)."""
    if labelmap.GetDimension() == 3:
        return labelmap
    if labelmap.GetDimension() != 2:
        raise ValueError(f"labelmap must be 2D or 3D, got {labelmap.GetDimension()}D")
    out = sitk.JoinSeries([labelmap], 0.0, 1.0)
    d = labelmap.GetDirection()
    out.SetDirection((d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))
    return out


def _ijk_to_lps(image: sitk.Image) -> np.ndarray:
    m = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    m[:3, 3] = image.GetOrigin()
    return m


def reference_geometry_string(image: sitk.Image) -> str:
    """Slicer's serialised reference-image geometry of ``image`` (3D): the 4x4 IJK-to-RAS matrix row by row, then the
    extent ``0;nx-1;0;ny-1;0;nz-1``, each value followed by ``;`` (as ``vtkSegmentationConverter`` writes it).

    Stored in the ``.seg.nrrd`` so that a file opened on its own (drag and drop) still knows the grid of its input.
    """
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_lps(image)
    extent = [v for n in image.GetSize() for v in (0, int(n) - 1)]
    numbers = [repr(float(v) + 0.0).removesuffix(".0") for v in ijk_to_ras.ravel()]  # + 0.0: no "-0"
    return "".join(f"{n};" for n in numbers + [str(v) for v in extent])


def _checked_labels(labelmap: sitk.Image, task) -> np.ndarray:
    if labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labelmap must have scalar pixels")
    arr = sitk.GetArrayFromImage(labelmap)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labelmap must hold integers, got {arr.dtype}")
    allowed = {0} | {lab.value for lab in task.labels}
    present = set(np.unique(arr).tolist())
    if not present <= allowed:
        raise ValueError(f"labelmap values {sorted(present - allowed)} are not labels of task {task.name}")
    return arr.astype(np.uint8, copy=False)


def _seg_dict(labelmap3d: sitk.Image, voxels_zyx: np.ndarray, task, extra_metadata) -> dict:
    # slicerio writes voxels in (i, j, k) = (x, y, z) index order
    voxels = np.ascontiguousarray(voxels_zyx.transpose(2, 1, 0))
    full_extent = [0, voxels.shape[0] - 1, 0, voxels.shape[1] - 1, 0, voxels.shape[2] - 1]
    segments = []
    for lab in task.labels:
        segments.append({
            "id": f"Segment_{lab.value}",
            "name": lab.name,
            "nameAutoGenerated": False,
            "color": [round(c / 255.0, 6) for c in lab.color],
            "colorAutoGenerated": False,
            "labelValue": int(lab.value),
            "layer": 0,
            # full extent for every segment, empty ones included: older Slicer versions crop a shared layer to the
            # first segment's extent, and an empty segment must still load (as an empty segment)
            "extent": list(full_extent),
            "terminology": terminology_dict(lab.terminology),
        })
    seg = {
        "voxels": voxels,
        "ijkToLPS": _ijk_to_lps(labelmap3d),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        # Slicer's serialisation: "name|value|description&" per parameter (its reader needs the closing "&")
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{reference_geometry_string(labelmap3d)}|Image geometry description string "
            "determining the geometry of the labelmap that is created in course of conversion.&"),
        "encoding": "gzip",
    }
    seg[METADATA_PREFIX + "Task"] = task.name
    for key, value in (extra_metadata or {}).items():
        key = str(key)
        if not key.startswith(METADATA_PREFIX):
            key = METADATA_PREFIX + key
        # NRRD key/value fields are single lines
        seg[key.replace(":", "_").replace("\n", " ")] = str(value).replace("\n", " ")
    return seg


def write_segmentation(labelmap: sitk.Image, task, path, extra_metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Write ``labelmap`` (UInt8, values = ``task.labels[i].value``, on the input geometry) to ``path``.

    ``.seg.nrrd`` -> Slicer segmentation with one segment per task label (empty ones included), colours, terminology
    and ``extra_metadata`` as ``KDSegmentation_<key>`` header fields; ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` -> plain
    labelmap. Atomic: nothing is left at ``path`` when anything fails. Returns the written path.
    """
    path = Path(path)
    kind = output_kind(path)
    arr = _checked_labels(labelmap, task)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {folder} ({exc.strerror or exc}); choose a writable output "
                         f"location") from None
    # same folder, so os.replace is an atomic rename; the name keeps the real suffix, which picks the writer
    tmp = folder / f".{path.name.split('.')[0]}.{uuid.uuid4().hex[:12]}.tmp{_suffix_of(path)}"
    try:
        if kind == "seg":
            import slicerio

            img3d = _as_3d(labelmap)
            zyx = arr if arr.ndim == 3 else arr[None]
            slicerio.write_segmentation(str(tmp), _seg_dict(img3d, zyx, task, extra_metadata))
        else:
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(labelmap)
            sitk.WriteImage(out, str(tmp), useCompression=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}); choose a writable output location "
                         f"with free space") from None
    except RuntimeError as exc:  # ITK writer errors
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot write {path} ({msg}); choose a writable output location") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return path


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------
def _is_slicer_seg(path: Path) -> bool:
    if path.name.lower().endswith(SEG_SUFFIX):
        return True
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception:  # noqa: BLE001 - a broken header is reported by the reader below
        return False
    return any(k.startswith("Segment0_") for k in header)


def _image_from_ijk(voxels_ijk: np.ndarray, ijk_to_lps: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(voxels_ijk.transpose(2, 1, 0)))
    m = np.asarray(ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (m[:3, :3] / spacing[None, :]).ravel()))
    img.SetOrigin(tuple(float(v) for v in m[:3, 3]))
    return img


def read_segmentation(path) -> Tuple[sitk.Image, Dict[str, int]]:
    """Read a ``.seg.nrrd`` or a plain labelmap -> (UInt8 labelmap, {segment name: label value}).

    A Slicer segmentation on one layer keeps its label values; one with overlapping segments (several layers) is merged
    into one labelmap with values 1..N in segment order, later segments winning where they overlap. A plain labelmap
    gets names ``label_<value>``. A single-slice segmentation stays a single-slice 3D image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"segmentation not found: {path}; check the path")
    try:
        if _is_slicer_seg(path):
            return _read_slicer_seg(path)
        img = sitk.ReadImage(str(path))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pynrrd, slicerio and ITK raise assorted types for broken files
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read segmentation {path.name}: unreadable or corrupt ({msg[:200]}); "
                         f"export it again") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} is not a labelmap (it has {img.GetNumberOfComponentsPerPixel()} components per "
                         f"voxel); give a labelmap or a .seg.nrrd")
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size and (float(arr.min()) < 0 or float(arr.max()) > 255 or not np.all(np.mod(arr, 1) == 0)):
        raise InputError(f"{path.name} is not a labelmap (values {float(arr.min()):g}..{float(arr.max()):g}); "
                         f"give integer labels 0..255 or a .seg.nrrd")
    lab = sitk.Cast(img, sitk.sitkUInt8)
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab)) if v != 0]
    return lab, {f"label_{v}": v for v in values}


def _read_slicer_seg(path: Path) -> Tuple[sitk.Image, Dict[str, int]]:
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    voxels = seg["voxels"]
    segments = seg.get("segments", [])
    if voxels.ndim == 3:
        names = {s.get("name", s["id"]): int(s.get("labelValue", 1)) for s in segments}
        keep = np.isin(voxels, list(names.values()))
        out = np.where(keep, voxels, 0)
    else:
        # overlapping segments: one value per segment, later ones overwrite earlier ones
        out = np.zeros(voxels.shape[1:], dtype=np.uint16)
        names = {}
        for i, s in enumerate(segments, start=1):
            out[voxels[s.get("layer", 0)] == s.get("labelValue", 1)] = i
            names[s.get("name", s["id"])] = i
    if out.size and int(out.max()) > 255:
        raise InputError(f"{path.name} has more than 255 segments; merge segments before evaluation")
    img = _image_from_ijk(out.astype(np.uint8), seg["ijkToLPS"])
    return img, names
