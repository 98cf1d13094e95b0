"""Dataset layouts: which folder structure holds which cases, recognised without reading any image.

Each layout is a detector registered with :func:`register_layout` (in detection order: the first that finds cases
wins). A detector gets the dataset root and the task and returns its :class:`Case` list, or None when the folder is
not of its layout. :func:`find_cases` runs them (a prepared cache folder is recognised first); nothing here imports
SimpleITK.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec

CACHE_DESCRIPTION = "a prepared cache folder (manifest.json, written by 'kdseg prepare')"

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


# ----------------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------------
Detector = Callable[[Path, TaskSpec], Optional[List[Case]]]


@dataclass(frozen=True)
class Layout:
    """A registered dataset layout: ``detect(root, task)`` -> its cases, or None when ``root`` is not of this
    layout; ``tasks``: the only tasks its data can be for (empty: any task)."""

    name: str
    description: str
    detect: Detector
    tasks: Tuple[str, ...] = ()


LAYOUTS: Dict[str, Layout] = {}


def register_layout(name: str, description: str, tasks: Sequence[str] = ()):
    """Function decorator adding a detector to ``LAYOUTS`` under ``name``; detection runs in registration order."""
    def add(detect: Detector) -> Detector:
        LAYOUTS[name] = Layout(name=name, description=description, detect=detect, tasks=tuple(tasks))
        return detect
    return add


# ----------------------------------------------------------------------------------------------------------------
# detectors, in detection order
# ----------------------------------------------------------------------------------------------------------------
@register_layout("drive", "DRIVE: training/{images,1st_manual,mask} and test/{images,1st_manual,mask}",
                 tasks=("retina",))
def detect_drive(root: Path, task: TaskSpec) -> Optional[List[Case]]:
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


@register_layout("chase_db1", "CHASE_DB1: images/Image_XXL.jpg + manual/Image_XXL_1stHO.png", tasks=("retina",))
def detect_chase(root: Path, task: TaskSpec) -> Optional[List[Case]]:
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


@register_layout("lidc_slices", "LIDC-IDRI slices: LIDC-IDRI-XXXX/nodule-N/{images,mask-0..3}/slice-K.png",
                 tasks=("lung_nodule",))
def detect_lidc(root: Path, task: TaskSpec) -> Optional[List[Case]]:
    if (root / "LIDC-IDRI-slices").is_dir():  # the folder that holds it
        root = root / "LIDC-IDRI-slices"
    if not any(p.is_dir() and p.name.startswith("LIDC-IDRI-") and any(p.glob("nodule-*")) for p in root.iterdir()):
        return None
    from KDSegmentationLib.tasks import lidc

    records = lidc.iter_lidc_nodules(root)
    ids = [r.patient_id for r in records]
    splits = lidc.split_patients(sorted(set(ids)), seed=0)
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
    # a case folder without a label file is an unlabelled case (another hospital's scans for distillation)
    return Case(case_id=d.name, image=str(image), label=label, structures=structures, layout="case_folders")


@register_layout("case_folders", "case folders: <case>/ct.nii.gz (or <case>/dicom/) + liver.nii.gz "
                 "[+ tumor.nii.gz] or label.nii.gz (none: unlabelled)", tasks=("liver", "lung_nodule"))
def detect_case_folders(root: Path, task: TaskSpec) -> Optional[List[Case]]:
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


@register_layout("msd", "Medical Segmentation Decathlon: imagesTr/ + labelsTr/ with the same file names")
def detect_msd(root: Path, task: TaskSpec) -> Optional[List[Case]]:
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return _paired(root / "imagesTr", root / "labelsTr", None, "msd") or None
    return None


@register_layout("generic", "images/ + labels/ (or masks/, vessel/) with the same base names, optional fov/ for fundus "
                            "masks")
def detect_generic(root: Path, task: TaskSpec) -> Optional[List[Case]]:
    images = _subdir(root, "images", "Images")
    labels = _subdir(root, "labels", "Labels", "masks", "Masks", "vessel", "vessels", "manual")
    if images and labels:
        return _paired(images, labels, _subdir(root, "fov", "FOV"), "generic") or None
    return None


@register_layout("unlabelled", "a folder of images (files or DICOM series folders) without labels")
def detect_unlabelled(root: Path, task: TaskSpec) -> Optional[List[Case]]:
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


# ----------------------------------------------------------------------------------------------------------------
# finding the cases of a folder
# ----------------------------------------------------------------------------------------------------------------
def find_cases(data_dir, task: TaskSpec) -> List[Case]:
    """List the cases of a dataset folder or a prepared cache (layouts: :data:`LAYOUTS`).

    Raises :class:`InputError` when the folder is missing, holds nothing recognisable, or holds data of another
    task (e.g. DRIVE photographs for the liver task).
    """
    from KDSegmentationLib.training.cache import is_cache, load_cache

    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"data folder {root} not found; pass an existing dataset or prepared-cache folder")
    if is_cache(root):
        cache = load_cache(root)
        if cache.task != task.name:
            raise InputError(f"{root} is a cache prepared for task {cache.task!r}, not {task.name!r}; "
                             f"prepare one for {task.name} with 'kdseg prepare --task {task.name}'")
        return cache.cases
    for layout in LAYOUTS.values():
        cases = layout.detect(root, task)
        if cases:
            if layout.tasks and task.name not in layout.tasks:
                raise InputError(f"{root} looks like a {layout.name} dataset, which is for task "
                                 f"{'/'.join(layout.tasks)}, not {task.name}; pass the matching --task")
            return _unique_ids(cases)
    raise InputError(f"no dataset recognised in {root}; expected one of: "
                     + "; ".join([CACHE_DESCRIPTION] + [layout.description for layout in LAYOUTS.values()]))


def layout_of(cases: Sequence[Case]) -> str:
    return cases[0].layout if cases else "empty"
