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
test patients). Every run is scored exactly as ``kdseg evaluate`` scores a model for its card: the deployment
inferer, the model's decision threshold, Dice on the original image grid (retina: inside the FOV; lung: per nodule
over its slice stack; liver: per volume). Finished runs are reused
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
    p.add_argument("--teacher-targets", default="online", choices=["online", "stored"],
                   help="the teacher on every patch, or its soft labels computed once per training image")
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


def test_selection(args):
    """(dataset folder, split) of the held-out test cases: ``--test-data`` whole, else the test split of ``--data``.
    Both must be original images: every run is scored as ``kdseg evaluate`` scores a model."""
    from KDSegmentationLib.training.cache import is_cache

    data, split = (args.test_data, "all") if args.test_data else (args.data, "test")
    if is_cache(data):
        raise SystemExit(f"{data} is a prepared cache; the ablation scores on the original images, as kdseg "
                         "evaluate does: pass --test-data DIR of original images")
    return data, split


def test_case_ids(selection, task) -> List[str]:
    from KDSegmentationLib.evaluation.evaluate import select_split
    from KDSegmentationLib.training.layouts import find_cases

    cases, _ = select_split(find_cases(selection[0], task), selection[1])
    return [c.case_id for c in cases]


def evaluate(model_path: Path, selection, task, device) -> Dict[str, float]:
    """Mean Dice per label (and 'mean' over labels) over the test cases, through ``kdseg evaluate``'s pipeline:
    the deployment inferer, the model's own decision threshold, the input grid."""
    from KDSegmentationLib.evaluation.evaluate import evaluate_dataset

    data, split = selection
    result = evaluate_dataset(task.name, data, model=str(model_path), device=str(device), split=split)
    out = {name: float(m["dice"]["mean"]) for name, m in result["mean"].items()}
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
    selection = test_selection(args)
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
                                  teacher_targets=args.teacher_targets,
                                  workers=args.workers, cache_dir=args.cache, progress=args.progress,
                                  resume=Path(str(model) + ".ckpt").is_dir(),
                                  command_line="scripts/ablation.py " + " ".join(sys.argv[1:]))
                train(cfg)
            dice = evaluate(model, selection, task, device)
            runs.append({"method": name, "spec": spec, "seed": seed, "model": model.name, "dice": dice,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:12s} seed {seed}: Dice {dice['mean']:.4f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = summarise(runs, methods, task)
    result = {"task": task.name, "data": args.data, "teacher": args.teacher, "test_data": args.test_data
              or "test split of --data", "test_cases": test_case_ids(selection, task), "seeds": seeds,
              "budget": {"steps": args.steps, "epochs": args.epochs, "max_minutes": args.max_minutes,
                         "batch_size": args.batch_size, "patch": patch},
              "alpha": args.alpha, "temperature": args.temperature, "teacher_targets": args.teacher_targets,
              "runs": runs, "table": table}
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
