"""Lung nodule task: HU -> the crops' intensity, the seed-point region of a real CT, the pipeline, RECIST diameters.

Training data are the LIDC-IDRI nodule crops (``LIDC-IDRI-XXXX/nodule-Y/{images,mask-0..3}/slice-Z.png``): stacks of
consecutive native axial slices, 128 x 128 pixels at the scan's native pixel spacing, centred on the nodule, 8-bit.
Matching the crops of LIDC-IDRI-0001..0003 against the same scans in HU (``scripts/recover_lidc_window.py``,
``docs/lidc_window.md``) showed how they were made: each 128 x 128 slice was min-max normalised on its own,
``round((HU - min) / (max - min) * 255)``; there is no fixed HU window. :func:`hu_to_crop_intensity` reproduces that.

Orientation of the crops (and of every stack this module builds): stack axes are (slice, row, column); slices go
inferior -> superior, rows anterior -> posterior, columns patient right -> left. In ITK's LPS physical space that is
increasing S, P and L, i.e. the usual radiological display of an axial DICOM slice.

Coordinates: Slicer gives the seed in RAS millimetres, ITK/SimpleITK works in LPS millimetres (x and y negated).
Arrays from SimpleITK are indexed (k, j, i), the reverse of ITK's index order (i, j, k).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import LUNG_NODULE, TaskSpec
from KDSegmentationLib.tasks.base import InputGridOutput, NetworkInput, TaskPipeline
from KDSegmentationLib.tasks.components import select_component
from KDSegmentationLib.tasks.ct import segment_volumes

CROP_SIZE = 128          # in-plane size (pixels) of the LIDC-IDRI crops and of the model input
PAD_HU = -1024.0         # value (HU) outside the image: air, the value CT scanners store outside the body


# ----------------------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------------------

def hu_to_crop_intensity(hu: np.ndarray, window: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """HU -> what ``crop / 255`` of the LIDC-IDRI crops represents, float32 in [0, 1].

    ``hu``: (..., H, W) in HU; each trailing 2D axial slice is processed on its own, as the crops were: clip to
    ``window`` (default ``tasks.LUNG_NODULE.hu_window``), then min-max normalise over that slice. The clip only
    guards against values the crops never contain (out-of-field padding such as -2048 or -3024 HU would otherwise
    become the minimum); it must not cut real tissue, so the window is the full CT range. A constant slice gives 0.
    Pass the whole 128 x 128 window: the minimum and maximum of a smaller region differ.
    """
    lo, hi = window if window is not None else LUNG_NODULE.hu_window
    x = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    if x.ndim < 2:
        raise ValueError(f"expected (..., H, W) slices, got shape {x.shape}")
    mn = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - mn
    out = np.where(rng > 0, (x - mn) / np.where(rng > 0, rng, 1.0), 0.0)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Seed-point region of a CT volume
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SeedRegion:
    """A stack of axial 128 x 128 windows around a seed point, in the crops' orientation (see module docstring).

    stack: float32 (n, 128, 128), :func:`hu_to_crop_intensity` of ``hu``.
    hu: float32 (n, 128, 128), HU; -1024 outside the image.
    index_slices: three ``(stack_slice, canonical_slice)`` pairs, one per stack axis (slice, row, column): stack
        positions ``stack_slice`` hold the voxels ``canonical_slice`` of the volume seen in canonical order
        (see :func:`canonical_view`); the rest of the stack is padding.
    seed_index: (i, j, k) ITK voxel index of the seed.
    seed_in_stack: (slice, row, column) position of the seed in ``stack``; row and column are always 64.
    axes: ITK index axis of each stack axis (slice, row, column).
    flips: whether each stack axis runs against its ITK index axis.
    spacing_mm: voxel size along the stack axes (slice, row, column), mm.
    image_size: ITK size (i, j, k) of the volume the region was taken from.
    """

    stack: np.ndarray
    hu: np.ndarray
    index_slices: Tuple[Tuple[slice, slice], ...]
    seed_index: Tuple[int, int, int]
    seed_in_stack: Tuple[int, int, int]
    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    spacing_mm: Tuple[float, float, float]
    image_size: Tuple[int, int, int]


def stack_axes(direction: Sequence[float]) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]:
    """ITK index axes for the stack axes (slice, row, column) = closest to (S, P, L), and whether to flip each.

    ``direction``: the 9 numbers of a 3D ITK direction matrix (row-major; column a = physical direction of index
    axis a, LPS). Only whole index axes are used, so oblique scans are read voxel for voxel without resampling.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    free = [0, 1, 2]
    axes, flips = [], []
    for phys in (2, 1, 0):                       # S first (slicing axis), then P (rows), then L (columns)
        a = max(free, key=lambda ax: abs(d[phys, ax]))
        free.remove(a)
        axes.append(a)
        flips.append(bool(d[phys, a] < 0))
    return tuple(axes), tuple(flips)


