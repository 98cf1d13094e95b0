"""The data of a run: prepared caches, the split, and every case's arrays in memory.

Labelled cases train with their labels; unlabelled ones (``--unlabelled``, or cases of ``--data`` without labels)
only through the teacher. A dataset's own test split is never trained or validated on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.cache import PreparedCache, ensure_cache, load_arrays
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.layouts import Case
from KDSegmentationLib.training.splits import split_cases
from KDSegmentationLib.training.stopping import Distributed, Stopper
from KDSegmentationLib.training.validation import ValItem, val_item


@dataclass
class TrainData:
    """Arrays of the labelled and unlabelled training cases (dicts from ``cache.load_arrays``), the validation
    items, and a JSON-able description of data and split (for the model card)."""

    train: List[Dict[str, np.ndarray]]
    train_ids: List[str]
    unlabelled: List[Dict[str, np.ndarray]]
    unlabelled_ids: List[str]
    val: List[ValItem]
    description: Dict[str, Any]


@dataclass
class _Split:
    train: List[Case]
    unlabelled: List[Case]
    val: List[Case]
    val_vs_teacher: List[Case]
    test: List[Case]


def _cache_of(cfg: TrainConfig, path: Optional[str], sub: str, task: TaskSpec, progress: Progress,
              stopper: Stopper, dist: Distributed) -> Optional[PreparedCache]:
    """The prepared cache of ``path``; rank 0 prepares it while the other ranks wait."""
    if not path:
        return None
    cache_dir = Path(cfg.cache_dir) / sub if cfg.cache_dir else None
    if not dist.main:
        dist.barrier()
    cache = ensure_cache(path, task, cache_dir, progress if dist.main else None, stopper.requested)
    if dist.main:
        dist.barrier()
    return cache


def _split(cfg: TrainConfig, data: Optional[PreparedCache], val_data: Optional[PreparedCache],
           unlabelled: Optional[PreparedCache], use_teacher: bool) -> _Split:
    train, val, test = [], [], []
    if data is not None:
        if val_data is not None:
            train = [c for c in data.cases if c.split != "test"]
            test = [c for c in data.cases if c.split == "test"]
            val = [c for c in val_data.cases if c.labelled]
        else:
            train, val, test = split_cases(data.cases, cfg.val_fraction, cfg.split_seed, cfg.folds, cfg.fold)
    unl = [c for c in train if not c.labelled]
    train = [c for c in train if c.labelled]
    val = [c for c in val if c.labelled]
    if unlabelled is not None:
        # a dataset's own test split stays untouched even with its labels hidden
        unl += [c for c in unlabelled.cases if c.split != "test"]
    if not use_teacher:
        unl = []
    val_unl: List[Case] = []
    if use_teacher and not val and unl and cfg.val_fraction != 0:
        # nothing labelled to validate on (local distillation): hold out images, score agreement with the teacher
        unl, val_unl, _ = split_cases(unl, cfg.val_fraction, cfg.split_seed)
    if not train and not unl:
        raise InputError("no usable training cases: the data has no labelled images"
                         + ("" if use_teacher else " (teacher training needs labels)"))
    return _Split(train=train, unlabelled=unl, val=val, val_vs_teacher=val_unl, test=test)


def _arrays(cases: List[Case], should_stop: Callable[[], bool]) -> List[Dict[str, np.ndarray]]:
    out = []
    for c in cases:
        if should_stop():
            raise CancelledError("cancelled while loading the data")
        out.append(load_arrays(c))
    return out


def _description(cfg: TrainConfig, data: Optional[PreparedCache], split: _Split) -> Dict[str, Any]:
    ids = lambda cases: [c.case_id for c in cases]  # noqa: E731
    return {
        "data": {"train": str(cfg.data) if cfg.data else None,
                 "layout": data.manifest.get("layout") if data else None,
                 "source": data.manifest.get("source") if data else None,
                 "validation": str(cfg.val_data) if cfg.val_data else None,
                 "unlabelled": str(cfg.unlabelled) if cfg.unlabelled else None},
        "split": {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "folds": cfg.folds,
                  "fold": cfg.fold if cfg.folds else None, "train_cases": ids(split.train),
                  "unlabelled_cases": ids(split.unlabelled), "val_cases": ids(split.val),
                  "val_cases_vs_teacher": ids(split.val_vs_teacher), "held_out_test_cases": ids(split.test)},
    }


def load_training_data(cfg: TrainConfig, task: TaskSpec, progress: Progress, stopper: Stopper,
                       dist: Distributed, use_teacher: bool) -> TrainData:
    """Caches (prepared by rank 0 when needed), the split, and every case's arrays in memory."""
    # the sub-folder names are on disk in existing --cache folders (hence the old spelling): kept, caches are reused
    caches: Tuple[Optional[PreparedCache], ...] = tuple(
        _cache_of(cfg, path, sub, task, progress, stopper, dist)
        for path, sub in ((cfg.data, "data"), (cfg.val_data, "val"), (cfg.unlabelled, "unlabeled")))
    data_cache, val_cache, unl_cache = caches
    if data_cache is None and unl_cache is None:
        raise InputError("no training data: pass --data DIR (and/or --unlabelled DIR for distillation)")
    split = _split(cfg, data_cache, val_cache, unl_cache, use_teacher)
    train = _arrays(split.train, stopper.requested)
    unl = _arrays(split.unlabelled, stopper.requested)
    for a in unl:
        a.pop("label", None)  # hidden: the student learns these images from the teacher alone
        a.pop("soft", None)
    val = [val_item(c.case_id, a, task) for c, a in zip(split.val, _arrays(split.val, stopper.requested))]
    val += [val_item(c.case_id, a, task, vs_teacher=True)
            for c, a in zip(split.val_vs_teacher, _arrays(split.val_vs_teacher, stopper.requested))]
    return TrainData(train=train, train_ids=[c.case_id for c in split.train], unlabelled=unl,
                     unlabelled_ids=[c.case_id for c in split.unlabelled], val=val,
                     description=_description(cfg, data_cache, split))
