"""Reading raw dataset cases into model-space arrays (dataset preparation only: SimpleITK is imported lazily)."""
from __future__ import annotations

from typing import Dict

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.layouts import PHOTO_EXTS, Case


def _read_mask_2d(path: str) -> np.ndarray:
    """A 2D mask/label image as (H, W) uint8 values; 0/255 (or True) masks become 0/1."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "1", "LA") else im)
    if a.ndim == 3:
        a = a.max(-1)
    a = a.astype(np.uint8)
    if a.max() > 127:  # 0/255 drawings: binary
        a = (a > 127).astype(np.uint8)
    return a


def _read_sitk(path: str):
    from KDSegmentationLib.io import images as imageio

    try:
        return imageio.read_image(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path} ({type(exc).__name__}: {exc}); check the file") from None


def _ct_label_image(case: Case):
    """The case's label as a SimpleITK uint8 image in its own physical space (structures merged, later wins)."""
    import SimpleITK as sitk

    if case.label:
        lab = _read_sitk(case.label)
        return sitk.Cast(lab, sitk.sitkUInt8)
    merged, ref = None, None
    for value, path in sorted(case.structures.items()):
        img = _read_sitk(path)
        arr = sitk.GetArrayFromImage(img) > 0
        if merged is None:
            merged, ref = np.zeros(arr.shape, np.uint8), img
        elif arr.shape != merged.shape:
            raise InputError(f"{path} does not have the grid of {case.structures[min(case.structures)]}; "
                             "structure masks of one case must share a grid")
        merged[arr] = value
    out = sitk.GetImageFromArray(merged)
    out.CopyInformation(ref)
    return out


def _prepare_retina(case: Case, task: TaskSpec) -> Dict[str, np.ndarray]:
    from KDSegmentationLib.io import images as imageio
    from KDSegmentationLib.tasks import retina

    rgb = imageio.photo_to_array(_read_sitk(case.image))
    # the field of view is found from the photo exactly as at inference (a dataset's own FOV mask is kept apart,
    # for metrics only): rescaling and normalisation then match what the model will see
    prep = retina.prepare_fundus(rgb, task, fov=None)
    out = {"image": np.ascontiguousarray(prep.rgb, dtype=np.uint8), "fov": np.asarray(prep.fov, bool),
           "scale": np.float64(prep.scale)}
    if case.fov:
        out["fov_ref"] = retina.prepare_fundus_label(_read_mask_2d(case.fov), prep).astype(bool)
    if case.label:
        out["label"] = np.asarray(retina.prepare_fundus_label(_read_mask_2d(case.label), prep), np.uint8)
    return out


def _prepare_ct_volume(case: Case, task: TaskSpec) -> Dict[str, np.ndarray]:
    from KDSegmentationLib.tasks import ct

    prep = ct.prepare_ct_volume(_read_sitk(case.image), task)
    out = {"image": np.asarray(prep.hu, np.int16), "spacing": np.asarray(prep.grid.GetSpacing(), np.float64)}
    if case.labelled:
        lab = np.asarray(ct.prepare_ct_label(_ct_label_image(case), prep), np.uint8)
        if lab.shape != out["image"].shape:
            raise InputError(f"label of case {case.case_id} did not resample onto its image grid")
        out["label"] = lab
    return out


def _slices_uint8(path: str, task: TaskSpec) -> np.ndarray:
    """A 2D image or a volume as an (n, h, w) uint8 slice stack. HU volumes get the LIDC crops' intensity mapping
    (``lung.hu_to_crop_intensity``, as at inference), so that such slices look like the 8-bit crops."""
    if path.lower().endswith(PHOTO_EXTS):
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.uint8)[None]
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(_read_sitk(path))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.dtype != np.uint8:
        from KDSegmentationLib.tasks.lung_nodule import hu_to_crop_intensity

        arr = np.round(hu_to_crop_intensity(arr.astype(np.float32), task.hu_window) * 255).astype(np.uint8)
    return arr


def _prepare_slices(case: Case, task: TaskSpec) -> Dict[str, np.ndarray]:
    if case.record is not None:
        from KDSegmentationLib.tasks import lidc

        images, _readers, consensus, soft = lidc.load_nodule(case.record)
        return {"image": np.asarray(images, np.uint8), "label": np.asarray(consensus > 0, np.uint8),
                "soft": np.asarray(soft, np.float16)}
    out = {"image": _slices_uint8(case.image, task)}
    if case.label and case.label.lower().endswith(PHOTO_EXTS):
        lab = _read_mask_2d(case.label)[None]
    elif case.label or case.structures:
        import SimpleITK as sitk

        lab = sitk.GetArrayFromImage(_ct_label_image(case)).astype(np.uint8)
        lab = lab[None] if lab.ndim == 2 else lab
    else:
        return out
    if lab.shape != out["image"].shape:
        raise InputError(f"label of case {case.case_id} has shape {lab.shape}, its image {out['image'].shape}; "
                         "slice labels must be on the image grid")
    out["label"] = (lab > 0).astype(np.uint8)
    out["soft"] = out["label"].astype(np.float16)
    return out


def prepare_case(case: Case, task: TaskSpec) -> Dict[str, np.ndarray]:
    """Read one raw case and bring it to model space (see the module docstring for the arrays)."""
    try:
        if task.input_kind == "2d-rgb":
            return _prepare_retina(case, task)
        if task.spatial_dims == 3:
            return _prepare_ct_volume(case, task)
        return _prepare_slices(case, task)
    except ModuleNotFoundError as exc:
        if exc.name != "SimpleITK":
            raise
        raise InputError("reading this dataset needs SimpleITK, which is not installed here; run 'kdseg prepare' "
                         "where it is and pass the prepared cache folder as --data") from None

