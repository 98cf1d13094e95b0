"""The Distiller: student + frozen teacher + losses; one call computes a training step's loss.

Training goes through it (``trainer.Trainer``): a batch mixing labelled and unlabelled samples gets, for the labelled
ones, every loss with their target (hard-label/seg terms and the teacher terms), and for the unlabelled ones the
losses with ``target=None`` (teacher terms only; ``seg`` gives 0), weighted by each part's share of the batch.
Design after mdistiller (a Distiller returning the logits and a dict of named losses, teacher always in eval mode);
the code is original. :func:`build_distiller` makes one for a :class:`TrainConfig`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.models.header_checks import validate_header
from KDSegmentationLib.training.losses import CompositeLoss, Features, build_losses

Labelled = Union[Sequence[bool], torch.Tensor, None]


def _index(obj, idx):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return type(obj)((k, v[idx]) for k, v in obj.items())
    return obj[idx]


class Distiller(nn.Module):
    """Student + frozen teacher + losses.

    ``forward(x, target=None, labelled=None) -> (student_logits, {name: detached loss value}, total)``. The teacher
    is frozen (``requires_grad`` off), always in eval mode (``train()`` never switches it back: its BatchNorm
    statistics and dropout must not change) and runs under ``torch.no_grad`` in :meth:`teacher_outputs`, the one
    place it runs during training; it is only run when a loss needs it (``seg`` alone trains the student without
    distillation, and then ``teacher`` may be None). Features are only requested when a loss reads them.

    The teacher is kept out of the module tree (it must already be on the device): DDP then neither broadcasts its
    buffers nor looks at its parameters, and ``state_dict()`` holds the student and the loss adapters only.
    Optimise :meth:`trainable_parameters` (student + loss adapters), save ``student``.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], losses: CompositeLoss):
        super().__init__()
        self.student = student
        self.losses = losses
        object.__setattr__(self, "teacher", teacher)  # not registered: see the class docstring
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        elif losses.needs_teacher:
            raise ValueError("these losses need a teacher network")

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's parameters, then the losses' (adapters)."""
        yield from self.student.parameters()
        yield from self.losses.parameters()

    def teacher_outputs(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Features]:
        """The teacher's (logits (B, C, *S), features or None), without gradient; (None, None) when no loss reads
        the teacher."""
        if not self.losses.needs_teacher:
            return None, None
        if self.teacher.training:  # e.g. a caller's teacher.train(): BatchNorm statistics must not move
            self.teacher.eval()
        with torch.no_grad():
            if self.losses.needs_features:
                return self.teacher(x, return_features=True)
            return self.teacher(x), None

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None, labelled: Labelled = None,
                teacher_logits: Optional[torch.Tensor] = None):
        """x (B, in_channels, *S); target as for the losses ((B, *S) labels or (B, C, *S) probabilities) or None;
        ``labelled`` (B,) flags which samples' targets count (None: all, when a target is given);
        ``teacher_logits`` (B, classes, *S): the teacher's stored soft labels of this view (see
        ``teacher_targets``), used instead of running the teacher -> (student_logits, losses_dict, total)."""
        if self.losses.needs_features:
            s_logits, s_feats = self.student(x, return_features=True)
        else:
            s_logits, s_feats = self.student(x), None
        if teacher_logits is not None and self.losses.needs_teacher:
            t_logits, t_feats = teacher_logits, None
        else:
            t_logits, t_feats = self.teacher_outputs(x)
        total, parts = self.loss(s_logits, t_logits, target, s_feats, t_feats, labelled)
        return s_logits, parts, total

    def loss(self, s_logits, t_logits, target, s_feats, t_feats,
             labelled: Labelled = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of a batch that mixes labelled and unlabelled samples: the labelled part with its target, the
        unlabelled part with ``target=None`` (teacher terms only), weighted by their share of the batch."""
        flags: Optional[List[bool]] = None if labelled is None else [bool(v) for v in labelled]
        if target is None or (flags is not None and not any(flags)):
            return self.losses(s_logits, t_logits, None, s_feats, t_feats)
        if flags is None or all(flags):
            return self.losses(s_logits, t_logits, target, s_feats, t_feats)
        lab = torch.tensor([i for i, f in enumerate(flags) if f], device=s_logits.device)
        unl = torch.tensor([i for i, f in enumerate(flags) if not f], device=s_logits.device)
        w = len(lab) / len(flags)
        tot_l, parts_l = self.losses(s_logits[lab], _index(t_logits, lab), target[lab], _index(s_feats, lab),
                                     _index(t_feats, lab))
        tot_u, parts_u = self.losses(s_logits[unl], _index(t_logits, unl), None, _index(s_feats, unl),
                                     _index(t_feats, unl))
        parts = {k: w * parts_l[k] + (1 - w) * parts_u.get(k, 0.0) for k in parts_l}
        return w * tot_l + (1 - w) * tot_u, parts


# ----------------------------------------------------------------------------------------------------------------
# building one for a run
# ----------------------------------------------------------------------------------------------------------------
def default_losses(cfg: TrainConfig) -> str:
    """The loss spec of a run: ``--losses``, else kd=1 for a student with a teacher, else seg=1."""
    if cfg.losses:
        return cfg.losses
    return "kd=1" if (cfg.role == "student" and cfg.teacher) else "seg=1"


