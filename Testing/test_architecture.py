"""The architecture's promises, checked by running the code: every consumer of network outputs gets them from the
one deployment inferer, the client never imports the engine's heavy dependencies, and the engine stays small."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import REPO, require, save_tiny_student
from KDSegmentationLib.inference.inferer import Inferer
from KDSegmentationLib.models.networks import build_network, default_arch_args

ENGINE = REPO / "KDSegmentation" / "KDSegmentationLib"


@pytest.fixture()
def forward_calls(monkeypatch):
    """Counts the inferer's forwards (torch or compiled: a call into the inferer from outside it counts once); the
    real forward still runs."""
    calls, depth = [], [0]

    def counting(real):
        def wrapper(self, x, roi_zyx=None):
            if depth[0] == 0:
                calls.append(tuple(x.shape))
            depth[0] += 1
            try:
                return real(self, x, roi_zyx)
            finally:
                depth[0] -= 1
        return wrapper

    for name in ("probabilities", "numpy_probabilities"):
        monkeypatch.setattr(Inferer, name, counting(getattr(Inferer, name)))
    return calls


@pytest.fixture()
def drive_pair(shared_data, tmp_path) -> Path:
    """Two DRIVE test photos with their masks in DRIVE's layout (linked, not copied)."""
    src = require(shared_data / "retina" / "DRIVE" / "test")
    for sub in ("images", "1st_manual", "mask"):
        (tmp_path / "DRIVE" / "test" / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[:2]:
            (tmp_path / "DRIVE" / "test" / sub / f.name).symlink_to(f)
    return tmp_path / "DRIVE"


@pytest.fixture()
def tiny_retina_model(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_tiny_student("retina", tmp_path / "tiny.kdseg.pt", card={"split": {"val_cases": ["01_test"]}})


def test_segment_evaluate_calibrate_validate_and_ablation_share_the_deployment_inferer(
        forward_calls, drive_pair, tiny_retina_model, tmp_path):
    from KDSegmentationLib.cli.segment import run_segment
    from KDSegmentationLib.evaluation.calibrate import calibrate
    from KDSegmentationLib.evaluation.evaluate import evaluate_dataset
    from KDSegmentationLib.tasks import RETINA
    from KDSegmentationLib.training.validation import predict_labels

    photo = sorted((drive_pair / "test" / "images").iterdir())[0]
    counts = {}

    def ran(name, action):
        before = len(forward_calls)
        action()
        counts[name] = len(forward_calls) - before

    ran("segment", lambda: run_segment("retina", str(photo), str(tmp_path / "s.seg.nrrd"), model=str(tiny_retina_model)))
    ran("evaluate", lambda: evaluate_dataset("retina", str(drive_pair), model=str(tiny_retina_model), split="all"))
    ran("calibrate", lambda: calibrate(str(tiny_retina_model), str(drive_pair)))
    arch, args = default_arch_args("retina", "student")
    net = build_network(arch, **args).eval()
    ran("validation", lambda: predict_labels(net, torch.zeros(1, 3, 64, 64), (64, 64), torch.device("cpu")))
    spec = importlib.util.spec_from_file_location("ablation", REPO / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    ran("ablation", lambda: ablation.evaluate(tiny_retina_model, (str(drive_pair), "all"), RETINA,
                                              torch.device("cpu")))
    assert counts == {"segment": 1, "evaluate": 2, "calibrate": 1, "validation": 1, "ablation": 2}


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_engine_modules_and_functions_stay_small():
    """At most ~400 lines a module and ~60 lines a function, so that each has one job a reader can hold."""
    too_long = []
    for path in sorted(ENGINE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 420:
            too_long.append(f"{path.relative_to(ENGINE)}: {len(text.splitlines())} lines")
        for fn in _functions(ast.parse(text)):
            if fn.end_lineno - fn.lineno + 1 > 62:
                too_long.append(f"{path.relative_to(ENGINE)}:{fn.lineno} {fn.name}")
    assert not too_long, too_long


def test_engine_layers_are_folders_at_most_two_levels_deep():
    depth = max(len(p.relative_to(ENGINE).parts) for p in ENGINE.rglob("*.py"))
    packages = sorted(p.name for p in ENGINE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert depth <= 2
    assert packages == ["cli", "client", "evaluation", "inference", "io", "models", "tasks", "training"]
