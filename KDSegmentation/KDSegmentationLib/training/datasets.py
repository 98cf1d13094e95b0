"""Training data: dataset layouts, a prepared numpy cache, and augmenting patch datasets.

Three stages, each usable alone:

1. :func:`find_cases` recognises a dataset folder (see :data:`LAYOUTS`) and lists its :class:`Case` objects. Nothing
   is read yet, so it is fast and never imports SimpleITK.
2. :func:`prepare_cache` reads every case once (SimpleITK, imported lazily here only), brings it to the task's model
   space with ``preprocess.py`` and writes one compressed ``.npz`` per case plus ``manifest.json``. Training machines
   without SimpleITK train from such a cache: :func:`find_cases` on a cache folder returns cases that point into it.
3. :class:`PatchDataset` + :class:`MixedBatchSampler` feed the trainer: every sample is a pure function of
   ``(seed, step, slot)`` so a resumed run sees exactly the samples an uninterrupted run would, whatever the number of
   DataLoader workers. The workers do the per-sample work (crop, intensity/colour/camera augmentation, the
   network-input normalisation); the spatial part is one batched ``grid_sample`` on the training device
   (``augment.warp_batch``), which keeps data loading off the critical path on a GPU.

Cache format (``kdseg-cache/1``), arrays in model space, (z, y, x) / (h, w) order:

- CT volume tasks (liver): ``image`` int16 HU on the model grid; ``label`` uint8; ``spacing`` float64 (x, y, z) mm.
- retina: ``image`` uint8 (h, w, 3) RGB rescaled to the task's field-of-view diameter; ``fov`` bool (h, w) found
  from the photo as at inference; ``fov_ref`` bool (h, w) the dataset's own FOV mask when it has one (metrics);
  ``label`` uint8 (h, w); ``scale`` (model pixels per input pixel).
- lung nodule slices: ``image`` uint8 (n, 128, 128) slice stack; ``label`` uint8 (n, h, w) reader consensus;
  ``soft`` float16 (n, h, w) fraction of readers marking each pixel.

Unlabelled cases simply have no ``label``. ``manifest.json`` holds the task, the preprocessing parameters, the
layout and source folder, a fingerprint of the source files, and per case its id, file, split, group and shape.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.training.augment import (AugPolicy, camera_jitter, crop, ct_intensity, default_policy, normalise_region,
                      random_affine, slice_intensity)
from KDSegmentationLib.tasks import TaskSpec

CACHE_FORMAT = "kdseg-cache/1"

LAYOUTS = {
    "cache": "a prepared cache folder (manifest.json, written by 'kdseg prepare')",
    "drive": "DRIVE: training/{images,1st_manual,mask} and test/{images,1st_manual,mask}",
    "chase_db1": "CHASE_DB1: images/Image_XXL.jpg + manual/Image_XXL_1stHO.png",
    "lidc_slices": "LIDC-IDRI slices: LIDC-IDRI-XXXX/nodule-N/{images,mask-0..3}/slice-K.png",
    "case_folders": "case folders: <case>/ct.nii.gz (or <case>/dicom/) + liver.nii.gz [+ tumor.nii.gz] or label.nii.gz",
    "msd": "Medical Segmentation Decathlon: imagesTr/ + labelsTr/ with the same file names",
    "generic": "images/ + labels/ (or masks/) with the same base names, optional fov/ for fundus masks",
    "unlabelled": "a folder of images (files or DICOM series folders) without labels",
}

IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
              ".gif", ".bmp", ".ppm", ".dcm")
PHOTO_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm")
# suffixes that label / mask files often carry on top of the image's base name
_LABEL_SUFFIXES = ("_1stho", "_manual1", "_label", "_labels", "_seg", "_mask", "_gt", "_fov")
# structure files of case folders -> label value, per task (later entries override earlier ones)
_STRUCTURE_FILES = {
    "liver": (("liver", 1), ("tumor", 2), ("tumour", 2), ("liver_tumor", 2)),
    "lung_nodule": (("nodule", 1), ("nodule_consensus50", 1)),
}
_LAYOUT_TASKS = {"drive": ("retina",), "chase_db1": ("retina",), "lidc_slices": ("lung_nodule",),
                 "case_folders": ("liver", "lung_nodule")}


# ----------------------------------------------------------------------------------------------------------------
# cases and layout detection
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One training/evaluation case before or after preparation.

    ``image`` is a file or a DICOM folder; ``label`` a label file, or ``None`` when the case is unlabelled.
    ``structures`` maps label value -> file for datasets that store one binary mask per structure.
    ``split`` is the dataset's own split (``train``/``val``/``test``) when it has one, ``group`` the patient (cases
    of one patient never land on both sides of a split). ``cache_file`` is set for cases read from a cache.
    """

    case_id: str
    image: Optional[str] = None
    label: Optional[str] = None
    fov: Optional[str] = None
    structures: Dict[int, str] = field(default_factory=dict)
    split: Optional[str] = None
    group: str = ""
    layout: str = ""
    record: Any = None
    cache_file: Optional[str] = None
    labelled: bool = False

    def __post_init__(self):
        if not self.group:
            self.group = self.case_id
        if self.cache_file is None:
            self.labelled = bool(self.label or self.structures or self.record is not None)

    def describe(self) -> Dict[str, Any]:
        """JSON-able summary (for manifests and model cards)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("record",)}
        d["structures"] = {str(k): v for k, v in self.structures.items()}
        return d


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def _norm_key(stem: str) -> str:
    """Key used to pair an image with its label: case-insensitive, nnU-Net channel suffix and mask suffixes gone."""
    s = stem.lower()
    s = re.sub(r"_0000$", "", s)
    for suf in _LABEL_SUFFIXES:
        if s.endswith(suf):
            s = s[: -len(suf)]
            break
    return s


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_EXTS)


def _dicom_dir(p: Path) -> Optional[Path]:
    """The folder holding a DICOM series at or below ``p`` (the one with most .dcm files), or None."""
    best, best_n = None, 0
    for d in [p] + sorted(q for q in p.rglob("*") if q.is_dir()):
        n = sum(1 for f in d.iterdir() if f.is_file() and f.suffix.lower() == ".dcm")
        if n > best_n:
            best, best_n = d, n
    return best


def _files_by_key(folder: Path) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if _is_image_file(f):
            out.setdefault(_norm_key(_strip_ext(f.name)), f)
    return out


def _subdir(root: Path, *names: str) -> Optional[Path]:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _detect_drive(root: Path) -> Optional[List[Case]]:
    parts = [(root / "training", "train"), (root / "test", "test")]
    if (root / "images").is_dir() and (root / "1st_manual").is_dir():  # pointed at DRIVE/training or DRIVE/test
        parts = [(root, "test" if root.name.lower() == "test" else "train")]
    cases = []
    for folder, split in parts:
        if not ((folder / "images").is_dir() and (folder / "1st_manual").is_dir()):
            continue
        manual = {f.name.split("_")[0]: f for f in (folder / "1st_manual").iterdir() if _is_image_file(f)}
        masks = {f.name.split("_")[0]: f for f in (folder / "mask").iterdir() if _is_image_file(f)} \
            if (folder / "mask").is_dir() else {}
        for img in sorted(f for f in (folder / "images").iterdir() if _is_image_file(f)):
            key = img.name.split("_")[0]
            lab = manual.get(key)
            cases.append(Case(case_id=_strip_ext(img.name), image=str(img), label=str(lab) if lab else None,
                              fov=str(masks[key]) if key in masks else None, split=split, layout="drive"))
    return cases or None


def _detect_chase(root: Path) -> Optional[List[Case]]:
    if not ((root / "images").is_dir() and (root / "manual").is_dir()):
        return None
    images = sorted(f for f in (root / "images").iterdir() if re.match(r"Image_\d+[LR]\.", f.name))
    if not images:
        return None
    cases = []
    for img in images:
        cid = _strip_ext(img.name)
        child = re.match(r"Image_(\d+)", cid).group(1)
        lab = root / "manual" / f"{cid}_1stHO.png"
        # the usual CHASE_DB1 protocol: children 01-10 (20 images) train, 11-14 (8 images) test; both eyes of a
        # child stay on the same side
        split = "test" if int(child) >= 11 else "train"
        cases.append(Case(case_id=cid, image=str(img), label=str(lab) if lab.is_file() else None, split=split,
                          group=f"child{child}", layout="chase_db1"))
    return cases


def _detect_lidc(root: Path) -> Optional[List[Case]]:
    if (root / "LIDC-IDRI-slices").is_dir():  # the folder that holds it
        root = root / "LIDC-IDRI-slices"
    if not any(p.is_dir() and p.name.startswith("LIDC-IDRI-") and any(p.glob("nodule-*")) for p in root.iterdir()):
        return None
    from KDSegmentationLib.tasks import lung_nodule as lung

    records = lung.iter_lidc_nodules(root)
    ids = [r.patient_id for r in records]
    splits = lung.split_patients(sorted(set(ids)), seed=0)
    split_of = {pid: name for name, pids in splits.items() for pid in pids}
    cases, counter = [], {}
    for rec in records:
        pid = rec.patient_id
        sub = None
        for attr in ("nodule_id", "nodule", "name"):
            sub = getattr(rec, attr, None)
            if isinstance(sub, (str, int)):
                break
            sub = None
        if sub is None:
            path = getattr(rec, "path", None) or getattr(rec, "folder", None)
            sub = Path(path).name if path else counter.get(pid, 0)
        counter[pid] = counter.get(pid, 0) + 1
        sub = str(sub)
        cid = sub if sub.startswith(pid) else f"{pid}_{sub}"
        cases.append(Case(case_id=cid, split=split_of.get(pid), group=pid, layout="lidc_slices", record=rec))
    return cases or None


def _case_folder(d: Path, task: TaskSpec) -> Optional[Case]:
    image = None
    for name in ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "image.nii.gz", "image.nii", "image.nrrd"):
        if (d / name).is_file():
            image = d / name
            break
    if image is None and (d / "dicom").is_dir():
        image = _dicom_dir(d / "dicom")
    if image is None:
        return None
    label, structures = None, {}
    for name in ("label.nii.gz", "labels.nii.gz", "label.nrrd", "seg.nii.gz", "segmentation.nii.gz"):
        if (d / name).is_file():
            label = str(d / name)
            break
    if label is None:
        for stem, value in _STRUCTURE_FILES.get(task.name, ()):
            for ext in (".nii.gz", ".nii", ".nrrd"):
                if (d / (stem + ext)).is_file():
                    structures[value] = str(d / (stem + ext))
    if label is None and not structures:
        return None
    return Case(case_id=d.name, image=str(image), label=label, structures=structures, layout="case_folders")


def _detect_case_folders(root: Path, task: TaskSpec) -> Optional[List[Case]]:
    cases = [c for c in (_case_folder(d, task) for d in sorted(root.iterdir()) if d.is_dir()) if c]
    return cases or None


def _paired(images: Path, labels: Optional[Path], fov: Optional[Path], layout: str) -> List[Case]:
    labs = _files_by_key(labels) if labels else {}
    fovs = _files_by_key(fov) if fov else {}
    cases = []
    for f in sorted(images.iterdir()):
        if _is_image_file(f):
            key = _norm_key(_strip_ext(f.name))
            lab, fv = labs.get(key), fovs.get(key)
            cases.append(Case(case_id=_strip_ext(f.name), image=str(f), label=str(lab) if lab else None,
                              fov=str(fv) if fv else None, layout=layout))
        elif f.is_dir() and _dicom_dir(f):
            cases.append(Case(case_id=f.name, image=str(_dicom_dir(f)), layout=layout))
    return cases


def _detect_msd(root: Path) -> Optional[List[Case]]:
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return _paired(root / "imagesTr", root / "labelsTr", None, "msd") or None
    return None


def _detect_generic(root: Path) -> Optional[List[Case]]:
    images = _subdir(root, "images", "Images")
    labels = _subdir(root, "labels", "Labels", "masks", "Masks")
    if images and labels:
        return _paired(images, labels, _subdir(root, "fov", "FOV"), "generic") or None
    return None


def _detect_unlabelled(root: Path) -> Optional[List[Case]]:
    folder = _subdir(root, "images", "Images") or root
    cases = _paired(folder, None, None, "unlabelled")
    if not cases and folder == root:
        # a folder holding one DICOM series directly
        d = _dicom_dir(root)
        if d is not None and d == root:
            cases = [Case(case_id=root.name, image=str(root), layout="unlabelled")]
    return cases or None


def _unique_ids(cases: List[Case]) -> List[Case]:
    seen: Dict[str, int] = {}
    for c in cases:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", c.case_id) or "case"
        n = seen.get(base, 0)
        seen[base] = n + 1
        c.case_id = base if n == 0 else f"{base}_{n}"
    return cases


def is_cache(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def find_cases(data_dir, task: TaskSpec) -> List[Case]:
    """List the cases of a dataset folder or a prepared cache (layouts: :data:`LAYOUTS`).

    Raises :class:`InputError` when the folder is missing, holds nothing recognisable, or holds data of another
    task (e.g. DRIVE photographs for the liver task).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"data folder {root} not found; pass an existing dataset or prepared-cache folder")
    if is_cache(root):
        cache = load_cache(root)
        if cache.task != task.name:
            raise InputError(f"{root} is a cache prepared for task {cache.task!r}, not {task.name!r}; "
                             f"prepare one for {task.name} with 'kdseg prepare --task {task.name}'")
        return cache.cases
    for layout, detect in (("drive", _detect_drive), ("chase_db1", _detect_chase), ("lidc_slices", _detect_lidc),
                           ("case_folders", lambda r: _detect_case_folders(r, task)), ("msd", _detect_msd),
                           ("generic", _detect_generic), ("unlabelled", _detect_unlabelled)):
        cases = detect(root)
        if cases:
            allowed = _LAYOUT_TASKS.get(layout)
            if allowed and task.name not in allowed:
                raise InputError(f"{root} looks like a {layout} dataset, which is for task "
                                 f"{'/'.join(allowed)}, not {task.name}; pass the matching --task")
            return _unique_ids(cases)
    raise InputError(f"no dataset recognised in {root}; expected one of: "
                     + "; ".join(f"{v}" for v in LAYOUTS.values()))


