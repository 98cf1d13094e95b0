"""Training checkpoints: save and resume a run exactly (model, loss adapters, optimiser, RNG, progress).

``<output>.ckpt/last.pt`` holds format, fingerprint (what must not change between a run and its resumption), the
student's and the losses' weights, the optimiser, every RNG's state, and the run state (step, elapsed seconds,
history, validation history, best result and best weights). It is written atomically (``io.atomic``): a crash while
writing leaves the previous checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.atomic import atomic_path

CKPT_FORMAT = "kdseg-checkpoint/1"
# the run state kept in a checkpoint beside the weights
RUN_STATE_KEYS = ("step", "elapsed", "history", "val_history", "best", "best_state")
# keys of checkpoint fingerprints written before the spelling "unlabelled" -> the current key
_OLD_FINGERPRINT_KEYS = {"unlabeled_cases": "unlabelled_cases"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    _version, internal, _gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(list(internal), dtype=torch.int64),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
             "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((3, internal, None))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, fingerprint: Dict[str, Any], model: Dict[str, torch.Tensor],
                    criterion: torch.nn.Module, optimizer: torch.optim.Optimizer, run_state: Dict[str, Any]) -> None:
    """Write ``path`` atomically (its folder is created); ``model`` is the student's state dict (on the CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CKPT_FORMAT, "fingerprint": fingerprint, "model": model,
               "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
               **{k: run_state[k] for k in RUN_STATE_KEYS}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _current_fingerprint(stored: Dict[str, Any]) -> Dict[str, Any]:
    return {_OLD_FINGERPRINT_KEYS.get(k, k): v for k, v in stored.items()}


def load_checkpoint(path: Path, fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    """Read a checkpoint and check it was made with the same settings; raises :class:`InputError` otherwise."""
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    if ck.get("format") != CKPT_FORMAT:
        raise InputError(f"{path} is not a training checkpoint of this version; run without --resume")
    stored = _current_fingerprint(ck["fingerprint"])
    changed: List[str] = [k for k in fingerprint if stored.get(k) != fingerprint[k]]
    if changed:
        raise InputError(f"the checkpoint in {path.parent} was made with other settings ({', '.join(changed)});"
                         " resume with the same options, or start afresh without --resume")
    return ck


def restore(ck: Dict[str, Any], student: torch.nn.Module, criterion: torch.nn.Module,
            optimizer: torch.optim.Optimizer, run_state: Dict[str, Any]) -> None:
    """Load a checkpoint read by :func:`load_checkpoint` into the networks, the optimiser, the RNGs and
    ``run_state``."""
    student.load_state_dict(ck["model"])
    criterion.load_state_dict(ck["criterion"])
    optimizer.load_state_dict(ck["optimizer"])
    set_rng_state(ck["rng"])
    for k in RUN_STATE_KEYS:
        run_state[k] = ck[k]


def student_state(student: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of the student's weights (for checkpoints and the best validated weights)."""
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}


def remove_checkpoints(ckpt_dir: Optional[Path]) -> None:
    import shutil

    if ckpt_dir is not None and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
