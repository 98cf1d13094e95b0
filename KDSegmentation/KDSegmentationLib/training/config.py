"""The definition of a training run (:class:`TrainConfig`) and the ``kdseg train-teacher`` / ``kdseg distill`` options
generated from it.

Each field that is a command-line option carries its help text, type, choices and flag in its metadata (written
once, with :func:`option`); :func:`add_options` turns them into argparse arguments and :func:`config_from_args`
turns the parsed namespace back into a :class:`TrainConfig`. Fields without that metadata (``role``,
``command_line``, ``extra_card``) are set by the program, not by the user.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.inference.device import DEVICE_CHOICES
from KDSegmentationLib.progress import PROGRESS_MODES

ROLES = ("teacher", "student")
UNSET = object()  # Option.cli_default: none (the field's default holds on the command line too)


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line.

    ``help`` is one text or a role -> text mapping; ``roles``: the commands that have the option ('teacher' is
    ``train-teacher``, 'student' is ``distill``); ``parse`` converts the parsed value (patch text -> sizes, JSON
    text -> dict); ``cli_default`` replaces the field's default on the command line only; ``aliases`` are further
    flags accepted but not shown in ``--help``.
    """

    help: Union[str, Mapping[str, str]] = ""
    flag: Optional[str] = None
    type: Optional[Callable[[str], Any]] = None
    choices: Union[Sequence[str], Callable[[], Sequence[str]], None] = None
    roles: Tuple[str, ...] = ROLES
    parse: Optional[Callable[[Any], Any]] = None
    cli_default: Any = UNSET
    required: bool = False
    dest: Optional[str] = None
    aliases: Tuple[str, ...] = ()


def option(help: Union[str, Mapping[str, str]] = "", **kw: Any) -> Dict[str, Option]:
    """Field metadata making the field a command-line option (see :class:`Option`)."""
    return {"cli": Option(help=help, **kw)}


