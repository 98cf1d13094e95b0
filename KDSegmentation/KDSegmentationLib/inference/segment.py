"""Inference: model resolution, device choice, and the per-task segmentation pipelines.

Every pipeline takes the image as read (SimpleITK, any geometry) and returns a UInt8 labelmap on exactly the input
grid, so the result overlays the input in Slicer without any further resampling.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.inference.device import pick_device  # noqa: F401 (re-exported for callers)
from KDSegmentationLib.tasks import TaskSpec

ProgressFn = Callable[[str, float], None]


def _noop(stage: str, fraction: float) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# models and devices
# ---------------------------------------------------------------------------------------------------------------

def resolve_model(task: TaskSpec, model: str = "student") -> Path:
    """``student``/``teacher`` -> the shipped file; a path -> itself; a bare name -> the user's model folder."""
    from KDSegmentationLib.paths import shipped_models_dir, user_models_dir

    if model in ("student", "teacher"):
        try:
            path = shipped_models_dir() / task.shipped_model_file(model)
        except FileNotFoundError:
            path = Path(task.shipped_model_file(model))
        if not path.is_file():
            raise InputError(f"no trained {model} model for task '{task.name}' is installed (expected {path}); "
                             f"train one with 'kdseg train-teacher'/'kdseg distill' or pass --model FILE")
        return path
    p = Path(model)
    if _is_bare_name(model):
        # A bare name means an installed model: the user's folder, then the shipped ones, and only then a file of
        # that name in the current directory (which anyone who can write there could plant).
        for cand in _named_model_candidates(model):
            if cand.is_file():
                return cand
    if p.is_file():
        return p
    raise InputError(f"model '{model}' not found; pass student, teacher, a model file, or a name from "
                     f"'kdseg models list'")


def _is_bare_name(model: str) -> bool:
    return bool(model) and Path(model).name == model and model not in (".", "..") and "/" not in model \
        and os.sep not in model and (os.altsep is None or os.altsep not in model)


def _named_model_candidates(model: str) -> List[Path]:
    from KDSegmentationLib.paths import shipped_models_dir, user_models_dir

    folders = [user_models_dir()]
    try:
        folders.append(shipped_models_dir())
    except FileNotFoundError:
        pass
    return [folder / name for folder in folders for name in (model, f"{model}.kdseg.pt")]


_MODEL_CACHE: Dict[tuple, object] = {}


def load_task_model(task: TaskSpec, model: str, device) -> "object":
    """Load (and cache, for the persistent worker) a model, checking that it was trained for ``task``."""
    from KDSegmentationLib.models.files import load_model

    path = resolve_model(task, model)
    key = (str(path.resolve()), os.path.getmtime(path), str(device))
    if key not in _MODEL_CACHE:
        loaded = load_model(path, device=str(device))
        if loaded.task != task.name:
            raise InputError(f"model {path.name} was trained for task '{loaded.task}', not '{task.name}'")
        _MODEL_CACHE.clear()  # one model at a time keeps the worker's memory flat
        _MODEL_CACHE[key] = loaded
    return _MODEL_CACHE[key]


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


def _forward(network, x, device):
    """Logits -> softmax probabilities; AMP on CUDA."""
    import torch

    with torch.inference_mode():
        x = x.to(device)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = network(x)
        else:
            logits = network(x)
        return torch.softmax(logits.float(), dim=1)


