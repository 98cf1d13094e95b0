"""The engine's wire protocol: the names the engine writes and reads, and the client expects.

Events are JSON objects, one per stdout line, with ``--progress json`` and from ``kdseg serve``:
``{"event": "progress", "stage": "inference", "fraction": 0.42}``. ``kdseg serve`` reads one request object per
stdin line (``{"id": 1, "command": "segment", "task": ..., "input": ..., "output": ...}``) and tags every event it
writes for that request with the request's ``id``. ``kdseg models list --json`` prints one JSON array of model
entries and nothing else on stdout.

Standard library only: the Slicer-side client imports this module and must stay free of the engine's heavy
dependencies.
"""
from __future__ import annotations

import json
from typing import Optional

# -- events (engine -> client) ---------------------------------------------------------------------------------
EVENT = "event"  # the field that names the event
EVENT_PROGRESS = "progress"
EVENT_METRIC = "metric"
EVENT_LOG = "log"
EVENT_RESULT = "result"
EVENT_ERROR = "error"
EVENTS = (EVENT_PROGRESS, EVENT_METRIC, EVENT_LOG, EVENT_RESULT, EVENT_ERROR)

# fields of the events
ID = "id"  # request id, on every event ``kdseg serve`` writes for a request
STAGE = "stage"
FRACTION = "fraction"
LEVEL = "level"
MESSAGE = "message"
PATH = "path"
SECONDS = "seconds"

LEVEL_INFO = "info"
LEVEL_WARNING = "warning"
LEVEL_ERROR = "error"
LEVELS = (LEVEL_INFO, LEVEL_WARNING, LEVEL_ERROR)

# what ``kdseg serve`` logs once its imports are done, before reading requests
READY_MESSAGE = "ready"

# ``progress`` stages: segmentation (in order), then training, dataset preparation and evaluation
STAGE_READING = "reading"
STAGE_PREPROCESSING = "preprocessing"
STAGE_INFERENCE = "inference"
STAGE_POSTPROCESSING = "postprocessing"
STAGE_WRITING = "writing"
STAGE_DONE = "done"
STAGE_PREPARE = "prepare"
STAGE_TEACHER_TARGETS = "teacher targets"
STAGE_TRAIN = "train"
STAGE_CHECKPOINT = "checkpoint"
STAGE_EVALUATION = "evaluation"
SEGMENT_STAGES = (STAGE_READING, STAGE_PREPROCESSING, STAGE_INFERENCE, STAGE_POSTPROCESSING, STAGE_WRITING,
                  STAGE_DONE)
STAGES = SEGMENT_STAGES + (STAGE_PREPARE, STAGE_TEACHER_TARGETS, STAGE_TRAIN, STAGE_CHECKPOINT, STAGE_EVALUATION)

# ``metric`` keys the client plots. Training writes ``step`` and ``loss`` (plus one key per loss term, ``lr``,
# timings) at each log interval, and ``step`` and ``val_dice`` (plus ``val_dice_<label>``, ``best_val_dice``)
# after each validation.
METRIC_STEP = "step"
METRIC_LOSS = "loss"
METRIC_VAL_DICE = "val_dice"

# ``result`` of a segmentation: per-segment statistics, warnings, the device that ran it
RESULT_SEGMENTS = "segments"
RESULT_WARNINGS = "warnings"
RESULT_DEVICE = "device"
# segment name -> why the model does not offer it (no such segment is written: never an empty one shown as a result)
RESULT_WITHHELD = "withheld"

# -- requests (client -> ``kdseg serve``) ----------------------------------------------------------------------
COMMAND = "command"
COMMAND_SEGMENT = "segment"
COMMAND_QUIT = "quit"
COMMANDS = (COMMAND_SEGMENT, COMMAND_QUIT)

REQUEST_TASK = "task"
REQUEST_INPUT = "input"
REQUEST_OUTPUT = "output"
REQUEST_MODEL = "model"
REQUEST_DEVICE = "device"
REQUEST_SEED_RAS = "seed_ras"
# text fields of a segment request, with their defaults (None: required)
SEGMENT_TEXT_FIELDS = ((REQUEST_TASK, None), (REQUEST_INPUT, None), (REQUEST_OUTPUT, None),
                       (REQUEST_MODEL, "student"), (REQUEST_DEVICE, "auto"))

# -- the model list (``kdseg models list --json``) ----------------------------------------------------------------
MODEL_SOURCE = "source"
SOURCE_SHIPPED = "shipped"
SOURCE_LOCAL = "local"  # distilled on this machine, in the user's model folder
MODEL_SOURCES = (SOURCE_SHIPPED, SOURCE_LOCAL)


def parse_event(line: str) -> Optional[dict]:
    """Parse one engine stdout line; returns the event dict, or None for lines that are not protocol events."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get(EVENT) not in EVENTS:
        return None
    return obj
