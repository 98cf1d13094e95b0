"""Liver and liver tumour in abdominal CT: a 3D network on the resampled, windowed volume; the organ kept whole."""
from __future__ import annotations

from typing import Dict

import numpy as np

from KDSegmentationLib.tasks.base import InputGridOutput, NetworkInput, TaskPipeline
from KDSegmentationLib.tasks.components import largest_component_in_box
from KDSegmentationLib.tasks.ct import ct_window, labels_on_input_grid, prepare_ct_volume, segment_volumes


def liver_postprocess(labels: np.ndarray) -> np.ndarray:
    """uint8 labels (z, y, x) 0/1/2 -> the same with only the largest connected organ (liver+tumour) component kept.

    Why: false positives in spleen/heart are disconnected from the liver, and a tumour is by definition in the liver.
    """
    found = largest_component_in_box(labels > 0)
    out = np.zeros_like(labels)
    if found is not None:
        box, organ = found
        # labels are 0/1/2 and the organ lies where they are > 0: keeping the labels inside it is exactly "1 in the
        # organ, 2 where it is tumour", in one uint8 pass over the organ's box
        out[box] = labels[box] * organ
    return out


class LiverPipeline(TaskPipeline):
    def prepare(self, image, seed_ras=None) -> NetworkInput:
        prepared = prepare_ct_volume(image, self.spec)
        tensor = ct_window(prepared.hu, self.spec)[None, None]
        return NetworkInput(tensor=tensor, context=prepared, roi_zyx=tuple(reversed(self.spec.roi_size)))

    def to_input_grid(self, probabilities, prepared: NetworkInput, image, threshold: float = 0.5) -> InputGridOutput:
        labels = labels_on_input_grid(probabilities[0], prepared.context, postprocess=liver_postprocess)
        return InputGridOutput(labels=labels, geometry=image)

    def measure(self, output: InputGridOutput, prepared: NetworkInput, image) -> Dict[str, dict]:
        return segment_volumes(output.labels, self.spec, image.GetSpacing())
