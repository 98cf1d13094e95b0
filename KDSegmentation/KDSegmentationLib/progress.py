"""Progress reporting in the engine's event protocol (names in :mod:`KDSegmentationLib.protocol`).

With ``mode="json"`` every event is one JSON object on one line of stdout, e.g.
``{"event": "progress", "stage": "inference", "fraction": 0.42}``; the Slicer panel and the tests parse exactly these
lines with :func:`KDSegmentationLib.protocol.parse_event`. With ``mode="bar"`` humans get a tqdm bar on stderr;
``mode="none"`` is silent.
``mode="auto"`` picks ``bar`` when stderr is a terminal, else ``none``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional, TextIO

from KDSegmentationLib import protocol as P


# The --progress choices of every command that reports progress
PROGRESS_MODES = ("auto", "json", "bar", "none")


class Progress:
    """Emits protocol events. Cheap to create; safe to call from training loops."""

    def __init__(self, mode: str = "auto", stream: Optional[TextIO] = None):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        if mode not in ("json", "bar", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream if stream is not None else sys.stdout
        self._bar = None
        self._bar_stage = None
        self._t0 = time.perf_counter()

    # -- events -------------------------------------------------------------------------------------------
    def progress(self, stage: str, fraction: float, **extra: Any) -> None:
        fraction = float(min(max(fraction, 0.0), 1.0))
        if self.mode == "json":
            self._emit({P.EVENT: P.EVENT_PROGRESS, P.STAGE: stage, P.FRACTION: round(fraction, 4), **extra})
        elif self.mode == "bar":
            self._update_bar(stage, fraction)

    def metric(self, **values: Any) -> None:
        if self.mode == "json":
            self._emit({P.EVENT: P.EVENT_METRIC, **values})
        elif self.mode == "bar":
            self._write_line(" ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def log(self, message: str, level: str = P.LEVEL_INFO) -> None:
        if self.mode == "json":
            self._emit({P.EVENT: P.EVENT_LOG, P.LEVEL: level, P.MESSAGE: message})
        else:
            # warnings must reach a human even without a bar
            if self.mode == "bar" or level in (P.LEVEL_WARNING, P.LEVEL_ERROR):
                self._write_line(f"{level}: {message}" if level != P.LEVEL_INFO else message)

    def result(self, path: Optional[str] = None, **extra: Any) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit({P.EVENT: P.EVENT_RESULT, P.PATH: path, P.SECONDS: round(self.elapsed(), 3), **extra})

    def error(self, message: str) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit({P.EVENT: P.EVENT_ERROR, P.MESSAGE: message})

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    # -- internals ----------------------------------------------------------------------------------------
    def _emit(self, obj: dict) -> None:
        self.stream.write(json.dumps(obj, default=_json_default) + "\n")
        self.stream.flush()

    def _write_line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _update_bar(self, stage: str, fraction: float) -> None:
        from tqdm import tqdm

        if self._bar is None or stage != self._bar_stage:
            self._close_bar()
            self._bar = tqdm(total=1000, desc=stage, file=sys.stderr, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
            self._bar_stage = stage
        self._bar.n = int(fraction * 1000)
        self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_stage = None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)
