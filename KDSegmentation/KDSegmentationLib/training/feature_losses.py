"""Feature distillation losses (registered with :func:`losses.register_loss`): FitNets hints through 1x1 adapters,
channel-wise distillation and pooled pairwise affinity. Features are name -> (B, C_name, *S_name) dicts from
``net(x, return_features=True)``; the teacher's are always detached.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from KDSegmentationLib.training.losses import DistillLoss, Features, _resize_like, register_loss

# full-resolution feature names (stride 1): left out of the default feature pairs, they would dominate memory in 3D
_FULL_RES = ("enc0", "dec0")


def _get_feature(features: Features, name: str, who: str) -> torch.Tensor:
    if features is None:
        raise ValueError(f"this loss needs the {who}'s features: call the network with return_features=True")
    try:
        return features[name]
    except KeyError:
        raise KeyError(f"{who} has no feature {name!r}; it has {', '.join(features)}") from None


def _normalise_pairs(feature_pairs: Optional[Iterable], student_channels: Optional[Mapping[str, int]],
                     teacher_channels: Optional[Mapping[str, int]], loss_name: str) -> List[Tuple[str, str]]:
    """Feature pairs as (student_name, teacher_name) tuples; by default every name both networks have except the
    full-resolution ones. Also checks the names against the channel dicts."""
    if student_channels is None or teacher_channels is None:
        raise ValueError(f"the {loss_name!r} loss needs student_channels and teacher_channels "
                         "(pass net.feature_channels of both networks)")
    if feature_pairs is None:
        pairs = [(n, n) for n in student_channels if n in teacher_channels and n not in _FULL_RES]
    else:
        pairs = []
        for p in feature_pairs:
            if isinstance(p, str):
                p = (p, p)
            s, t = p
            pairs.append((str(s), str(t)))
    if not pairs:
        raise ValueError(f"the {loss_name!r} loss has no feature pairs to distil")
    for s, t in pairs:
        if s not in student_channels:
            raise ValueError(f"student has no feature {s!r}; it has {', '.join(student_channels)}")
        if t not in teacher_channels:
            raise ValueError(f"teacher has no feature {t!r}; it has {', '.join(teacher_channels)}")
    return pairs


def _make_adapters(pairs: Sequence[Tuple[str, str]], student_channels: Mapping[str, int],
                   teacher_channels: Mapping[str, int], spatial_dims: int) -> nn.ModuleDict:
    """One 1x1 convolution per pair mapping the student's channels to the teacher's (FitNets' regressor)."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.ModuleDict({_pair_key(s, t): conv(student_channels[s], teacher_channels[t], 1) for s, t in pairs})


def _pair_key(s: str, t: str) -> str:
    return f"{s}->{t}"  # ModuleDict keys may not contain '.'


@register_loss("hint")
class HintLoss(DistillLoss):
    """FitNets hint loss: MSE between 1x1-adapted student features and teacher features, averaged over pairs.

    ``feature_pairs``: [(student_name, teacher_name), ...] (a single name means the same name on both sides); by
    default every name both networks expose except the full-resolution ones. The adapters (one 1x1 conv per pair,
    student channels -> teacher channels) are parameters of this loss: optimise them with the student. A student
    feature of a different size than the teacher's is resized to it (linear interpolation).
    """

    needs_features = True

    def __init__(self, student_channels: Optional[Mapping[str, int]] = None,
                 teacher_channels: Optional[Mapping[str, int]] = None, feature_pairs: Optional[Iterable] = None,
                 spatial_dims: int = 2):
        super().__init__()
        self.pairs = _normalise_pairs(feature_pairs, student_channels, teacher_channels, "hint")
        self.adapters = _make_adapters(self.pairs, student_channels, teacher_channels, spatial_dims)

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        total = 0.0
        for s, t in self.pairs:
            ft = _get_feature(teacher_features, t, "teacher").detach().float()
            fs = self.adapters[_pair_key(s, t)](_get_feature(student_features, s, "student").float())
            total = total + F.mse_loss(_resize_like(fs, ft), ft)
        return total / len(self.pairs)


def channel_wise_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """CWD term: each channel's map becomes a distribution over positions (softmax over *S at tau); KL(teacher ||
    student) summed over positions, averaged over batch and channels, times tau^2. (B, C, *S) x 2 -> scalar."""
    b, c = student.shape[:2]
    s = student.float().reshape(b * c, -1) / tau
    t = teacher.detach().float().reshape(b * c, -1) / tau
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="sum", log_target=True)
    return tau * tau * kl / (b * c)


