"""Training data in one import: dataset layouts, raw-case reading, the prepared cache, splits and samples.

The code lives in one module per job; this module re-exports their public names (and the raw readers the
evaluation reuses) so that ``from KDSegmentationLib.training import datasets as ds`` keeps one short prefix:

- ``layouts``: :class:`Case`, the layout registry (:data:`LAYOUTS`, :func:`register_layout`), :func:`find_cases`;
- ``reading``: :func:`prepare_case` (one raw case -> model-space arrays; SimpleITK imported lazily);
- ``cache``: :func:`prepare_cache`, :func:`ensure_cache`, :func:`load_cache`, :func:`load_arrays`;
- ``splits``: :func:`split_cases` (by patient);
- ``sampling``: :class:`PatchDataset`, :class:`MixedBatchSampler`, :func:`make_loader`, :func:`network_input`.
"""
from __future__ import annotations

from KDSegmentationLib.training.cache import (CACHE_FORMAT, PreparedCache, default_cache_root, ensure_cache,
                                              is_cache, load_arrays, load_cache, prepare_cache, source_fingerprint,
                                              task_preprocessing)
from KDSegmentationLib.training.layouts import (IMAGE_EXTS, LAYOUTS, PHOTO_EXTS, Case, Layout, find_cases,
                                                layout_of, register_layout)
from KDSegmentationLib.training.reading import _ct_label_image, _read_mask_2d, _read_sitk, prepare_case
from KDSegmentationLib.training.sampling import (MixedBatchSampler, PatchDataset, make_loader, network_input,
                                                 worker_init)
from KDSegmentationLib.training.splits import split_cases

__all__ = ["CACHE_FORMAT", "PreparedCache", "default_cache_root", "ensure_cache", "is_cache", "load_arrays",
           "load_cache", "prepare_cache", "source_fingerprint", "task_preprocessing", "IMAGE_EXTS", "LAYOUTS",
           "PHOTO_EXTS", "Case", "Layout", "find_cases", "layout_of", "register_layout", "prepare_case",
           "_ct_label_image", "_read_mask_2d", "_read_sitk", "MixedBatchSampler", "PatchDataset", "make_loader",
           "network_input", "worker_init", "split_cases"]
