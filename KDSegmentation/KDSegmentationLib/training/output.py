"""Where a run writes: its model file resolved (``--output``, or the next versioned local name), checked, and locked
against every other run for the whole run, checkpoints included."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io.locks import OutputLock, OutputLocked
from KDSegmentationLib.models.naming import resolve_output, version_number, versioned_model_name
from KDSegmentationLib.training.config import TrainConfig


def check_output(cfg: TrainConfig, output: Path) -> None:
    if output.exists() and not cfg.overwrite:
        raise InputError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    for teacher in (cfg.teacher.split(",") if cfg.teacher else []):
        if not Path(teacher.strip()).is_file():
            raise InputError(f"teacher model {teacher.strip()} not found")


def _acquire(cfg: TrainConfig) -> OutputLock:
    """The lock of the run's output. An explicit ``--output`` in use is refused; a versioned output that another
    run is writing moves on to the next free version."""
    output = resolve_output(cfg.output, cfg.task, cfg.role, cfg.resume)
    for _attempt in range(20):
        try:
            return OutputLock(output).acquire()
        except OutputLocked:
            if cfg.output:
                raise
        n = version_number(output.name, cfg.task) + 1
        while (output.parent / versioned_model_name(cfg.task, n)).exists():
            n += 1
        output = output.parent / versioned_model_name(cfg.task, n)
    raise InputError("every new version of the local model is being written by another run; wait and try again")


@contextlib.contextmanager
def locked_output(cfg: TrainConfig, main_process: bool = True) -> Iterator[Path]:
    """The output model file, locked for the block. Only the main process of a torchrun job locks: the other
    ranks share its output and never write it."""
    if not main_process:
        yield resolve_output(cfg.output, cfg.task, cfg.role, cfg.resume)
        return
    lock = _acquire(cfg)
    try:
        yield lock.output
    finally:
        lock.release()
