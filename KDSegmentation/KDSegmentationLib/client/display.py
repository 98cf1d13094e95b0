"""Text and plot data the panel shows: elapsed time, progress, segment sizes, metrics."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from KDSegmentationLib import protocol as P


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe_progress(event: Dict[str, Any]) -> str:
    """``{"stage": "inference", "fraction": 0.42}`` -> ``"Inference 42%"``."""
    stage = str(event.get(P.STAGE) or "working").replace("_", " ")
    stage = stage[:1].upper() + stage[1:]
    fraction = event.get(P.FRACTION)
    if isinstance(fraction, (int, float)):
        return f"{stage} {int(round(100 * min(max(float(fraction), 0.0), 1.0)))}%"
    return stage


def _fmt_number(value: Any, digits: int = 1) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _segment_line(name: str, stats: Dict[str, Any]) -> str:
    if "volume_ml" in stats:
        text = f"{name}: {_fmt_number(stats['volume_ml'], 1)} mL"
        if stats.get("longest_axial_diameter_mm") is not None:
            text += f", longest axial diameter (RECIST) {_fmt_number(stats['longest_axial_diameter_mm'], 1)} mm"
        if stats.get("max_3d_diameter_mm") is not None:
            text += f", maximum 3D diameter {_fmt_number(stats['max_3d_diameter_mm'], 1)} mm"
        return text
    if "area_px" in stats:
        text = f"{name}: {int(stats['area_px'])} px"
        if stats.get("fraction_of_fov") is not None:
            text += f" ({_fmt_number(100 * float(stats['fraction_of_fov']), 1)}% of the field of view)"
        return text
    return f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items())


def format_volumes(result_event: Optional[Dict[str, Any]]) -> str:
    """Segment sizes of a ``result`` event, one line per segment: mL for CT, the nodule's longest diameter, and
    pixels with the share of the field of view for 2D photographs."""
    if not result_event:
        return ""
    segments = result_event.get(P.RESULT_SEGMENTS) or {}
    lines = [_segment_line(name, stats or {}) for name, stats in segments.items()]
    if not lines:
        lines.append("No segment found.")
    for name, reason in (result_event.get(P.RESULT_WITHHELD) or {}).items():
        lines.append(f"{name}: not available with this model ({reason})")
    for warning in result_event.get(P.RESULT_WARNINGS) or []:
        lines.append(f"Warning: {warning}")
    return "\n".join(lines)


def format_metric(event: Dict[str, Any]) -> str:
    parts = []
    for key, value in event.items():
        if key == P.EVENT:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return float(value)
    return None


class MetricHistory:
    """Training loss and validation Dice from ``metric`` events, ready to plot against the training step.

    Reads the keys training writes (:data:`~KDSegmentationLib.protocol.METRIC_LOSS`,
    :data:`~KDSegmentationLib.protocol.METRIC_VAL_DICE`, at :data:`~KDSegmentationLib.protocol.METRIC_STEP`);
    a metric without a step is placed after the previous ones.
    """

    def __init__(self) -> None:
        self.loss_x: List[float] = []
        self.loss: List[float] = []
        self.dice_x: List[float] = []
        self.dice: List[float] = []
        self._count = 0

    def add(self, event: Dict[str, Any]) -> bool:
        """Record a metric event; True when it added a point."""
        self._count += 1
        x = _number(event.get(P.METRIC_STEP))
        x = float(self._count) if x is None else x
        added = False
        loss = _number(event.get(P.METRIC_LOSS))
        if loss is not None:
            self.loss_x.append(x)
            self.loss.append(loss)
            added = True
        dice = _number(event.get(P.METRIC_VAL_DICE))
        if dice is not None:
            self.dice_x.append(x)
            self.dice.append(dice)
            added = True
        return added
