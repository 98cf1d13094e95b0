"""The numbers of a run worked out from the config, the task and the data: batch, patch, steps, schedule, workers."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.sampling import MixedBatchSampler

# per-task defaults: (batch on CUDA, batch on CPU, patches per labelled case per epoch, epochs)
TASK_DEFAULTS = {
    "retina": (16, 4, 32, 100),
    "lung_nodule": (64, 16, 2, 100),
    "liver": (2, 1, 16, 100),
}


@dataclass
class Plan:
    """``batch_size`` per process; ``patch`` in array order; ``budget_s`` the time budget (None: none)."""

    batch_size: int
    patch: Tuple[int, ...]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    budget_s: Optional[float]
    val_every: int
    ckpt_every: int
    workers: int
    warmup_fraction: float = 0.0

    def fraction_done(self, step: int, elapsed_s: float) -> float:
        """Share of the run done, by steps or by time, whichever is further."""
        return max(step / self.total_steps, elapsed_s / self.budget_s if self.budget_s else 0.0)


def lr_factor(step: int, fraction: float, warmup_steps: int, schedule: str, floor: float = 0.01,
              warmup_fraction: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine or poly(0.9) decay to ``floor`` as ``fraction`` (share
    of the run done, by steps or by time, whichever is further) goes from 0 to 1.

    The warm-up ends after ``warmup_steps`` steps or ``warmup_fraction`` of the run, whichever comes first: under a
    time budget far fewer steps may fit than were planned, and a warm-up counted in planned steps alone would then
    take a large share of the run at a reduced rate (216 of a 3D teacher's 528 steps)."""
    p = min(max(fraction, 0.0), 1.0)
    if step < warmup_steps:
        ramp = (step + 1) / warmup_steps
        if warmup_fraction > 0:
            ramp = max(ramp, p / warmup_fraction)
        if ramp < 1.0:
            return ramp
    if schedule == "poly":
        return max(floor, (1.0 - p) ** 0.9)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def _batch_and_patch(cfg: TrainConfig, task: TaskSpec, cuda: bool) -> Tuple[int, Tuple[int, ...]]:
    b_gpu, b_cpu, _, _ = TASK_DEFAULTS.get(task.name, (8, 2, 16, 100))
    batch = int(cfg.batch_size or (b_gpu if cuda else b_cpu))
    if batch < 1:
        raise InputError("--batch-size must be at least 1")
    patch = tuple(int(p) for p in (cfg.patch or tuple(reversed(task.roi_size))))
    if len(patch) != task.spatial_dims or min(patch) < 8:
        raise InputError(f"--patch needs {task.spatial_dims} sizes of at least 8 for {task.name} "
                         f"(got {list(patch)})")
    return batch, patch


def make_plan(cfg: TrainConfig, task: TaskSpec, n_labelled: int, n_unlabelled: int, cuda: bool,
              world: int = 1) -> Plan:
    """The plan for ``n_labelled`` + ``n_unlabelled`` training cases on ``world`` processes."""
    _, _, ppc, epochs = TASK_DEFAULTS.get(task.name, (8, 2, 16, 100))
    batch, patch = _batch_and_patch(cfg, task, cuda)
    per_labelled = MixedBatchSampler(n_labelled, n_unlabelled, batch, 1,
                                     unlabelled_fraction=cfg.unlabelled_fraction).per_l
    ppc = int(cfg.patches_per_case or ppc)
    n_cases = n_labelled if n_labelled else n_unlabelled
    # an epoch: every labelled case seen ``ppc`` times (every unlabelled one when there are no labels)
    per_step = max(1, per_labelled if n_labelled else batch) * world
    spe = max(1, math.ceil(n_cases * ppc / per_step))
    total = int(cfg.steps) if cfg.steps else int(cfg.epochs or epochs) * spe
    if total < 1:
        raise InputError("nothing to train: --steps/--epochs must be at least 1")
    warmup = min(500, max(1, int(round(cfg.warmup * total)))) if cfg.warmup > 0 else 0
    # a student started from a trained one (--init: local distillation) is fine-tuned, at a quarter of the rate
    lr = float(cfg.lr or (1e-3 if cfg.role == "teacher" else 5e-4 if cfg.init else 2e-3))
    budget = float(cfg.max_minutes) * 60.0 if cfg.max_minutes else None
    if cfg.workers is None:
        cpus = os.cpu_count() or 1
        workers = max(0, min(12, cpus // world - 1)) if cuda else 0
    else:
        workers = int(cfg.workers)
    return Plan(batch_size=batch, patch=patch, steps_per_epoch=spe, total_steps=total, warmup_steps=warmup, lr=lr,
                budget_s=budget, val_every=int(cfg.val_every or spe), ckpt_every=int(cfg.ckpt_every or spe),
                workers=workers, warmup_fraction=float(cfg.warmup))