@register_loss("cwd")
class CWDLoss(DistillLoss):
    """Channel-wise distillation (Shu et al., ICCV 2021): per channel, a spatial softmax at ``tau`` and a KL.

    On the logits by default (``on_logits``); with ``on_features=True`` also on the feature pairs (student features
    mapped by 1x1 adapters to the teacher's channels); the terms are averaged. ``tau`` (not ``temperature``) so that
    a common ``temperature`` given for the KD loss does not change it; the paper uses 4 on logits.
    """

    def __init__(self, tau: float = 4.0, on_logits: bool = True, on_features: bool = False,
                 student_channels: Optional[Mapping[str, int]] = None,
                 teacher_channels: Optional[Mapping[str, int]] = None, feature_pairs: Optional[Iterable] = None,
                 spatial_dims: int = 2):
        super().__init__()
        if not (on_logits or on_features):
            raise ValueError("cwd needs on_logits or on_features")
        self.tau = float(tau)
        self.on_logits = bool(on_logits)
        self.needs_features = bool(on_features)
        self.pairs = _normalise_pairs(feature_pairs, student_channels, teacher_channels, "cwd") if on_features else []
        self.adapters = _make_adapters(self.pairs, student_channels, teacher_channels, spatial_dims) \
            if on_features else nn.ModuleDict()

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        terms = []
        if self.on_logits:
            terms.append(channel_wise_kl(student_logits, teacher_logits, self.tau))
        for s, t in self.pairs:
            ft = _get_feature(teacher_features, t, "teacher")
            fs = self.adapters[_pair_key(s, t)](_get_feature(student_features, s, "student").float())
            terms.append(channel_wise_kl(_resize_like(fs, ft), ft, self.tau))
        return sum(terms) / len(terms)


def pooled_affinity(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B, N, N) cosine similarities between the N = prod(grid) average-pooled positions."""
    pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
    f = pool(x.float(), tuple(grid)).flatten(2)          # (B, C, N)
    f = F.normalize(f, dim=1)
    return f.transpose(1, 2) @ f


@register_loss("affinity")
class AffinityLoss(DistillLoss):
    """Pairwise (structured) distillation (Liu et al., CVPR 2019): match the student's and teacher's pairwise
    similarity between positions, after average pooling by ``pool_size``.

    Memory is O(N^2) in the number N of pooled positions, so the pooled grid is shrunk further until
    N <= ``max_positions`` (a 96x96x64 CT patch pooled by 8 gives 1152 positions). Cosine similarity makes the loss
    independent of channel counts: no adapters. On the logits by default; with ``on_features=True`` on the feature
    pairs instead (averaged).
    """

    def __init__(self, pool_size: int = 8, max_positions: int = 4096, on_features: bool = False,
                 student_channels: Optional[Mapping[str, int]] = None,
                 teacher_channels: Optional[Mapping[str, int]] = None, feature_pairs: Optional[Iterable] = None):
        super().__init__()
        self.pool_size = int(pool_size)
        self.max_positions = int(max_positions)
        self.needs_features = bool(on_features)
        self.pairs = _normalise_pairs(feature_pairs, student_channels, teacher_channels, "affinity") \
            if on_features else []

    def _grid(self, size: Sequence[int]) -> Tuple[int, ...]:
        # at least 2 positions per axis (when the map has them): a 1-position affinity is constant and teaches nothing
        grid = [max(min(n, 2), math.ceil(n / self.pool_size)) for n in size]
        while math.prod(grid) > self.max_positions:
            grid = [max(1, math.ceil(g / 2)) for g in grid]
        return tuple(grid)

    def _term(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        grid = self._grid(ft.shape[2:])
        return (pooled_affinity(fs, grid) - pooled_affinity(ft.detach(), grid)).pow(2).mean()

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=None,
                teacher_features=None):
        if not self.pairs:
            return self._term(student_logits, teacher_logits)
        terms = [self._term(_get_feature(student_features, s, "student"), _get_feature(teacher_features, t, "teacher"))
                 for s, t in self.pairs]
        return sum(terms) / len(terms)


# ----------------------------------------------------------------------------------------------------------------
# combination
