"""The one network forward of the engine: deployment, validation during training, evaluation, calibration and the
KD ablation all get their probabilities here, so every number is measured on the path clinicians run."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from KDSegmentationLib.models.compiled import OnnxNetwork  # torch-free

# Whole-volume forward up to this many model voxels (fastest: no overlap); MONAI's sliding window above it.
WHOLE_MAX_VOXELS = {"cuda": 48_000_000, "cpu": 6_000_000}
SLIDING_WINDOW = {"sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"}


class Inferer:
    """Softmax class probabilities of ``network`` on ``device``: float16 autocast on CUDA, float32 on the CPU.

    ``network`` is a torch module, or a compiled model's :class:`models.compiled.OnnxNetwork` (CPU, numpy in and out:
    torch is only imported when the input is too large to run whole).
    """

    def __init__(self, network, device):
        self.network = network
        self.device = device
        self.compiled = isinstance(network, OnnxNetwork)

    def _logits(self, x):
        import torch

        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.network(x).float()
        return self.network(x)

    def probabilities(self, x, roi_zyx: Optional[Sequence[int]] = None):
        """x: float32 (B, C, *spatial) array or tensor -> torch float32 (B, classes, *spatial) on the device.

        ``roi_zyx``: the sliding-window ROI (model voxels) for inputs too large to run whole; None runs whole.
        """
        import torch

        if self.compiled:
            return torch.from_numpy(self.numpy_probabilities(x, roi_zyx))
        x = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
        with torch.inference_mode():
            x = x.to(self.device)
            if self._runs_whole(x, roi_zyx):
                return torch.softmax(self._logits(x).float(), dim=1)
            from monai.inferers import sliding_window_inference  # only here: importing MONAI costs start-up

            logits = sliding_window_inference(x, roi_size=tuple(roi_zyx), predictor=self._logits, **SLIDING_WINDOW)
            return torch.softmax(logits.float(), dim=1)

    def numpy_probabilities(self, x, roi_zyx: Optional[Sequence[int]] = None) -> np.ndarray:
        """As :meth:`probabilities`, as a float32 numpy array on the CPU."""
        if not self.compiled:
            return self.probabilities(x, roi_zyx).cpu().numpy()
        if self._runs_whole(x, roi_zyx):
            return self.network.probabilities(x)
        return self._compiled_sliding_window(x, roi_zyx)

    def _runs_whole(self, x, roi_zyx) -> bool:
        """Whole input in one forward (no ROI, or few enough voxels for the device); else MONAI's sliding window."""
        kind = "cuda" if getattr(self.device, "type", self.device) == "cuda" else "cpu"
        return roi_zyx is None or int(np.prod(tuple(x.shape[2:]))) <= WHOLE_MAX_VOXELS[kind]

    def _compiled_sliding_window(self, x, roi_zyx) -> np.ndarray:
        """MONAI's sliding window over the compiled network's logits: the same blending as the torch path."""
        import torch
        from monai.inferers import sliding_window_inference

        def predictor(window):
            return torch.from_numpy(self.network.logits(window.numpy()))

        with torch.inference_mode():
            logits = sliding_window_inference(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)),
                                              roi_size=tuple(roi_zyx), predictor=predictor, **SLIDING_WINDOW)
            return torch.softmax(logits.float(), dim=1).numpy()
