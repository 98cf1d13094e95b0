"""The argmax of linearly interpolated class probabilities on a finer grid, computed where it can differ only.

For a model grid that is the input grid with another spacing (same origin and direction, as ``ct.prepare_ct_volume``
makes it), a model index is an input index times the spacing ratio on each axis. Linear interpolation at an input
voxel is a convex combination of the 2 x 2 x 2 model voxels around it (its *cell*), and a convex combination of
probability vectors that all have the same argmax has that argmax too (each inequality p_c >= p_k, strict for
k < c, is kept by positive weights). So a voxel whose cell is *uniform* takes the cell's label without any
interpolation; only voxels in mixed cells (a thin shell along each boundary, a few percent of an organ's box) are
interpolated, exactly as ITK's ``ResampleImageFilter`` with a linear interpolator does (float64, rounded to
float32, compared with the first class winning ties; continuous indices in [-0.5, n - 0.5) are inside, the outer
half voxel takes the edge value, outside is background).

Arrays are (z, y, x); ITK index vectors (x, y, z).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

MIXED = np.uint8(255)


def shares_axes(grid, original) -> bool:
    """Whether ``grid`` (model) and ``original`` (input) SimpleITK images share origin and direction."""
    return bool(np.allclose(grid.GetOrigin(), original.GetOrigin(), atol=1e-6)
                and np.allclose(grid.GetDirection(), original.GetDirection(), atol=1e-9))


def _axis(first: int, last: int, ratio: float, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Input indices first..last on one axis -> (model index below, above, weight of above (float64), inside)."""
    j = np.arange(first, last + 1, dtype=np.float64) * ratio
    inside = (j >= -0.5) & (j < n - 0.5)
    jc = np.clip(j, 0.0, n - 1.0)
    j0 = np.floor(jc).astype(np.intp)
    return j0, np.minimum(j0 + 1, n - 1), jc - j0, inside


def cell_labels(prob_zyx: np.ndarray) -> np.ndarray:
    """(C, z, y, x) probabilities -> uint8 (z, y, x): the argmax of the cell whose lowest corner is each model voxel
    when all its corners share it (the last index's cell is the voxel itself), else :data:`MIXED`."""
    lab = np.argmax(prob_zyx, axis=0).astype(np.uint8)
    nz, ny, nx = lab.shape
    pad = np.pad(lab, ((0, 1), (0, 1), (0, 1)), mode="edge")
    same = np.ones(lab.shape, bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    same &= pad[dz:dz + nz, dy:dy + ny, dx:dx + nx] == lab
    return np.where(same, lab, MIXED)


def _interpolate(prob_zyx: np.ndarray, axes: List[tuple], where: Sequence[np.ndarray]) -> np.ndarray:
    """Trilinear values (C, M) float32 of every class at the box voxels ``where`` (z, y, x index arrays)."""
    _, ny, nx = prob_zyx.shape[1:]
    flat = prob_zyx.reshape(prob_zyx.shape[0], -1)
    # per axis: (model index, weight) of the voxel below and above each point
    (z0, z1, wz, _), (y0, y1, wy, _), (x0, x1, wx, _) = axes
    iz, iy, ix = where
    zs = [(z0[iz] * (ny * nx), 1.0 - wz[iz]), (z1[iz] * (ny * nx), wz[iz])]
    ys = [(y0[iy] * nx, 1.0 - wy[iy]), (y1[iy] * nx, wy[iy])]
    xs = [(x0[ix], 1.0 - wx[ix]), (x1[ix], wx[ix])]
    corners = [(oz + oy + ox, fz * fy * fx) for oz, fz in zs for oy, fy in ys for ox, fx in xs]
    out = np.zeros((prob_zyx.shape[0], iz.size), np.float64)
    for c in range(prob_zyx.shape[0]):  # 1D takes per class: several times faster than one 2D fancy index
        for offset, weight in corners:
            out[c] += flat[c].take(offset) * weight
    return out.astype(np.float32)


def _runs(axes: List[tuple]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per axis, for every model index: (first box index, number of box indices) of the input points it is the
    model index below of. That index rises with the input index, so each one owns a run of input indices."""
    runs = []
    for j0, *_ in axes:
        count = np.bincount(j0, minlength=int(j0.max()) + 1)
        runs.append((np.cumsum(count) - count, count))
    return runs


def _chunks(cells_zyx: np.ndarray, runs, max_voxels: int = 1 << 18):
    """``cells_zyx`` (K, 3) in groups owning at most about ``max_voxels`` input voxels each: the per-voxel index and
    weight arrays of a group stay a few MB (a liver's shell in a 300-slice CT has over a million voxels)."""
    if not len(cells_zyx):
        return
    owned = np.prod([count[cells_zyx[:, a]] for a, (_, count) in enumerate(runs)], axis=0)
    edges = np.flatnonzero(np.diff(np.cumsum(owned) // max_voxels)) + 1
    yield from np.split(cells_zyx, edges)


def _voxels_of_cells(cells_zyx: np.ndarray, runs) -> Tuple[np.ndarray, ...]:
    """Box voxel indices (z, y, x arrays) of every input voxel whose lower cell corner is one of ``cells_zyx``
    (K, 3), generated run by run (:func:`_runs`) without scanning the box."""
    first = [f[cells_zyx[:, a]] for a, (f, _) in enumerate(runs)]
    count = [c[cells_zyx[:, a]] for a, (_, c) in enumerate(runs)]
    per_cell = count[0] * count[1] * count[2]
    cell = np.repeat(np.arange(len(cells_zyx)), per_cell)
    k = np.arange(int(per_cell.sum())) - np.repeat(np.cumsum(per_cell) - per_cell, per_cell)
    kz, rest = np.divmod(k, (count[1] * count[2])[cell])
    ky, kx = np.divmod(rest, count[2][cell])
    return first[0][cell] + kz, first[1][cell] + ky, first[2][cell] + kx


def argmax_on_input_box(prob_zyx: np.ndarray, grid, original, start, stop) -> np.ndarray:
    """Labels uint8 (Z, Y, X) of the input-grid box ``start..stop`` (x, y, z, inclusive): the argmax of the classes'
    linear interpolation (see the module docstring). ``grid``/``original``: the model and input SimpleITK images,
    sharing their axes."""
    ratio = np.asarray(original.GetSpacing()) / np.asarray(grid.GetSpacing())  # (x, y, z)
    n_xyz = grid.GetSize()
    axes = [_axis(int(start[a]), int(stop[a]), float(ratio[a]), int(n_xyz[a])) for a in (2, 1, 0)]
    cells = cell_labels(prob_zyx)
    # the cell label of each input voxel, gathered one axis at a time (uint8: cheap even on 512 x 512 x 300)
    labels = cells.take(axes[0][0], axis=0).take(axes[1][0], axis=1).take(axes[2][0], axis=2)
    lo = [int(ax[0][0]) for ax in axes]
    hi = [int(ax[0][-1]) + 1 for ax in axes]
    mixed_cells = np.argwhere(cells[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == MIXED) + np.asarray(lo)
    runs = _runs(axes)
    for chunk in _chunks(mixed_cells, runs):
        where = _voxels_of_cells(chunk, runs)
        labels[where] = np.argmax(_interpolate(prob_zyx, axes, where), axis=0).astype(np.uint8)
    for a, ax in enumerate(axes):
        if not ax[3].all():
            index = [slice(None)] * 3
            index[a] = ~ax[3]
            labels[tuple(index)] = 0  # outside the model image: ITK's default, background
    return labels
