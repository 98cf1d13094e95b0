"""The pipeline every task implements, and the one place that maps a task name to its pipeline.

Data flow of ``kdseg segment`` (and of evaluation, calibration and validation, which run the same steps):

    image (SimpleITK, input grid) -> pipeline.prepare -> NetworkInput (float32 (B, C, *spatial), model grid)
    -> inference.Inferer -> probabilities (B, C, *spatial) -> pipeline.to_input_grid (+ post-processing)
    -> labels (uint8, input grid) -> pipeline.measure -> segment statistics
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from KDSegmentationLib.tasks import TaskSpec


@dataclass
class NetworkInput:
    """A task's network input with what its inverse needs.

    tensor: float32 (B, C, *spatial) on the model grid (B = 1 for a volume or photo; the nodule's slices are the
    batch). roi_zyx: sliding-window ROI in model voxels, or None to run the whole input at once. context: the
    task's record of the preparation (model grid, seed region, rescaled photo) used to map the output back.
    """

    tensor: np.ndarray
    context: Any
    roi_zyx: Optional[Tuple[int, ...]] = None


@dataclass
class InputGridOutput:
    """The result on the input grid: labels (uint8, the input's array shape, values = task label values), the
    labelmap image with the input's geometry, given or built from the labels and ``geometry`` (an image on the
    same grid) by :meth:`label_image` when asked for (no full-size copy is made before it is needed), and
    the foreground probability where the task has one (for AP/AUC)."""

    labels: np.ndarray
    labelmap: Any = None
    probability: Optional[np.ndarray] = None
    warnings: List[str] = field(default_factory=list)
    geometry: Any = None

    def label_image(self):
        """The labelmap (SimpleITK UInt8 on the input grid): the given one, else built from the labels now."""
        if self.labelmap is not None:
            return self.labelmap
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.labels.reshape(tuple(reversed(self.geometry.GetSize()))))
        image.CopyInformation(self.geometry)
        return image


class TaskPipeline:
    """One task's steps around the network. Subclasses hold no state but the task's specification."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    def prepare(self, image, seed_ras=None) -> NetworkInput:
        """Input image (SimpleITK, validated for the task) -> network input on the model grid."""
        raise NotImplementedError

    def to_input_grid(self, probabilities: np.ndarray, prepared: NetworkInput, image,
                      threshold: float = 0.5) -> InputGridOutput:
        """Class probabilities (B, C, *spatial) -> post-processed labels on exactly the input grid.
        ``threshold``: a binary model's calibrated decision threshold on the foreground probability."""
        raise NotImplementedError

    def measure(self, output: InputGridOutput, prepared: NetworkInput, image) -> Dict[str, dict]:
        """Segment name -> statistics shown to the user (volumes in mL, or areas in pixels)."""
        raise NotImplementedError


def withhold(output: InputGridOutput, task: TaskSpec, withheld) -> Tuple[InputGridOutput, TaskSpec]:
    """The result without the labels a model does not offer (``withheld``: label values): their voxels go to the
    structure that contains them (a tumour to its organ, so the organ stays whole) or to the background, in place.
    Returns the output and the task as offered (only the remaining labels: the segments written and measured)."""
    import dataclasses

    from KDSegmentationLib.tasks.components import mask_box

    withheld = set(withheld)
    if not withheld:
        return output, task
    labels = output.labels  # changed in place: the pipeline's fresh result, and a copy would cost a full grid
    box = mask_box(labels)
    inside = labels[box] if box is not None else labels[:0]  # a view: the labels' box is all that can change
    for lab in task.labels:
        if lab.value in withheld:
            inside[inside == lab.value] = lab.within if lab.within not in (None, *withheld) else 0
    offered = dataclasses.replace(task, labels=tuple(lab for lab in task.labels if lab.value not in withheld))
    geometry = output.geometry if output.labelmap is None else output.labelmap
    return dataclasses.replace(output, labels=labels, labelmap=None, geometry=geometry), offered


def pipeline_for(task: TaskSpec) -> TaskPipeline:
    """The pipeline of ``task`` (imported here, so that a task module is loaded only when it runs)."""
    if task.name == "liver":
        from KDSegmentationLib.tasks.liver import LiverPipeline as cls
    elif task.name == "lung_nodule":
        from KDSegmentationLib.tasks.lung_nodule import LungNodulePipeline as cls
    elif task.name == "retina":
        from KDSegmentationLib.tasks.retina import RetinaPipeline as cls
    else:
        raise KeyError(f"task {task.name} has no pipeline")
    return cls(task)
