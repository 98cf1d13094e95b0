"""``segment``: one image through its task's pipeline and the inferer, with the worker's model cache.

The pipeline takes the image as read (SimpleITK, any geometry) and returns a UInt8 labelmap on exactly the input
grid, so the result overlays the input in Slicer without any further resampling.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from typing import Callable, Dict, List, Optional

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec

ProgressFn = Callable[[str, float], None]


def _noop(stage: str, fraction: float) -> None:
    pass


_MODEL_CACHE: Dict[tuple, object] = {}


def load_task_model(task: TaskSpec, model: str, device) -> "object":
    """Load (and cache, for the persistent worker) a model or an ensemble (``a,b``) with torch, checking that it
    was trained for ``task``."""
    from KDSegmentationLib.models.catalog import resolve_models
    from KDSegmentationLib.models.ensemble import load_ensemble
    from KDSegmentationLib.models.files import load_model

    paths = resolve_models(task, model)
    key = (tuple((str(p.resolve()), os.path.getmtime(p)) for p in paths), str(device))
    if key not in _MODEL_CACHE:
        loaded = load_model(paths[0], device=str(device)) if len(paths) == 1 else \
            load_ensemble(paths, device=str(device))
        _check_task(loaded, task, paths[0])
        _remember(key, loaded)
    return _MODEL_CACHE[key]


def load_for_inference(task: TaskSpec, model: str, device: str = "auto", log: Callable[[str], None] = print,
                       compiled: bool = True):
    """(model, device) for a request. With ``compiled`` (a one-shot process) and the CPU, a single model's compiled
    form through ONNX Runtime (compiled on first use, see :mod:`models.compiled`): it is loaded without importing
    torch, about 2 s less per run. Otherwise torch, on the device :func:`pick_device` chooses: a persistent worker
    has paid torch's import once, and torch's own forward is faster there (channels-last 2D convolutions;
    ``benchmarks/results/benchmarks.md``). ``log`` hears about compiling."""
    from KDSegmentationLib.inference.device import cpu_threads, pick_device, surely_cpu
    from KDSegmentationLib.models.catalog import resolve_models
    from KDSegmentationLib.models.compiled import compilation_possible, load_compiled

    paths = resolve_models(task, model)
    if not compiled or len(paths) > 1 or not compilation_possible() or not surely_cpu(device):
        dev = pick_device(device)
        return load_task_model(task, model, dev), dev
    key = ("compiled", str(paths[0].resolve()), os.path.getmtime(paths[0]))
    if key not in _MODEL_CACHE:
        compiled = load_compiled(paths[0], cpu_threads())
        if compiled is None:
            compiled = _compile(task, model, log)
        _check_task(compiled, task, paths[0])
        _remember(key, compiled)
    loaded = _MODEL_CACHE[key]
    return loaded, ("cpu" if loaded.runtime == "onnxruntime" else pick_device("cpu"))


def _compile(task: TaskSpec, model: str, log: Callable[[str], None]):
    """The compiled model, compiled now from the torch one; the torch model itself when compiling fails."""
    from KDSegmentationLib.inference.device import cpu_threads, pick_device
    from KDSegmentationLib.models.onnx_export import compile_model

    loaded = load_task_model(task, model, pick_device("cpu"))
    compiled, message = compile_model(loaded, cpu_threads())
    log(message)
    return compiled or loaded


def _check_task(loaded, task: TaskSpec, path) -> None:
    if loaded.task != task.name:
        raise InputError(f"model {path.name} was trained for task '{loaded.task}', not '{task.name}'")


def _remember(key: tuple, loaded) -> None:
    _MODEL_CACHE.clear()  # one model at a time keeps the worker's memory flat
    _MODEL_CACHE[key] = loaded


# ---------------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SegmentationResult:
    labelmap: object                          # SimpleITK.Image UInt8 on the input grid
    probability: Optional[np.ndarray] = None  # foreground probability on the input grid (retina, lung) for AP/AUC
    stats: Dict[str, dict] = field(default_factory=dict)  # segment name -> {"volume_ml" | "area_px", ...}
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    task: Optional[TaskSpec] = None           # the task as offered by the model: the segments written and measured
    withheld: Dict[str, str] = field(default_factory=dict)  # segment name -> why the model does not offer it


def segment_image(image, task: TaskSpec, loaded, device, seed_ras=None,
                  progress: ProgressFn = _noop) -> SegmentationResult:
    """Run one task's pipeline on a SimpleITK image (already validated for the task); labels on the input grid."""
    from KDSegmentationLib.inference.inferer import Inferer
    from KDSegmentationLib.tasks.base import pipeline_for, withhold

    pipeline = pipeline_for(task)
    timings = {}
    t0 = time.perf_counter()
    progress("preprocessing", 0.0)
    prepared = pipeline.prepare(image, seed_ras)
    timings["preprocess"] = time.perf_counter() - t0
    progress("inference", 0.0)
    t0 = time.perf_counter()
    prob = Inferer(loaded.network, device).numpy_probabilities(prepared.tensor, prepared.roi_zyx)
    timings["inference"] = time.perf_counter() - t0
    progress("postprocessing", 0.0)
    t0 = time.perf_counter()
    output = pipeline.to_input_grid(prob, prepared, image, threshold=loaded.decision_threshold)
    output, offered = withhold(output, task, loaded.withheld_labels)
    stats = pipeline_for(offered).measure(output, prepared, image)
    timings["postprocess"] = time.perf_counter() - t0
    withheld = {lab.name: loaded.withheld_labels[lab.value] for lab in task.labels
                if lab.value in loaded.withheld_labels}
    return SegmentationResult(labelmap=output.label_image(), probability=output.probability, stats=stats,
                              warnings=output.warnings, timings=timings, task=offered, withheld=withheld)
