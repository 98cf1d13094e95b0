"""``kdseg evaluate``: metrics of one prediction against a reference, or of a model over a whole dataset.

Every number in the model cards comes from :func:`evaluate_dataset` (run by ``scripts/evaluate_models.py``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec, get_task


def _labels(task: TaskSpec) -> Dict[int, str]:
    return {lab.value: lab.name for lab in task.labels}


def organ_contents(task: TaskSpec) -> Dict[int, List[int]]:
    """{organ label value: values of the labels inside it} (the liver: its tumours)."""
    return {lab.value: [o.value for o in task.labels if o.within == lab.value] for lab in task.labels
            if any(o.within == lab.value for o in task.labels)}


def _values_by_task(names_to_values: Dict[str, int], task: TaskSpec) -> Dict[int, int]:
    """Map a file's label values onto the task's: by segment name when the names match, else by value."""
    mapping = {}
    for lab in task.labels:
        if lab.name in names_to_values:
            mapping[names_to_values[lab.name]] = lab.value
    return mapping


def evaluate_pair(task_name: str, pred_path: str, ref_path: str) -> Dict:
    """Metrics of a predicted segmentation against a reference (.seg.nrrd or labelmap) on the same grid."""
    import SimpleITK as sitk

    from KDSegmentationLib.evaluation.metrics import segmentation_metrics
    from KDSegmentationLib.io.geometry import same_grid
    from KDSegmentationLib.io.segmentations import read_segmentation

    task = get_task(task_name)
    for p in (pred_path, ref_path):
        if not Path(p).exists():
            raise InputError(f"{p} does not exist; give a .seg.nrrd or labelmap file")
    pred, pred_names = read_segmentation(pred_path)
    ref, ref_names = read_segmentation(ref_path)
    if not same_grid(pred, ref, tol=1e-3):
        raise InputError("prediction and reference are on different grids (size/spacing/origin/direction); "
                         "resample one onto the other first")
    pa = _remap(sitk.GetArrayFromImage(pred), _values_by_task(pred_names, task))
    ra = _remap(sitk.GetArrayFromImage(ref), _values_by_task(ref_names, task))
    metrics = segmentation_metrics(pa, ra, ref.GetSpacing(), _labels(task), contains=organ_contents(task))
    return {"task": task.name, "pred": str(pred_path), "ref": str(ref_path), "metrics": metrics}


def _remap(arr: np.ndarray, mapping: Dict[int, int]) -> np.ndarray:
    if not mapping or all(k == v for k, v in mapping.items()):
        return arr
    out = np.zeros_like(arr)
    for src, dst in mapping.items():
        out[arr == src] = dst
    return out


# ---------------------------------------------------------------------------------------------------------------
# a model over a dataset
# ---------------------------------------------------------------------------------------------------------------

def select_split(cases, split: str):
    """Cases of ``split``; a dataset without splits (case folders) is evaluated whole and says so."""
    if split == "all":
        return list(cases), "all"
    chosen = [c for c in cases if c.split == split]
    if chosen:
        return chosen, split
    if not any(c.split for c in cases):
        return list(cases), "all (the dataset has no splits)"
    raise InputError(f"the dataset has no '{split}' cases; use --split with one of "
                     f"{', '.join(sorted({c.split for c in cases if c.split}))} or all")


def evaluate_dataset(task_name: str, data_dir: str, model: str = "student", device: str = "auto",
                     split: str = "test", threads: Optional[int] = None, progress_mode: str = "none",
                     case_ids: Optional[List[str]] = None) -> Dict:
    """Run the model on every case of ``split`` (or the named cases) the way a user would; compare with references."""
    from KDSegmentationLib.training.layouts import find_cases
    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.inference.segment import load_task_model
    from KDSegmentationLib.evaluation.metrics import mean_metrics
    from KDSegmentationLib.progress import Progress

    task = get_task(task_name)
    if not Path(data_dir).is_dir():
        raise InputError(f"--data {data_dir} is not a folder")
    progress = Progress(progress_mode)
    if case_ids:
        wanted = set(case_ids)
        cases = [c for c in find_cases(data_dir, task) if c.case_id in wanted]
        missing = wanted - {c.case_id for c in cases}
        if missing:
            raise InputError(f"cases not found in {data_dir}: {', '.join(sorted(missing))}")
        split_used = "cases " + ",".join(sorted(wanted))
    else:
        cases, split_used = select_split(find_cases(data_dir, task), split)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    dev = pick_device(device)
    loaded = load_task_model(task, model, dev)
    per_case: List[Dict] = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        progress.progress("evaluation", i / max(len(cases), 1), case=case.case_id)
        if case.layout == "lidc_slices":
            metrics = _eval_lidc_nodule(case, task, loaded, dev)
        else:
            metrics = _eval_full_pipeline(case, task, loaded, dev)
        per_case.append({"case": case.case_id, "metrics": metrics})
        progress.metric(case=case.case_id, **{f"dice_{k}": v.get("dice") for k, v in metrics.items()})
    progress.progress("evaluation", 1.0)
    return {"task": task.name, "data": str(data_dir), "split": split_used, "n_cases": len(per_case),
            "model": Path(loaded.path).name, "model_role": loaded.role, "device": str(dev),
            "seconds": round(time.perf_counter() - t0, 1),
            "mean": mean_metrics([c["metrics"] for c in per_case]), "cases": per_case}


def _eval_full_pipeline(case, task: TaskSpec, loaded, dev) -> Dict:
    """Read the case's image, run exactly the ``kdseg segment`` pipeline, compare on the input grid."""
    import SimpleITK as sitk

    from KDSegmentationLib.training.reading import _ct_label_image, _read_mask_2d, _read_sitk
    from KDSegmentationLib.io.suitability import check_image_for_task
    from KDSegmentationLib.inference.segment import segment_image
    from KDSegmentationLib.evaluation.lesions import lesion_detection
    from KDSegmentationLib.evaluation.metrics import segmentation_metrics

    image = _read_sitk(case.image)
    check_image_for_task(image, task)
    labels = _labels(task)
    if task.input_kind == "2d-rgb":
        ref = _read_mask_2d(case.label)
        fov = _read_mask_2d(case.fov) > 0 if case.fov else None
        res = segment_image(image, task, loaded, dev)
        pred = sitk.GetArrayFromImage(res.labelmap).reshape(ref.shape)
        if fov is None:
            from KDSegmentationLib.tasks.retina import fov_mask
            from KDSegmentationLib.io.images import photo_to_array

            fov = fov_mask(photo_to_array(image))
        prob = {1: res.probability.reshape(ref.shape)} if res.probability is not None else None
        return segmentation_metrics(pred, (ref > 0).astype(np.uint8), (1.0, 1.0), labels, prob=prob, mask=fov)
    ref_img = _ct_label_image(case)
    seed = _seed_from_reference(ref_img) if task.needs_seed else None
    res = segment_image(image, task, loaded, dev, seed_ras=seed)
    pred = sitk.GetArrayFromImage(res.labelmap)
    ref = sitk.GetArrayFromImage(ref_img)
    if ref.shape != pred.shape:
        raise InputError(f"reference of case {case.case_id} is not on the image grid")
    metrics = segmentation_metrics(pred, ref, image.GetSpacing(), labels, contains=organ_contents(task))
    for lab in task.labels:
        if lab.within is not None:  # a lesion inside its organ: also counted lesion by lesion
            metrics[lab.name].update(lesion_detection(pred == lab.value, ref == lab.value, image))
    return metrics


