"""Distillation losses: a registry of named losses, combined by weight (``distiller.Distiller`` runs them).

Every loss is an ``nn.Module`` with one signature::

    loss(student_logits, teacher_logits, target, student_features, teacher_features) -> scalar tensor

- ``student_logits``, ``teacher_logits``: (B, C, *S) raw scores (2D or 3D), same size;
- ``target``: hard labels (B, *S) or (B, 1, *S) integer, soft labels (B, C, *S) float probabilities (e.g. the
  fraction of readers who marked a voxel), or None for unlabelled images;
- ``student_features``, ``teacher_features``: name -> (B, C_name, *S_name) dicts from
  ``net(x, return_features=True)`` (see ``networks``); only feature losses read them.

Pixel/voxel-wise terms are averaged over the batch AND the voxels, so a loss value does not grow with the image or
patch size (a plain ``KLDivLoss(reduction='batchmean')`` divides by the batch only and so sums over voxels).
Everything is computed in float32 so that mixed precision does not underflow the logarithms. The teacher's tensors
are always detached: no gradient ever reaches the teacher.

Combine losses by name: ``build_losses("kd=1.0,hint=0.5", alpha=0.5, temperature=2.0, student_channels=...,
teacher_channels=..., spatial_dims=2)``; the common keyword arguments go to every loss that accepts them (by name),
per-loss options go in a dict spec: ``{"kd": 1.0, "cwd": {"weight": 0.5, "tau": 4.0}}`` (or the same as JSON text).
Design after torchdistill (losses in a registry, chosen by name); the code is original.
"""
from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from KDSegmentationLib.errors import InputError

Features = Optional[Mapping[str, torch.Tensor]]

LOSSES: Dict[str, type] = {}


def register_loss(name: str):
    """Class decorator adding a loss to ``LOSSES`` under ``name``."""
    def add(cls):
        LOSSES[name] = cls
        cls.registry_name = name
        return cls
    return add


# ----------------------------------------------------------------------------------------------------------------
# helpers

def kl_per_voxel(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) summed over classes, averaged over batch and voxels (nats).

    (B, C, *S), (B, C, *S) -> scalar. The teacher's distribution comes first (it is the reference), as in Hinton
    et al.: with teacher (0.8, 0.2) and student (0.7, 0.3) this is 0.8 ln(0.8/0.7) + 0.2 ln(0.2/0.3) = 0.0257.
    """
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1).mean()


def split_target(target: torch.Tensor, logits: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """Classify a target as 'hard' -> (B, 1, *S) long labels, or 'soft' -> (B, C, *S) float probabilities."""
    if target.is_floating_point() and target.shape == logits.shape:
        return "soft", target.float()
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.dim() != logits.dim() or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
        raise ValueError(f"target of shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
                         "expected (B, *S) or (B, 1, *S) labels, or (B, C, *S) probabilities")
    return "hard", target.long()


def _resize_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Resize (B, C, *S) to ref's spatial size (linear); identity when sizes already match."""
    if x.shape[2:] == ref.shape[2:]:
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=ref.shape[2:], mode=mode, align_corners=False)


def _zero_like(logits: torch.Tensor) -> torch.Tensor:
    # zero that stays attached to the graph: a total made only of zero terms can still be backpropagated
    return logits.float().sum() * 0.0


# ----------------------------------------------------------------------------------------------------------------
# losses

class DistillLoss(nn.Module):
    """Base class. ``needs_teacher``: reads the teacher's output; ``needs_features``: reads the features dicts."""

    needs_teacher = True
    needs_features = False
    registry_name = "?"

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None, student_features: Features = None,
                teacher_features: Features = None) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@register_loss("seg")
