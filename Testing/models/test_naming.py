"""The versioned name of local students: <task>_student_local_vN.kdseg.pt, model version local-vN."""
from __future__ import annotations

import pytest

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.models.naming import (local_version, next_versioned_output, resolve_output,
                                               versioned_model_name)


def test_versioned_names(tmp_path):
    assert versioned_model_name("liver", 3) == "liver_student_local_v3.kdseg.pt"
    assert local_version(tmp_path / "liver_student_local_v3.kdseg.pt", "liver") == "local-v3"
    assert local_version(tmp_path / "liver_student.kdseg.pt", "liver") is None
    assert next_versioned_output(tmp_path / "missing", "liver").name == "liver_student_local_v1.kdseg.pt"
    (tmp_path / "liver_student_local_v2.kdseg.pt").write_bytes(b"m")
    (tmp_path / "liver_student_local_v4.kdseg.pt.ckpt").mkdir()  # a stopped run holds its version
    (tmp_path / "retina_student_local_v9.kdseg.pt").write_bytes(b"m")
    assert next_versioned_output(tmp_path, "liver").name == "liver_student_local_v5.kdseg.pt"
    assert next_versioned_output(tmp_path, "liver", resume=True).name == "liver_student_local_v4.kdseg.pt"


def test_resolve_output(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEG_USER_MODELS", str(tmp_path))
    assert resolve_output(str(tmp_path / "a.kdseg.pt"), "liver", "teacher") == tmp_path / "a.kdseg.pt"
    assert resolve_output(None, "liver", "student") == tmp_path / "liver_student_local_v1.kdseg.pt"
    with pytest.raises(InputError, match="must end with"):
        resolve_output(str(tmp_path / "a.pt"), "liver", "student")
    with pytest.raises(InputError, match="train-teacher needs --output"):
        resolve_output(None, "liver", "teacher")