def _seed_from_reference(ref_img):
    """The click a clinician would make: the reference's voxel nearest to its centroid, as RAS mm."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(ref_img) > 0
    if not arr.any():
        raise InputError("reference nodule mask is empty; cannot place a seed point")
    zyx = np.argwhere(arr)
    c = zyx.mean(axis=0)
    k, j, i = zyx[np.argmin(((zyx - c) ** 2).sum(axis=1))]
    x, y, z = ref_img.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
    return (-x, -y, z)  # LPS -> RAS


def lidc_nodule_probability(case, loaded, dev):
    """One LIDC-IDRI nodule stack (8-bit crops, spacing unknown) through the network, as ``kdseg segment`` runs it.

    Returns (prob float32 (n, 128, 128), consensus uint8 (n, 128, 128), select): ``select`` keeps the connected
    component at the stack's centre (the seed a clinician would click) of a boolean mask."""
    from KDSegmentationLib.inference.inferer import Inferer
    from KDSegmentationLib.tasks.components import select_component
    from KDSegmentationLib.tasks import LUNG_NODULE
    from KDSegmentationLib.tasks.lung_nodule import LungNodulePipeline
    from KDSegmentationLib.tasks.lidc import load_nodule

    images, _, consensus, _ = load_nodule(case.record)
    prepared = LungNodulePipeline(LUNG_NODULE).prepare_crops(images)
    prob = Inferer(loaded.network, dev).numpy_probabilities(prepared.tensor)[:, 1]
    seed = tuple(s // 2 for s in images.shape)
    return prob, consensus, lambda fg: select_component(fg, seed, (1.0, 1.0, 1.0), 10.0)


def _eval_lidc_nodule(case, task: TaskSpec, loaded, dev) -> Dict:
    """One LIDC-IDRI nodule: network + the seeded component selection at the model's decision threshold."""
    from KDSegmentationLib.evaluation.metrics import segmentation_metrics

    prob, consensus, select = lidc_nodule_probability(case, loaded, dev)
    pred = select(prob >= loaded.decision_threshold).astype(np.uint8)
    return segmentation_metrics(pred, (consensus > 0).astype(np.uint8), (1.0, 1.0, 1.0), _labels(task),
                                prob={1: prob})
