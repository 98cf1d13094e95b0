"""The one way the engine writes a file: into a hidden temporary file beside the target, then an atomic rename.

Readers (Slicer, a second kdseg, a crashed run's successor) never see a half-written file, and a failed or cancelled
write leaves nothing behind: the target keeps its old content or stays absent.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.paths import MODEL_SUFFIX


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path: Path) -> Path:
    """Hidden sibling of ``path`` keeping its full suffix (``.seg.nrrd``, ``.nii.gz``), which picks the writers."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".seg.nrrd", ".nii.gz", MODEL_SUFFIX)) else path.suffix
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f".{stem[:40]}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (mode 0666 & ~umask), on error it is removed.

    The parent folder must exist (creating it is the caller's decision: an output folder, a model folder). An
    ``OSError`` while writing (no space, read-only folder) becomes an :class:`InputError` naming the file.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only or vanished folder: the user's to fix, in one line
        raise InputError(f"cannot write {path} ({exc.strerror or exc}); free some space or choose a writable "
                         f"location") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` atomically, creating the parent folder when needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path, obj: Any, indent: int = 2) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())
