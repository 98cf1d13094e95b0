"""What a model's header says, read the same way whichever runtime runs the network (torch or ONNX Runtime).

Torch-free: a compiled model is loaded and described without importing torch.
"""
from __future__ import annotations

from typing import Any, Dict


class HeaderView:
    """Mixin for loaded models: ``self.header`` is the validated header dict (see :mod:`models.files`)."""

    header: Dict[str, Any]

    @property
    def task(self) -> str:
        return self.header["task"]

    @property
    def role(self) -> str:
        return self.header.get("role", "model")

    @property
    def card(self) -> Dict[str, Any]:
        return self.header.get("card", {})

    @property
    def decision_threshold(self) -> float:
        """Foreground probability at or above which a binary model's voxel is labelled (``kdseg calibrate``)."""
        return float((self.header.get("preprocessing") or {}).get("decision_threshold", 0.5))

    @property
    def withheld_labels(self) -> Dict[int, str]:
        """Label value -> why the model does not offer it (its measured accuracy is below the product's bar)."""
        withheld = (self.header.get("preprocessing") or {}).get("withheld_labels") or {}
        return {int(k): str(v) for k, v in withheld.items()}
