"""The Slicer-side client of the engine: standard library and :mod:`KDSegmentationLib.protocol` only (never
torch, MONAI or numpy), so the panel loads fast and the tests run it without Slicer.

- :mod:`.process`: the engine process (safe environment and working directory, events, requests, cancel)
- :mod:`.commands`: engine command lines and ``kdseg serve`` requests
- :mod:`.runs`: :class:`Run` and :class:`RunManager`, the state machine the panel's timer drives
- :mod:`.models`: the model list, labels, cards, deleting local models, versioned names
- :mod:`.environment`: the engine's interpreter and the packages it needs
- :mod:`.display`: text and plot data for the panel
- :mod:`.resources`: bundled samples, terminology files, safe file names
"""
from KDSegmentationLib.client.commands import distill_command, models_list_command, segment_command
from KDSegmentationLib.client.display import format_elapsed, format_volumes
from KDSegmentationLib.client.environment import (SLICER_REQUIREMENTS, TORCH_REQUIREMENT, engine_python,
                                                  installed_version, missing_requirements)
from KDSegmentationLib.client.models import (delete_user_model, is_local_model, model_card_text, model_choices,
                                             model_label, next_model_path)
from KDSegmentationLib.client.resources import find_samples, safe_name, terminology_files
from KDSegmentationLib.client.runs import Run, RunManager

__all__ = [
    "Run", "RunManager", "SLICER_REQUIREMENTS", "TORCH_REQUIREMENT", "delete_user_model", "distill_command",
    "engine_python", "find_samples", "format_elapsed", "format_volumes", "installed_version", "is_local_model",
    "missing_requirements", "model_card_text", "model_choices", "model_label", "models_list_command",
    "next_model_path", "safe_name", "segment_command", "terminology_files",
]
