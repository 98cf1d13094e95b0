"""Per-task post-processing of labelmaps (numpy (z, y, x) arrays)."""
from __future__ import annotations

import numpy as np


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-/8-connected component of a boolean mask."""
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


def liver_postprocess(labels: np.ndarray) -> np.ndarray:
    """Liver = largest connected organ (liver+tumour) component; tumour only inside it.

    Why: false positives in spleen/heart are disconnected from the liver, and a tumour is by definition in the liver.
    """
    organ = largest_component(labels > 0)
    out = np.zeros_like(labels)
    out[organ] = 1
    out[organ & (labels == 2)] = 2
    return out
