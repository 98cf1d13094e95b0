"""Compiled models (ONNX Runtime on the CPU): the same probabilities as torch on any input size, found again only
for the exact model file they came from, never trusted when damaged, and no torch import once compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import LIB_PARENT, REPO, save_tiny_student
from KDSegmentationLib.inference import segment as segment_module
from KDSegmentationLib.inference.inferer import Inferer
from KDSegmentationLib.inference.segment import load_for_inference
from KDSegmentationLib.models.compiled import TOLERANCE, compiled_paths, load_compiled
from KDSegmentationLib.models.files import load_model, rewrite_header, save_model
from KDSegmentationLib.models.networks import build_network, default_arch_args
from KDSegmentationLib.models.onnx_export import compile_model
from KDSegmentationLib.paths import file_sha256
from KDSegmentationLib.tasks import get_task

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# sizes the compile-time check does not use: the graph must not be tied to the sizes it saw
OTHER_SIZES = {"retina": (1, 3, 47, 129), "lung_nodule": (3, 2, 64, 50), "liver": (1, 1, 22, 41, 50)}


@pytest.fixture(autouse=True)
def fresh_model_cache():
    segment_module._MODEL_CACHE.clear()
    yield
    segment_module._MODEL_CACHE.clear()


def _torch_probabilities(loaded, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(loaded.network(torch.from_numpy(x)), dim=1).numpy()


@pytest.mark.parametrize("task", ["retina", "lung_nodule", "liver"])
def test_a_compiled_student_gives_torchs_probabilities_on_a_size_it_never_saw(tmp_path, task):
    torch.manual_seed(0)
    path = save_tiny_student(task, tmp_path / f"{task}.kdseg.pt")
    loaded = load_model(path)
    compiled, message = compile_model(loaded)
    assert compiled is not None, message
    x = np.random.default_rng(1).normal(size=OTHER_SIZES[task]).astype(np.float32)
    diff = np.abs(compiled.network.probabilities(x) - _torch_probabilities(loaded, x)).max()
    assert diff <= TOLERANCE
    assert compiled.header == loaded.header and compiled.runtime == "onnxruntime"


def test_a_compiled_teacher_gives_torchs_probabilities(tmp_path):
    torch.manual_seed(0)
    arch, args = default_arch_args("retina", "teacher")
    args = dict(args, filters=[4, 8, 8, 16, 16])
    path = save_model(tmp_path / "t.kdseg.pt", build_network(arch, **args), arch=arch, arch_args=args,
                      task="retina", role="teacher")
    loaded = load_model(path)
    compiled, message = compile_model(loaded)
    assert compiled is not None, message
    x = np.random.default_rng(2).normal(size=(1, 3, 70, 45)).astype(np.float32)
    assert np.abs(compiled.network.probabilities(x) - _torch_probabilities(loaded, x)).max() <= TOLERANCE


def test_a_compiled_model_belongs_to_the_exact_bytes_of_its_model_file(tmp_path):
    torch.manual_seed(0)
    path = save_tiny_student("retina", tmp_path / "r.kdseg.pt")
    assert load_compiled(path) is None
    compile_model(load_model(path))
    assert load_compiled(path) is not None
    info = json.loads(compiled_paths(path, file_sha256(path))[1].read_text())
    assert info["source_sha256"] == file_sha256(path) and info["max_abs_softmax_diff"] <= TOLERANCE
    old_graph = compiled_paths(path, file_sha256(path))[0]
    rewrite_header(path, card={"name": "recalibrated"})  # same weights, other bytes: the old graph must not be used
    assert load_compiled(path) is None
    compile_model(load_model(path))
    assert load_compiled(path) is not None and not old_graph.exists()  # one graph per model name in the cache
    assert sorted(p.suffix for p in old_graph.parent.glob("r-*")) == [".json", ".onnx"]


def test_a_damaged_graph_is_never_run_and_is_compiled_again(tmp_path):
    torch.manual_seed(0)
    path = save_tiny_student("retina", tmp_path / "r.kdseg.pt")
    compile_model(load_model(path))
    graph = compiled_paths(path, file_sha256(path))[0]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert load_compiled(path) is None
    heard = []
    loaded, device = load_for_inference(get_task("retina"), str(path), "cpu", log=heard.append)
    assert loaded.runtime == "onnxruntime" and device == "cpu"
    assert heard and "compiled for ONNX Runtime" in heard[0]
    assert load_compiled(path) is not None


def test_a_model_that_fails_to_compile_runs_with_torch_and_leaves_no_graph(tmp_path, monkeypatch):
    import KDSegmentationLib.models.onnx_export as export

    def broken(*args, **kwargs):
        raise RuntimeError("exporter refused an operator")

    monkeypatch.setattr(export, "_export", broken)
    torch.manual_seed(0)
    path = save_tiny_student("retina", tmp_path / "r.kdseg.pt")
    heard = []
    loaded, device = load_for_inference(get_task("retina"), str(path), "cpu", log=heard.append)
    assert loaded.runtime == "torch" and device == torch.device("cpu")
    assert "runs with torch" in heard[0] and "exporter refused" in heard[0]
    graph, description = compiled_paths(path, file_sha256(path))
    assert not description.exists() and not graph.exists() and not any(graph.parent.glob("*.tmp*"))


def test_torch_is_used_by_workers_when_asked_for_on_a_gpu_machine_and_for_ensembles(tmp_path, monkeypatch):
    import KDSegmentationLib.inference.device as device_module

    torch.manual_seed(0)
    a = save_tiny_student("retina", tmp_path / "a.kdseg.pt")
    b = save_tiny_student("retina", tmp_path / "b.kdseg.pt")
    task = get_task("retina")
    assert load_for_inference(task, f"{a},{b}", "cpu")[0].role == "ensemble"
    assert load_for_inference(task, str(a), "cpu", compiled=False)[0].runtime == "torch"  # a persistent worker
    monkeypatch.setenv("KDSEG_RUNTIME", "torch")
    assert load_for_inference(task, str(a), "cpu")[0].runtime == "torch"
    monkeypatch.delenv("KDSEG_RUNTIME")
    monkeypatch.setattr(device_module, "_nvidia_driver_present", lambda: True)
    assert load_for_inference(task, str(a), "auto")[0].runtime == "torch"  # torch decides whether CUDA is usable
    assert load_for_inference(task, str(a), "cpu")[0].runtime == "onnxruntime"


def test_the_sliding_window_blends_the_compiled_logits_as_torch_does(tmp_path, monkeypatch):
    import KDSegmentationLib.inference.inferer as inferer

    torch.manual_seed(0)
    path = save_tiny_student("liver", tmp_path / "l.kdseg.pt")
    loaded = load_model(path)
    compiled, _ = compile_model(loaded)
    monkeypatch.setitem(inferer.WHOLE_MAX_VOXELS, "cpu", 1000)
    x = np.random.default_rng(3).normal(size=(1, 1, 20, 40, 36)).astype(np.float32)
    ref = Inferer(loaded.network, torch.device("cpu")).numpy_probabilities(x, (16, 24, 24))
    got = Inferer(compiled.network, "cpu").numpy_probabilities(x, (16, 24, 24))
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOLERANCE


FRESH_RUN = """
import json, sys
from KDSegmentationLib.cli.segment import run_segment
summary = run_segment("liver", sys.argv[1], sys.argv[2], device="auto", one_shot=True)
print(json.dumps({"runtime": summary["runtime"], "torch_imported": "torch" in sys.modules}))
"""


def _fresh_segment(sample, out, runtime: str) -> dict:
    env = dict(os.environ, KDSEG_RUNTIME=runtime, PYTHONPATH=str(LIB_PARENT))
    done = subprocess.run([sys.executable, "-c", FRESH_RUN, str(sample), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_once_compiled_a_fresh_run_does_not_import_torch_and_writes_torchs_labelmap(tmp_path, monkeypatch):
    import SimpleITK as sitk

    if "cuda" in str(load_for_inference(get_task("liver"), "student", "auto")[1]):
        pytest.skip("a CUDA GPU runs the model with torch")
    sample = REPO / "Resources" / "Samples" / "liver" / "abdomen_ct_3mm.nii.gz"
    compiled = _fresh_segment(sample, tmp_path / "compiled.nii.gz", "auto")  # compiles, or finds the graph
    again = _fresh_segment(sample, tmp_path / "again.nii.gz", "auto")
    reference = _fresh_segment(sample, tmp_path / "torch.nii.gz", "torch")
    assert compiled["runtime"] == again["runtime"] == "onnxruntime" and reference["runtime"] == "torch"
    assert not again["torch_imported"] and reference["torch_imported"]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f))) for f in
              ("again.nii.gz", "torch.nii.gz")]
    assert labels[0].any() and np.array_equal(labels[0], labels[1])


def test_an_unwritable_cache_folder_runs_torch_and_says_why(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("KDSEG_COMPILED", str(blocker / "compiled"))
    torch.manual_seed(0)
    path = save_tiny_student("retina", tmp_path / "r.kdseg.pt")
    heard = []
    loaded, _ = load_for_inference(get_task("retina"), str(path), "cpu", log=heard.append)
    assert loaded.runtime == "torch" and "runs with torch" in heard[0]
    assert blocker.read_text().startswith("a file")