def _patch(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--patch must be sizes like 256,256 or 64,96,96 (got {text!r})") from None
    return values


def _json_dict(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--arch-args is not valid JSON ({exc}); write it like '{{\"width\": 16}}'") from None
    if not isinstance(value, dict):
        raise InputError("--arch-args must be a JSON object like '{\"width\": 16}'")
    return value


def _task_names() -> List[str]:
    from KDSegmentationLib.tasks import TASKS

    return list(TASKS)


def _at_least_one(value: int) -> int:
    return max(1, value)


STUDENT = ("student",)
# where the soft labels come from: the teacher on every patch, or computed once per image (training.teacher_targets)
TEACHER_TARGET_MODES = ("online", "stored")


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI options are generated from these fields).

    ``role`` is 'teacher' (train-teacher) or 'student' (distill). Unset values take per-task defaults. ``patch`` is
    in array order ((z, y, x) or (y, x)); default ``task.roi_size`` reversed. ``batch_size`` is per process.
    ``steps`` (optimiser steps) overrides ``epochs``; ``max_minutes`` caps the whole run (across resumes) and the
    learning-rate schedule follows whichever of steps and time runs out first.
    """

    task: str = field(metadata=option("the task", choices=_task_names, required=True))
    data: Optional[str] = field(default=None, metadata=option(
        "dataset folder (any supported layout) or a prepared cache (kdseg prepare)"))
    output: Optional[str] = field(default=None, metadata=option("model file to write (*.kdseg.pt)"))
    role: str = "student"
    teacher: Optional[str] = field(default=None, metadata=option(
        "teacher model file (*.kdseg.pt), or an ensemble of them joined by commas (probabilities averaged, with "
        "flips)", roles=STUDENT))
    losses: Optional[str] = field(default=None, metadata=option({
        "teacher": "loss spec (default seg=1: Dice + cross-entropy)",
        "student": "loss spec, e.g. kd=1 or seg=1,hint=0.5 (default kd=1 with a teacher, else seg=1)"}))
    alpha: float = field(default=0.5, metadata=option(
        "kd: weight of the teacher term (1-alpha: labels)", type=float, roles=STUDENT))
    temperature: float = field(default=2.0, metadata=option("kd/soft_ce temperature", type=float, roles=STUDENT))
    unlabelled: Optional[str] = field(default=None, metadata=option(
        "folder of images without labels: learnt from the teacher alone", roles=STUDENT, aliases=("--unlabeled",)))
    unlabelled_fraction: float = field(default=0.5, metadata=option(
        "share of each batch from --unlabelled", type=float, roles=STUDENT, aliases=("--unlabeled-fraction",)))
    init: Optional[str] = field(default=None, metadata=option(
        "start from this student model (local distillation of a shipped student)", roles=STUDENT))
    soft_labels: bool = field(default=False, metadata=option({
        "teacher": "lung: train on the readers' agreement fraction",
        "student": "lung: use the readers' agreement fraction as target"}))
    teacher_targets: str = field(default="online", metadata=option(
        "online: the teacher runs on every augmented patch; stored: its soft labels are computed once per training "
        "image and cropped/warped with the student's view (output losses only)", choices=TEACHER_TARGET_MODES,
        roles=STUDENT))
    val_data: Optional[str] = field(default=None, metadata=option(
        "validation dataset (default: a share of --data, split by patient)"))
    val_fraction: Optional[float] = field(default=None, metadata=option(
        "share of patients held out for validation (default 0.2, or the dataset's own validation split; 0 = none)",
        type=float))
    split_seed: int = field(default=0, metadata=option("seed of the patient split", type=int))
    folds: int = field(default=0, metadata=option("k-fold cross-validation by patient: number of folds", type=int))
    fold: int = field(default=0, metadata=option("which fold validates (0..folds-1)", type=int))
    epochs: Optional[int] = field(default=None, metadata=option(
        "epochs (an epoch sees each labelled case --patches-per-case times)", type=int))
    steps: Optional[int] = field(default=None, metadata=option("optimiser steps (overrides --epochs)", type=int))
    max_minutes: Optional[float] = field(default=None, metadata=option(
        "time budget for the whole run (the model is written when it runs out; the learning-rate schedule follows "
        "it)", type=float))
    batch_size: Optional[int] = field(default=None, metadata=option("patches per step and process", type=int))
    patch: Optional[Sequence[int]] = field(default=None, metadata=option(
        "patch size in array order, e.g. 256,256 or 64,96,96 (z,y,x)", parse=_patch))
    patches_per_case: Optional[int] = field(default=None, metadata=option(
        "patches per labelled case per epoch", type=int))
    lr: Optional[float] = field(default=None, metadata=option(
        "peak learning rate (AdamW; default 1e-3 teacher, 2e-3 student, 5e-4 student from --init)", type=float))
    weight_decay: float = field(default=1e-4, metadata=option("AdamW weight decay", type=float))
    schedule: str = field(default="cosine", metadata=option(
        "learning-rate decay after the warm-up", choices=("cosine", "poly")))
    warmup: float = 0.03
    grad_clip: float = 5.0
    seed: int = field(default=0, metadata=option("seed of weights, data order and augmentation", type=int))
    device: str = field(default="auto", metadata=option("where to train", choices=DEVICE_CHOICES))
    workers: Optional[int] = field(default=None, metadata=option(
        "DataLoader worker processes (default: CPUs-1 up to 12 on CUDA, 0 on CPU)", type=int))
    arch: Optional[str] = field(default=None, metadata=option(
        "network architecture (default: the task's shipped one)"))
    arch_args: Optional[Dict[str, Any]] = field(default=None, metadata=option(
        "JSON object of architecture arguments, merged into the defaults", parse=_json_dict))
    overwrite: bool = field(default=False, metadata=option("replace an existing --output"))
    resume: bool = field(default=False, metadata=option("continue from <output>.ckpt/ after a stop or crash"))
    val_every: Optional[int] = field(default=None, metadata=option(
        "validate every N steps (default: every epoch)", type=int))
    ckpt_every: Optional[int] = field(default=None, metadata=option(
        "checkpoint every N steps (default: every epoch)", type=int))
    ckpt_minutes: float = 10.0
    log_every: int = field(default=10, metadata=option(
        "progress/metric event every N steps", type=int, parse=_at_least_one))
    progress: str = field(default="none", metadata=option(
        "progress output on stdout", choices=PROGRESS_MODES, cli_default="auto"))
    cache_dir: Optional[str] = field(default=None, metadata=option(
        "folder for the prepared data cache (default: the user's cache folder)", flag="--cache"))
    cancel_file: Optional[str] = field(default=None, metadata=option(
        "stop cleanly (checkpoint kept) as soon as this file exists"))
    keep_checkpoints: bool = field(default=False, metadata=option("keep <output>.ckpt/ after success"))
    deterministic: bool = field(default=False, metadata=option("deterministic cuDNN (slower)"))
    amp: bool = field(default=True, metadata=option("fp32 on CUDA instead of bf16 autocast"))
    channels_last: bool = field(default=False, metadata=option("channels-last memory format (2D, CUDA)"))
    compile: bool = field(default=False, metadata=option("torch.compile the network being trained"))
    # dest: the top-level parser's --version (the program's) must not collide with this one
    version: Optional[str] = field(default=None, metadata=option(
        "version string stored in the model file", dest="model_version"))
    command_line: Optional[str] = None
    augment: bool = field(default=True, metadata=option("train without augmentation"))
    extra_card: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------
def cli_fields(role: Optional[str] = None) -> List[Tuple[Any, Option]]:
    """(dataclass field, :class:`Option`) of every option field, in field order; only ``role``'s when given."""
    out = []
    for f in fields(TrainConfig):
        opt = f.metadata.get("cli")
        if opt is not None and (role is None or role in opt.roles):
            out.append((f, opt))
    return out


def flag_of(f, opt: Option) -> str:
    """The option's flag: ``--name-with-dashes``; booleans that default to True are switched off by ``--no-name``."""
    if opt.flag:
        return opt.flag
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.type in (bool, "bool") and f.default is True else f"--{name}"


def _argument(f, opt: Option, role: str) -> Tuple[List[str], Dict[str, Any]]:
    """argparse ``add_argument`` arguments of one option field."""
    kw: Dict[str, Any] = {"dest": opt.dest or f.name}
    kw["help"] = opt.help[role] if isinstance(opt.help, Mapping) else opt.help
    if f.type in (bool, "bool"):
        kw["action"] = "store_false" if f.default is True else "store_true"
        return [flag_of(f, opt)], kw
    if opt.required:
        kw["required"] = True
    else:
        kw["default"] = f.default if opt.cli_default is UNSET else opt.cli_default
    if opt.type is not None:
        kw["type"] = opt.type
    if opt.choices is not None:
        kw["choices"] = list(opt.choices() if callable(opt.choices) else opt.choices)
    else:  # named after the flag, not the field: --cache CACHE
        kw["metavar"] = flag_of(f, opt)[2:].replace("-", "_").upper()
    return [flag_of(f, opt)], kw


def add_options(parser: argparse.ArgumentParser, role: str) -> None:
    """Add the options of ``role`` ('teacher': ``train-teacher``, 'student': ``distill``) to ``parser``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    for f, opt in cli_fields(role):
        flags, kw = _argument(f, opt, role)
        parser.add_argument(*flags, **kw)
        for alias in opt.aliases:  # old spellings keep working, unlisted
            parser.add_argument(alias, dest=kw["dest"], type=kw.get("type"), default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
    parser.set_defaults(role=role)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Parsed ``train-teacher`` / ``distill`` options -> :class:`TrainConfig`; raises :class:`InputError` for
    combinations that cannot train."""
    values: Dict[str, Any] = {"role": args.role}
    for f, opt in cli_fields(args.role):
        value = getattr(args, opt.dest or f.name)
        values[f.name] = opt.parse(value) if (opt.parse is not None and value is not None) else value
    cfg = TrainConfig(**values, command_line="kdseg " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if cfg.role == "student" and not cfg.teacher and not cfg.losses:
        raise InputError("kdseg distill needs --teacher FILE (or --losses seg=1 to train the student without one)")
    if not 0 < cfg.unlabelled_fraction < 1:
        raise InputError("--unlabelled-fraction must be between 0 and 1")
    if cfg.data is None and cfg.unlabelled is None:
        raise InputError("pass --data DIR" + (" and/or --unlabelled DIR" if cfg.role == "student" else ""))
    return cfg
