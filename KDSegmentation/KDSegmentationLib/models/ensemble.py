"""A teacher made of several models: their softmax probabilities averaged, each also on the flipped input
(test-time augmentation), returned as log-probabilities so that every consumer of logits works unchanged.

Distilling an ensemble into one small network is where knowledge distillation began (Hinton et al. 2015): the
average of models that err differently is better than each, and a student learns that average at one model's cost.
An ensemble is written as model files joined by commas (``--teacher a.kdseg.pt,b.kdseg.pt``, ``--model ...``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.catalog import SEPARATOR

class EnsembleNetwork(nn.Module):
    """x (B, C, *S) -> log of the mean softmax (B, classes, *S) over the members and, with ``flips``, over the input
    mirrored along each spatial axis (the mirror undone on the output). Float32; no features (feature losses
    need one teacher network)."""

    def __init__(self, networks: Sequence[nn.Module], flips: bool = True):
        super().__init__()
        self.members = nn.ModuleList(networks)
        self.flips = flips

    def _views(self, x: torch.Tensor) -> List[Tuple[int, ...]]:
        spatial = tuple(range(2, x.dim()))
        return [()] + ([(d,) for d in spatial] if self.flips else [])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if return_features:
            raise InputError("an ensemble teacher has no features: use output losses (kd, soft_ce, hard_label) "
                             "with it, or one teacher for feature losses (hint, cwd, affinity)")
        total, n = None, 0
        for net in self.members:
            for dims in self._views(x):
                xi = torch.flip(x, dims) if dims else x
                p = torch.softmax(net(xi).float(), dim=1)
                p = torch.flip(p, dims) if dims else p
                total = p if total is None else total + p
                n += 1
        return torch.log((total / n).clamp_min(1e-8))


class LoadedEnsemble:
    """The loaded members as one model: what :class:`models.files.LoadedModel` offers to inference and training."""

    runtime = "torch"

    def __init__(self, loaded: Sequence, flips: bool = True):
        self.members = list(loaded)
        self.network = EnsembleNetwork([m.network for m in self.members], flips).eval()
        self.path = Path(SEPARATOR.join(str(m.path) for m in self.members))

    @property
    def task(self) -> str:
        return self.members[0].task

    @property
    def role(self) -> str:
        return "ensemble"

    @property
    def header(self) -> Dict:
        first = self.members[0].header
        return {**first, "role": "ensemble", "arch": "ensemble",
                "card": {"name": " + ".join(Path(str(m.path)).name for m in self.members),
                         "members": [{"file": Path(str(m.path)).name, "arch": m.header.get("arch"),
                                      "version": m.header.get("version")} for m in self.members]}}

    @property
    def card(self) -> Dict:
        return self.header["card"]

    @property
    def decision_threshold(self) -> float:
        """The members' mean calibrated threshold: a first guess for the averaged probability."""
        return float(sum(m.decision_threshold for m in self.members) / len(self.members))

    @property
    def withheld_labels(self) -> Dict[int, str]:
        """A label any member withholds is withheld: the average of an unreliable model is not reliable."""
        out: Dict[int, str] = {}
        for m in self.members:
            out.update(m.withheld_labels)
        return out


def load_ensemble(paths: Sequence, device: str = "cpu", flips: bool = True) -> LoadedEnsemble:
    """Load every member (each checked as any model file is) and check that they agree on task and labels."""
    from KDSegmentationLib.models.files import load_model

    loaded = [load_model(p, device=device) for p in paths]
    first = loaded[0]
    for m in loaded[1:]:
        if m.task != first.task or m.header.get("labels") != first.header.get("labels"):
            raise InputError(f"ensemble members disagree: {Path(str(m.path)).name} is a {m.task} model with labels "
                             f"{m.header.get('labels')}, {Path(str(first.path)).name} a {first.task} model")
    return LoadedEnsemble(loaded, flips)
