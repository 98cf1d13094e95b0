"""The model cards are what scripts/evaluate_models.py writes from the committed model files and evaluation.json:
nothing in them is typed by hand, and every number has a source a command reproduces."""
from __future__ import annotations

import importlib.util
import json
import shutil

from conftest import REPO

MODELS = REPO / "Resources" / "Models"


def _text(path):
    return path.read_text(encoding="utf-8")  # the cards hold non-ASCII signs; the locale may be ASCII


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_models", REPO / "scripts" / "evaluate_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_cards_are_regenerated_from_the_committed_evaluations(tmp_path):
    models = tmp_path / "Models"
    shutil.copytree(MODELS, models)
    (models / "MODEL_CARDS.md").unlink()
    # every model keeps its stored evaluation and every section its committed numbers: no data is read
    assert _script().main(["--data", str(tmp_path / "no-data"), "--models", str(models), "--reuse",
                           "--no-update"]) == 0
    assert _text(models / "MODEL_CARDS.md") == _text(MODELS / "MODEL_CARDS.md")
    assert json.loads(_text(models / "evaluation.json")) == json.loads(_text(MODELS / "evaluation.json"))


def test_each_teacher_is_set_against_its_student_on_the_same_data():
    script = _script()
    summary = json.loads(_text(MODELS / "evaluation.json"))
    entries = [{"name": m["name"], "evaluations": m["evaluations"]} for m in summary["models"]]
    rows = [line for line in script._teacher_student_lines(entries) if line.startswith("| ") and "---" not in line]
    by_name = {e["name"]: e for e in entries}
    assert len(rows) == 1 + sum(len(by_name[f"{t}_student"]["evaluations"]) for t in ("retina", "lung_nodule", "liver"))
    for row in rows[1:]:
        task, _title, teacher, student, diff = [c.strip() for c in row.strip("|").split("|")]
        # the printed Dice are rounded to 3 decimals, the difference to 1 (of the unrounded values)
        assert abs(float(diff) - 100 * (float(teacher) - float(student))) < 0.16, row
