"""Train / validation / held-out test split of cases, by patient (``Case.group``), deterministic for a seed."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.training.layouts import Case


def split_cases(cases: Sequence[Case], val_fraction: Optional[float] = 0.2, seed: int = 0,
                folds: int = 0, fold: int = 0) -> Tuple[List[Case], List[Case], List[Case]]:
    """Split cases into (train, val, held-out test) by ``group`` (patient), deterministically for a seed.

    Cases the dataset marks ``test`` are held out for final evaluation and never used for training or validation
    (DRIVE test, CHASE_DB1 children 11-14, the LIDC test patients). When the dataset has its own ``val`` cases and no
    fraction is requested they are the validation set. ``folds > 1`` picks fold ``fold`` of a grouped k-fold split
    as validation (cross-validation). ``val_fraction = 0`` trains on everything (no validation).
    """
    test = [c for c in cases if c.split == "test"]
    pool = [c for c in cases if c.split != "test"]
    if folds and folds > 1:
        groups = _shuffled_groups(pool, seed)
        if not 0 <= fold < folds:
            raise InputError(f"--fold must be in 0..{folds - 1}")
        val_groups = set(groups[fold::folds])
    elif val_fraction is None and any(c.split == "val" for c in pool):
        val_groups = {c.group for c in pool if c.split == "val"}
    else:
        frac = 0.2 if val_fraction is None else float(val_fraction)
        if not 0.0 <= frac < 1.0:
            raise InputError("--val-fraction must be in [0, 1)")
        groups = _shuffled_groups(pool, seed)
        n_val = int(round(frac * len(groups)))
        if frac > 0 and n_val == 0 and len(groups) >= 2:
            n_val = 1
        val_groups = set(groups[:n_val])
    train = [c for c in pool if c.group not in val_groups]
    val = [c for c in pool if c.group in val_groups]
    return train, val, test


def _shuffled_groups(cases: Sequence[Case], seed: int) -> List[str]:
    groups = sorted({c.group for c in cases})
    rng = np.random.default_rng(seed)
    return [groups[i] for i in rng.permutation(len(groups))]

