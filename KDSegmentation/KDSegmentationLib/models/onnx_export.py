"""Compile a model to ONNX (see :mod:`models.compiled`): export, check against torch on two input sizes, write.

Needs torch and the ``onnx`` package (the exporter's), and ONNX Runtime to check the result; without them nothing is
written and torch keeps running the model.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from KDSegmentationLib.io.atomic import atomic_path
from KDSegmentationLib.models.compiled import (INPUT, LOGITS, PROBABILITIES, TOLERANCE, CompiledModel, OnnxNetwork,
                                               compiled_paths, describe)
from KDSegmentationLib.paths import file_sha256

# Two sizes that are not multiples of any network's stride (so padding and cropping are exercised): the graph must
# give torch's probabilities on both, proving it is not tied to the size it was traced with.
CHECK_SIZES = {2: ((1, 61, 83), (2, 100, 67)), 3: ((1, 19, 37, 30), (1, 27, 30, 45))}


class _LogitsAndProbabilities(torch.nn.Module):
    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        logits = self.network(x).float()
        return logits, torch.softmax(logits, dim=1)


def _check_inputs(network: torch.nn.Module):
    """Seeded random inputs (B, C, *spatial) of the two check sizes, float32."""
    args = network.spatial_dims, _in_channels(network)
    rng = np.random.default_rng(0)
    return [rng.normal(size=(s[0], args[1]) + s[1:]).astype(np.float32) for s in CHECK_SIZES[args[0]]]


def _in_channels(network: torch.nn.Module) -> int:
    first = next(p for p in network.parameters() if p.dim() >= 3)
    return int(first.shape[1])


def _export(network: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(example.ndim - 2)}}
    # the exporter's deprecation and tracer notices are about its own future, not the user's model
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LogitsAndProbabilities(network).eval(), (torch.from_numpy(example),), str(path),
                          input_names=[INPUT], output_names=[LOGITS, PROBABILITIES],
                          dynamic_axes={INPUT: axes, LOGITS: axes, PROBABILITIES: axes},
                          opset_version=17, dynamo=False)


def _max_difference(network: torch.nn.Module, compiled: OnnxNetwork, inputs) -> float:
    worst = 0.0
    with torch.inference_mode():
        for x in inputs:
            ref = torch.softmax(network(torch.from_numpy(x)).float(), dim=1).numpy()
            worst = max(worst, float(np.abs(compiled.probabilities(x) - ref).max()))
    return worst


def _forget_others(graph: Path) -> None:
    """Remove the compiled forms of earlier versions of a model of the same name (a retrained or recalibrated model
    file): the cache holds one graph per model name, not one per version ever run. Another model file of the same
    name is merely compiled again on its next use."""
    stem = graph.stem.rsplit("-", 1)[0]
    for old in graph.parent.glob(f"{stem}-*"):
        if old.stem != graph.stem and old.suffix in (".onnx", ".json") and old.stem.rsplit("-", 1)[0] == stem:
            try:
                old.unlink(missing_ok=True)
            except OSError:  # in use by another process (Windows): it goes next time
                pass


def compile_model(loaded, threads: Optional[int] = None) -> Tuple[Optional[CompiledModel], str]:
    """(compiled model or None, a line saying what happened) for a torch :class:`LoadedModel` on the CPU."""
    model_path = Path(loaded.path)
    if importlib.util.find_spec("onnx") is None:
        return None, f"{model_path.name} runs with torch: install the onnx package to compile it for ONNX Runtime"
    network = loaded.network.eval()
    try:
        source_sha256 = file_sha256(model_path)
        graph, description = compiled_paths(model_path, source_sha256)
        inputs = _check_inputs(network)
        graph.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(graph) as tmp:
            _export(network, inputs[0], tmp)
            diff = _max_difference(network, OnnxNetwork(tmp, threads), inputs)
            if not diff <= TOLERANCE:
                raise ValueError(f"ONNX Runtime differs from torch by {diff:.1e} (tolerance {TOLERANCE:.0e})")
        info = describe(model_path, source_sha256, graph, loaded.header, diff)
        with atomic_path(description) as tmp:
            tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: torch runs the model whatever happens
        return None, f"{model_path.name} runs with torch: compiling it for ONNX Runtime failed " \
                     f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
    _forget_others(graph)
    compiled = CompiledModel(network=OnnxNetwork(graph, threads), header=loaded.header, path=model_path)
    return compiled, f"{model_path.name} compiled for ONNX Runtime (max softmax difference to torch {diff:.1e})"
