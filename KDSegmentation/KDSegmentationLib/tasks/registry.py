"""The task registry: one entry per segmentation task, used by every layer (CLI, inference, training, Slicer panel).

Geometry conventions: spacings are (x, y, z) in millimetres in SimpleITK/ITK order (LPS physical space); arrays taken
from SimpleITK images are (z, y, x). Intensities of CT tasks are Hounsfield units (HU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from KDSegmentationLib.paths import MODEL_SUFFIX


@dataclass(frozen=True)
class Terminology:
    """DICOM/Slicer terminology triplets (coding scheme, code value, code meaning).

    Every code is either in the list its context names (Slicer's DICOM master lists) or declared in full in the
    project's ``Resources/Terminology`` files, so Slicer's terminology logic resolves each segment without an error.
    """

    category: Tuple[str, str, str]
    type: Tuple[str, str, str]
    region: Optional[Tuple[str, str, str]] = None
    context: str = "Segmentation category and type - DICOM master list"
    region_context: str = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Label:
    value: int                       # value in the labelmap
    name: str                        # segment name shown in Slicer
    color: Tuple[int, int, int]      # RGB 0..255
    terminology: Terminology
    within: Optional[int] = None     # value of the label whose structure contains this one (a tumour: its organ)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    modality: str                    # "CT" or "fundus photograph"
    input_kind: str                  # "3d-ct" or "2d-rgb"
    spatial_dims: int                # of the network: 3 (liver), 2 (lung nodule slices, retina)
    labels: Tuple[Label, ...]
    # network input channels: CT intensity (1); RGB (3); nodule slices: intensity and the click map (2)
    input_channels: int = 1
    # model grid: CT tasks resample to this spacing (x, y, z) mm; None keeps the native in-plane spacing
    spacing_mm: Optional[Tuple[float, float, float]] = None
    # CT intensity window (HU) mapped to [0, 1] before the network
    hu_window: Optional[Tuple[float, float]] = None
    # retina: field-of-view diameter in pixels the images are rescaled to (DRIVE's FOV is about 540 px wide)
    fov_diameter_px: Optional[float] = None
    # sliding-window ROI on the model grid, (x, y[, z]) voxels
    roi_size: Tuple[int, ...] = ()
    needs_seed: bool = False
    # lung nodule: size of the axial region (mm) and number of slices around the seed point
    seed_region_mm: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Network output channels: background + one per label (mutually exclusive labels)."""
        return 1 + len(self.labels)

    def label_by_name(self, name: str) -> Label:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise KeyError(name)

    def shipped_model_file(self, role: str) -> str:
        """File name of the shipped ``student``/``teacher`` model under ``Resources/Models``."""
        if role not in ("student", "teacher"):
            raise ValueError(role)
        return f"{self.name}_{role}{MODEL_SUFFIX}"


_ANATOMY = ("SCT", "123037004", "Anatomical Structure")
_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")

TASKS: Dict[str, TaskSpec] = {}


def _register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


LIVER = _register(TaskSpec(
    name="liver",
    title="Liver and liver tumour (abdominal CT)",
    modality="CT",
    input_kind="3d-ct",
    spatial_dims=3,
    labels=(
        Label(1, "Liver", (221, 130, 101),
              Terminology(_ANATOMY, ("SCT", "10200004", "Liver"))),
        Label(2, "Liver tumor", (144, 238, 144),
              Terminology(_ALTERED, ("SCT", "108369006", "Neoplasm"), region=("SCT", "10200004", "Liver")),
              within=1),
    ),
    spacing_mm=(3.0, 3.0, 3.0),
    hu_window=(-200.0, 300.0),
    roi_size=(96, 96, 64),
))

LUNG_NODULE = _register(TaskSpec(
    name="lung_nodule",
    title="Lung nodule around a seed point (chest CT)",
    modality="CT",
    input_kind="3d-ct",
    spatial_dims=2,
    input_channels=2,
    labels=(
        Label(1, "Lung nodule", (255, 200, 0),
              Terminology(_ALTERED, ("SCT", "27925004", "Nodule"), region=("SCT", "39607008", "Lung"))),
    ),
    spacing_mm=None,            # crops are at the scan's native in-plane spacing
    # Only a clip: the LIDC-IDRI crops were made by a per-slice min-max of each 128x128 window (docs/lidc_window.md),
    # so inference clips to the 12-bit CT range (drops -2048/-3024 padding) and then min-max scales each slice.
    hu_window=(-1024.0, 3071.0),
    roi_size=(128, 128),
    needs_seed=True,
    seed_region_mm=40.0,        # half-height of the slab (mm, along z) searched around the seed
    extra={"intensity": "per-slice min-max after clipping to hu_window"},
))

RETINA = _register(TaskSpec(
    name="retina",
    title="Retinal vessels (colour fundus photograph)",
    modality="fundus photograph",
    input_kind="2d-rgb",
    spatial_dims=2,
    input_channels=3,
    labels=(
        Label(1, "Retinal vessels", (216, 101, 79),
              Terminology(_ANATOMY, ("KDSEG", "RV0001", "Retinal blood vessel"),
                          context="KDSegmentation - retina", region=("SCT", "5665001", "Retina"),
                          region_context="KDSegmentation - anatomic regions")),
    ),
    fov_diameter_px=540.0,
    roi_size=(256, 256),
))


def get_task(name: str) -> TaskSpec:
    from KDSegmentationLib.errors import InputError

    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
