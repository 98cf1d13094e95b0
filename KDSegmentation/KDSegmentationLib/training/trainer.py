"""Teacher training and teacher -> student distillation that never loses work.

:func:`train` runs both: a teacher with the ``seg`` loss, or a student with any loss spec of ``losses.py``
(``kd=1`` with alpha/temperature, ``seg=1,hint=0.5``, ...) against a frozen teacher, on labelled data, unlabelled
data (``unlabeled``: the student learns from the teacher alone) or both mixed in every batch.

What it guarantees:

- the output model is written once, at the end, atomically (``modelfile.save_model``); an existing file is never
  replaced without ``overwrite=True``; a run that fails or is cancelled leaves previous model files byte-identical;
- checkpoints (``<output>.ckpt/last.pt``: model, optimiser, schedule, RNG, step, history, best weights) are written
  atomically every ``ckpt_every`` steps and when the run is stopped; ``resume=True`` continues from the last one
  and reproduces an uninterrupted run (every training sample is a function of seed and step);
- SIGINT/SIGTERM, a cancel file or a ``should_stop`` callable stop the run after the current step, keep a
  checkpoint and raise :class:`CancelledError` (``.signal`` tells which signal, for exit codes 130/143);
- the time budget (``max_minutes``, whole run across resumes) ends the run normally, with the model written.

Progress goes through :class:`progress.Progress` (JSON lines: ``metric`` events with step, epoch, loss and each loss
component, lr, samples/s, ETA, and ``val_dice`` after each validation; ``progress`` events for the stages and each
checkpoint). At the end a report (``<output>.report.json`` and ``.report.png``: loss and Dice curves) is written
beside the model. Under ``torchrun`` (WORLD_SIZE > 1) the same code runs DDP: NCCL on CUDA, gloo on CPU, each rank
its own share of every global batch, rank 0 alone validates and writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from KDSegmentationLib.training import datasets as ds
from KDSegmentationLib.training.augment import warp_batch
from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.tasks import TaskSpec, get_task

MODEL_SUFFIX = ".kdseg.pt"
CKPT_FORMAT = "kdseg-checkpoint/1"

# per-task defaults: (batch on CUDA, batch on CPU, patches per labelled case per epoch, epochs)
_TASK_DEFAULTS = {
    "retina": (16, 4, 32, 100),
    "lung_nodule": (64, 16, 2, 100),
    "liver": (2, 1, 16, 100),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI maps its options 1:1 onto these fields).

    ``role`` is 'teacher' (train-teacher) or 'student' (distill). Unset values take per-task defaults. ``patch`` is
    in array order ((z, y, x) or (y, x)); default ``task.roi_size`` reversed. ``batch_size`` is per process.
    ``steps`` (optimiser steps) overrides ``epochs``; ``max_minutes`` caps the whole run (across resumes) and the
    learning-rate schedule follows whichever of steps and time runs out first.
    """

    task: str
    data: Optional[str] = None
    output: Optional[str] = None
    role: str = "student"
    teacher: Optional[str] = None
    losses: Optional[str] = None
    alpha: float = 0.5
    temperature: float = 2.0
    unlabeled: Optional[str] = None
    unlabeled_fraction: float = 0.5
    init: Optional[str] = None
    soft_labels: bool = False
    val_data: Optional[str] = None
    val_fraction: Optional[float] = None
    split_seed: int = 0
    folds: int = 0
    fold: int = 0
    epochs: Optional[int] = None
    steps: Optional[int] = None
    max_minutes: Optional[float] = None
    batch_size: Optional[int] = None
    patch: Optional[Sequence[int]] = None
    patches_per_case: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup: float = 0.03
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    workers: Optional[int] = None
    arch: Optional[str] = None
    arch_args: Optional[Dict[str, Any]] = None
    overwrite: bool = False
    resume: bool = False
    val_every: Optional[int] = None
    ckpt_every: Optional[int] = None
    ckpt_minutes: float = 10.0
    log_every: int = 10
    progress: str = "none"
    cache_dir: Optional[str] = None
    cancel_file: Optional[str] = None
    keep_checkpoints: bool = False
    deterministic: bool = False
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    version: Optional[str] = None
    command_line: Optional[str] = None
    augment: bool = True
    extra_card: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# stopping: signals, cancel file, callable, distributed agreement
# ----------------------------------------------------------------------------------------------------------------
class Stopper:
    """Collects stop requests; the loop polls :meth:`requested` after each step.

    The first SIGINT/SIGTERM only sets a flag (and restores the previous handler, so a second Ctrl-C interrupts
    at once); handlers are installed only from the main thread and removed by :meth:`close`.
    """

    def __init__(self, cancel_file: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None):
        self.cancel_file = Path(cancel_file) if cancel_file else None
        self.should_stop = should_stop
        self.signal: Optional[int] = None
        self.reason: Optional[str] = None
        self._old: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                    pass

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        self.reason = signal.Signals(signum).name
        if signum in self._old:
            signal.signal(signum, self._old[signum])

    def requested(self) -> bool:
        if self.reason is None:
            if self.cancel_file is not None and self.cancel_file.exists():
                self.reason = f"cancel file {self.cancel_file}"
            elif self.should_stop is not None and self.should_stop():
                self.reason = "stop requested"
        return self.reason is not None

    def close(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):  # pragma: no cover
                pass
        self._old = {}


