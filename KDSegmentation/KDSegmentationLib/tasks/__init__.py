"""Tasks: the registry of what the product segments, and one pipeline module per task."""
from KDSegmentationLib.tasks.registry import LIVER, LUNG_NODULE, RETINA, TASKS, Label, TaskSpec, Terminology, get_task

__all__ = ["LIVER", "LUNG_NODULE", "RETINA", "TASKS", "Label", "TaskSpec", "Terminology", "get_task"]
