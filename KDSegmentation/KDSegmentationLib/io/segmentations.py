"""Write and read segmentations: Slicer ``.seg.nrrd`` (names, colours, terminology) or a plain labelmap.

Geometry is taken from the labelmap image unchanged (LPS origin, spacing, direction), so the result lies exactly on the
input grid. A ``.seg.nrrd`` stores only the bounding box of the labels, as Slicer stores segmentations: the file's grid
is the input grid shifted to the box (``Segmentation_ReferenceImageExtentOffset`` = the box's first voxel index), the
full input grid is kept as the reference image geometry, and reading pads the box back onto it. A 2D photo labelmap
is written as a single-slice 3D volume (z spacing 1 mm, z origin 0), as Slicer stores photos. Every write goes to a
temporary file in the target folder and is renamed into place, so a failed write never leaves a partial file.
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
# gzip level of the .seg.nrrd. A liver's box of a 512 x 512 x 85 CT (6 MB): levels 1, 2 and 3 take the same ~0.01 s
# for 101, 95 and 88 KiB, level 9 ~0.24 s for 35 KiB (benchmarks/results/stages.md): 3 is the smallest of the fast ones
SEG_COMPRESSION_LEVEL = 3
_REFERENCE_GEOMETRY = "Reference image geometry"


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


def _label_box(arr_zyx: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(first, last) (z, y, x) indices (inclusive) of the non-zero voxels of ``arr_zyx``; None when all are zero.

    Why per axis on shrinking slabs: one pass over the full grid finds the slices, the other two passes only see
    those slices, and no full-size boolean copy is made (a 512 x 512 x 200 labelmap takes ~5 ms).
    """
    z = np.flatnonzero(arr_zyx.reshape(arr_zyx.shape[0], -1).max(axis=1))
    if z.size == 0:
        return None
    slab = arr_zyx[z[0]:z[-1] + 1]
    y = np.flatnonzero(slab.max(axis=(0, 2)))
    x = np.flatnonzero(slab[:, y[0]:y[-1] + 1].max(axis=(0, 1)))
    return np.array([z[0], y[0], x[0]]), np.array([z[-1], y[-1], x[-1]])


def _checked_labels(labelmap: sitk.Image, task) -> Tuple[np.ndarray, Optional[Tuple[np.ndarray, np.ndarray]]]:
    """(uint8 labels (z, y, x) or (y, x), their non-zero box or None); ValueError for values that are not labels.

    The values are counted in the box only: outside it every voxel is 0.
    """
    if labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("labelmap must have scalar pixels")
    arr = sitk.GetArrayViewFromImage(labelmap)  # a view: the labelmap outlives it
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labelmap must hold integers, got {arr.dtype}")
    if arr.dtype != np.uint8:
        # wider types: values outside 0..255 must be refused, not wrapped by the cast
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            present = sorted({int(arr.min()), int(arr.max())} - {0})
            raise ValueError(f"labelmap values {present} are not labels of task {task.name}")
        arr = arr.astype(np.uint8)
    zyx = arr if arr.ndim == 3 else arr[None]
    box = _label_box(zyx)
    if box is not None:
        inside = zyx[box[0][0]:box[1][0] + 1, box[0][1]:box[1][1] + 1, box[0][2]:box[1][2] + 1]
        allowed = {0} | {lab.value for lab in task.labels}
        top = int(inside.max())
        # labels 1..N: the maximum alone proves the values (a histogram of the box costs ~20 times more)
        present = set(range(top + 1)) if set(range(top + 1)) <= allowed else set(
            np.flatnonzero(np.bincount(inside.ravel(), minlength=256)).tolist())
        if not present <= allowed:
            raise ValueError(f"labelmap values {sorted(present - allowed)} are not labels of task {task.name}")
    return arr, box