class _Dist:
    """torchrun environment: rank, world size, local rank; a no-op when WORLD_SIZE is 1 or unset."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            from datetime import timedelta

            backend = "nccl" if device.type == "cuda" else "gloo"
            # long timeout: rank 0 validates and writes checkpoints while the others wait at a barrier
            torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=60))
            self.active = True

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def any_flag(self, flags: Sequence[bool], device: torch.device) -> List[bool]:
        """Element-wise OR of boolean flags over all ranks (every rank stops at the same step)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.active = False


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda (got {name!r})")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_tensor(),
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
             "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_tensor() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    return torch.tensor(list(internal), dtype=torch.int64)


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((3, internal, None))
    pos, has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_factor(step: int, fraction: float, warmup_steps: int, schedule: str, floor: float = 0.01) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps``, then cosine or poly(0.9) decay to ``floor``
    as ``fraction`` (share of the run done, by steps or by time, whichever is further) goes from 0 to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(fraction, 0.0), 1.0)
    if schedule == "poly":
        return max(floor, (1.0 - p) ** 0.9)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def dice_per_label(pred: np.ndarray, ref: np.ndarray, values: Sequence[int],
                   mask: Optional[np.ndarray] = None) -> Dict[int, float]:
    """Dice per label value; NaN where the label is absent from both (it then does not count in means)."""
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    out = {}
    for v in values:
        p, r = pred == v, ref == v
        s = int(p.sum()) + int(r.sum())
        out[v] = 2.0 * int(np.count_nonzero(p & r)) / s if s else float("nan")
    return out


