"""What a finished run leaves beside its model: the model card (stored in the model file) and the report
(``<output>.report.json``: history, validation, card; ``<output>.report.png``: loss and Dice curves)."""
from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from KDSegmentationLib.io.atomic import write_bytes
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.config import TrainConfig
from KDSegmentationLib.training.plan import Plan


def _recipe(cfg: TrainConfig, plan: Plan, state: Dict[str, Any], spec: str, device: torch.device, world: int,
            policy) -> Dict[str, Any]:
    return {
        "losses": spec, "alpha": cfg.alpha, "temperature": cfg.temperature, "soft_labels": cfg.soft_labels,
        "teacher_targets": cfg.teacher_targets if cfg.teacher else None,
        "init": Path(cfg.init).name if cfg.init else None, "unlabelled_fraction": cfg.unlabelled_fraction,
        "steps": state["step"], "planned_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
        "epochs": round(state["step"] / plan.steps_per_epoch, 2), "max_minutes": cfg.max_minutes,
        "batch_size": plan.batch_size, "processes": world, "patch": list(plan.patch),
        "optimizer": "AdamW", "lr": plan.lr, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
        "warmup_steps": plan.warmup_steps, "warmup_fraction": plan.warmup_fraction, "grad_clip": cfg.grad_clip,
        "amp": "bf16" if (cfg.amp and device.type == "cuda") else "fp32",
        "augmentation": asdict(policy) if cfg.augment else None,
    }


def _validation_metrics(state: Dict[str, Any]) -> Dict[str, Any]:
    best = state["best"]
    last_val = state["val_history"][-1] if state["val_history"] else None
    # a run from an existing student (--init) is scored before its first step
    before = state["val_history"][0] if state["val_history"] and state["val_history"][0]["step"] == 0 else None
    return {"validation": {
        "metric": "dice (mean over labels, then cases; model grid" +
                  (", against the teacher)" if (last_val or {}).get("vs_teacher") else ")"),
        "best": round(best["val_dice"], 5) if best else None, "best_step": best["step"] if best else None,
        "best_per_label": best["per_label"] if best else None,
        "final": round(last_val["val_dice"], 5) if last_val else None,
        "before": round(before["val_dice"], 5) if before else None}}


def model_card(cfg: TrainConfig, task: TaskSpec, description: Dict[str, Any], plan: Plan, state: Dict[str, Any],
               n_params: int, spec: str, teacher_header: Optional[Dict[str, Any]], device: torch.device,
               world: int, policy, step_times: List[float]) -> Dict[str, Any]:
    """The model card: data, split, recipe, command, seed, validation metrics, parameters, time, versions.

    ``state``: the run state (step, elapsed seconds, val_history, best); ``step_times``: seconds per step."""
    from KDSegmentationLib import __version__

    teacher = None
    if cfg.teacher and teacher_header is not None:
        teacher = {"file": ",".join(Path(t.strip()).name for t in cfg.teacher.split(",")),
                   "version": teacher_header.get("version"), "arch": teacher_header.get("arch")}
        if teacher_header.get("role") == "ensemble":
            teacher["members"] = teacher_header["card"]["members"]
    card = {
        "description": f"{cfg.role} for {task.title}",
        "data": description["data"],
        "split": description["split"],
        "recipe": _recipe(cfg, plan, state, spec, device, world, policy),
        "command": cfg.command_line or " ".join(sys.argv),
        "seed": cfg.seed,
        "teacher": teacher,
        "metrics": _validation_metrics(state),
        "parameters": n_params,
        "training_time_s": round(state["elapsed"], 1),
        "step_time_s": round(float(np.median(step_times)), 4) if step_times else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": {"kdsegmentation": __version__, "torch": torch.__version__, "created_by": "kdseg " +
                    ("train-teacher" if cfg.role == "teacher" else "distill")},
    }
    card.update(cfg.extra_card or {})
    return portable(json.loads(json.dumps(card, default=str)))


# An absolute path of the machine that trained: POSIX (/a/b), home (~/a) or Windows (C:\a, \\server\share).
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/\\])(?:~?/|[A-Za-z]:[\\/]|\\\\)[^\s"',;=]+""")


def _last_part(match: "re.Match") -> str:
    parts = [p for p in re.split(r"[\\/]", match.group(0)) if p and p != "~"]
    return parts[-1] if parts else match.group(0)


def portable(value: Any) -> Any:
    """A card with every absolute path of the training machine cut to its last part (``/home/ann/data/DRIVE`` ->
    ``DRIVE``): a model file is shared, the folder layout of the machine that made it is not."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(_last_part, value)
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value


def write_report(output: Path, state: Dict[str, Any], card: Dict[str, Any]) -> Path:
    """``<output>.report.json`` (history, validation, card) and ``<output>.report.png`` (loss and Dice curves),
    each written atomically; the PNG only where matplotlib is installed (the 'train' extra)."""
    report = Path(str(output) + ".report.json")
    payload = {"model": Path(output).name, "history": state["history"], "validation": state["val_history"],
               "best": state["best"], "training_time_s": round(state["elapsed"], 1), "card": card}
    write_bytes(report, json.dumps(payload, indent=1, default=str).encode())
    try:
        png = plot_curves(state)
    except ImportError:  # matplotlib is optional
        return report
    write_bytes(Path(str(output) + ".report.png"), png)
    return report


def plot_curves(state: Dict[str, Any]) -> bytes:
    """PNG bytes: training loss (and its components) by step, and validation Dice (mean and per label) by step."""
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
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    plt.close(fig)
    return buf.getvalue()