def _stored_box(zyx: np.ndarray, box) -> Tuple[np.ndarray, np.ndarray]:
    """(voxels (i, j, k) of the box to store, its offset (i, j, k) in the full grid).

    The box is the labels' bounding box, as Slicer stores a segmentation cropped to its segments; an all-empty result
    is one zero voxel at offset 0 (Slicer's own writer stores an empty segmentation the same way, and its reader
    takes a 1-voxel image as "no image data").
    """
    if box is None:
        return np.zeros((1, 1, 1), np.uint8), np.zeros(3, int)
    lo, hi = np.array(box[0]), np.array(box[1])
    if np.all(lo == hi):
        # one labelled voxel: Slicer's reader takes any 1-voxel image for "no image data" (and crashes on its
        # segments), so the box gets a second voxel where the grid has one
        axis = next((a for a in (2, 1, 0) if zyx.shape[a] > 1), None)
        if axis is not None:
            if hi[axis] + 1 < zyx.shape[axis]:
                hi[axis] += 1
            else:
                lo[axis] -= 1
    inside = zyx[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    # (z, y, x) -> (i, j, k) as a view: an F-ordered write of it reads the box in place, no transposed copy
    return inside.transpose(2, 1, 0), lo[::-1].astype(int)


def _seg_dict(labelmap3d: sitk.Image, voxels_zyx: np.ndarray, box, task, extra_metadata) -> dict:
    """slicerio's segmentation dict of the labels cropped to ``box`` ((z, y, x) first/last indices, or None).

    The stored grid is the input grid shifted by the box's offset: its origin is the input-grid point of the offset
    voxel (so readers that ignore Slicer's private fields still place it right) and
    ``Segmentation_ReferenceImageExtentOffset`` says where it sits in the reference geometry, stored in full as
    ``Segmentation_ConversionParameters``.
    """
    voxels, offset = _stored_box(voxels_zyx, box)
    ijk_to_lps = _ijk_to_lps(labelmap3d)
    ijk_to_lps[:3, 3] += ijk_to_lps[:3, :3] @ offset
    if box is None:
        # an empty extent: every segment loads as an empty segment
        extent = [0, -1, 0, -1, 0, -1]
    else:
        # the stored box's extent for every segment, empty ones included: Slicer builds a shared layer's labelmap
        # from the first segment's extent, so a smaller (or empty) first extent would cut the other segments
        extent = [0, voxels.shape[0] - 1, 0, voxels.shape[1] - 1, 0, voxels.shape[2] - 1]
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
            "extent": list(extent),
            "terminology": terminology_dict(lab.terminology),
        })
    seg = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [int(v) for v in offset],
        # Slicer's serialisation: "name|value|description&" per parameter (its reader needs the closing "&")
        "Segmentation_ConversionParameters": (
            f"{_REFERENCE_GEOMETRY}|{reference_geometry_string(labelmap3d)}|Image geometry description string "
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
    arr, box = _checked_labels(labelmap, task)
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

            zyx = arr if arr.ndim == 3 else arr[None]
            seg = _seg_dict(_as_3d(labelmap), zyx, box, task, extra_metadata)
            slicerio.write_segmentation(str(tmp), seg, compression_level=SEG_COMPRESSION_LEVEL)
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


def _image_from_zyx(voxels_zyx: np.ndarray, ijk_to_lps: np.ndarray) -> sitk.Image:
    """UInt8 (z, y, x) voxels on the grid of a 4x4 IJK-to-LPS matrix (mm) -> SimpleITK image."""
    img = sitk.GetImageFromArray(voxels_zyx)
    m = np.asarray(ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (m[:3, :3] / spacing[None, :]).ravel()))
    img.SetOrigin(tuple(float(v) for v in m[:3, 3]))
    return img


def _reference_geometry(seg: dict) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(IJK-to-LPS 4x4 (mm), extent (6,) ints) of a segmentation's reference image geometry; None if absent or bad."""
    for parameter in seg.get("conversionParameters", []):
        if parameter.get("name") != _REFERENCE_GEOMETRY:
            continue
        try:
            numbers = [float(v) for v in str(parameter.get("value", "")).split(";") if v.strip()]
        except ValueError:
            return None
        if len(numbers) != 22:
            return None
        ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.array(numbers[:16]).reshape(4, 4)
        return ijk_to_lps, np.array(numbers[16:], dtype=int)
    return None


def _on_reference_grid(box_ijk: np.ndarray, file_ijk_to_lps: np.ndarray, offset, reference):
    """The stored box (i, j, k) placed back on its reference grid -> (voxels (z, y, x), IJK-to-LPS of that grid).

    ``offset``: the box's first voxel as a reference-grid index (``Segmentation_ReferenceImageExtentOffset``);
    ``reference``: :func:`_reference_geometry`. The grid is the reference extent (grown to hold the box, should a
    segment reach beyond it). Without a reference geometry, or with one that is not the lattice the box lies on
    (another volume's), the box is returned on its own grid, as stored.
    """
    offset = np.asarray(offset if offset is not None else (0, 0, 0), dtype=int)
    frame = np.array(file_ijk_to_lps, dtype=float)
    frame[:3, 3] -= frame[:3, :3] @ offset  # reference index 0, as the file places it
    if reference is None or not np.allclose(np.linalg.solve(reference[0], frame), np.eye(4), atol=1e-3):
        return np.ascontiguousarray(box_ijk.transpose(2, 1, 0)), np.asarray(file_ijk_to_lps, dtype=float)
    extent = reference[1]
    lo = np.minimum(extent[0::2], offset)
    hi = np.maximum(extent[1::2], offset + np.array(box_ijk.shape) - 1)
    full = np.zeros(tuple((hi - lo + 1)[::-1]), np.uint8)
    at = offset - lo
    full[at[2]:at[2] + box_ijk.shape[2], at[1]:at[1] + box_ijk.shape[1], at[0]:at[0] + box_ijk.shape[0]] = \
        box_ijk.transpose(2, 1, 0)
    frame[:3, 3] += frame[:3, :3] @ lo
    return full, frame


def read_segmentation(path) -> Tuple[sitk.Image, Dict[str, int]]:
    """Read a ``.seg.nrrd`` or a plain labelmap -> (UInt8 labelmap, {segment name: label value}).

    A Slicer segmentation on one layer keeps its label values; one with overlapping segments (several layers) is merged
    into one labelmap with values 1..N in segment order, later segments winning where they overlap. A plain labelmap
    gets names ``label_<value>``. A single-slice segmentation stays a single-slice 3D image. A segmentation stored
    cropped to its segments (as Slicer and :func:`write_segmentation` store it) is returned on its full reference
    grid (``Segmentation_ReferenceImageExtentOffset`` and the reference image geometry).
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
    voxels_zyx, ijk_to_lps = _on_reference_grid(out.astype(np.uint8, copy=False), seg["ijkToLPS"],
                                                 seg.get("referenceImageExtentOffset"), _reference_geometry(seg))
    return _image_from_zyx(voxels_zyx, ijk_to_lps), names
