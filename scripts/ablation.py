#!/usr/bin/env python
"""Does knowledge distillation earn its place? Train the same student without KD and with each KD loss, under the
same budget, data split and seeds, evaluate every run on held-out test cases and tabulate mean +- sd Dice.

    python scripts/ablation.py --task retina --data DRIVE --teacher retina_teacher.kdseg.pt \\
        --seeds 0,1,2 --steps 3000 --out ablation_retina

Methods (``--methods``, default all), each a loss spec of ``losses.py``; override one with ``--spec NAME:SPEC``:

    seg        seg=1                      the student alone (no teacher): the baseline
    kd         kd=1                       (1-alpha) Dice+CE + alpha T^2 KL, with --alpha/--temperature
    soft_ce    seg=1,soft_ce=1            soft-label cross-entropy to the teacher
    hard_label seg=1,hard_label=1         the teacher's argmax as extra labels
    hint       seg=1,hint=0.5             FitNets feature hints (1x1 adapters)
    cwd        seg=1,cwd=1                channel-wise distillation
    affinity   seg=1,affinity=1           pooled pairwise affinity (structured KD)

Test cases: ``--test-data DIR``, else the dataset's own test split (DRIVE test, CHASE_DB1 children 11-14, the LIDC
test patients). Dice is computed with ``metrics.segmentation_metrics`` on the model grid (retina: inside the FOV;
lung: per nodule over its slice stack; liver: per volume), i.e. the comparison between methods is exact, while
``kdseg evaluate`` gives the numbers on the original image grid for the model cards. Finished runs are reused
(``<out>/<method>_seed<k>.kdseg.pt``) and interrupted ones resumed, so the script can be run again after a stop.
Writes ``<out>/ablation.json`` and ``<out>/ablation.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "KDSegmentation"))

import numpy as np  # noqa: E402

METHODS = {
    "seg": "seg=1",
    "kd": "kd=1",
    "soft_ce": "seg=1,soft_ce=1",
    "hard_label": "seg=1,hard_label=1",
    "hint": "seg=1,hint=0.5",
    "cwd": "seg=1,cwd=1",
    "affinity": "seg=1,affinity=1",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True, help="training dataset or prepared cache")
    p.add_argument("--teacher", required=True, help="teacher model file")
    p.add_argument("--test-data", help="test dataset or cache (default: the test split of --data)")
    p.add_argument("--out", required=True, help="folder for the runs and the tables")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--spec", action="append", default=[], metavar="NAME:SPEC",
                   help="override or add a method, e.g. hint:seg=1,hint=0.1")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for a mean +- sd)")
    p.add_argument("--steps", type=int, help="optimiser steps per run (the same for every run)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="time budget per run")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--patch", help="patch size in array order, e.g. 256,256")
    p.add_argument("--lr", type=float)
    p.add_argument("--val-fraction", type=float, help="validation share (best-checkpoint selection)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--soft-labels", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int)
    p.add_argument("--cache", help="folder for prepared data caches")
    p.add_argument("--progress", default="none", choices=["json", "bar", "none"])
    return p.parse_args(argv)


def methods_from(args) -> Dict[str, str]:
    methods = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)} or add one with --spec")
        methods[name] = METHODS[name]
    for item in args.spec:
        name, _, spec = item.partition(":")
        if not spec:
            raise SystemExit(f"--spec must be NAME:SPEC (got {item!r})")
        methods[name.strip()] = spec.strip()
    return methods


def needs_teacher(spec: str) -> bool:
    from KDSegmentationLib.training.losses import LOSSES, parse_loss_spec

    return any(LOSSES[name].needs_teacher for name in parse_loss_spec(spec))


def test_cases(args, task):
    """(case, arrays) of the held-out test cases."""
    from KDSegmentationLib.training import cache as caches

    if args.test_data:
        cache = caches.ensure_cache(args.test_data, task, Path(args.cache) / "test" if args.cache else None)
        cases = [c for c in cache.cases if c.labelled]
    else:
        cache = caches.ensure_cache(args.data, task, Path(args.cache) / "data" if args.cache else None)
        cases = [c for c in cache.cases if c.labelled and c.split == "test"]
    if not cases:
        raise SystemExit("no labelled test cases: pass --test-data DIR (the dataset has no test split)")
    return [(c, caches.load_arrays(c)) for c in cases]


def evaluate(model_path: Path, cases, task, device) -> Dict[str, float]:
    """Mean Dice per label (and 'mean' over labels) over the test cases, with metrics.segmentation_metrics."""
    import torch

    from KDSegmentationLib.training import sampling
    from KDSegmentationLib.evaluation.metrics import segmentation_metrics
    from KDSegmentationLib.models.files import load_model
    from KDSegmentationLib.training.validation import predict_labels

    net = load_model(model_path, device=str(device)).network
    labels = {lab.value: lab.name for lab in task.labels}
    roi = tuple(reversed(task.roi_size))
    slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
    per_label: Dict[str, List[float]] = {name: [] for name in labels.values()}
    for case, arrays in cases:
        x = torch.from_numpy(sampling.network_input(arrays, task))
        pred = predict_labels(net, x if slices else x[None], roi, device)
        pred = pred if slices else pred[0]
        ref = arrays["label"]
        if task.input_kind == "2d-rgb":
            spacing, mask = (1.0, 1.0), arrays.get("fov_ref", arrays["fov"])
        elif slices:
            spacing, mask = (1.0, 1.0, 1.0), None
        else:
            spacing, mask = tuple(float(s) for s in arrays.get("spacing", task.spacing_mm)), None
        m = segmentation_metrics(pred, ref, spacing, labels, mask=mask)
        for name in labels.values():
            per_label[name].append(m[name]["dice"])
    out = {name: float(np.mean(v)) for name, v in per_label.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def run(args) -> Dict:
    import torch

    from KDSegmentationLib.tasks import get_task
    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.io.atomic import write_bytes
    from KDSegmentationLib.training.config import TrainConfig
    from KDSegmentationLib.training.trainer import train

    task = get_task(args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = methods_from(args)
    patch = [int(v) for v in args.patch.split(",")] if args.patch else None
    device = pick_device(args.device)
    cases = test_cases(args, task)
    runs = []
    for name, spec in methods.items():
        for seed in seeds:
            model = out / f"{name}_seed{seed}.kdseg.pt"
            t0 = time.perf_counter()
            if not model.exists():
                cfg = TrainConfig(task=task.name, data=args.data, output=str(model), role="student",
                                  teacher=args.teacher if needs_teacher(spec) else None,
                                  losses=spec, alpha=args.alpha, temperature=args.temperature, seed=seed,
                                  steps=args.steps, epochs=args.epochs, max_minutes=args.max_minutes,
                                  batch_size=args.batch_size, patch=patch, lr=args.lr, val_fraction=args.val_fraction,
                                  split_seed=args.split_seed, soft_labels=args.soft_labels, device=args.device,
                                  workers=args.workers, cache_dir=args.cache, progress=args.progress,
                                  resume=Path(str(model) + ".ckpt").is_dir(),
                                  command_line="scripts/ablation.py " + " ".join(sys.argv[1:]))
                train(cfg)
            dice = evaluate(model, cases, task, device)
            runs.append({"method": name, "spec": spec, "seed": seed, "model": model.name, "dice": dice,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:12s} seed {seed}: Dice {dice['mean']:.4f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = summarise(runs, methods, task)
    result = {"task": task.name, "data": args.data, "teacher": args.teacher, "test_data": args.test_data
              or "test split of --data", "test_cases": [c.case_id for c, _ in cases], "seeds": seeds,
              "budget": {"steps": args.steps, "epochs": args.epochs, "max_minutes": args.max_minutes,
                         "batch_size": args.batch_size, "patch": patch},
              "alpha": args.alpha, "temperature": args.temperature, "runs": runs, "table": table}
    write_bytes(out / "ablation.json", json.dumps(result, indent=1).encode("utf-8"))
    write_bytes(out / "ablation.md", markdown(result, task).encode("utf-8"))
    return result


def summarise(runs, methods, task) -> List[Dict]:
    names = [lab.name for lab in task.labels] + ["mean"]
    base = [r["dice"]["mean"] for r in runs if r["method"] == "seg"]
    rows = []
    for method, spec in methods.items():
        rs = [r for r in runs if r["method"] == method]
        row = {"method": method, "spec": spec, "n": len(rs)}
        for name in names:
            vals = np.array([r["dice"][name] for r in rs], float)
            row[name] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        if base and method != "seg":
            row["delta_vs_seg"] = row["mean"]["mean"] - float(np.mean(base))
        rows.append(row)
    return rows


def markdown(result: Dict, task) -> str:
    names = [lab.name for lab in task.labels] + ["mean"]
    lines = [f"# KD ablation: {task.name}", "",
             f"Same student, same budget ({json.dumps(result['budget'])}), seeds {result['seeds']}; "
             f"Dice on {len(result['test_cases'])} test cases ({result['test_data']}), model grid. "
             f"kd: alpha {result['alpha']}, T {result['temperature']}.", "",
             "| method | losses | " + " | ".join(f"Dice {n}" for n in names) + " | vs seg |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for row in result["table"]:
        cells = [f"{row[n]['mean']:.4f} ± {row[n]['sd']:.4f}" for n in names]
        delta = f"{row['delta_vs_seg'] * 100:+.2f} pt" if "delta_vs_seg" in row else "baseline"
        lines.append(f"| {row['method']} | `{row['spec']}` | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    run(args)
    print(Path(args.out) / "ablation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
