"""``kdseg train-teacher``, ``kdseg distill`` and ``kdseg prepare``: the training commands of the ``kdseg`` CLI.

``add_subcommands(subparsers)`` is called by ``cli.build_parser``; every command sets ``func`` to a function that
returns the exit code. Bad input raises :class:`InputError` (exit 2, one line); a run stopped by SIGINT or SIGTERM
keeps its checkpoint and exits 130 or 143 (128 + signal number), a cancel file also 130.

Examples::

    kdseg prepare --task liver --data RadCTTACEomics --output liver_cache
    kdseg train-teacher --task retina --data DRIVE --output retina_teacher.kdseg.pt --max-minutes 60
    kdseg distill --task retina --teacher retina_teacher.kdseg.pt --data DRIVE --losses kd=1 --alpha 0.5 \\
        --temperature 2 --output retina_student.kdseg.pt
    kdseg distill --task retina --teacher retina_teacher.kdseg.pt --unlabelled MY_PHOTOS --init retina_student.kdseg.pt
        (local distillation: writes <task>_student_local_vN.kdseg.pt in the user's model folder)
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.progress import PROGRESS_MODES
from KDSegmentationLib.training.config import add_options, config_from_args


def add_subcommands(subparsers) -> None:
    """Add ``train-teacher``, ``distill`` and ``prepare`` to the ``kdseg`` parser (the training options come from
    ``training.config.TrainConfig``)."""
    from KDSegmentationLib.tasks import TASKS

    p = subparsers.add_parser("train-teacher", help="train a teacher network on labelled data")
    add_options(p, "teacher")
    p.set_defaults(func=cmd_train_teacher)

    p = subparsers.add_parser("distill", help="distil a teacher into a fast student (labelled and/or unlabelled "
                              "images)")
    add_options(p, "student")
    p.set_defaults(func=cmd_distill)

    p = subparsers.add_parser("prepare", help="read a dataset once into a numpy cache (no SimpleITK needed to "
                              "train from it)")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--output", required=True, help="cache folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    p.add_argument("--workers", type=int, default=0, help="parallel reader processes")
    p.add_argument("--progress", default="auto", choices=list(PROGRESS_MODES))
    p.set_defaults(func=cmd_prepare)


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
    from KDSegmentationLib.training import cache as caches, layouts
    from KDSegmentationLib.progress import Progress
    from KDSegmentationLib.tasks import get_task

    task = get_task(args.task)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it or choose another --output")
    if caches.is_cache(args.data):
        raise InputError(f"{args.data} is already a prepared cache; train from it directly")
    progress = Progress(args.progress)
    cases = layouts.find_cases(args.data, task)
    caches.prepare_cache(cases, task, out, progress=progress, workers=args.workers,
                     source=str(Path(args.data).resolve()), fingerprint=caches.source_fingerprint(cases))
    n_lab = sum(1 for c in cases if c.labelled)
    progress.result(str(out), cases=len(cases), labelled=n_lab, layout=layouts.layout_of(cases))
    if progress.mode != "json":
        print(f"{out}: {len(cases)} cases ({n_lab} labelled, layout {layouts.layout_of(cases)})")
    return 0
