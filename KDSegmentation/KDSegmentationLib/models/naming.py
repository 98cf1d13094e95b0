"""Where a trained model goes: the ``--output`` file, or the next versioned name of a local distillation.

The one rule for versioned local models: ``<task>_student_local_vN.kdseg.pt`` in the user's model folder, model
version ``local-vN`` (:func:`versioned_model_name`, :func:`next_versioned_output`, :func:`local_version`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.paths import MODEL_SUFFIX


def _prefix(task: str) -> str:
    return f"{task}_student_local_v"


def versioned_model_name(task: str, n: int) -> str:
    """File name of version ``n`` of a task's local student: ``<task>_student_local_v<n>.kdseg.pt``."""
    return f"{_prefix(task)}{int(n)}{MODEL_SUFFIX}"


def version_number(name: str, task: str) -> Optional[int]:
    """N of a file named ``<task>_student_local_vN...`` (any suffix after N), else None."""
    prefix = _prefix(task)
    if name.endswith(".lock"):  # a run's lock file: the run's version is decided by its lock, not by the file
        return None
    if name.startswith(prefix):
        num = name[len(prefix):].split(".")[0]
        if num.isdigit():
            return int(num)
    return None


def local_version(output: Path, task: str) -> Optional[str]:
    """The model version ``local-vN`` of a versioned output file, else None."""
    n = version_number(Path(output).name, task)
    return None if n is None else f"local-v{n}"


def taken_versions(folder: Path, task: str) -> List[int]:
    """Every N used by a file of ``folder`` (model, report, checkpoint folder...), ascending."""
    if not folder.is_dir():
        return []
    return sorted({n for n in (version_number(p.name, task) for p in folder.iterdir()) if n is not None})


def next_versioned_output(folder: Path, task: str, resume: bool = False) -> Path:
    """The next free ``<task>_student_local_vN.kdseg.pt`` in ``folder`` (N one past every version in use); with
    ``resume``, the newest version whose run left a checkpoint and no model, when there is one."""
    taken = taken_versions(folder, task)
    if resume:
        for n in reversed(taken):
            cand = folder / versioned_model_name(task, n)
            if (folder / f"{cand.name}.ckpt").is_dir() and not cand.exists():
                return cand
    return folder / versioned_model_name(task, max(taken, default=0) + 1)


def resolve_output(output: Optional[str], task: str, role: str, resume: bool = False) -> Path:
    """The model file a run writes: ``output`` (must end with .kdseg.pt); ``distill`` without one gets the next
    versioned name in the user's model folder."""
    if output:
        out = Path(output)
        if not out.name.endswith(MODEL_SUFFIX):
            raise InputError(f"--output {out} must end with {MODEL_SUFFIX}")
        return out
    if role != "student":
        raise InputError("train-teacher needs --output FILE.kdseg.pt")
    from KDSegmentationLib.paths import user_models_dir

    return next_versioned_output(user_models_dir(), task, resume)
