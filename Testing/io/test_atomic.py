"""Every file the engine writes appears whole or not at all, and a failed write is one line naming the file."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.io import atomic


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    monkeypatch.setattr(atomic.os, "replace", _enospc)
    with pytest.raises(InputError) as info:
        atomic.write_json(target, {"new": 1})
    assert str(target) in str(info.value) and "No space left" in str(info.value) and "\n" not in str(info.value)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failing_model_writer_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import torch

    from KDSegmentationLib.models import files

    def half_written(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(files.torch, "save", half_written)
    with pytest.raises(InputError) as info:
        files.atomic_save({"w": torch.zeros(2)}, tmp_path / "m.kdseg.pt")
    assert "cannot write" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
