#!/usr/bin/env python
"""Withhold the segments a shipped model does not segment reliably: it then never shows them, empty or not.

A label is offered only when its measured accuracy on data the model never saw reaches the product's bar. For the
liver tumour (the lesion cascade's bar): lesion Dice >= 0.60 on the cross-validation cases that have lesions, and
detection of >= 70 % of the lesions >= 10 mm with <= 1 false positive per case. The numbers come from
``Resources/Models/evaluation.json`` (``scripts/evaluate_models.py``); a model whose numbers miss the bar gets
``preprocessing.withheld_labels`` {label value: reason} in its file (same weights, written atomically), and
``kdseg segment``, ``kdseg serve`` and the panel then merge the label into its organ and say why it is absent.

    python scripts/withhold_labels.py [--models Resources/Models] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "KDSegmentation"))

from KDSegmentationLib.evaluation.lesions import pooled_detection  # noqa: E402

LESION_DICE_BAR = 0.60
DETECTION_BAR = 0.70          # share of lesions >= 10 mm found
FALSE_POSITIVES_BAR = 1.0     # false-positive lesions per case
CROSS_VALIDATION = "3-fold cross-validation"


def lesion_reason(evaluations, label_name: str) -> Optional[str]:
    """Why ``label_name`` misses the bar in a model's cross-validation (with every number measured), or None when
    it reaches it."""
    cv = [e for e in evaluations if e.get("split") == CROSS_VALIDATION]
    if not cv:
        return f"{label_name.lower()} segmentation was not cross-validated"
    per_case = [c["metrics"] for c in cv[0]["cases"]]
    cases = [m[label_name] for m in per_case if (m[label_name].get("volume_ref_ml") or 0) > 0]
    if not cases:
        return f"no cross-validation case has a {label_name.lower()}"
    dice = sum(float(m["dice"]) for m in cases) / len(cases)
    misses = dice < LESION_DICE_BAR
    said = f"cross-validation Dice {dice:.2f} on {len(cases)} cases with lesions (bar {LESION_DICE_BAR:.2f})"
    detection = pooled_detection(per_case, label_name)
    if detection["cases"] < len(per_case):
        return said + "; per-lesion detection was not measured"
    sensitivity, fp = detection["sensitivity_10mm"], detection["false_positives_per_case"]
    misses |= sensitivity is None or sensitivity < DETECTION_BAR or fp > FALSE_POSITIVES_BAR
    said += (f"; {detection['detected_10mm']} of {detection['lesions_10mm']} lesions >= 10 mm found with "
             f"{fp:.1f} false positives per case (bar {DETECTION_BAR:.0%} with <= {FALSE_POSITIVES_BAR:g})")
    return said if misses else None


def withheld_for(entry: Dict, task) -> Dict[str, str]:
    """{label value: reason} for the labels of ``task`` that a model must withhold."""
    out = {}
    for lab in task.labels:
        if lab.within is None:  # organs and single-structure tasks are always offered; lesions must earn it
            continue
        reason = lesion_reason(entry.get("evaluations", []), lab.name)
        if reason:
            out[str(lab.value)] = reason
    return out


def apply(path: Path, withheld: Dict[str, str]) -> bool:
    """Write ``withheld`` into the model file when it differs from what the file holds; True when rewritten."""
    from KDSegmentationLib.models.files import read_header, rewrite_header

    pre = dict(read_header(path).get("preprocessing") or {})
    if pre.get("withheld_labels", {}) == withheld:
        return False
    if withheld:
        pre["withheld_labels"] = withheld
    else:
        pre.pop("withheld_labels", None)
    rewrite_header(path, preprocessing=pre)
    return True


def main(argv=None) -> int:
    from KDSegmentationLib.tasks import get_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[1] / "Resources" / "Models")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    summary = json.loads((args.models / "evaluation.json").read_text(encoding="utf-8"))
    for entry in summary["models"]:
        task = get_task(entry["name"].rsplit("_", 1)[0])
        withheld = withheld_for(entry, task)
        print(f"{entry['name']}: {json.dumps(withheld) if withheld else 'every label offered'}")
        if not args.dry_run:
            apply(args.models / f"{entry['name']}.kdseg.pt", withheld)
    return 0


if __name__ == "__main__":
    sys.exit(main())