def _load(path: str, what: str, task: TaskSpec, device: torch.device):
    """A model file, or for ``a,b,...`` an ensemble of them (see :mod:`models.ensemble`)."""
    from KDSegmentationLib.models.catalog import is_ensemble, members
    from KDSegmentationLib.models.ensemble import load_ensemble
    from KDSegmentationLib.models.files import load_model

    loaded = load_ensemble(members(path), device=str(device)) if is_ensemble(path) else \
        load_model(path, device=str(device))
    if loaded.task != task.name:
        raise InputError(f"{what} {path} is a {loaded.task} model, not {task.name}")
    return loaded


def build_student(cfg: TrainConfig, task: TaskSpec, device: torch.device):
    """(student, arch, arch_args, --init model's header or None): the ``--init`` model, or a new network of the
    task's default (or ``--arch``) architecture."""
    from KDSegmentationLib.models import networks

    if cfg.init:
        loaded = _load(cfg.init, "--init", task, device)
        if cfg.arch and cfg.arch != loaded.header["arch"]:
            raise InputError(f"--arch {cfg.arch} differs from the --init model's {loaded.header['arch']}; drop one")
        loaded.network.train()
        return loaded.network, loaded.header["arch"], dict(loaded.header["arch_args"]), loaded.header
    arch, arch_args = networks.default_arch_args(task.name, "teacher" if cfg.role == "teacher" else "student")
    if cfg.arch and cfg.arch != arch:
        base = {k: arch_args[k] for k in ("spatial_dims", "in_channels", "out_channels")}
        arch, arch_args = cfg.arch, base
    arch_args.update(cfg.arch_args or {})
    # the same bounds a model file's header must meet: an architecture that could not be loaded again, or that
    # would exhaust memory, is refused before anything is built (one line, exit code 2)
    validate_header({"task": task.name, "arch": arch, "arch_args": arch_args}, None,
                    what="the network asked for by --arch/--arch-args is refused", remedy="change --arch-args")
    return networks.build_network(arch, **arch_args).to(device), arch, arch_args, None


def build_criterion(cfg: TrainConfig, task: TaskSpec, student: nn.Module, teacher: Optional[nn.Module],
                    device: torch.device) -> CompositeLoss:
    spec = default_losses(cfg)
    common: Dict[str, Any] = dict(
        alpha=cfg.alpha, temperature=cfg.temperature, spatial_dims=task.spatial_dims,
        student_channels=getattr(student, "feature_channels", None),
        teacher_channels=getattr(teacher, "feature_channels", None) if teacher is not None else None)
    try:
        criterion = build_losses(spec, **common).to(device)
    except ValueError as exc:
        raise InputError(f"losses {spec!r}: {exc}") from None
    if criterion.needs_teacher and teacher is None:
        raise InputError(f"losses {spec!r} need a teacher: pass --teacher FILE")
    return criterion


def weaker_teacher_warning(teacher_header: Optional[Dict[str, Any]],
                           student_header: Optional[Dict[str, Any]]) -> Optional[str]:
    """A warning when the teacher's card records a lower held-out Dice than the starting student's, averaged over
    the evaluations both cards hold (each the mean over labels): local distillation from it is expected to make the
    student worse (measured at a new camera in docs/new_site_hrf.md). One set alone would let a tie on the
    training camera decide against a teacher that is better on every other. None when the cards do not tell."""
    def scores(header):
        evals = ((header or {}).get("card") or {}).get("evaluation") or []
        return {e["title"]: float(np.mean([m["dice"]["mean"] for m in e["mean"].values()])) for e in evals
                if e.get("mean")}

    teacher, student = scores(teacher_header), scores(student_header)
    common = [t for t in teacher if t in student]
    if not common:
        return None
    t_mean, s_mean = (float(np.mean([d[t] for t in common])) for d in (teacher, student))
    if t_mean >= s_mean:
        return None
    sets = common[0] if len(common) == 1 else f"{len(common)} held-out sets"
    return (f"the teacher scored Dice {t_mean:.3f} on {sets}, below the starting student's {s_mean:.3f}: it has "
            "less to teach than the student knows, and distilling from it is expected to make the student worse; "
            "choose a stronger teacher (or an ensemble)")


def build_distiller(cfg: TrainConfig, task: TaskSpec, device: torch.device, log=None):
    """(distiller, arch, arch_args, teacher header or None, --init header or None) for a run. A teacher that no loss
    reads is dropped (with a warning through ``log(message, level=...)``)."""
    teacher = teacher_header = None
    if cfg.teacher:
        loaded = _load(cfg.teacher, "teacher", task, device)
        teacher, teacher_header = loaded.network, loaded.header
    student, arch, arch_args, init_header = build_student(cfg, task, device)
    criterion = build_criterion(cfg, task, student, teacher, device)
    if teacher is not None and not criterion.needs_teacher:
        if log is not None:
            log(f"the losses {default_losses(cfg)!r} do not use the teacher; it is ignored", level="warning")
        teacher = teacher_header = None
    return Distiller(student, teacher, criterion), arch, arch_args, teacher_header, init_header
