"""Connected components of binary masks: the post-processing steps shared by the tasks."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-/8-connected component (3D/2D) of a boolean mask."""
    from scipy import ndimage

    if not mask.any():
        return mask
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    lab, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def select_component(mask: np.ndarray, seed: Sequence[int], spacing_mm: Sequence[float],
                     max_distance_mm: float = 10.0) -> np.ndarray:
    """Keep the 3D connected component (26-neighbourhood) of ``mask`` that contains ``seed``; uint8 0/1.

    mask: 0/1 array (3D); seed: its array index; spacing_mm: voxel size per array axis (an orthonormal direction
    matrix keeps distances, so index offsets times spacing are physical distances). When no component contains the
    seed, keeps the one with the voxel nearest to the seed if that voxel is within ``max_distance_mm``; else empty.
    """
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    keep = labels[tuple(seed)]
    if keep == 0:
        idx = np.argwhere(labels > 0)
        dist = np.sqrt((((idx - np.asarray(seed)) * np.asarray(spacing_mm, float)) ** 2).sum(axis=1))
        best = int(np.argmin(dist))
        if dist[best] > max_distance_mm:
            return np.zeros(mask.shape, np.uint8)
        keep = labels[tuple(idx[best])]
    return (labels == keep).astype(np.uint8)