def layout_of(cases: Sequence[Case]) -> str:
    return cases[0].layout if cases else "empty"


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def split_cases(cases: Sequence[Case], val_fraction: Optional[float] = 0.2, seed: int = 0,
                folds: int = 0, fold: int = 0) -> Tuple[List[Case], List[Case], List[Case]]:
    """Split cases into (train, val, held-out test) by ``group`` (patient), deterministically for a seed.

    Cases the dataset marks ``test`` are held out for final evaluation and never used for training or validation
    (DRIVE test, CHASE_DB1 children 11-14, the LIDC test patients). When the dataset has its own ``val`` cases and no
    fraction is requested they are the validation set. ``folds > 1`` picks fold ``fold`` of a grouped k-fold split
    as validation (cross-validation). ``val_fraction = 0`` trains on everything (no validation).
    """
    test = [c for c in cases if c.split == "test"]
    pool = [c for c in cases if c.split != "test"]
    if folds and folds > 1:
        groups = _shuffled_groups(pool, seed)
        if not 0 <= fold < folds:
            raise InputError(f"--fold must be in 0..{folds - 1}")
        val_groups = set(groups[fold::folds])
    elif val_fraction is None and any(c.split == "val" for c in pool):
        val_groups = {c.group for c in pool if c.split == "val"}
    else:
        frac = 0.2 if val_fraction is None else float(val_fraction)
        if not 0.0 <= frac < 1.0:
            raise InputError("--val-fraction must be in [0, 1)")
        groups = _shuffled_groups(pool, seed)
        n_val = int(round(frac * len(groups)))
        if frac > 0 and n_val == 0 and len(groups) >= 2:
            n_val = 1
        val_groups = set(groups[:n_val])
    train = [c for c in pool if c.group not in val_groups]
    val = [c for c in pool if c.group in val_groups]
    return train, val, test