def _sliding_or_whole(network, x, roi_zyx: Sequence[int], device, whole_max_voxels: int):
    """Whole-volume forward when it fits (fastest on CPU: no overlap); MONAI sliding window otherwise."""
    import torch

    if x[0, 0].numel() <= whole_max_voxels:
        return _forward(network, x, device)
    from monai.inferers import sliding_window_inference  # only here: importing MONAI costs seconds of start-up

    with torch.inference_mode():
        def predictor(patch):
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    return network(patch).float()
            return network(patch)

        logits = sliding_window_inference(x.to(device), roi_size=tuple(roi_zyx), sw_batch_size=2,
                                          predictor=predictor, overlap=0.25, mode="gaussian")
        return torch.softmax(logits.float(), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------------------

def segment_image(image, task: TaskSpec, loaded, device, seed_ras=None,
                  progress: ProgressFn = _noop) -> SegmentationResult:
    """Run one task's pipeline on a SimpleITK image (already validated for the task)."""
    if task.name == "liver":
        return _segment_liver(image, task, loaded, device, progress)
    if task.name == "lung_nodule":
        if seed_ras is None:
            raise InputError("the lung_nodule task needs a seed point: pass --seed-ras X,Y,Z (RAS mm, as shown in "
                             "Slicer) inside the nodule")
        return _segment_nodule(image, task, loaded, device, seed_ras, progress)
    if task.name == "retina":
        return _segment_retina(image, task, loaded, device, progress)
    raise InputError(f"task {task.name} has no inference pipeline")


def _segment_liver(image, task, loaded, device, progress) -> SegmentationResult:
    import SimpleITK as sitk
    import torch

    from KDSegmentationLib.tasks.postprocess import liver_postprocess
    from KDSegmentationLib.tasks.preprocess import ct_window, labels_on_input_grid, prepare_ct_volume

    t = {}
    t0 = time.perf_counter()
    progress("preprocessing", 0.0)
    prepared = prepare_ct_volume(image, task)
    x = torch.from_numpy(ct_window(prepared.hu, task))[None, None]
    t["preprocess"] = time.perf_counter() - t0
    progress("inference", 0.0)
    t0 = time.perf_counter()
    roi_zyx = tuple(reversed(task.roi_size))
    whole = 48_000_000 if device.type == "cuda" else 6_000_000
    prob = _sliding_or_whole(loaded.network, x, roi_zyx, device, whole)[0].cpu().numpy()
    t["inference"] = time.perf_counter() - t0
    progress("postprocessing", 0.0)
    t0 = time.perf_counter()
    labels = labels_on_input_grid(prob, prepared, postprocess=liver_postprocess)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(image)
    t["postprocess"] = time.perf_counter() - t0
    return SegmentationResult(labelmap=lab, stats=segment_stats(labels, task, image.GetSpacing()), timings=t)


def _segment_nodule(image, task, loaded, device, seed_ras, progress) -> SegmentationResult:
    import torch

    from KDSegmentationLib.tasks.lung_nodule import extract_seed_region, longest_axial_diameter_mm, max_3d_diameter_mm, network_stack, paste_back

    t = {}
    t0 = time.perf_counter()
    progress("preprocessing", 0.0)
    region = extract_seed_region(image, seed_ras, task)
    x = torch.from_numpy(network_stack(region.stack))
    t["preprocess"] = time.perf_counter() - t0
    progress("inference", 0.0)
    t0 = time.perf_counter()
    prob = _forward(loaded.network, x, device)[:, 1].cpu().numpy()
    t["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lab = paste_back(prob, region, image, threshold=loaded.decision_threshold)
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(lab)
    stats = segment_stats(labels, task, image.GetSpacing())
    name = task.labels[0].name
    stats[name]["longest_axial_diameter_mm"] = round(longest_axial_diameter_mm(lab), 1)
    stats[name]["max_3d_diameter_mm"] = round(max_3d_diameter_mm(lab), 1)
    t["postprocess"] = time.perf_counter() - t0
    res = SegmentationResult(labelmap=lab, stats=stats, timings=t)
    if labels.max() == 0:
        res.warnings.append("no nodule found at the seed point; click closer to the nodule's centre")
    return res


def _segment_retina(image, task, loaded, device, progress) -> SegmentationResult:
    import torch

    from KDSegmentationLib.tasks.retina import fov_mask
    from KDSegmentationLib.io.images import photo_to_array
    from KDSegmentationLib.tasks.preprocess import fundus_input, prepare_fundus, probabilities_to_photo

    t = {}
    t0 = time.perf_counter()
    progress("preprocessing", 0.0)
    rgb = photo_to_array(image)
    fov = fov_mask(rgb)
    prepared = prepare_fundus(rgb, task, fov=fov)
    x = torch.from_numpy(fundus_input(prepared.rgb, prepared.fov))[None]
    t["preprocess"] = time.perf_counter() - t0
    progress("inference", 0.0)
    t0 = time.perf_counter()
    prob_s = _forward(loaded.network, x, device)[0, 1].cpu().numpy() * prepared.fov
    t["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob = probabilities_to_photo(prob_s, prepared) * fov
    labels2d = (prob >= loaded.decision_threshold).astype(np.uint8)
    lab = _photo_label_image(labels2d, image)
    t["postprocess"] = time.perf_counter() - t0
    stats = {task.labels[0].name: {"area_px": int(labels2d.sum()),
                                   "fraction_of_fov": round(float(labels2d.sum()) / max(int(fov.sum()), 1), 4)}}
    return SegmentationResult(labelmap=lab, probability=prob.astype(np.float32), stats=stats, timings=t)


def _photo_label_image(labels2d: np.ndarray, photo):
    """(H, W) labels -> UInt8 image with the photo's geometry (2D, or single-slice 3D if the photo was 3D)."""
    import SimpleITK as sitk

    if photo.GetDimension() == 3:
        lab = sitk.GetImageFromArray(labels2d[None])
    else:
        lab = sitk.GetImageFromArray(labels2d)
    lab.SetOrigin(photo.GetOrigin())
    lab.SetSpacing(photo.GetSpacing())
    lab.SetDirection(photo.GetDirection())
    return lab


def segment_stats(labels: np.ndarray, task: TaskSpec, spacing) -> Dict[str, dict]:
    """Per-segment voxel counts and volumes in mL (spacing in mm, x/y/z)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=task.num_classes)
    return {lab.name: {"voxels": int(counts[lab.value]), "volume_ml": round(counts[lab.value] * voxel_ml, 2)}
            for lab in task.labels}
