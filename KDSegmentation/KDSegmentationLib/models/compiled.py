"""Compiled models: a model file's network exported once to ONNX and run by ONNX Runtime on the CPU.

Why: importing torch costs about 2 s of every one-shot ``kdseg segment`` (``benchmarks/results/runtime.md``); once
torch is loaded its own forward is as fast, so a persistent worker keeps torch. A compiled graph is a cache, never a
source of truth:

- it lives in the user's cache folder, named by the SHA-256 of the model file's bytes, so a retrained, rewritten or
  replaced model file never meets an old graph;
- it is written only after its probabilities matched torch's within ``TOLERANCE`` (``models/onnx_export.py``);
- anything unexpected (a missing or corrupt file, ONNX Runtime not installed) means torch runs the model instead.

Torch stays the runtime for ensembles, the GPU, training and evaluation. Importing this module does not import torch.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from KDSegmentationLib.models.header_view import HeaderView
from KDSegmentationLib.paths import file_sha256, user_cache_dir

RUNTIME_ENV = "KDSEG_RUNTIME"            # auto (default): ONNX Runtime on the CPU when installed; torch: never
RUNTIMES = ("auto", "torch")
COMPILED_ENV = "KDSEG_COMPILED"          # folder of compiled models (default: the user's cache folder)
FORMAT = "kdseg-compiled/1"
TOLERANCE = 1e-4                         # max |softmax difference| to torch accepted when compiling
INPUT, LOGITS, PROBABILITIES = "x", "logits", "p"


def runtime_choice() -> str:
    """The runtime asked for through ``KDSEG_RUNTIME``; an unknown value counts as ``auto``."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    return value if value in RUNTIMES else "auto"


def compilation_possible() -> bool:
    """ONNX Runtime can run compiled models here (the exporter's own ``onnx`` package is checked when compiling)."""
    return runtime_choice() == "auto" and importlib.util.find_spec("onnxruntime") is not None


def compiled_dir() -> Path:
    env = os.environ.get(COMPILED_ENV)
    return Path(env) if env else user_cache_dir("compiled")


def compiled_paths(model_path, digest: str):
    """(graph ``.onnx``, description ``.json``) of the model file whose bytes hash to ``digest``."""
    stem = Path(model_path).name.split(".")[0][:60]
    base = compiled_dir() / f"{stem}-{digest[:24]}"
    return base.with_suffix(".onnx"), base.with_suffix(".json")


class OnnxNetwork:
    """An ONNX Runtime session of a compiled model on the CPU.

    ``probabilities(x)``: float32 (B, C, *spatial) -> softmax (B, classes, *spatial) float32;
    ``logits(x)``: the same before the softmax (for MONAI's sliding window, which blends logits).
    """

    def __init__(self, graph_path: Path, threads: Optional[int] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default, one per physical core
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([PROBABILITIES], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([LOGITS], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]


@dataclass
class CompiledModel(HeaderView):
    """A compiled model: what :class:`models.files.LoadedModel` offers to inference, without torch."""
    network: OnnxNetwork
    header: Dict[str, Any]
    path: Path
    runtime: str = "onnxruntime"


def load_compiled(model_path, threads: Optional[int] = None) -> Optional[CompiledModel]:
    """The compiled form of ``model_path`` when one exists for its exact bytes and is intact; None otherwise."""
    from KDSegmentationLib.models.header_checks import validate_header

    model_path = Path(model_path)
    try:
        graph, description = compiled_paths(model_path, file_sha256(model_path))
        info = json.loads(description.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT or info.get("graph_sha256") != file_sha256(graph):
            return None
        header = validate_header(info["header"], model_path, compiled=True)
        return CompiledModel(network=OnnxNetwork(graph, threads), header=header, path=model_path)
    except Exception:  # noqa: BLE001 - absent, unreadable or foreign: torch runs the model and compiles it again
        return None


def describe(model_path, source_sha256: str, graph: Path, header: Dict[str, Any],
             max_abs_diff: float) -> Dict[str, Any]:
    """The description written beside a graph: what it was compiled from and how well it matched torch."""
    return {"format": FORMAT, "model_file": Path(model_path).name, "source_sha256": source_sha256,
            "graph_sha256": file_sha256(graph), "max_abs_softmax_diff": max_abs_diff, "tolerance": TOLERANCE,
            "header": header}