def _shuffled_groups(cases: Sequence[Case], seed: int) -> List[str]:
    groups = sorted({c.group for c in cases})
    rng = np.random.default_rng(seed)
    return [groups[i] for i in rng.permutation(len(groups))]


# ----------------------------------------------------------------------------------------------------------------
# reading raw cases (preparation only: SimpleITK imported lazily)
# ----------------------------------------------------------------------------------------------------------------
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
    from KDSegmentationLib.tasks import preprocess

    rgb = imageio.photo_to_array(_read_sitk(case.image))
    # the field of view is found from the photo exactly as at inference (a dataset's own FOV mask is kept apart,
    # for metrics only): rescaling and normalisation then match what the model will see
    prep = preprocess.prepare_fundus(rgb, task, fov=None)
    out = {"image": np.ascontiguousarray(prep.rgb, dtype=np.uint8), "fov": np.asarray(prep.fov, bool),
           "scale": np.float64(prep.scale)}
    if case.fov:
        out["fov_ref"] = preprocess.prepare_fundus_label(_read_mask_2d(case.fov), prep).astype(bool)
    if case.label:
        out["label"] = np.asarray(preprocess.prepare_fundus_label(_read_mask_2d(case.label), prep), np.uint8)
    return out


def _prepare_ct_volume(case: Case, task: TaskSpec) -> Dict[str, np.ndarray]:
    from KDSegmentationLib.tasks import preprocess

    prep = preprocess.prepare_ct_volume(_read_sitk(case.image), task)
    out = {"image": np.asarray(prep.hu, np.int16), "spacing": np.asarray(prep.grid.GetSpacing(), np.float64)}
    if case.labelled:
        lab = np.asarray(preprocess.prepare_ct_label(_ct_label_image(case), prep), np.uint8)
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
        from KDSegmentationLib.tasks import lung_nodule as lung

        images, _readers, consensus, soft = lung.load_nodule(case.record)
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