def canonical_view(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """View of a SimpleITK array (k, j, i) with axes (slice, row, column) as in the stack; writes go through."""
    view = np.transpose(array, [2 - a for a in axes])
    for dim, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis=dim)
    return view


def _seed_to_index(ct, seed_ras_mm) -> Tuple[int, int, int]:
    x, y, z = (float(v) for v in seed_ras_mm)
    lps = (-x, -y, z)                            # Slicer RAS -> ITK LPS
    cont = ct.TransformPhysicalPointToContinuousIndex(lps)
    size = ct.GetSize()
    if not all(-0.5 <= c < s - 0.5 for c, s in zip(cont, size)):
        corners = np.array([ct.TransformContinuousIndexToPhysicalPoint([(s - 0.5) if (n >> a) & 1 else -0.5
                                                                         for a, s in enumerate(size)])
                            for n in range(8)]) * (-1, -1, 1)          # LPS -> RAS
        box = ", ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(corners.min(0), corners.max(0)))
        raise InputError(f"seed point RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm is outside the image (RAS extent {box} mm); "
                         "place the seed on the nodule inside the volume")
    return tuple(int(math.floor(c + 0.5)) for c in cont)


def _window(center: int, half_before: int, half_after: int, size: int, clip: bool):
    """(stack_slice, canonical_slice, length) of positions center-half_before .. center+half_after-1."""
    start, stop = center - half_before, center + half_after
    if clip:
        start, stop = max(start, 0), min(stop, size)
    s0, s1 = max(start, 0), min(stop, size)
    return slice(s0 - start, s1 - start), slice(s0, s1), stop - start


