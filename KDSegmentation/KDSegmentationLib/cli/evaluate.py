"""``kdseg evaluate`` (one prediction, or a model over a dataset) and ``kdseg calibrate``."""
from __future__ import annotations

import json
from pathlib import Path

from KDSegmentationLib.cli.arguments import bound_text, check_not_input
from KDSegmentationLib.errors import InputError
from KDSegmentationLib.inference.device import DEVICE_CHOICES
from KDSegmentationLib.progress import PROGRESS_MODES


def cmd_evaluate(args) -> int:
    from KDSegmentationLib.evaluation.evaluate import evaluate_dataset, evaluate_pair

    if args.output:
        out = Path(args.output)
        for given in (args.pred, args.ref):
            if given:
                check_not_input(given, out)
    if args.pred and args.ref:
        result = evaluate_pair(args.task, args.pred, args.ref)
    elif args.data:
        result = evaluate_dataset(args.task, args.data, model=args.model, device=args.device, split=args.split,
                                  threads=args.threads, progress_mode=args.progress,
                                  case_ids=[c for c in (args.cases or "").split(",") if c] or None)
    else:
        raise InputError("kdseg evaluate needs either --pred and --ref, or --data DIR")
    text = json.dumps(result, indent=2)
    if args.output:
        from KDSegmentationLib.io.atomic import write_json

        write_json(Path(args.output), result)
    print(text)
    return 0


def cmd_calibrate(args) -> int:
    from KDSegmentationLib.evaluation.calibrate import DEFAULT_GRID, calibrate, store_threshold

    grid = DEFAULT_GRID
    if args.thresholds:
        try:
            grid = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--thresholds {args.thresholds!r} is not a comma-separated list of numbers") from None
        # a stored threshold outside (0, 1) would make the model file unloadable (and its results empty or full)
        if not grid or not all(0.0 < t < 1.0 for t in grid):
            raise InputError(f"--thresholds {bound_text(args.thresholds, 200)!r}: every candidate must be a number "
                             "strictly between 0 and 1")
    result = calibrate(args.model, args.data, grid, device=args.device, threads=args.threads)
    if not args.dry_run:
        store_threshold(args.model, result)
        result["stored_in"] = str(args.model)
    print(json.dumps(result, indent=2))
    return 0


def add_parsers(sub, task_names) -> None:
    """``evaluate`` and ``calibrate``."""
    s = sub.add_parser("evaluate", help="metrics of one prediction, or of a model over a dataset")
    s.add_argument("--task", required=True, choices=task_names)
    s.add_argument("--pred", help="predicted segmentation (.seg.nrrd or labelmap)")
    s.add_argument("--ref", help="reference segmentation or labelmap")
    s.add_argument("--data", help="dataset folder (any supported layout)")
    s.add_argument("--split", default="test", help="which split of the dataset to evaluate (test, val, train, all)")
    s.add_argument("--cases", help="comma-separated case ids to evaluate instead of a split")
    s.add_argument("--model", default="student")
    s.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    s.add_argument("--threads", type=str)
    s.add_argument("--output", help="also write the metrics JSON here")
    s.add_argument("--progress", default="auto", choices=PROGRESS_MODES)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("calibrate", help="choose a binary model's decision threshold on its validation cases "
                       "and store it in the model file")
    s.add_argument("--model", required=True, help="model file (rewritten in place, atomically)")
    s.add_argument("--data", required=True, help="the original dataset the model was trained on (not a prepared cache)")
    s.add_argument("--thresholds", help="comma-separated candidates (default 0.30,0.35,...,0.90)")
    s.add_argument("--dry-run", action="store_true", help="print the table, leave the model file as it is")
    s.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_calibrate)