# ----------------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedCache:
    """A prepared cache folder: its manifest and its cases (``Case.cache_file`` set)."""

    path: Path
    manifest: Dict[str, Any]
    cases: List[Case]

    @property
    def task(self) -> str:
        return self.manifest["task"]


def task_preprocessing(task: TaskSpec) -> Dict[str, Any]:
    """The parameters that define model space for a task (stored in caches and model files)."""
    d: Dict[str, Any] = {"task": task.name, "input_kind": task.input_kind, "spatial_dims": task.spatial_dims}
    if task.spacing_mm is not None:
        d["spacing_mm"] = list(task.spacing_mm)
    if task.hu_window is not None:
        d["hu_window"] = list(task.hu_window)
    if task.fov_diameter_px is not None:
        d["fov_diameter_px"] = task.fov_diameter_px
    try:
        from KDSegmentationLib.tasks import preprocess

        d["preprocess_version"] = str(getattr(preprocess, "VERSION", getattr(preprocess, "__version__", "1")))
    except Exception:  # the module is optional for reading caches
        pass
    return d


def _record_paths(record: Any) -> List[str]:
    """Every path held by a dataset record (e.g. a LIDC nodule's slice files and reader folders)."""
    out: List[str] = []
    values = list(vars(record).values()) if hasattr(record, "__dict__") else \
        [getattr(record, f) for f in getattr(record, "__dataclass_fields__", {})]
    for v in values:
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(item, Path):
                out.append(str(item))
    return out