def _region_geometry(ct, seed_ras_mm, task: TaskSpec):
    if ct.GetDimension() != 3:
        raise InputError(f"the lung nodule task needs a 3D CT volume, got a {ct.GetDimension()}D image; "
                         "load the CT series as one volume")
    if ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the lung nodule task needs a single-channel CT in HU, got a multi-channel image; "
                         "load the CT series, not a screenshot or colour image")
    seed = _seed_to_index(ct, seed_ras_mm)
    axes, flips = stack_axes(ct.GetDirection())
    size, spacing = ct.GetSize(), ct.GetSpacing()
    canon_seed = [size[a] - 1 - seed[a] if f else seed[a] for a, f in zip(axes, flips)]
    half_mm = task.seed_region_mm if task.seed_region_mm is not None else 40.0
    # whole slices within +-half_mm of the seed; a small tolerance keeps a slice lying exactly on the boundary
    k = int(math.floor(half_mm / spacing[axes[0]] + 1e-6))
    roi = tuple(task.roi_size) if task.roi_size else (CROP_SIZE, CROP_SIZE)
    rows, cols = roi[1], roi[0]
    # along z only the volume's own slices (no padding); in-plane a fixed window with the seed at index size//2,
    # as in the crops, whose nodule centre sits at pixel 64 of 128
    dims = [_window(canon_seed[0], k, k + 1, size[axes[0]], clip=True),
            _window(canon_seed[1], rows // 2, rows - rows // 2, size[axes[1]], clip=False),
            _window(canon_seed[2], cols // 2, cols - cols // 2, size[axes[2]], clip=False)]
    seed_in_stack = (canon_seed[0] - dims[0][1].start, rows // 2, cols // 2)
    return seed, axes, flips, dims, seed_in_stack


def take_region(image, region: SeedRegion, pad_value: float = 0.0, dtype=None) -> np.ndarray:
    """The region's (n, 128, 128) stack of any image on the same grid as the CT it came from (e.g. a reference mask).

    Positions outside the image get ``pad_value``; ``dtype`` defaults to the image's pixel type.
    """
    import SimpleITK as sitk

    if tuple(image.GetSize()) != tuple(region.image_size):
        raise ValueError(f"image size {image.GetSize()} differs from the region's volume {region.image_size}")
    view = canonical_view(sitk.GetArrayViewFromImage(image), region.axes, region.flips)
    out = np.full(region.stack.shape, pad_value, dtype=dtype or view.dtype)
    out[tuple(s for s, _ in region.index_slices)] = view[tuple(c for _, c in region.index_slices)]
    return out


def extract_seed_region(ct, seed_ras_mm, task: TaskSpec = LUNG_NODULE) -> SeedRegion:
    """Axial 128 x 128 windows around a seed point of a CT, ready for the 2D network.

    ct: SimpleITK 3D image in HU, any direction matrix. seed_ras_mm: (x, y, z) in Slicer RAS millimetres.
    Takes the slices within +-``task.seed_region_mm`` (mm, along the slicing axis = the index axis closest to S/I)
    of the seed, clipped to the volume, and in each a window of ``task.roi_size`` pixels at the native spacing
    with the seed at (64, 64), padded with -1024 HU outside the image.
    Raises InputError when the seed is outside the image.
    """
    seed, axes, flips, dims, seed_in_stack = _region_geometry(ct, seed_ras_mm, task)
    spacing = ct.GetSpacing()
    region = SeedRegion(
        stack=np.zeros((dims[0][2], dims[1][2], dims[2][2]), np.float32), hu=None,
        index_slices=tuple((d[0], d[1]) for d in dims), seed_index=seed, seed_in_stack=seed_in_stack,
        axes=axes, flips=flips, spacing_mm=tuple(float(spacing[a]) for a in axes),
        image_size=tuple(int(s) for s in ct.GetSize()))
    region.hu = take_region(ct, region, PAD_HU, dtype=np.float32)
    region.stack = hu_to_crop_intensity(region.hu, task.hu_window)
    return region


# ----------------------------------------------------------------------------------------------------------------
# Back to the CT grid
# ----------------------------------------------------------------------------------------------------------------

def paste_back(prob_stack: np.ndarray, region: SeedRegion, reference, threshold: float = 0.5,
               max_distance_mm: float = 10.0):
    """Nodule probabilities on the stack -> SimpleITK UInt8 labelmap (0/1) on exactly ``reference``'s grid.

    prob_stack: float32 (n, 128, 128) like ``region.stack``; voxels with ``prob >= threshold`` are foreground (so a
    soft label of 0.5, one of two readers, counts, as in the consensus rule). Only the connected component at the
    seed, or the nearest one within ``max_distance_mm`` (mm), is kept; padding outside the image is ignored.
    """
    import SimpleITK as sitk

    prob_stack = np.asarray(prob_stack)
    if prob_stack.shape != region.stack.shape:
        raise ValueError(f"prob_stack shape {prob_stack.shape} differs from the region's {region.stack.shape}")
    if tuple(reference.GetSize()) != tuple(region.image_size):
        raise ValueError(f"reference size {reference.GetSize()} differs from the region's volume {region.image_size}")
    inside = tuple(s for s, _ in region.index_slices)
    fg = np.zeros(prob_stack.shape, np.uint8)
    fg[inside] = prob_stack[inside] >= threshold
    fg = select_component(fg, region.seed_in_stack, region.spacing_mm, max_distance_mm)
    out = np.zeros(tuple(reversed(region.image_size)), np.uint8)
    canonical_view(out, region.axes, region.flips)[tuple(c for _, c in region.index_slices)] = fg[inside]
    lab = sitk.GetImageFromArray(out)
    lab.CopyInformation(reference)
    return lab


def _feret_diameter(corners: np.ndarray, to_physical: np.ndarray) -> float:
    """Largest distance between any two of ``corners`` (n, d): voxel corners in index units (half-integers), the
    distance measured after the linear map ``to_physical`` (d, d; mm).

    The farthest pair is a pair of convex-hull vertices, and a point lying between two others on a line is no
    vertex (the map keeps lines). So only the points at both ends of their grid line along every axis and diagonal
    of the lattice are paired: exact, and no hull library is imported (SciPy's costs a fresh process about 0.5 s)."""
    pts = np.rint(np.asarray(corners) * 2).astype(np.int64)  # shared corners repeat: harmless, cheaper than unique
    for direction in _lattice_directions(pts.shape[1]):
        pts = pts[_line_ends(pts, direction)]
    cand = (pts / 2.0) @ np.asarray(to_physical, float).T
    best = 0.0
    for start in range(0, len(cand), 256):  # pairwise in blocks: memory stays small whatever the nodule
        diff = cand[start:start + 256, None, :] - cand[None, :, :]
        best = max(best, float((diff ** 2).sum(-1).max()))
    return best ** 0.5


def _lattice_directions(d: int) -> List[np.ndarray]:
    """The axes and diagonals of a d-D lattice: every non-zero vector of {-1, 0, 1}^d, one of each +-pair."""
    vectors = np.array(np.meshgrid(*[(-1, 0, 1)] * d, indexing="ij")).reshape(d, -1).T
    return [v for v in vectors if v.any() and v[np.flatnonzero(v)[0]] > 0]


def _line_ends(pts: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Boolean (n,): the points of ``pts`` (n, d) that are first or last along ``direction`` among the points on
    their line (points on one line share ``p - t * direction``, t their position along it)."""
    axis = int(np.flatnonzero(direction)[0])
    position = pts[:, axis]  # direction[axis] is 1
    key = pts - position[:, None] * direction[None, :]
    order = np.lexsort((position,) + tuple(key[:, a] for a in reversed(range(key.shape[1]))))
    grouped = key[order]
    starts = np.r_[True, np.any(grouped[1:] != grouped[:-1], axis=1)]
    ends = np.r_[starts[1:], True]
    out = np.zeros(len(pts), bool)
    out[order[starts | ends]] = True
    return out


def longest_axial_diameter_mm(labelmap) -> float:
    """RECIST's measurement: longest diameter (mm) on one axial slice of a nodule labelmap; 0.0 when empty.

    The axial slice (index axis closest to S/I) with the largest area, its maximum Feret diameter measured between
    pixel corners (edge to edge). A nodule elongated along S/I is longer in 3D: see :func:`max_3d_diameter_mm`.
    """
    import SimpleITK as sitk

    axes, flips = stack_axes(labelmap.GetDirection())
    mask = canonical_view(sitk.GetArrayViewFromImage(labelmap), axes, flips) > 0
    if not mask.any():
        return 0.0
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    rc = np.argwhere(mask[z]).astype(float)
    spacing = labelmap.GetSpacing()
    sp = np.array([spacing[axes[1]], spacing[axes[2]]])
    corners = np.concatenate([rc + off for off in ((-.5, -.5), (-.5, .5), (.5, -.5), (.5, .5))])
    return _feret_diameter(corners, np.diag(sp))


def max_3d_diameter_mm(labelmap) -> float:
    """Maximum 3D diameter (mm) of a labelmap's foreground, between voxel corners in physical space; 0.0 when empty.

    Measured with the image's spacing and direction, so it is the same for any orientation of the grid.
    """
    import SimpleITK as sitk

    zyx = np.argwhere(sitk.GetArrayViewFromImage(labelmap) > 0)
    if zyx.size == 0:
        return 0.0
    ijk = zyx[:, ::-1].astype(float)
    offsets = np.array([[dx, dy, dz] for dx in (-.5, .5) for dy in (-.5, .5) for dz in (-.5, .5)])
    corners = (ijk[:, None, :] + offsets[None]).reshape(-1, 3)
    to_physical = np.array(labelmap.GetDirection()).reshape(3, 3) * np.array(labelmap.GetSpacing())[None, :]
    return _feret_diameter(corners, to_physical)


# ----------------------------------------------------------------------------------------------------------------
# The clinician's click as a network input
# ----------------------------------------------------------------------------------------------------------------

CLICK_SIGMA_PX = 6.0


def click_map(shape: Sequence[int], centre: Sequence[float], sigma_px: float = CLICK_SIGMA_PX) -> np.ndarray:
    """float32 (h, w) Gaussian bump (peak 1) at the in-plane click position ``centre`` (row, col).

    Why: the network is told which structure the user means. Without it, a small nodule beside a vessel of the same
    size and density is ambiguous, and the network segmented the vessel.
    """
    rows = np.arange(shape[0], dtype=np.float32)[:, None] - float(centre[0])
    cols = np.arange(shape[1], dtype=np.float32)[None, :] - float(centre[1])
    return np.exp(-(rows ** 2 + cols ** 2) / (2.0 * sigma_px ** 2)).astype(np.float32)


def network_stack(stack: np.ndarray, centre: Optional[Sequence[float]] = None) -> np.ndarray:
    """Slices (n, h, w) in [0, 1] -> network input (n, 2, h, w): intensity and the click map.

    ``centre`` is the seed's (row, col) in the slices; default the middle, where the seed is placed by
    :func:`extract_seed_region` and where the LIDC-IDRI crops have their nodule.
    """
    n, h, w = stack.shape
    if centre is None:
        centre = (h // 2, w // 2)
    click = np.broadcast_to(click_map((h, w), centre), (n, h, w))
    return np.stack([np.asarray(stack, np.float32), click], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------

class LungNodulePipeline(TaskPipeline):
    """A nodule from one click: axial windows around the seed through the 2D network, the seeded component pasted
    back onto the CT grid, measured as RECIST does (longest axial diameter) and in 3D."""

    def prepare(self, image, seed_ras=None) -> NetworkInput:
        if seed_ras is None:
            raise InputError("the lung_nodule task needs a seed point: pass --seed-ras X,Y,Z (RAS mm, as shown in "
                             "Slicer) inside the nodule")
        region = extract_seed_region(image, seed_ras, self.spec)
        return NetworkInput(tensor=network_stack(region.stack), context=region)

    def to_input_grid(self, probabilities, prepared: NetworkInput, image, threshold: float = 0.5) -> InputGridOutput:
        import SimpleITK as sitk

        labelmap = paste_back(probabilities[:, 1], prepared.context, image, threshold=threshold)
        labels = sitk.GetArrayFromImage(labelmap)
        warnings = [] if labels.any() else ["no nodule found at the seed point; click closer to the nodule's centre"]
        return InputGridOutput(labels=labels, labelmap=labelmap, warnings=warnings)

    def measure(self, output: InputGridOutput, prepared: NetworkInput, image) -> Dict[str, dict]:
        stats = segment_volumes(output.labels, self.spec, image.GetSpacing())
        name = self.spec.labels[0].name
        stats[name]["longest_axial_diameter_mm"] = round(longest_axial_diameter_mm(output.labelmap), 1)
        stats[name]["max_3d_diameter_mm"] = round(max_3d_diameter_mm(output.labelmap), 1)
        return stats

    def prepare_crops(self, crops_uint8: np.ndarray) -> NetworkInput:
        """LIDC-IDRI crops (n, 128, 128) uint8, the nodule at their centre (no CT grid) -> network input."""
        return NetworkInput(tensor=network_stack(crops_uint8.astype(np.float32) / 255.0), context=None)
