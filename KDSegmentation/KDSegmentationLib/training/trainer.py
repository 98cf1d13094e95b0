"""Teacher training and teacher -> student distillation that never loses work.

:func:`train` runs both: a teacher with the ``seg`` loss, or a student with any loss spec of ``losses.py``
(``kd=1`` with alpha/temperature, ``seg=1,hint=0.5``, ...) against a frozen teacher, on labelled data, unlabelled
data (``unlabelled``: the student learns from the teacher alone) or both mixed in every batch. Every step goes
through :class:`distiller.Distiller` (student, teacher and losses).

What it guarantees:

- the output model is written once, at the end, atomically (``models.files.save_model``); an existing file is never
  replaced without ``overwrite=True``; a run that fails or is cancelled leaves previous model files byte-identical;
- checkpoints (``<output>.ckpt/last.pt``, see ``checkpoint.py``) are written atomically every ``ckpt_every`` steps
  and when the run is stopped; ``resume=True`` continues from the last one and reproduces an uninterrupted run
  (every training sample is a function of seed and step);
- SIGINT/SIGTERM, a cancel file or a ``should_stop`` callable stop the run after the current step, keep a
  checkpoint and raise :class:`CancelledError` (``.signal`` tells which signal, for exit codes 130/143);
- the time budget (``max_minutes``, whole run across resumes) ends the run normally, with the model written.

Progress goes through :class:`progress.Progress` (JSON lines: ``metric`` events with step, epoch, loss and each loss
component, lr, samples/s, ETA, and ``val_dice`` after each validation; ``progress`` events for the stages and each
checkpoint). At the end a report (``report.py``) is written beside the model. Under ``torchrun`` (WORLD_SIZE > 1)
the same code runs DDP: NCCL on CUDA, gloo on CPU, each rank its own share of every global batch, rank 0 alone
validates and writes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from KDSegmentationLib import protocol as P
from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.inference.device import pick_device
from KDSegmentationLib.progress import Progress
from KDSegmentationLib.tasks import TaskSpec, get_task
from KDSegmentationLib.training import checkpoint as ckpt
from KDSegmentationLib.training.cache import task_preprocessing
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.data import TrainData, load_training_data
from KDSegmentationLib.training.distiller import build_distiller, default_losses, weaker_teacher_warning
from KDSegmentationLib.training.output import check_output, locked_output
from KDSegmentationLib.models.naming import local_version
from KDSegmentationLib.training.plan import lr_factor, make_plan
from KDSegmentationLib.training.report import model_card, write_report
from KDSegmentationLib.training.sampling import MixedBatchSampler, PatchDataset, batch_to_device, make_loader
from KDSegmentationLib.training.stopping import Distributed, Stopper
from KDSegmentationLib.training.teacher_targets import check_stored_targets, store_teacher_logits
from KDSegmentationLib.training.validation import validate


class Trainer:
    """One run: :meth:`setup` (networks, data, plan, optimiser, checkpoint), then :meth:`run` (the loop, then the
    model and the report). :meth:`step` is one optimiser step on a collated batch."""

    def __init__(self, cfg: TrainConfig, task: TaskSpec, output: Path, device: torch.device, dist: Distributed,
                 progress: Progress, stopper: Stopper):
        self.cfg, self.task, self.output, self.device = cfg, task, output, device
        self.dist, self.progress, self.stopper = dist, progress, stopper
        self.ckpt_dir = Path(str(output) + ".ckpt")
        self.state: Dict[str, Any] = {"step": 0, "elapsed": 0.0, "history": [], "val_history": [], "best": None,
                                      "best_state": None}
        self.teacher_preds: Dict[str, Any] = {}
        self.step_times: List[float] = []
        self._acc: Dict[str, Any] = {}
        self._acc_n = 0

    # -- set-up -------------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from KDSegmentationLib.models import networks

        cfg, task = self.cfg, self.task
        self.distiller, self.arch, self.arch_args, self.teacher_header, self.init_header = build_distiller(
            cfg, task, self.device, log=self.progress.log)
        self.spec = default_losses(cfg)
        warning = weaker_teacher_warning(self.teacher_header, self.init_header)
        if warning and self.dist.main:
            self.progress.log(warning, level="warning")
        self.data: TrainData = load_training_data(cfg, task, self.progress, self.stopper, self.dist,
                                                  self.distiller.teacher is not None)
        if not self.data.train and not self.data.unlabelled:
            raise InputError("no training cases")
        self.plan = make_plan(cfg, task, len(self.data.train), len(self.data.unlabelled),
                              self.device.type == "cuda", self.dist.world)
        if self.stored_targets:
            self._store_teacher_targets()
        self.dataset = PatchDataset(self.data.train + self.data.unlabelled,
                                    [True] * len(self.data.train) + [False] * len(self.data.unlabelled), task,
                                    self.plan.patch, soft_labels=cfg.soft_labels, augment=cfg.augment)
        if self.channels_last:
            self.distiller.student = self.distiller.student.to(memory_format=torch.channels_last)
        # the network itself, also once torch.compile has wrapped it: weights are saved and loaded without the
        # wrapper's key prefix
        self._student = self.distiller.student
        self.params = [p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.plan.lr, weight_decay=cfg.weight_decay,
                                           fused=self.device.type == "cuda")
        self.fingerprint = self._fingerprint()
        if cfg.resume:
            self._resume()
        self.n_params = networks.count_parameters(self.student)
        self._wrap()
        self._log_start()
        return self

    @property
    def stored_targets(self) -> bool:
        """Whether the teacher's soft labels are computed once per image (``--teacher-targets stored``)."""
        return self.cfg.teacher_targets == "stored" and self.distiller.teacher is not None

    def _store_teacher_targets(self) -> None:
        cases = self.data.train + self.data.unlabelled
        check_stored_targets(self.task, self.distiller.losses.needs_features, cases, self.plan.patch)
        t0 = time.perf_counter()
        nbytes = store_teacher_logits(
            cases, self.task, self.distiller.teacher, self.device, self.stopper.requested,
            lambda i, n: self.progress.progress(P.STAGE_TEACHER_TARGETS, i / n, cases=i))
        self.progress.log(f"teacher soft labels of {len(cases)} training images stored once "
                          f"({nbytes / 2 ** 20:.1f} MB float16, {time.perf_counter() - t0:.1f} s)")

    @property
    def student(self) -> torch.nn.Module:
        return self._student

    @property
    def channels_last(self) -> bool:
        return self.cfg.channels_last and self.task.spatial_dims == 2

    def _fingerprint(self) -> Dict[str, Any]:
        """What must not change between a run and its resumption."""
        cfg, plan = self.cfg, self.plan
        return {"task": cfg.task, "role": cfg.role, "arch": self.arch, "arch_args": self.arch_args,
                "losses": self.spec, "alpha": cfg.alpha, "temperature": cfg.temperature, "seed": cfg.seed,
                "batch_size": plan.batch_size, "patch": list(plan.patch), "soft_labels": cfg.soft_labels,
                "teacher_targets": cfg.teacher_targets,
                "train_cases": self.data.train_ids, "unlabelled_cases": self.data.unlabelled_ids}

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            self.progress.log(f"no checkpoint in {self.ckpt_dir}; starting from the beginning", level="warning")
            return
        ck = ckpt.load_checkpoint(path, self.fingerprint)
        ckpt.restore(ck, self.student, self.distiller.losses, self.optimizer, self.state)
        self.progress.log(f"resuming from step {self.state['step']} ({path})")

    def _wrap(self) -> None:
        """torch.compile, DDP, and the loader (which starts at the resumed step)."""
        if self.cfg.compile:
            self.distiller.student = torch.compile(self.distiller.student)
        self.module: torch.nn.Module = self.distiller
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.distiller, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        sampler = MixedBatchSampler(len(self.data.train), len(self.data.unlabelled), self.plan.batch_size,
                                    self.plan.total_steps, seed=self.cfg.seed, start_step=self.state["step"],
                                    rank=self.dist.rank, world_size=self.dist.world,
                                    unlabelled_fraction=self.cfg.unlabelled_fraction)
        self.loader = make_loader(self.dataset, sampler, self.plan.workers, self.device)

    def _log_start(self) -> None:
        if not self.dist.main:
            return
        d, p, w = self.data, self.plan, self.dist.world
        self.progress.log(f"{self.cfg.role} {self.arch} ({self.n_params} parameters) on {self.device}: "
                          f"{len(d.train)} labelled + {len(d.unlabelled)} unlabelled training cases, "
                          f"{len(d.val)} validation cases; {p.total_steps} steps of {p.batch_size} x "
                          f"{list(p.patch)}{f' x {w} processes' if w > 1 else ''}; losses {self.spec}")

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], float]:
        """One optimiser step on a collated batch -> (total loss, {loss name: value}, learning rate)."""
        step, plan = self.state["step"], self.plan
        lr = plan.lr * lr_factor(step, plan.fraction_done(step, self.state["elapsed"]), plan.warmup_steps,
                                 self.cfg.schedule, warmup_fraction=plan.warmup_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        b = batch_to_device(batch, plan.patch, self.dataset.policy.pad_mode, self.device, self.cfg.soft_labels,
                            self.channels_last)
        use_amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            _, parts, total = self.module(b.x, b.target, b.labelled, b.teacher_logits)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.state["step"] = step + 1
        return total, parts, lr

    def _accumulate(self, total: torch.Tensor, parts: Dict[str, torch.Tensor]) -> None:
        # running sums stay on the device: no GPU->CPU sync except at log steps
        acc = self._acc
        acc["loss"] = acc.get("loss", 0.0) + total.detach().float()
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        self._acc_n += 1

    def _log_metrics(self, lr: float, sec_per_step: float) -> None:
        """Mean losses since the last log step -> history and a metric event; raises when they are not finite."""
        step, plan, state = self.state["step"], self.plan, self.state
        means = {k: float(v) / self._acc_n for k, v in self._acc.items()}
        self._acc, self._acc_n = {}, 0
        if not all(math.isfinite(v) for v in means.values()):
            raise RuntimeError(f"training diverged at step {step} (loss {means.get('loss')}); "
                               "lower --lr or check the data")
        remaining = (plan.total_steps - step) * sec_per_step
        if plan.budget_s:
            remaining = min(remaining, max(0.0, plan.budget_s - state["elapsed"]))
        epoch = round(step / plan.steps_per_epoch, 3)
        entry = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 6) for k, v in means.items()}}
        state["history"].append(entry)
        self.progress.progress("train", plan.fraction_done(step, state["elapsed"]), step=step, epoch=epoch,
                               eta_s=round(remaining, 1))
        self.progress.metric(**entry, step_s=round(sec_per_step, 4),
                             samples_per_s=round(plan.batch_size * self.dist.world / max(sec_per_step, 1e-9), 1),
                             eta_s=round(remaining, 1))

    # -- validation and checkpoints -----------------------------------------------------------------------------
    def _validate(self) -> bool:
        """Validate on rank 0 (the others wait); False on every rank when a stop came meanwhile."""
        res, main = None, self.dist.main and bool(self.data.val)
        if main:
            res = validate(self.student, self.data.val, self.task, tuple(reversed(self.task.roi_size)),
                           self.device, self.teacher_preds, self.distiller.teacher,
                           self.stopper.requested)
        if res is not None:
            self._record_validation(res)
        self.dist.barrier()
        return not self.dist.any_flag([main and res is None], self.device)[0]

    def _record_validation(self, res: Dict[str, Any]) -> None:
        state, step = self.state, self.state["step"]
        entry = {"step": step, "epoch": round(step / self.plan.steps_per_epoch, 3), **res}
        state["val_history"].append(entry)
        if step > 0 and (state["best"] is None or res["val_dice"] > state["best"]["val_dice"]):
            state["best"] = {"val_dice": res["val_dice"], "step": step, "per_label": res["per_label"]}
            state["best_state"] = ckpt.student_state(self.student)
        self.progress.metric(step=step, epoch=entry["epoch"], val_dice=round(res["val_dice"], 5),
                             **{f"val_dice_{k}": round(v, 5) for k, v in res["per_label"].items() if v == v},
                             **({"best_val_dice": round(state["best"]["val_dice"], 5)} if state["best"] else {}),
                             **({"val_vs_teacher": True} if res["vs_teacher"] else {}))

    def checkpoint(self) -> None:
        """Write ``<output>.ckpt/last.pt`` (rank 0 only; the others need not wait for the file)."""
        if not self.dist.main:
            return
        path = self.ckpt_dir / "last.pt"
        ckpt.save_checkpoint(path, self.fingerprint, ckpt.student_state(self.student), self.distiller.losses,
                             self.optimizer, self.state)
        self.progress.progress("checkpoint", self.state["step"] / self.plan.total_steps, step=self.state["step"],
                               path=str(path))

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """The loop, then the model and the report; returns the model file. Raises :class:`CancelledError` when
        stopped (after writing a checkpoint)."""
        if self.cfg.init and self.state["step"] == 0 and not self._validate():
            # the starting student is scored first, so that the run reports before and after (it does not compete
            # for the model written: validation cases from another site than the adaptation images would keep it)
            err = CancelledError(f"stopped before the first step ({self.stopper.reason or 'stop requested'})")
            err.signal = self.stopper.signal
            raise err
        self.module.train()
        it = iter(self.loader)
        try:
            stopped_by = self._loop(it)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if stopped_by is not None:
            self.checkpoint()
            self.dist.barrier()
            err = CancelledError(f"stopped at step {self.state['step']} ({stopped_by}); the checkpoint in "
                                 f"{self.ckpt_dir} is kept: rerun with --resume to continue")
            err.signal = self.stopper.signal
            raise err
        if self.dist.main:
            self._finish()
        self.dist.barrier()
        return self.output

    def _loop(self, it) -> Optional[str]:
        """Steps until the plan or the budget is done -> None, or the reason the run was stopped."""
        cfg, plan, state = self.cfg, self.plan, self.state
        t_start, elapsed0 = time.perf_counter(), state["elapsed"]
        last_ckpt = t_log = time.perf_counter()
        since_log = 0
        while state["step"] < plan.total_steps:
            state["elapsed"] = elapsed0 + time.perf_counter() - t_start  # the schedule follows time as well
            total, parts, lr = self.step(next(it))
            step = state["step"]
            self._accumulate(total, parts)
            since_log += 1
            state["elapsed"] = elapsed0 + time.perf_counter() - t_start
            over_budget = plan.budget_s is not None and state["elapsed"] >= plan.budget_s
            stop_req, over_budget = self.dist.any_flag([self.stopper.requested(), over_budget], self.device)
            if step % cfg.log_every == 0 or step == plan.total_steps or stop_req or over_budget:
                now = time.perf_counter()
                self.step_times.append((now - t_log) / max(since_log, 1))
                self._log_metrics(lr, self.step_times[-1])
                t_log, since_log = now, 0
            if stop_req:
                return self.stopper.reason or "stop requested on another process"
            if (step % plan.val_every == 0 or step >= plan.total_steps or over_budget) and not self._validate():
                return self.stopper.reason or "stop requested"
            if step % plan.ckpt_every == 0 or (time.perf_counter() - last_ckpt) > cfg.ckpt_minutes * 60:
                self.checkpoint()
                last_ckpt = time.perf_counter()
            if over_budget:
                self.progress.log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                return None
        return None

    # -- the model, the report ----------------------------------------------------------------------------------
    def _preprocessing(self, card: Dict[str, Any]) -> Dict[str, Any]:
        preprocessing = task_preprocessing(self.task)
        if self.init_header is not None:
            # fine-tuning keeps the initial model's calibrated threshold (kdseg calibrate refines it when the
            # labelled validation cases are at hand); 0.5 would undo the calibration of a shipped student
            threshold = (self.init_header.get("preprocessing") or {}).get("decision_threshold")
            if threshold is not None:
                preprocessing["decision_threshold"] = threshold
                card["decision_threshold_from"] = Path(self.cfg.init).name
        return preprocessing

    def _finish(self) -> None:
        from KDSegmentationLib.models.files import save_model

        cfg, state = self.cfg, self.state
        if state["best_state"] is not None:
            self.student.load_state_dict(state["best_state"])
        bad = [k for k, v in self.student.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a model file that could never be loaded again is not written
            raise InputError(f"training diverged: non-finite weights ({bad[0]}); nothing was written, the checkpoint "
                             f"in {self.ckpt_dir} is kept; lower --lr and train again")
        card = model_card(cfg, self.task, self.data.description, self.plan, state, self.n_params, self.spec,
                          self.teacher_header, self.device, self.dist.world, self.dataset.policy, self.step_times)
        version = cfg.version or local_version(self.output, self.task.name) or "1"
        card["version"]["model"] = version
        preprocessing = self._preprocessing(card)
        save_model(self.output, self.student, arch=self.arch, arch_args=self.arch_args, task=self.task.name,
                   role=cfg.role, version=version, preprocessing=preprocessing,
                   labels={lab.value: lab.name for lab in self.task.labels}, card=card, overwrite=cfg.overwrite)
        report = write_report(self.output, state, card)
        if not cfg.keep_checkpoints:
            ckpt.remove_checkpoints(self.ckpt_dir)
        best = state["best"]
        self.progress.result(str(self.output), report=str(report),
                             **({"val_dice": round(best["val_dice"], 5)} if best else {}), steps=state["step"])


# ----------------------------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------------------------
def _configure_cuda(device: torch.device, deterministic: bool) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def train(config: TrainConfig, progress: Optional[Progress] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> Path:
    """Train a teacher or distil a student (see the module docstring); returns the written model file.

    Raises :class:`InputError` for bad options/data (nothing written), :class:`CancelledError` when stopped
    (a checkpoint kept, no model written).
    """
    cfg = config
    task = get_task(cfg.task)
    dist = Distributed()
    progress = progress or Progress(cfg.progress if dist.main else "none")
    if not dist.main:
        progress = Progress("none")
    if cfg.role not in ("teacher", "student"):
        raise InputError(f"role must be teacher or student (got {cfg.role!r})")
    with locked_output(cfg, dist.main) as output:
        check_output(cfg, output)
        stopper = Stopper(cfg.cancel_file, should_stop)
        try:
            device = pick_device(cfg.device, dist.local_rank)
            dist.init(device)
            _configure_cuda(device, cfg.deterministic)
            ckpt.seed_everything(cfg.seed)
            return Trainer(cfg, task, output, device, dist, progress, stopper).setup().run()
        except CancelledError as exc:
            if getattr(exc, "signal", None) is None:  # stopped before the loop (data preparation, loading)
                exc.signal = stopper.signal
            raise
        finally:
            stopper.close()
            dist.close()