def _nanmean(values) -> float:
    vals = [v for v in values if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def resolve_output(cfg: TrainConfig) -> Path:
    """The output file; ``distill`` without one gets ``<task>_student_local_vN.kdseg.pt`` in the user's model folder
    (N = next free version; on --resume, the newest version whose run left a checkpoint and no model)."""
    if cfg.output:
        out = Path(cfg.output)
        if not out.name.endswith(MODEL_SUFFIX):
            raise InputError(f"--output {out} must end with {MODEL_SUFFIX}")
        return out
    if cfg.role != "student":
        raise InputError("train-teacher needs --output FILE.kdseg.pt")
    from KDSegmentationLib.paths import user_models_dir

    folder = user_models_dir()
    pattern = f"{cfg.task}_student_local_v"
    taken = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(pattern):
                num = p.name[len(pattern):].split(".")[0]
                if num.isdigit():
                    taken.append(int(num))
    if cfg.resume:
        for n in sorted(set(taken), reverse=True):
            cand = folder / f"{pattern}{n}{MODEL_SUFFIX}"
            if (folder / f"{cand.name}.ckpt").is_dir() and not cand.exists():
                return cand
    n = max(taken, default=0) + 1
    return folder / f"{pattern}{n}{MODEL_SUFFIX}"


def _local_version(output: Path, task: str) -> Optional[str]:
    prefix = f"{task}_student_local_v"
    if output.name.startswith(prefix):
        num = output.name[len(prefix):].split(".")[0]
        if num.isdigit():
            return f"local-v{num}"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ValItem:
    """A validation case: network input (1, C, *S), or (n, 1, h, w) for slice stacks; reference (*S) / (n, h, w);
    an optional mask (FOV) restricting the Dice; ``vs_teacher``: scored against the teacher's prediction."""

    case_id: str
    x: torch.Tensor
    ref: Optional[np.ndarray]
    mask: Optional[np.ndarray] = None
    vs_teacher: bool = False


@dataclass
class TrainData:
    train: List[Dict[str, np.ndarray]]
    train_ids: List[str]
    unlabelled: List[Dict[str, np.ndarray]]
    unlabelled_ids: List[str]
    val: List[ValItem]
    description: Dict[str, Any]


def _val_item(case_id: str, arrays: Dict[str, np.ndarray], task: TaskSpec, vs_teacher: bool = False) -> ValItem:
    x = torch.from_numpy(np.ascontiguousarray(ds.network_input(arrays, task)))
    slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
    if not slices:
        x = x[None]
    mask = arrays.get("fov_ref", arrays.get("fov"))
    ref = None if vs_teacher else arrays["label"]
    return ValItem(case_id=case_id, x=x, ref=ref, mask=None if mask is None else np.asarray(mask, bool),
                   vs_teacher=vs_teacher)


def load_training_data(cfg: TrainConfig, task: TaskSpec, progress: Progress, stopper: Stopper, dist: _Dist,
                       use_teacher: bool) -> TrainData:
    """Caches (prepared by rank 0 when needed), the split, and every case's arrays in memory."""
    def cache_of(path: Optional[str], sub: str):
        if not path:
            return None
        cache_dir = Path(cfg.cache_dir) / sub if cfg.cache_dir else None
        if not dist.main:
            dist.barrier()
        cache = ds.ensure_cache(path, task, cache_dir, progress if dist.main else None, stopper.requested)
        if dist.main:
            dist.barrier()
        return cache

    data_cache = cache_of(cfg.data, "data")
    val_cache = cache_of(cfg.val_data, "val")
    unl_cache = cache_of(cfg.unlabeled, "unlabeled")
    if data_cache is None and unl_cache is None:
        raise InputError("no training data: pass --data DIR (and/or --unlabeled DIR for distillation)")

    train_cases, val_cases, test_cases = [], [], []
    if data_cache is not None:
        if val_cache is not None:
            train_cases = [c for c in data_cache.cases if c.split != "test"]
            test_cases = [c for c in data_cache.cases if c.split == "test"]
            val_cases = [c for c in val_cache.cases if c.labelled]
        else:
            train_cases, val_cases, test_cases = ds.split_cases(data_cache.cases, cfg.val_fraction, cfg.split_seed,
                                                                cfg.folds, cfg.fold)
    unl_cases = [c for c in train_cases if not c.labelled]
    train_cases = [c for c in train_cases if c.labelled]
    val_cases = [c for c in val_cases if c.labelled]
    if unl_cache is not None:
        # a dataset's own test split stays untouched even with its labels hidden
        unl_cases += [c for c in unl_cache.cases if c.split != "test"]
    if not use_teacher:
        unl_cases = []
    val_unl = []
    if use_teacher and not val_cases and unl_cases and cfg.val_fraction != 0:
        # nothing labelled to validate on (local distillation): hold out images, score agreement with the teacher
        unl_cases, val_unl, _ = ds.split_cases(unl_cases, cfg.val_fraction, cfg.split_seed)
    if not train_cases and not unl_cases:
        raise InputError("no usable training cases: the data has no labelled images"
                         + ("" if use_teacher else " (teacher training needs labels)"))

    def arrays(cases):
        out = []
        for c in cases:
            if stopper.requested():
                raise CancelledError("cancelled while loading the data")
            out.append(ds.load_arrays(c))
        return out

    train = arrays(train_cases)
    unl = arrays(unl_cases)
    for a in unl:
        a.pop("label", None)  # hidden: the student learns these images from the teacher alone
        a.pop("soft", None)
    val = [_val_item(c.case_id, a, task) for c, a in zip(val_cases, arrays(val_cases))]
    val += [_val_item(c.case_id, a, task, vs_teacher=True) for c, a in zip(val_unl, arrays(val_unl))]
    description = {
        "data": {"train": str(cfg.data) if cfg.data else None,
                 "layout": data_cache.manifest.get("layout") if data_cache else None,
                 "source": data_cache.manifest.get("source") if data_cache else None,
                 "validation": str(cfg.val_data) if cfg.val_data else None,
                 "unlabeled": str(cfg.unlabeled) if cfg.unlabeled else None},
        "split": {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "folds": cfg.folds,
                  "fold": cfg.fold if cfg.folds else None,
                  "train_cases": [c.case_id for c in train_cases],
                  "unlabeled_cases": [c.case_id for c in unl_cases],
                  "val_cases": [c.case_id for c in val_cases],
                  "val_cases_vs_teacher": [c.case_id for c in val_unl],
                  "held_out_test_cases": [c.case_id for c in test_cases]},
    }
    return TrainData(train=train, train_ids=[c.case_id for c in train_cases], unlabelled=unl,
                     unlabelled_ids=[c.case_id for c in unl_cases], val=val, description=description)


def make_loader(dataset: ds.PatchDataset, sampler: ds.MixedBatchSampler, workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    kwargs: Dict[str, Any] = {}
    if workers > 0:
        # persistent: workers (and their copy of the arrays) live for the whole run; deep prefetch keeps the GPU fed
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=ds.worker_init)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# networks and loss
# ----------------------------------------------------------------------------------------------------------------
class TrainModule(torch.nn.Module):
    """Student + loss in one module, so that DDP all-reduces the student's and the loss adapters' gradients
    together. ``forward`` -> (student logits, total loss, {name: detached value})."""

    def __init__(self, student: torch.nn.Module, criterion: torch.nn.Module, want_features: bool):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.want_features = want_features

    def forward(self, x, teacher_logits=None, teacher_feats=None, target=None,
                labelled: Optional[List[bool]] = None):
        if self.want_features:
            logits, feats = self.student(x, return_features=True)
        else:
            logits, feats = self.student(x), None
        return (logits,) + combined_loss(self.criterion, logits, teacher_logits, target, feats, teacher_feats,
                                         labelled)


def _index(obj, idx):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return type(obj)((k, v[idx]) for k, v in obj.items())
    return obj[idx]


def combined_loss(criterion, s_logits, t_logits, target, s_feats, t_feats, labelled: Optional[List[bool]]):
    """The loss of a batch that mixes labelled and unlabelled samples: the labelled part with its target, the
    unlabelled part with ``target=None`` (teacher only), weighted by their share of the batch."""
    n = s_logits.shape[0]
    if labelled is None or all(labelled):
        return criterion(s_logits, t_logits, target, s_feats, t_feats)
    if not any(labelled):
        return criterion(s_logits, t_logits, None, s_feats, t_feats)
    lab = torch.tensor([i for i, f in enumerate(labelled) if f], device=s_logits.device)
    unl = torch.tensor([i for i, f in enumerate(labelled) if not f], device=s_logits.device)
    w = len(lab) / n
    tot_l, parts_l = criterion(s_logits[lab], _index(t_logits, lab), target[lab], _index(s_feats, lab),
                               _index(t_feats, lab))
    tot_u, parts_u = criterion(s_logits[unl], _index(t_logits, unl), None, _index(s_feats, unl),
                               _index(t_feats, unl))
    parts = {k: w * parts_l[k] + (1 - w) * parts_u.get(k, 0.0) for k in parts_l}
    return w * tot_l + (1 - w) * tot_u, parts


def build_models(cfg: TrainConfig, task: TaskSpec, device: torch.device):
    """(student, arch, arch_args, teacher or None, teacher header or None, --init model's header or None)."""
    from KDSegmentationLib.models import networks
    from KDSegmentationLib.models.files import load_model

    teacher = teacher_header = None
    if cfg.teacher:
        loaded = load_model(cfg.teacher, device=str(device))
        if loaded.task != task.name:
            raise InputError(f"teacher {cfg.teacher} is a {loaded.task} model, not {task.name}")
        teacher, teacher_header = loaded.network, loaded.header
        teacher.requires_grad_(False)
        teacher.eval()
    if cfg.init:
        loaded = load_model(cfg.init, device=str(device))
        if loaded.task != task.name:
            raise InputError(f"--init {cfg.init} is a {loaded.task} model, not {task.name}")
        if cfg.arch and cfg.arch != loaded.header["arch"]:
            raise InputError(f"--arch {cfg.arch} differs from the --init model's {loaded.header['arch']}; drop one")
        student, arch, arch_args = loaded.network, loaded.header["arch"], dict(loaded.header["arch_args"])
        student.train()
        return student, arch, arch_args, teacher, teacher_header, loaded.header
    role = "teacher" if cfg.role == "teacher" else "student"
    arch, arch_args = networks.default_arch_args(task.name, role)
    if cfg.arch and cfg.arch != arch:
        base = {k: arch_args[k] for k in ("spatial_dims", "in_channels", "out_channels")}
        arch, arch_args = cfg.arch, base
    arch_args.update(cfg.arch_args or {})
    student = networks.build_network(arch, **arch_args).to(device)
    return student, arch, arch_args, teacher, teacher_header, None


def default_losses(cfg: TrainConfig) -> str:
    if cfg.losses:
        return cfg.losses
    return "kd=1" if (cfg.role == "student" and cfg.teacher) else "seg=1"


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def predict_labels(net: torch.nn.Module, x: torch.Tensor, roi: Sequence[int], device: torch.device,
                   amp: bool = True) -> np.ndarray:
    """Whole image/volume prediction with MONAI's sliding window over ``roi`` (array order). x (B, C, *S) ->
    argmax labels (B, *S) uint8; for slice stacks B is the number of slices."""
    from monai.inferers import sliding_window_inference

    roi = tuple(min(r, s) for r, s in zip(roi, x.shape[2:]))
    use_amp = amp and device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = []
        # slice stacks: chunks of slices, each a one-window "image"
        for chunk in torch.split(x, 64 if x.dim() == 4 and x.shape[0] > 1 else 1):
            logits = sliding_window_inference(chunk.to(device), roi_size=roi, sw_batch_size=8, predictor=net,
                                              overlap=0.25, mode="gaussian")
            out.append(logits.float().argmax(1).to(torch.uint8).cpu())
    return torch.cat(out).numpy()


def validate(net: torch.nn.Module, items: Sequence[ValItem], task: TaskSpec, roi: Sequence[int],
             device: torch.device, amp: bool, teacher_preds: Dict[str, np.ndarray],
             teacher: Optional[torch.nn.Module], stopper: Stopper) -> Optional[Dict[str, Any]]:
    """Mean Dice over cases (each case: mean over its labels present); per label too. None when stopped."""
    was_training = net.training
    net.eval()
    values = [lab.value for lab in task.labels]
    per_case, per_label = [], {v: [] for v in values}
    try:
        for item in items:
            if stopper.requested():
                return None
            pred = predict_labels(net, item.x, roi, device, amp)
            if item.vs_teacher:
                if item.case_id not in teacher_preds:
                    teacher_preds[item.case_id] = predict_labels(teacher, item.x, roi, device, amp)
                ref = teacher_preds[item.case_id]
            else:
                ref = item.ref
            pred = pred.reshape(ref.shape)
            mask = None if item.mask is None else np.broadcast_to(item.mask, ref.shape)
            d = dice_per_label(pred, ref, values, mask)
            per_case.append(_nanmean(d.values()))
            for v in values:
                per_label[v].append(d[v])
    finally:
        net.train(was_training)
    names = {lab.value: lab.name for lab in task.labels}
    mean = _nanmean(per_case)
    return {"val_dice": 1.0 if mean != mean else mean,
            "per_label": {names[v]: _nanmean(per_label[v]) for v in values},
            "vs_teacher": all(i.vs_teacher for i in items)}


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
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


def _plan(cfg: TrainConfig, task: TaskSpec, data: TrainData, device: torch.device, dist: _Dist) -> _Plan:
    b_gpu, b_cpu, ppc, epochs = _TASK_DEFAULTS.get(task.name, (8, 2, 16, 100))
    batch = int(cfg.batch_size or (b_gpu if device.type == "cuda" else b_cpu))
    if batch < 1:
        raise InputError("--batch-size must be at least 1")
    patch = tuple(int(p) for p in (cfg.patch or tuple(reversed(task.roi_size))))
    if len(patch) != task.spatial_dims or min(patch) < 8:
        raise InputError(f"--patch needs {task.spatial_dims} sizes of at least 8 for {task.name} "
                         f"(got {list(patch)})")
    per_labelled = ds.MixedBatchSampler(len(data.train), len(data.unlabelled), batch, 1,
                                        unlabelled_fraction=cfg.unlabeled_fraction).per_l
    ppc = int(cfg.patches_per_case or ppc)
    n_cases = len(data.train) if data.train else len(data.unlabelled)
    # an epoch: every labelled case seen ``ppc`` times (every unlabelled one when there are no labels)
    per_step = max(1, per_labelled if data.train else batch) * dist.world
    spe = max(1, math.ceil(n_cases * ppc / per_step))
    if cfg.steps:
        total = int(cfg.steps)
    else:
        total = int(cfg.epochs or epochs) * spe
    if total < 1:
        raise InputError("nothing to train: --steps/--epochs must be at least 1")
    warmup = min(500, max(1, int(round(cfg.warmup * total)))) if cfg.warmup > 0 else 0
    lr = float(cfg.lr or (1e-3 if cfg.role == "teacher" else 2e-3))
    budget = float(cfg.max_minutes) * 60.0 if cfg.max_minutes else None
    if cfg.workers is None:
        cpus = os.cpu_count() or 1
        workers = max(0, min(12, cpus // dist.world - 1)) if device.type == "cuda" else 0
    else:
        workers = int(cfg.workers)
    return _Plan(batch_size=batch, patch=patch, steps_per_epoch=spe, total_steps=total, warmup_steps=warmup, lr=lr,
                 budget_s=budget, val_every=int(cfg.val_every or spe), ckpt_every=int(cfg.ckpt_every or spe),
                 workers=workers)


def _fingerprint(cfg: TrainConfig, arch: str, arch_args: Dict[str, Any], plan: _Plan, data: TrainData) -> Dict:
    """What must not change between a run and its resumption."""
    return {"task": cfg.task, "role": cfg.role, "arch": arch, "arch_args": arch_args, "losses": default_losses(cfg),
            "alpha": cfg.alpha, "temperature": cfg.temperature, "seed": cfg.seed, "batch_size": plan.batch_size,
            "patch": list(plan.patch), "soft_labels": cfg.soft_labels, "train_cases": data.train_ids,
            "unlabeled_cases": data.unlabelled_ids}


def train(config: TrainConfig, progress: Optional[Progress] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> Path:
    """Train a teacher or distil a student (see the module docstring); returns the written model file.

    Raises :class:`InputError` for bad options/data (nothing written), :class:`CancelledError` when stopped
    (a checkpoint kept, no model written).
    """
    cfg = config
    task = get_task(cfg.task)
    dist = _Dist()
    progress = progress or Progress(cfg.progress if dist.main else "none")
    if not dist.main:
        progress = Progress("none")
    if cfg.role not in ("teacher", "student"):
        raise InputError(f"role must be teacher or student (got {cfg.role!r})")
    output = resolve_output(cfg)
    if output.exists() and not cfg.overwrite:
        raise InputError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    if cfg.teacher and not Path(cfg.teacher).is_file():
        raise InputError(f"teacher model {cfg.teacher} not found")
    ckpt_dir = Path(str(output) + ".ckpt")
    stopper = Stopper(cfg.cancel_file, should_stop)
    try:
        device = pick_device(cfg.device, dist.local_rank)
        dist.init(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed)
        return _run(cfg, task, output, ckpt_dir, device, dist, progress, stopper)
    except CancelledError as exc:
        if getattr(exc, "signal", None) is None:  # stopped before the loop (data preparation, loading)
            exc.signal = stopper.signal
        raise
    finally:
        stopper.close()
        dist.close()


def _run(cfg: TrainConfig, task: TaskSpec, output: Path, ckpt_dir: Path, device: torch.device, dist: _Dist,
         progress: Progress, stopper: Stopper) -> Path:
    from KDSegmentationLib.training import losses as losses_mod
    from KDSegmentationLib.models import networks
    from KDSegmentationLib.models.files import save_model

    student, arch, arch_args, teacher, teacher_header, init_header = build_models(cfg, task, device)
    spec = default_losses(cfg)
    common = dict(alpha=cfg.alpha, temperature=cfg.temperature, spatial_dims=task.spatial_dims,
                  student_channels=getattr(student, "feature_channels", None),
                  teacher_channels=getattr(teacher, "feature_channels", None) if teacher is not None else None)
    try:
        criterion = losses_mod.build_losses(spec, **common).to(device)
    except ValueError as exc:
        raise InputError(f"losses {spec!r}: {exc}") from None
    if criterion.needs_teacher and teacher is None:
        raise InputError(f"losses {spec!r} need a teacher: pass --teacher FILE")
    use_teacher = teacher is not None and criterion.needs_teacher
    if teacher is not None and not use_teacher:
        progress.log(f"the losses {spec!r} do not use the teacher; it is ignored", level="warning")
        teacher = teacher_header = None
    data = load_training_data(cfg, task, progress, stopper, dist, use_teacher)
    if not data.train and not data.unlabelled:
        raise InputError("no training cases")
    plan = _plan(cfg, task, data, device, dist)
    dataset = ds.PatchDataset(data.train + data.unlabelled,
                              [True] * len(data.train) + [False] * len(data.unlabelled), task, plan.patch,
                              soft_labels=cfg.soft_labels, augment=cfg.augment)
    if cfg.channels_last and task.spatial_dims == 2:
        student = student.to(memory_format=torch.channels_last)
    module = TrainModule(student, criterion, criterion.needs_features)
    params = [p for p in module.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay, fused=fused)
    fingerprint = _fingerprint(cfg, arch, arch_args, plan, data)

    # -- state, possibly from a checkpoint ---------------------------------------------------------------------
    state = {"step": 0, "elapsed": 0.0, "history": [], "val_history": [], "best": None, "best_state": None}
    ckpt_path = ckpt_dir / "last.pt"
    if cfg.resume:
        if ckpt_path.is_file():
            ck = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
            if ck.get("format") != CKPT_FORMAT:
                raise InputError(f"{ckpt_path} is not a training checkpoint of this version; run without --resume")
            changed = [k for k in fingerprint if ck["fingerprint"].get(k) != fingerprint[k]]
            if changed:
                raise InputError(f"the checkpoint in {ckpt_dir} was made with other settings ({', '.join(changed)});"
                                 " resume with the same options, or start afresh without --resume")
            student.load_state_dict(ck["model"])
            criterion.load_state_dict(ck["criterion"])
            optimizer.load_state_dict(ck["optimizer"])
            _set_rng_state(ck["rng"])
            for k in ("step", "elapsed", "history", "val_history", "best", "best_state"):
                state[k] = ck[k]
            progress.log(f"resuming from step {state['step']} ({ckpt_path})")
        else:
            progress.log(f"no checkpoint in {ckpt_dir}; starting from the beginning", level="warning")

    if cfg.compile:
        module.student = torch.compile(module.student)
    train_module: torch.nn.Module = module
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ds.MixedBatchSampler(len(data.train), len(data.unlabelled), plan.batch_size, plan.total_steps,
                                   seed=cfg.seed, start_step=state["step"], rank=dist.rank, world_size=dist.world,
                                   unlabelled_fraction=cfg.unlabeled_fraction)
    loader = make_loader(dataset, sampler, plan.workers, device)
    use_amp = cfg.amp and device.type == "cuda"
    want_teacher_feats = use_teacher and criterion.needs_features
    teacher_preds: Dict[str, np.ndarray] = {}
    roi = tuple(reversed(task.roi_size))
    n_params = networks.count_parameters(student)
    if dist.main:
        progress.log(f"{cfg.role} {arch} ({n_params} parameters) on {device}: {len(data.train)} labelled + "
                     f"{len(data.unlabelled)} unlabelled training cases, {len(data.val)} validation cases; "
                     f"{plan.total_steps} steps of {plan.batch_size} x {list(plan.patch)}"
                     f"{f' x {dist.world} processes' if dist.world > 1 else ''}; losses {spec}")

    def checkpoint() -> None:
        if not dist.main:
            return
        from KDSegmentationLib.models.files import atomic_save

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({"format": CKPT_FORMAT, "fingerprint": fingerprint, "model": student_state(),
                     "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": _rng_state(), **{k: state[k] for k in ("step", "elapsed", "history", "val_history",
                                                                   "best", "best_state")}}, ckpt_path)
        progress.progress("checkpoint", state["step"] / plan.total_steps, step=state["step"], path=str(ckpt_path))

    def student_state() -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}

    def run_validation() -> bool:
        """Validate on rank 0 (the others wait); False on every rank when a stop came meanwhile."""
        stopped = False
        if dist.main and data.val:
            res = validate(student, data.val, task, roi, device, cfg.amp, teacher_preds, teacher, stopper)
            stopped = res is None
        if dist.main and data.val and not stopped:
            step = state["step"]
            entry = {"step": step, "epoch": round(step / plan.steps_per_epoch, 3), **res}
            state["val_history"].append(entry)
            best = state["best"]
            if best is None or res["val_dice"] > best["val_dice"]:
                state["best"] = {"val_dice": res["val_dice"], "step": step, "per_label": res["per_label"]}
                state["best_state"] = student_state()
            progress.metric(step=step, epoch=entry["epoch"], val_dice=round(res["val_dice"], 5),
                            **{f"val_dice_{k}": round(v, 5) for k, v in res["per_label"].items() if v == v},
                            best_val_dice=round(state["best"]["val_dice"], 5),
                            **({"val_vs_teacher": True} if res["vs_teacher"] else {}))
        dist.barrier()
        return not dist.any_flag([stopped], device)[0]

    # -- the loop ----------------------------------------------------------------------------------------------
    module.train()
    if teacher is not None:
        teacher.eval()
    t_start = time.perf_counter()
    elapsed0 = state["elapsed"]
    last_ckpt_time = time.perf_counter()
    acc: Dict[str, Any] = {}
    acc_n, t_log, steps_since_log = 0, time.perf_counter(), 0
    step_times: List[float] = []
    stopped_by: Optional[str] = None
    it = iter(loader)
    try:
        while state["step"] < plan.total_steps:
            step = state["step"]
            elapsed = elapsed0 + time.perf_counter() - t_start
            fraction = max(step / plan.total_steps, elapsed / plan.budget_s if plan.budget_s else 0.0)
            lr = plan.lr * lr_factor(step, fraction, plan.warmup_steps, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = next(it)
            x, target, labelled = _batch_to_device(batch, plan.patch, dataset.policy.pad_mode, device,
                                                   cfg.soft_labels, cfg.channels_last and task.spatial_dims == 2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                t_logits = t_feats = None
                if use_teacher:
                    with torch.no_grad():
                        if want_teacher_feats:
                            t_logits, t_feats = teacher(x, return_features=True)
                        else:
                            t_logits = teacher(x)
                _, total, parts = train_module(x, t_logits, t_feats, target, labelled)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            state["step"] = step = step + 1
            # running sums stay on the device: no GPU->CPU sync except at log steps
            acc["loss"] = acc.get("loss", 0.0) + total.detach().float()
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            acc_n += 1
            steps_since_log += 1
            state["elapsed"] = elapsed0 + time.perf_counter() - t_start
            over_budget = plan.budget_s is not None and state["elapsed"] >= plan.budget_s
            stop_req, over_budget = dist.any_flag([stopper.requested(), over_budget], device)
            if step % cfg.log_every == 0 or step == plan.total_steps or stop_req or over_budget:
                now = time.perf_counter()
                sec_per_step = (now - t_log) / max(steps_since_log, 1)
                step_times.append(sec_per_step)
                t_log, steps_since_log = now, 0
                means = {k: float(v) / acc_n for k, v in acc.items()}
                if not all(math.isfinite(v) for v in means.values()):
                    raise RuntimeError(f"training diverged at step {step} (loss {means.get('loss')}); "
                                       "lower --lr or check the data")
                remaining = (plan.total_steps - step) * sec_per_step
                if plan.budget_s:
                    remaining = min(remaining, max(0.0, plan.budget_s - state["elapsed"]))
                epoch = step / plan.steps_per_epoch
                entry = {"step": step, "epoch": round(epoch, 3), "lr": lr, **{k: round(v, 6) for k, v in
                                                                              means.items()}}
                state["history"].append(entry)
                progress.progress("train", max(step / plan.total_steps,
                                               state["elapsed"] / plan.budget_s if plan.budget_s else 0.0),
                                  step=step, epoch=round(epoch, 3), eta_s=round(remaining, 1))
                progress.metric(**entry, step_s=round(sec_per_step, 4),
                                samples_per_s=round(plan.batch_size * dist.world / max(sec_per_step, 1e-9), 1),
                                eta_s=round(remaining, 1))
                acc, acc_n = {}, 0
            if stop_req:
                stopped_by = stopper.reason or "stop requested on another process"
                break
            done = step >= plan.total_steps or over_budget
            if step % plan.val_every == 0 or done:
                if not run_validation():
                    stopped_by = stopper.reason or "stop requested"
                    break
            if step % plan.ckpt_every == 0 or (time.perf_counter() - last_ckpt_time) > cfg.ckpt_minutes * 60:
                checkpoint()  # rank 0 only; the others need not wait for the file
                last_ckpt_time = time.perf_counter()
            if over_budget:
                progress.log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                break
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if stopped_by is not None:
        checkpoint()
        dist.barrier()
        err = CancelledError(f"stopped at step {state['step']} ({stopped_by}); the checkpoint in {ckpt_dir} is "
                             "kept: rerun with --resume to continue")
        err.signal = stopper.signal
        raise err

    # -- the model, the report ---------------------------------------------------------------------------------
    if dist.main:
        if state["best_state"] is not None:
            student.load_state_dict(state["best_state"])
        card = _card(cfg, task, data, plan, state, n_params, spec, teacher_header, device, dist,
                     dataset.policy, step_times)
        version = cfg.version or _local_version(output, task.name) or "1"
        card["version"]["model"] = version
        preprocessing = ds.task_preprocessing(task)
        if init_header is not None:
            # fine-tuning keeps the initial model's calibrated threshold (kdseg calibrate refines it when the
            # labelled validation cases are at hand); 0.5 would undo the calibration of a shipped student
            threshold = (init_header.get("preprocessing") or {}).get("decision_threshold")
            if threshold is not None:
                preprocessing["decision_threshold"] = threshold
                card["decision_threshold_from"] = Path(cfg.init).name
        save_model(output, student, arch=arch, arch_args=arch_args, task=task.name, role=cfg.role,
                   version=version, preprocessing=preprocessing,
                   labels={lab.value: lab.name for lab in task.labels}, card=card, overwrite=cfg.overwrite)
        report = write_report(output, state, card)
        if not cfg.keep_checkpoints and ckpt_dir.is_dir():
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)
        best = state["best"]
        progress.result(str(output), report=str(report),
                        **({"val_dice": round(best["val_dice"], 5)} if best else {}), steps=state["step"])
    dist.barrier()
    return output


def _batch_to_device(batch: Dict[str, torch.Tensor], patch, pad_mode: str, device: torch.device, soft: bool,
                     channels_last: bool):
    """Move a collated batch to the device and apply its spatial augmentation there -> (x, target, labelled)."""
    nb = device.type == "cuda"
    image = batch["image"].to(device, non_blocking=nb)
    theta = batch["theta"].to(device, non_blocking=nb)
    label = batch["label"].to(device, non_blocking=nb)
    soft_t = batch["soft"].to(device, non_blocking=nb) if soft else None
    with torch.no_grad():
        x, y, s = warp_batch(image, theta, patch, label=None if soft else label, soft=soft_t, pad_mode=pad_mode)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labelled = [bool(v) for v in batch["labelled"].tolist()]
    return x, (s if soft else y), labelled


def _card(cfg: TrainConfig, task: TaskSpec, data: TrainData, plan: _Plan, state, n_params: int, spec: str,
          teacher_header, device: torch.device, dist: _Dist, policy, step_times: List[float]) -> Dict:
    """The model card: data, split, recipe, command, seed, validation metrics, parameters, time, versions."""
    from KDSegmentationLib import __version__

    def jsonable(obj):
        return json.loads(json.dumps(obj, default=str))

    best = state["best"]
    last_val = state["val_history"][-1] if state["val_history"] else None
    teacher = None
    if cfg.teacher and teacher_header is not None:
        teacher = {"file": Path(cfg.teacher).name, "version": (teacher_header or {}).get("version"),
                   "arch": (teacher_header or {}).get("arch")}
    card = {
        "description": f"{cfg.role} for {task.title}",
        "data": data.description["data"],
        "split": data.description["split"],
        "recipe": {
            "losses": spec, "alpha": cfg.alpha, "temperature": cfg.temperature, "soft_labels": cfg.soft_labels,
            "init": Path(cfg.init).name if cfg.init else None, "unlabeled_fraction": cfg.unlabeled_fraction,
            "steps": state["step"], "planned_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": round(state["step"] / plan.steps_per_epoch, 2), "max_minutes": cfg.max_minutes,
            "batch_size": plan.batch_size, "processes": dist.world, "patch": list(plan.patch),
            "optimizer": "AdamW", "lr": plan.lr, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
            "warmup_steps": plan.warmup_steps, "grad_clip": cfg.grad_clip,
            "amp": "bf16" if (cfg.amp and device.type == "cuda") else "fp32",
            "augmentation": asdict(policy) if cfg.augment else None,
        },
        "command": cfg.command_line or " ".join(sys.argv),
        "seed": cfg.seed,
        "teacher": teacher,
        "metrics": {"validation": {
            "metric": "dice (mean over labels, then cases; model grid" +
                      (", against the teacher)" if (last_val or {}).get("vs_teacher") else ")"),
            "best": round(best["val_dice"], 5) if best else None, "best_step": best["step"] if best else None,
            "best_per_label": best["per_label"] if best else None,
            "final": round(last_val["val_dice"], 5) if last_val else None}},
        "parameters": n_params,
        "training_time_s": round(state["elapsed"], 1),
        "step_time_s": round(float(np.median(step_times)), 4) if step_times else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": {"kdsegmentation": __version__, "torch": torch.__version__, "created_by": "kdseg " +
                    ("train-teacher" if cfg.role == "teacher" else "distill")},
    }
    card.update(cfg.extra_card or {})
    return jsonable(card)


def write_report(output: Path, state: Dict[str, Any], card: Dict[str, Any]) -> Path:
    """``<output>.report.json`` (history, validation, card) and ``<output>.report.png`` (loss and Dice curves)."""
    report = Path(str(output) + ".report.json")
    payload = {"model": str(output), "history": state["history"], "validation": state["val_history"],
               "best": state["best"], "training_time_s": round(state["elapsed"], 1), "card": card}
    _write_atomic(report, json.dumps(payload, indent=1, default=str).encode())
    try:
        _plot(state, Path(str(output) + ".report.png"))
    except ImportError:  # matplotlib is optional (the 'train' extra)
        pass
    return report


def _plot(state: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, val = state["history"], state["val_history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if hist:
        steps = [h["step"] for h in hist]
        keys = [k for k in hist[0] if k not in ("step", "epoch", "lr")]
        for k in keys:
            ax1.plot(steps, [h.get(k, float("nan")) for h in hist], label=k, lw=2 if k == "loss" else 1)
        losses = [h.get("loss", float("nan")) for h in hist]
        if min(losses) > 0 and max(losses) > 20 * min(losses):  # log only when it spans decades
            ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend(fontsize=8)
    if val:
        ax2.plot([v["step"] for v in val], [v["val_dice"] for v in val], "o-", label="mean")
        for name in val[0].get("per_label", {}):
            ax2.plot([v["step"] for v in val], [v["per_label"].get(name) for v in val], ".--", label=name)
        ax2.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_title("validation Dice")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, path)
