"""``kdseg train-teacher``, ``kdseg distill`` and ``kdseg prepare``: the training commands of the ``kdseg`` CLI.

``add_subcommands(subparsers)`` is called by ``cli.build_parser``; every command sets ``func`` to a function that
returns the exit code. Bad input raises :class:`InputError` (exit 2, one line); a run stopped by SIGINT or SIGTERM
keeps its checkpoint and exits 130 or 143 (128 + signal number), a cancel file also 130.

Examples::

    kdseg prepare --task liver --data RadCTTACEomics --output liver_cache
    kdseg train-teacher --task retina --data DRIVE --output retina_teacher.kdseg.pt --max-minutes 60
    kdseg distill --task retina --teacher retina_teacher.kdseg.pt --data DRIVE --losses kd=1 --alpha 0.5 \\
        --temperature 2 --output retina_student.kdseg.pt
    kdseg distill --task retina --teacher retina_teacher.kdseg.pt --unlabeled MY_PHOTOS --init retina_student.kdseg.pt
        (local distillation: writes <task>_student_local_vN.kdseg.pt in the user's model folder)
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

from KDSegmentationLib.errors import CancelledError, InputError


def _patch(text: Optional[str]):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--patch must be sizes like 256,256 or 64,96,96 (got {text!r})") from None
    return values


def _json_dict(text: Optional[str], option: str):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{option} is not valid JSON ({exc}); write it like '{{\"width\": 16}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object like '{{\"width\": 16}}'")
    return value


def _add_common(p, task_names) -> None:
    p.add_argument("--task", required=True, choices=task_names)
    p.add_argument("--data", help="dataset folder (any supported layout) or a prepared cache (kdseg prepare)")
    p.add_argument("--output", help="model file to write (*.kdseg.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--resume", action="store_true", help="continue from <output>.ckpt/ after a stop or crash")
    p.add_argument("--val-data", help="validation dataset (default: a share of --data, split by patient)")
    p.add_argument("--val-fraction", type=float, help="share of patients held out for validation (default 0.2, "
                   "or the dataset's own validation split; 0 = none)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation by patient: number of folds")
    p.add_argument("--fold", type=int, default=0, help="which fold validates (0..folds-1)")
    p.add_argument("--epochs", type=int, help="epochs (an epoch sees each labelled case --patches-per-case times)")
    p.add_argument("--steps", type=int, help="optimiser steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=float, help="time budget for the whole run (the model is written when it "
                   "runs out; the learning-rate schedule follows it)")
    p.add_argument("--batch-size", type=int, help="patches per step and process")
    p.add_argument("--patch", help="patch size in array order, e.g. 256,256 or 64,96,96 (z,y,x)")
    p.add_argument("--patches-per-case", type=int, help="patches per labelled case per epoch")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW; default 1e-3 teacher, 2e-3 student)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["cosine", "poly"], default="cosine")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: CPUs-1 up to 12 on CUDA, "
                   "0 on CPU)")
    p.add_argument("--arch", help="network architecture (default: the task's shipped one)")
    p.add_argument("--arch-args", help="JSON object of architecture arguments, merged into the defaults")
    p.add_argument("--val-every", type=int, help="validate every N steps (default: every epoch)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default: every epoch)")
    p.add_argument("--log-every", type=int, default=10, help="progress/metric event every N steps")
    p.add_argument("--cache", help="folder for the prepared data cache (default: the user's cache folder)")
    p.add_argument("--cancel-file", help="stop cleanly (checkpoint kept) as soon as this file exists")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep <output>.ckpt/ after success")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    p.add_argument("--deterministic", action="store_true", help="deterministic cuDNN (slower)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA instead of bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (2D, CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network being trained")
    p.add_argument("--version", dest="model_version", help="version string stored in the model file")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "bar", "none"])


def add_subcommands(subparsers) -> None:
    """Add ``train-teacher``, ``distill`` and ``prepare`` to the ``kdseg`` parser."""
    from KDSegmentationLib.tasks import TASKS

    names = list(TASKS)
    p = subparsers.add_parser("train-teacher", help="train a teacher network on labelled data")
    _add_common(p, names)
    p.add_argument("--losses", default="seg=1", help="loss spec (default seg=1: Dice + cross-entropy)")
    p.add_argument("--soft-labels", action="store_true", help="lung: train on the readers' agreement fraction")
    p.set_defaults(func=cmd_train_teacher, role="teacher")

    p = subparsers.add_parser("distill", help="distil a teacher into a fast student (labelled and/or unlabelled "
                              "images)")
    _add_common(p, names)
    p.add_argument("--teacher", help="teacher model file (*.kdseg.pt)")
    p.add_argument("--losses", help="loss spec, e.g. kd=1 or seg=1,hint=0.5 (default kd=1 with a teacher, else "
                   "seg=1)")
    p.add_argument("--alpha", type=float, default=0.5, help="kd: weight of the teacher term (1-alpha: labels)")
    p.add_argument("--temperature", type=float, default=2.0, help="kd/soft_ce temperature")
    p.add_argument("--unlabeled", help="folder of images without labels: learnt from the teacher alone")
    p.add_argument("--unlabeled-fraction", type=float, default=0.5, help="share of each batch from --unlabeled")
    p.add_argument("--init", help="start from this student model (local distillation of a shipped student)")
    p.add_argument("--soft-labels", action="store_true", help="lung: use the readers' agreement fraction as target")
    p.set_defaults(func=cmd_distill, role="student")

    p = subparsers.add_parser("prepare", help="read a dataset once into a numpy cache (no SimpleITK needed to "
                              "train from it)")
    p.add_argument("--task", required=True, choices=names)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--output", required=True, help="cache folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--workers", type=int, default=0, help="parallel reader processes")
    p.add_argument("--progress", default="auto", choices=["auto", "json", "bar", "none"])
    p.set_defaults(func=cmd_prepare)


def config_from_args(args):
    """argparse namespace -> trainer.TrainConfig."""
    from KDSegmentationLib.training.trainer import TrainConfig

    if args.role == "student" and not args.teacher and not args.losses:
        raise InputError("kdseg distill needs --teacher FILE (or --losses seg=1 to train the student without one)")
    if not 0 < getattr(args, "unlabeled_fraction", 0.5) < 1:
        raise InputError("--unlabeled-fraction must be between 0 and 1")
    if args.data is None and getattr(args, "unlabeled", None) is None:
        raise InputError("pass --data DIR" + (" and/or --unlabeled DIR" if args.role == "student" else ""))
    return TrainConfig(
        task=args.task, data=args.data, output=args.output, role=args.role, teacher=getattr(args, "teacher", None),
        losses=args.losses, alpha=getattr(args, "alpha", 0.5), temperature=getattr(args, "temperature", 2.0),
        unlabeled=getattr(args, "unlabeled", None), unlabeled_fraction=getattr(args, "unlabeled_fraction", 0.5),
        init=getattr(args, "init", None), soft_labels=args.soft_labels, val_data=args.val_data,
        val_fraction=args.val_fraction, split_seed=args.split_seed, folds=args.folds, fold=args.fold,
        epochs=args.epochs, steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
        patch=_patch(args.patch), patches_per_case=args.patches_per_case, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed, device=args.device,
        workers=args.workers, arch=args.arch, arch_args=_json_dict(args.arch_args, "--arch-args"),
        overwrite=args.overwrite, resume=args.resume, val_every=args.val_every, ckpt_every=args.ckpt_every,
        log_every=max(1, args.log_every), progress=args.progress, cache_dir=args.cache,
        cancel_file=args.cancel_file, keep_checkpoints=args.keep_checkpoints, deterministic=args.deterministic,
        amp=args.amp, channels_last=args.channels_last, compile=args.compile, version=args.model_version,
        augment=args.augment, command_line="kdseg " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )


def _run_training(args) -> int:
    # One BLAS thread per process: each DataLoader worker normalises fundus crops with numpy matrix products, and
    # a dozen workers each spinning OpenBLAS's default thread pool oversubscribe the CPUs (measured: twice the CPU
    # time for the same work). Effective only before numpy is first imported, which is the case here.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from KDSegmentationLib.progress import Progress
    from KDSegmentationLib.training.trainer import train

    cfg = config_from_args(args)
    progress = Progress(args.progress)
    try:
        out = train(cfg, progress=progress)
    except CancelledError as exc:
        # 128 + signal number, as a shell reports a process killed by it: 130 Ctrl-C, 143 SIGTERM
        code = 128 + int(getattr(exc, "signal", None) or signal.SIGINT)
        message = f"cancelled: {exc}"
        if args.progress == "json":
            progress.error(message)
        print(f"kdseg: {message}", file=sys.stderr, flush=True)
        return code
    if progress.mode != "json":
        print(out)
    return 0


def cmd_train_teacher(args) -> int:
    return _run_training(args)


def cmd_distill(args) -> int:
    return _run_training(args)


def cmd_prepare(args) -> int:
    from KDSegmentationLib.training import datasets as ds
    from KDSegmentationLib.progress import Progress
    from KDSegmentationLib.tasks import get_task

    task = get_task(args.task)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it or choose another --output")
    if ds.is_cache(args.data):
        raise InputError(f"{args.data} is already a prepared cache; train from it directly")
    progress = Progress(args.progress)
    cases = ds.find_cases(args.data, task)
    ds.prepare_cache(cases, task, out, progress=progress, workers=args.workers,
                     source=str(Path(args.data).resolve()), fingerprint=ds.source_fingerprint(cases))
    n_lab = sum(1 for c in cases if c.labelled)
    progress.result(str(out), cases=len(cases), labelled=n_lab, layout=ds.layout_of(cases))
    if progress.mode != "json":
        print(f"{out}: {len(cases)} cases ({n_lab} labelled, layout {ds.layout_of(cases)})")
    return 0
