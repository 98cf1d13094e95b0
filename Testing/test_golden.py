"""Behaviour is kept: every bundled sample, through ``kdseg segment`` with the student and the teacher, gives the
labelmap (voxel digest, grid) and segment statistics recorded in ``Testing/golden/golden.json``."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).with_name("golden")
_spec = importlib.util.spec_from_file_location("record_golden", GOLDEN_DIR / "record_golden.py")
record_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_golden)

GOLDEN = json.loads(record_golden.GOLDEN_FILE.read_text())


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_sample_output_equals_golden(key, tmp_path):
    task, model = key.split("/")
    produced = record_golden.segment_sample(task, model, tmp_path)
    assert produced["runtime"] == GOLDEN[key]["runtime"]
    assert produced["labelmap"] == GOLDEN[key]["labelmap"]
    assert produced["segments"] == GOLDEN[key]["segments"]