def source_fingerprint(cases: Sequence[Case]) -> str:
    """sha1 over every source file's path, size and mtime (a changed dataset invalidates its cache)."""
    h = hashlib.sha1()
    for c in cases:
        paths = [c.image, c.label, c.fov] + [c.structures[k] for k in sorted(c.structures)]
        if c.record is not None:
            paths += _record_paths(c.record)
        h.update(c.case_id.encode())
        for p in paths:
            if not p:
                continue
            pp = Path(str(p))
            files = [pp] if pp.is_file() else (sorted(f for f in pp.rglob("*") if f.is_file()) if pp.is_dir() else [])
            for f in files:
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _prepare_one(args) -> Dict[str, Any]:
    case, task, out_dir = args
    arrays = prepare_case(case, task)
    fname = case.case_id + ".npz"
    np.savez_compressed(out_dir / fname, **arrays)
    entry = case.describe()
    entry.update(file=fname, labelled="label" in arrays, shape=list(arrays["image"].shape))
    for k in ("image", "label", "fov", "cache_file", "structures", "record"):
        entry.pop(k, None)
    entry["source"] = {"image": case.image, "label": case.label, "fov": case.fov,
                       "structures": {str(k): v for k, v in case.structures.items()}}
    return entry


def prepare_cache(cases: Sequence[Case], task: TaskSpec, out_dir, progress=None,
                  should_stop: Optional[Callable[[], bool]] = None, workers: int = 0,
                  source: Optional[str] = None, fingerprint: Optional[str] = None) -> Path:
    """Read every case once and write ``out_dir`` (one ``<case>.npz`` each + ``manifest.json``), atomically.

    The folder is built under a temporary name beside ``out_dir`` and renamed at the end, so an interrupted
    preparation never leaves a half cache behind. ``workers > 1`` reads cases in parallel processes.
    """
    out_dir = Path(out_dir)
    cases = list(cases)
    if not cases:
        raise InputError("no cases to prepare")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=str(out_dir.parent)))
    try:
        entries: List[Dict[str, Any]] = []
        jobs = [(c, task, tmp) for c in cases]
        if workers and workers > 1 and len(cases) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, entry in enumerate(pool.map(_prepare_one, jobs, chunksize=4)):
                    entries.append(entry)
                    _prep_tick(progress, should_stop, i, len(cases), entry)
        else:
            for i, job in enumerate(jobs):
                entries.append(_prepare_one(job))
                _prep_tick(progress, should_stop, i, len(cases), entries[-1])
        manifest = {
            "format": CACHE_FORMAT, "task": task.name, "layout": layout_of(cases),
            "source": str(source) if source else None, "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "preprocessing": task_preprocessing(task),
            "cases": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _prep_tick(progress, should_stop, i, n, entry) -> None:
    if progress is not None:
        progress.progress("prepare", (i + 1) / n, case=entry["case_id"])
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled while preparing the data cache")


def load_cache(cache_dir) -> PreparedCache:
    """Read a cache's manifest (arrays are loaded on demand with :func:`load_arrays`). Never imports SimpleITK."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{cache_dir} is not a readable data cache ({exc}); prepare it again with 'kdseg prepare'")
    if manifest.get("format") != CACHE_FORMAT:
        raise InputError(f"{cache_dir} has cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}; "
                         "prepare it again with 'kdseg prepare'")
    cases = []
    for e in manifest["cases"]:
        c = Case(case_id=e["case_id"], split=e.get("split"), group=e.get("group") or e["case_id"],
                 layout=manifest.get("layout", "cache"), cache_file=str(cache_dir / e["file"]),
                 labelled=bool(e.get("labelled")))
        cases.append(c)
    return PreparedCache(path=cache_dir, manifest=manifest, cases=cases)


def load_arrays(case: Case) -> Dict[str, np.ndarray]:
    """All arrays of a cached case, fully read into memory."""
    if not case.cache_file:
        raise ValueError(f"case {case.case_id} is not from a prepared cache")
    try:
        with np.load(case.cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cached case {case.cache_file} is unreadable ({exc}); prepare the cache again")


def default_cache_root() -> Path:
    env = os.environ.get("KDSEG_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA", str(Path.home()))
    return Path(base) / "KDSegmentation" / "datasets"


def ensure_cache(data_dir, task: TaskSpec, cache_dir=None, progress=None, should_stop=None,
                 workers: int = 0) -> PreparedCache:
    """A prepared cache for ``data_dir``: the folder itself when it is one, else a cache prepared (or reused when the
    source files and preprocessing are unchanged) in ``cache_dir`` or the user's cache folder."""
    data_dir = Path(data_dir)
    if is_cache(data_dir):
        find_cases(data_dir, task)  # checks the task
        return load_cache(data_dir)
    cases = find_cases(data_dir, task)
    fp = source_fingerprint(cases)
    if cache_dir is None:
        key = hashlib.sha1(f"{data_dir.resolve()}|{task.name}".encode()).hexdigest()[:12]
        cache_dir = default_cache_root() / f"{task.name}-{data_dir.name}-{key}"
    cache_dir = Path(cache_dir)
    if is_cache(cache_dir):
        try:
            cache = load_cache(cache_dir)
            if (cache.task == task.name and cache.manifest.get("fingerprint") == fp
                    and cache.manifest.get("preprocessing") == task_preprocessing(task)):
                if progress is not None:
                    progress.log(f"reusing prepared cache {cache_dir}")
                return cache
        except InputError:
            pass
    if progress is not None:
        progress.log(f"preparing {len(cases)} cases of {data_dir} into {cache_dir}")
    prepare_cache(cases, task, cache_dir, progress=progress, should_stop=should_stop, workers=workers,
                  source=str(data_dir.resolve()), fingerprint=fp)
    return load_cache(cache_dir)


# ----------------------------------------------------------------------------------------------------------------
# training samples
# ----------------------------------------------------------------------------------------------------------------
def network_input(arrays: Dict[str, np.ndarray], task: TaskSpec) -> np.ndarray:
    """Whole-case network input without augmentation: CT (1, z, y, x); retina (3, h, w); nodule slices (n, 2, h, w)
    (intensity and the click map at the crop centre)."""
    if task.input_kind == "2d-rgb":
        from KDSegmentationLib.tasks import preprocess

        return np.asarray(preprocess.fundus_input(arrays["image"], arrays["fov"]), np.float32)
    if task.spatial_dims == 3:
        from KDSegmentationLib.tasks import preprocess

        return np.asarray(preprocess.ct_window(arrays["image"], task), np.float32)[None]
    from KDSegmentationLib.tasks.lung_nodule import network_stack

    return network_stack(arrays["image"].astype(np.float32) / 255.0)


class PatchDataset:
    """Augmented training samples addressed by key ``(case_index, seed_tuple)`` (see :class:`MixedBatchSampler`).

    ``cases`` are array dicts from :func:`load_arrays`; ``labelled`` flags which of them may use their label.
    An item is a dict of tensors:

    - ``image`` float16 (C, *region): network input (CT window / fundus normalisation / slice [0, 1]) with intensity
      augmentation, ``region`` = ``patch`` x ``policy.region_factor``;
    - ``label`` uint8 (*region) (zeros when unlabelled), ``soft`` float16 (2, *region) when soft labels are asked for;
    - ``theta`` float32 (d, d+1) the spatial augmentation for :func:`warp_batch`; ``labelled`` bool.
    """

    def __init__(self, cases: Sequence[Dict[str, np.ndarray]], labelled: Sequence[bool], task: TaskSpec,
                 patch: Sequence[int], policy: Optional[AugPolicy] = None, soft_labels: bool = False,
                 augment: bool = True):
        self.cases = list(cases)
        self.labelled = [bool(x) and "label" in c for x, c in zip(labelled, self.cases)]
        self.task = task
        self.patch = tuple(int(p) for p in patch)
        self.policy = policy or default_policy(task)
        self.soft_labels = soft_labels
        self.augment = augment
        self.region = tuple(int(math.ceil(p * self.policy.region_factor / 2) * 2) for p in self.patch) \
            if augment else self.patch
        self.is_slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
        # retina: the FOV diameter of each photo (for normalising crops) and the whole-photo network input, which
        # samples without camera jitter crop directly (~1 ms instead of ~15 ms of normalisation)
        self._diameter: List[float] = []
        self._normalised: List[np.ndarray] = []
        if task.input_kind == "2d-rgb":
            from KDSegmentationLib.tasks.retina import fov_diameter

            for c in self.cases:
                self._diameter.append(fov_diameter(c["fov"]) if c["fov"].any() else float(max(c["fov"].shape)))
                self._normalised.append(network_input(c, task).transpose(1, 2, 0).astype(np.float16))
        # foreground voxels per class, found once: the crop centres of foreground-oversampled patches
        self._fg: List[List[np.ndarray]] = []
        for c, lab in zip(self.cases, self.labelled):
            if not lab:
                self._fg.append([])
            elif self.is_slices:
                per_slice = c["label"].reshape(c["label"].shape[0], -1).any(1)
                self._fg.append([np.flatnonzero(per_slice)])
            else:
                values = [v for v in np.unique(c["label"]) if v > 0]
                self._fg.append([np.flatnonzero(c["label"] == v).astype(np.int64) for v in values])

    def __len__(self) -> int:
        return len(self.cases)

    # -- centre choice ------------------------------------------------------------------------------------------
    def _centre(self, i: int, shape: Tuple[int, ...], rng: np.random.Generator) -> Tuple[int, ...]:
        fg = self._fg[i]
        if fg and rng.random() < self.policy.pos_fraction:
            cls = fg[int(rng.integers(len(fg)))]  # classes equally often: small tumours get their share
            if len(cls):
                return np.unravel_index(int(cls[int(rng.integers(len(cls)))]), shape)
        c = self.cases[i]
        for _ in range(20):  # uniform inside the body / field of view (rejection sampling, no index arrays kept)
            p = tuple(int(rng.integers(s)) for s in shape)
            if self.task.input_kind == "2d-rgb":
                if c["fov"][p]:
                    return p
            elif c["image"][p] > -500:
                return p
        return tuple(int(rng.integers(s)) for s in shape)

    # -- items --------------------------------------------------------------------------------------------------
    def __getitem__(self, key):
        import torch

        i, seed = key
        rng = np.random.default_rng(seed)
        c = self.cases[i]
        labelled = self.labelled[i]
        soft = None
        if self.is_slices:
            n = c["image"].shape[0]
            fg = self._fg[i]
            if fg and len(fg[0]) and rng.random() < self.policy.pos_fraction:
                k = int(fg[0][int(rng.integers(len(fg[0])))])
            else:
                k = int(rng.integers(n))
            hw = c["image"].shape[1:]
            if tuple(hw) == self.patch:  # nodule-centred crops (LIDC): the whole slice
                centre = (hw[0] // 2, hw[1] // 2)
            else:  # larger slices: centred on the nodule when this slice shows it
                fg_px = np.flatnonzero(c["label"][k]) if labelled else np.zeros(0, np.int64)
                centre = np.unravel_index(int(fg_px[int(rng.integers(len(fg_px)))]), hw) if len(fg_px) else \
                    tuple(int(rng.integers(s)) for s in hw)
            img = slice_intensity(crop(c["image"][k], centre, self.region), rng, self.augment)[None]
            # the click channel: the crop is centred where the user would click (the nodule), and the spatial
            # augmentation below moves it together with the image
            from KDSegmentationLib.tasks.lung_nodule import click_map

            img = np.concatenate([img, click_map(self.region, (self.region[0] // 2, self.region[1] // 2))[None]])
            lab = crop(c["label"][k], centre, self.region) if labelled else None
            if labelled and self.soft_labels:
                s = c["soft"][k] if "soft" in c else c["label"][k]
                fg_s = crop(np.asarray(s, np.float32), centre, self.region)
                soft = np.stack([1 - fg_s, fg_s])
        elif self.task.input_kind == "2d-rgb":
            centre = self._centre(i, c["fov"].shape, rng)
            if self.augment and rng.random() < self.policy.camera_p:
                rgb = crop(c["image"], centre, self.region)
                fov = crop(c["fov"], centre, self.region, False)
                img = normalise_region(camera_jitter(rgb, fov, rng), fov, self._diameter[i])
            else:
                img = crop(self._normalised[i], centre, self.region).transpose(2, 0, 1)
            lab = crop(c["label"], centre, self.region) if labelled else None
        else:
            centre = self._centre(i, c["image"].shape, rng)
            hu = crop(c["image"], centre, self.region, np.int16(-1024))
            img = ct_intensity(hu, self.task, rng, self.augment)[None]
            lab = crop(c["label"], centre, self.region) if labelled else None
        theta = random_affine(rng, self.policy, self.patch, self.region, self.augment)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img)).to(torch.float16),
            "label": torch.from_numpy(np.ascontiguousarray(lab if lab is not None
                                                           else np.zeros(self.region, np.uint8))),
            "theta": torch.from_numpy(theta),
            "labelled": torch.tensor(labelled),
        }
        if self.soft_labels:
            if soft is None:
                soft = np.zeros((2,) + self.region, np.float32)
                soft[0] = 1.0
            item["soft"] = torch.from_numpy(np.ascontiguousarray(soft)).to(torch.float16)
        return item


class MixedBatchSampler:
    """Deterministic batches of ``(case_index, seed)`` keys, mixing labelled and unlabelled cases.

    Global step ``g`` on rank ``r`` holds ``n_l`` labelled and ``n_u = round(batch * unlabelled_fraction)``
    unlabelled keys (all labelled when there are no unlabelled cases, all unlabelled when there are no labelled
    ones). Each stream walks through fresh seeded permutations of its cases, so every case is seen equally often,
    and every key depends only on ``(seed, g, r, slot)``: restarting at ``start_step`` reproduces the same data.
    Unlabelled case indices follow the labelled ones in the dataset (``n_labelled + j``).
    """

    def __init__(self, n_labelled: int, n_unlabelled: int, batch_size: int, total_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, unlabelled_fraction: float = 0.5):
        if n_labelled + n_unlabelled == 0:
            raise InputError("no training cases")
        self.n_l, self.n_u = n_labelled, n_unlabelled
        self.batch_size, self.total_steps, self.seed = batch_size, total_steps, seed
        self.start_step, self.rank, self.world = start_step, rank, world_size
        if n_unlabelled == 0:
            self.per_l = batch_size
        elif n_labelled == 0:
            self.per_l = 0
        else:
            self.per_l = min(batch_size - 1, max(1, batch_size - int(round(batch_size * unlabelled_fraction))))
        self.per_u = batch_size - self.per_l
        self._perm_cache: Dict[int, Tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def _case(self, stream: int, n: int, draw: int) -> int:
        cycle, pos = divmod(draw, n)
        cached = self._perm_cache.get(stream)
        if cached is None or cached[0] != cycle:  # only the current cycle of each stream is kept
            cached = (cycle, np.random.default_rng([self.seed, 7 + stream, cycle]).permutation(n))
            self._perm_cache[stream] = cached
        return int(cached[1][pos])

    def batch(self, step: int) -> List[Tuple[int, Tuple[int, ...]]]:
        keys = []
        for stream, n, per, offset in ((0, self.n_l, self.per_l, 0), (1, self.n_u, self.per_u, self.n_l)):
            for j in range(per):
                draw = (step * self.world + self.rank) * per + j
                case = self._case(stream, n, draw)
                keys.append((offset + case, (self.seed, step, self.rank, stream, j)))
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, Tuple[int, ...]]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)


def worker_init(_worker_id: int) -> None:
    """DataLoader worker set-up: the main process alone handles Ctrl-C/SIGTERM (it stops cleanly after the current
    step and shuts the workers down); workers that died on the signal would turn a clean stop into a crash."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