class SegLoss(DistillLoss):
    """Dice + cross-entropy against the labels (MONAI DiceCELoss with softmax); 0 when ``target`` is None.

    Hard labels are one-hot encoded; soft labels (B, C, *S) are used as they are (soft Dice, and cross-entropy with
    class probabilities). Defaults follow nnU-Net: the background is left out of the Dice term (it would dilute the
    small vessel/tumour classes) and the Dice is computed over the whole batch (``batch=True``), so a patch without
    tumour does not produce a huge per-sample Dice loss.
    """

    needs_teacher = False

    def __init__(self, include_background: bool = False, batch: bool = True, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0):
        super().__init__()
        from monai.losses import DiceCELoss  # training only: keeps inference start-up free of MONAI

        common = dict(include_background=include_background, softmax=True, batch=batch,
                      lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.hard = DiceCELoss(to_onehot_y=True, **common)
        self.soft = DiceCELoss(to_onehot_y=False, **common)

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        if target is None:
            return _zero_like(student_logits)
        kind, tgt = split_target(target, student_logits)
        return (self.hard if kind == "hard" else self.soft)(student_logits.float(), tgt)


@register_loss("kd")
class KDLoss(DistillLoss):
    """Pixel/voxel-wise knowledge distillation (Hinton et al.), the project's formula::

        L = (1 - alpha) * L_seg(y, p_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    with the KL summed over classes and averaged over batch and voxels, and L_seg Dice + CE (``SegLoss``). The T^2
    keeps the soft term's gradient scale independent of T. Without labels (``target`` None) only the soft term is
    used, with weight 1: ``T^2 * KL``.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, include_background: bool = False,
                 batch: bool = True):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.seg = SegLoss(include_background=include_background, batch=batch)

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        soft = self.temperature ** 2 * kl_per_voxel(student_logits, teacher_logits, self.temperature)
        if target is None:
            return soft
        return (1.0 - self.alpha) * self.seg(student_logits, target=target) + self.alpha * soft


@register_loss("soft_ce")
class SoftCELoss(DistillLoss):
    """Soft-label cross-entropy ``-T^2 * sum_c q_T log p_s,T`` per voxel (q_T: teacher softmax at T), mean over voxels.

    Equals the KD term plus the teacher's entropy (constant for the student): same gradient, but its minimum is not
    zero, it is ``T^2 * H(q_T)``.
    """

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        t = self.temperature
        q = F.softmax(teacher_logits.detach().float() / t, dim=1)
        log_p = F.log_softmax(student_logits.float() / t, dim=1)
        return -(t * t) * (q * log_p).sum(dim=1).mean()


@register_loss("hard_label")
class HardLabelLoss(DistillLoss):
    """Cross-entropy (and optionally Dice) against the teacher's argmax, i.e. teacher pseudo-labels."""

    def __init__(self, dice: bool = False, include_background: bool = False, batch: bool = True):
        super().__init__()
        self.seg = SegLoss(include_background=include_background, batch=batch) if dice else None

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        pseudo = teacher_logits.detach().argmax(dim=1)  # (B, *S)
        if self.seg is not None:
            return self.seg(student_logits, target=pseudo)
        return F.cross_entropy(student_logits.float(), pseudo)


class CompositeLoss(nn.Module):
    """Weighted sum of named losses. ``forward(...) -> (total, {name: detached unweighted value})``.

    It is an ``nn.Module``: its ``parameters()`` are the adapters of the feature losses, which the trainer must
    optimise together with the student (``distiller.Distiller.trainable_parameters()`` does that).
    """

    def __init__(self, losses: Mapping[str, DistillLoss], weights: Mapping[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = {name: float(weights[name]) for name in losses}

    @property
    def needs_teacher(self) -> bool:
        return any(loss.needs_teacher for loss in self.losses.values())

    @property
    def needs_features(self) -> bool:
        return any(loss.needs_features for loss in self.losses.values())

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None, student_features: Features = None,
                teacher_features: Features = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        total = _zero_like(student_logits)
        parts: Dict[str, torch.Tensor] = OrderedDict()
        for name, loss in self.losses.items():
            if loss.needs_teacher and teacher_logits is None:
                raise ValueError(f"loss {name!r} needs the teacher's logits")
            value = loss(student_logits, teacher_logits, target, student_features, teacher_features)
            parts[name] = value.detach()
            total = total + self.weights[name] * value
        return total, parts

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={w:g}" for n, w in self.weights.items())


def parse_loss_spec(spec: Union[str, Mapping[str, Any]]) -> "OrderedDict[str, Dict[str, Any]]":
    """'kd=1.0,hint=0.5' (a bare name means weight 1), JSON text, or a dict name -> weight | {weight, options...}
    -> OrderedDict name -> {'weight': w, **options}."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except ValueError as exc:
                raise InputError(f"loss specification is not valid JSON ({exc}); "
                                 'write it like kd=1.0,hint=0.5 or {"kd": 1.0}') from None
        else:
            items: Dict[str, Any] = OrderedDict()
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, _, weight = part.partition("=")
                try:
                    items[name.strip()] = float(weight) if weight.strip() else 1.0
                except ValueError:
                    raise InputError(f"loss weight {weight!r} for {name.strip()!r} is not a number; "
                                     "write the losses like kd=1.0,hint=0.5") from None
            spec = items
    out: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for name, value in spec.items():
        if name not in LOSSES:
            raise InputError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        options = dict(value) if isinstance(value, Mapping) else {"weight": value}
        options["weight"] = float(options.get("weight", 1.0))
        out[name] = options
    if not out:
        raise InputError("no loss given; write the losses like kd=1.0,hint=0.5")
    return out


def build_losses(spec: Union[str, Mapping[str, Any]], **common: Any) -> CompositeLoss:
    """Build a ``CompositeLoss`` from a spec (see ``parse_loss_spec``).

    ``common`` keyword arguments (e.g. alpha, temperature, spatial_dims, student_channels, teacher_channels,
    feature_pairs) are given to each loss whose constructor has a parameter of that name; per-loss options from a
    dict spec override them.
    """
    losses: Dict[str, DistillLoss] = OrderedDict()
    weights: Dict[str, float] = {}
    for name, options in parse_loss_spec(spec).items():
        cls = LOSSES[name]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        options = dict(options)
        weights[name] = options.pop("weight")
        unknown = set(options) - accepted
        if unknown:
            raise InputError(f"loss {name!r} has no option {', '.join(sorted(unknown))}; "
                             f"its options are {', '.join(sorted(accepted)) or 'none'}")
        kwargs = {k: v for k, v in common.items() if k in accepted}
        kwargs.update(options)
        losses[name] = cls(**kwargs)
    return CompositeLoss(losses, weights)


__all__ = ["LOSSES", "register_loss", "DistillLoss", "SegLoss", "KDLoss", "SoftCELoss", "HardLabelLoss",
           "CompositeLoss", "build_losses", "parse_loss_spec", "kl_per_voxel", "split_target"]


# the feature losses register themselves on import (hint, cwd, affinity)
from KDSegmentationLib.training import feature_losses  # noqa: E402,F401
