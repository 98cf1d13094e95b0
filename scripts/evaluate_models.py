#!/usr/bin/env python
"""Regenerates every accuracy number of the model cards with ``kdseg evaluate`` (the user's full pipeline).

    python scripts/evaluate_models.py --data DATA_ROOT [--runs RUNS_DIR] [--models Resources/Models]

DATA_ROOT holds the original datasets: retina/DRIVE, retina/CHASE_DB1, retina/HRF, lung/LIDC-IDRI-slices,
lung/LIDC-IDRI_c2c_slabs, lung/LIDC-IDRI-slices_0251-0500, liver/RadCTTACEomics. RUNS_DIR is the output folder of
``scripts/train_all.sh``: its ablation runs and the locally distilled retina student are evaluated too. Writes
``<models>/evaluation.json``, ``<models>/MODEL_CARDS.md``, and stores each shipped model's held-out metrics in its
file's card (same weights, new checksum).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "KDSegmentation"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from KDSegmentationLib.evaluation.evaluate import evaluate_dataset  # noqa: E402
from KDSegmentationLib.evaluation.lesions import pooled_detection  # noqa: E402
from KDSegmentationLib.io.atomic import write_json  # noqa: E402
from retina_sets import hrf_test_ids, link_drive_chase  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# held-out evaluations per task: (title, dataset folder under DATA_ROOT, split or None, what it proves)
EVALS = {
    "retina": [
        ("DRIVE test (20 images, observer 1, inside the FOV)", "retina/DRIVE", "test", "in-domain, unseen patients"),
        ("CHASE_DB1 test (children 11-14, 8 images, 1st observer)", "retina/CHASE_DB1", "test",
         "the second training camera (Nidek, 999x960), children never seen (01-10 are in training)"),
        ("HRF test half (Canon CR-1, 21 images: healthy, glaucoma, diabetic retinopathy)", "retina/HRF", "hrf-test",
         "a third camera never used in training"),
    ],
    "lung_nodule": [
        ("LIDC-IDRI slices, test patients (125 nodules; consensus of the readers who marked each nodule)",
         "lung/LIDC-IDRI-slices", "test", "unseen patients, 8-bit crops"),
        ("LIDC-IDRI chest-CT slabs in HU (patients 0001-0003, full seed-point pipeline)",
         "lung/LIDC-IDRI_c2c_slabs", "all", "the real input (HU, native geometry) on test patients"),
        ("LIDC-IDRI slices of patients 0251-0500 (215 other patients, 629 nodules; never used in training)",
         "lung/LIDC-IDRI-slices_0251-0500", "all", "other patients (LIDC-IDRI pools seven academic centres)"),
    ],
    "liver": [
        ("RadCTTACEomics 3-fold cross-validation by case (each case segmented by the fold models that "
             "never saw it)", "liver/RadCTTACEomics", "cross-validation",
         "patients never seen in training or checkpoint selection; the shipped pair is trained on all nine with the "
         "same recipe"),
    ],
}
MAX_CASES_KEPT = 40   # evaluations with more cases keep their means only (in the model files and evaluation.json)
# the original dataset holding each task's validation cases (kdseg calibrate); retina's are in DRIVE_CHASE, a folder
# of links made by scripts/retina_sets.py
CALIBRATION_DATA = {"retina": "DRIVE_CHASE", "lung_nodule": "lung/LIDC-IDRI-slices"}
LICENSES = {
    "retina": "DRIVE training set (research use; not redistributed) and CHASE_DB1 children 01-10 (CC BY 4.0) for "
              "training: two cameras. DRIVE test, CHASE_DB1 children 11-14 and the HRF test half (research use; "
              "Budai et al. 2013) only for testing; HRF's training half, without its labels, for the locally "
              "distilled variant.",
    "lung_nodule": "LIDC-IDRI (TCIA, CC BY 3.0; Armato et al., Med Phys 2011). Crops from the public "
                   "LIDC-IDRI-slices collection; HU slabs of patients 0001-0003.",
    "liver": "RadCTTACEomics sample cases (license unverified: internal evaluation only; the images are not "
             "redistributed, only the weights trained on them). Students also learn from seven unlabelled CTs of "
             "HCC-TACE-Seg (TCIA, MD Anderson, CC BY 4.0; Moawad et al. 2021, doi:10.7937/TCIA.5FNA-0924) through "
             "the teacher alone.",
}


def totalsegmentator_example(path, data_root, threads):
    """Liver on the TotalSegmentator example CT (another hospital/scanner, 3 mm); its reference is that model's
    output (label 5), not a manual mask, so this row is a generalisation check, not an accuracy claim."""
    import SimpleITK as sitk

    from KDSegmentationLib.io.images import read_image
    from KDSegmentationLib.inference.device import pick_device
    from KDSegmentationLib.inference.segment import load_task_model, segment_image
    from KDSegmentationLib.evaluation.metrics import mean_metrics, segmentation_metrics
    from KDSegmentationLib.tasks import get_task

    folder = data_root / "liver" / "TotalSegmentator_example"
    if not folder.is_dir():
        return None
    import torch

    torch.set_num_threads(threads)
    task = get_task("liver")
    image = read_image(str(folder / "example_ct_sm.nii.gz"))
    ref = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz"))) == 5).astype("uint8")
    res = segment_image(image, task, load_task_model(task, str(path), pick_device("cpu")), pick_device("cpu"))
    pred = (sitk.GetArrayFromImage(res.labelmap) >= 1).astype("uint8")  # liver incl. tumour vs organ reference
    m = segmentation_metrics(pred, ref, image.GetSpacing(), {1: "Liver"})
    return {"title": "TotalSegmentator example CT (other hospital; reference = TotalSegmentator output, label 5)",
            "data": "liver/TotalSegmentator_example", "split": "all", "n_cases": 1,
            "why": "generalisation check only", "mean": mean_metrics([m]),
            "cases": [{"case": "example_ct_sm", "metrics": m}]}


def cross_validation(task, role, data_root, runs, threads, folds=3):
    """Each fold's model (``RUNS/<task>_cv/fold<k>/<task>_<role>.kdseg.pt``, from ``train_all.sh liver_cv``) on the
    cases its card lists as held out; the mean is over all cases of all folds. None when a fold model is missing."""
    from KDSegmentationLib.evaluation.metrics import mean_metrics
    from KDSegmentationLib.models.files import read_header

    if runs is None:
        return None
    paths = [runs / f"{task}_cv" / f"fold{k}" / f"{task}_{role}.kdseg.pt" for k in range(folds)]
    if not all(p.is_file() for p in paths):
        print(f"skip cross-validation of {task}_{role}: fold models missing under {runs}", flush=True)
        return None
    cases, folds_out, seconds = [], [], 0.0
    for k, path in enumerate(paths):
        held_out = read_header(path)["card"]["split"]["val_cases"]
        res = evaluate_dataset(task, str(data_root / "liver" / "RadCTTACEomics"), model=str(path), device="cpu",
                               split="all", threads=threads, case_ids=held_out)
        seconds += res.get("seconds", 0.0)
        for c in res["cases"]:
            cases.append(dict(c, fold=k))
        folds_out.append({"fold": k, "cases": held_out, "mean": res["mean"]})
        print(f"cross-validation {task}_{role} fold {k}: {held_out}", flush=True)
    return {"task": task, "data": "liver/RadCTTACEomics", "split": "3-fold cross-validation", "n_cases": len(cases),
            "model_role": role, "device": "cpu", "seconds": round(seconds, 1), "folds": folds_out,
            "mean": mean_metrics([c["metrics"] for c in cases]), "cases": cases}


def _per_case_dice(result, label="Liver"):
    return {c["case"]: c["metrics"][label]["dice"] for c in result["cases"]}


def _fold_ts_dice(role, data_root, runs, threads, folds=3):
    """Liver Dice of each fold model on the TotalSegmentator example CT (another hospital); None for a fold whose
    model is missing."""
    out = []
    for k in range(folds):
        path = runs / "liver_cv" / f"fold{k}" / f"liver_{role}.kdseg.pt"
        res = totalsegmentator_example(path, data_root, threads) if path.is_file() else None
        out.append(res["cases"][0]["metrics"]["Liver"]["dice"] if res else None)
    return out


# comparison students of the liver cross-validation (train_all.sh step liver_<role>): (heading, what differs,
# the shipped student's row, the comparison's row)
LIVER_COMPARISONS = {
    "student_no_unlabelled": (
        "Liver: distillation on unlabelled CTs of another hospital",
        "distilled with and without the seven unlabelled contrast CTs of HCC-TACE-Seg (another hospital; a quarter "
        "of each batch, learnt from the teacher alone)",
        "with the unlabelled CTs (shipped recipe)", "without them"),
    "student_instance_norm": (
        "Liver: batch against instance normalisation in the student",
        "with batch normalisation (folded into the convolutions at inference) and with instance normalisation "
        "(the teacher's; statistics of each input, so no training statistics to be wrong on another hospital's "
        "CT), both with the unlabelled CTs",
        "batch normalisation (shipped)", "instance normalisation"),
}


def liver_student_comparison(shipped_cv, shipped_ts, role, data_root, runs, threads):
    """The liver student's cross-validation (``shipped_cv``) against a comparison student of each fold trained with
    one change (``RUNS/liver_cv/fold<k>/liver_<role>.kdseg.pt``, :data:`LIVER_COMPARISONS`): per-case Dice of both,
    and each fold model's Dice on the TotalSegmentator example CT (the shipped fold students': ``shipped_ts``, from
    :func:`_fold_ts_dice`); None when the comparison models are missing."""
    other = cross_validation("liver", role, data_root, runs, threads)
    if not (other and shipped_cv):
        return None
    shipped, variant = _per_case_dice(shipped_cv), _per_case_dice(other)
    diffs = [shipped[c] - variant[c] for c in shipped]
    return {"role": role, "cases": sorted(shipped), "dice_shipped": shipped, "dice_variant": variant,
            "mean_shipped": statistics.mean(shipped.values()), "mean_variant": statistics.mean(variant.values()),
            "mean_difference": statistics.mean(diffs), "sd_difference": statistics.stdev(diffs),
            "other_hospital_shipped": shipped_ts,
            "other_hospital_variant": _fold_ts_dice(role, data_root, runs, threads)}


def calibration_folder(task, data_root):
    """The folder holding ``task``'s validation cases; retina's links are made under the system's temp folder."""
    if task != "retina":
        return data_root / CALIBRATION_DATA[task]
    import tempfile

    return link_drive_chase(data_root / "retina", Path(tempfile.gettempdir()) / "kdseg_retina_sets" / "DRIVE_CHASE")


def calibrated_evaluation(task, path, data_root, threads):
    """A comparison run (ablation arm, labels-only student) on the task's first held-out set, at its own
    validation-calibrated threshold like the shipped models: a KD student inherits its teacher's calibration, so
    comparing both at 0.5 would not be fair. The threshold is stored in the run's file."""
    from KDSegmentationLib.evaluation.calibrate import calibrate, store_threshold

    store_threshold(str(path), calibrate(str(path), str(calibration_folder(task, data_root)), threads=threads))
    _, rel, split, _ = EVALS[task][0]
    return evaluate_dataset(task, str(data_root / rel), model=str(path), device="cpu", split=split, threads=threads)


def _mean(result, label, metric):
    m = result["mean"].get(label, {}).get(metric, {})
    return m.get("mean"), m.get("sd"), m.get("n")


def evaluate_model(task, path, data_root, threads, header, runs=None):
    out = []
    for title, rel, split, why in EVALS[task]:
        folder = data_root / rel
        if not folder.is_dir():
            print(f"skip {title}: {folder} not found", flush=True)
            continue
        if split == "cross-validation":
            res = cross_validation(task, header["role"], data_root, runs, threads)
            if res:
                res["title"], res["why"] = title, why
                out.append(res)
            continue
        kwargs = {}
        if split == "card-val":
            kwargs["case_ids"] = header["card"]["split"]["val_cases"]
            split = "all"
        elif split == "hrf-test":
            kwargs["case_ids"], split = hrf_test_ids(data_root / "retina"), "all"
        t0 = time.perf_counter()
        res = evaluate_dataset(task, str(folder), model=str(path), device="cpu", split=split, threads=threads,
                               **kwargs)
        res["title"], res["why"] = title, why
        res["data"] = rel
        print(f"{path.name:34s} {title[:60]:60s} {time.perf_counter() - t0:6.1f}s", flush=True)
        out.append(res)
    return out


def _compact(result, max_cases=MAX_CASES_KEPT):
    """An evaluation without its per-case list when it has more than ``max_cases`` cases: the cards use per-case
    numbers only for the liver (nine cases), and hundreds of nodules would make each model file mostly metadata."""
    if len(result.get("cases", [])) <= max_cases:
        return result
    return {k: v for k, v in result.items() if k != "cases"}


def _fmt(v, sd=None, pct=False):
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if sd is not None:
        s += f" ± {sd:.3f}"
    return s


def _threshold_line(header):
    cal = header["card"].get("calibration")
    if not cal:
        return []
    by_t = dict(zip(cal["thresholds"], cal["mean_dice"]))
    at_half = f" (at 0.5: {by_t[0.5]:.3f})" if 0.5 in by_t else ""
    if "standard_error" not in cal:
        return [f"- decision threshold: {cal['best_threshold']} — the best mean Dice on its {cal['n_cases']} "
                f"validation cases, {cal['best_dice']:.3f}{at_half} (`kdseg calibrate`, `train_all.sh calibrate`)"]
    top_t = max(by_t, key=lambda t: by_t[t])
    return [f"- decision threshold: {cal['best_threshold']} — mean Dice {cal['best_dice']:.3f} on its "
            f"{cal['n_cases']} validation cases; the top is {cal['top_dice']:.3f} at {top_t}, standard error "
            f"{cal['standard_error']:.3f}: the threshold nearest 0.5 within one standard error of the top is kept "
            "(`kdseg calibrate`, `train_all.sh calibrate`)"]


def _withheld_lines(header):
    withheld = (header.get("preprocessing") or {}).get("withheld_labels") or {}
    names = {str(k): v for k, v in header.get("labels", {}).items()}
    return [f"- not offered: {names.get(value, value)} — {reason}; the segment is never shown, its voxels count as "
            f"the organ (`scripts/withhold_labels.py`)" for value, reason in sorted(withheld.items())]


def _cv_case_lines(res):
    """A cross-validation's per-case liver numbers and its lesion-by-lesion detection, under the model's table."""
    if res.get("split") != "3-fold cross-validation":
        return []
    cells = [f"{c['case'].rsplit('_', 1)[-1]} {c['metrics']['Liver']['dice']:.3f} "
             f"(precision {c['metrics']['Liver']['precision']:.2f})" for c in res["cases"]]
    lines = ["", "Liver Dice per cross-validation case: " + ", ".join(cells) + "."]
    det = pooled_detection([c["metrics"] for c in res["cases"]], "Liver tumor")
    if det["cases"]:
        lines.append(f"Liver tumour, lesion by lesion (before withholding): {det['detected_10mm']} of "
                     f"{det['lesions_10mm']} lesions >= 10 mm found, {det['false_positives_per_case']:.1f} false "
                     f"positive lesions per case.")
    return lines


def _teacher_student_lines(entries):
    """Does each teacher know more than its student? Dice of both on every held-out set, side by side."""
    by_name = {e["name"]: e for e in entries}
    rows = []
    for task in EVALS:
        teacher, student = by_name.get(f"{task}_teacher"), by_name.get(f"{task}_student")
        if not (teacher and student):
            continue
        for t_res, s_res in zip(teacher["evaluations"], student["evaluations"]):
            lab = next(iter(s_res["mean"]))
            t, s = _mean(t_res, lab, "dice")[0], _mean(s_res, lab, "dice")[0]
            if t is None or s is None:
                continue
            rows.append(f"| {task} | {s_res['title']} | {t:.3f} | {s:.3f} | {100 * (t - s):+.1f} |")
    if not rows:
        return []
    return ["## Teachers against their students", "",
            "A teacher teaches only what it knows better than its student: Dice of both on the same held-out data "
            "(first label of each task).", "",
            "| task | held-out data | teacher | student | teacher - student (points) |", "|---|---|---|---|---|",
            *rows, ""]


def _liver_comparison_lines(cmp):
    heading, change, shipped_row, variant_row = LIVER_COMPARISONS[cmp["role"]]
    per_case = ", ".join(f"{c.rsplit('_', 1)[-1]} {cmp['dice_shipped'][c]:.3f}/{cmp['dice_variant'][c]:.3f}"
                         for c in cmp["cases"])
    folds = lambda key: ", ".join("n/a" if v is None else f"{v:.3f}" for v in cmp.get(key, []))  # noqa: E731
    return [f"## {heading}", "",
            f"The liver student of each cross-validation fold {change}; all else equal (teacher, recipe, budget, "
            f"seed: `train_all.sh liver_student` and `liver_{cmp['role']}`). Liver Dice on the nine "
            "cross-validation cases, and of each fold's student on the TotalSegmentator example CT (a third "
            "hospital; its reference is that model's output).", "",
            "| student | cross-validation Dice | TotalSegmentator example, fold 0, 1, 2 |", "|---|---|---|",
            f"| {shipped_row} | {cmp['mean_shipped']:.3f} | {folds('other_hospital_shipped')} |",
            f"| {variant_row} | {cmp['mean_variant']:.3f} | {folds('other_hospital_variant')} |", "",
            f"Cross-validation difference per case, shipped minus comparison: {100 * cmp['mean_difference']:+.1f} ± "
            f"{100 * cmp['sd_difference']:.1f} points ({shipped_row.split(' (')[0]}/{variant_row}: {per_case}).", ""]


def card_markdown(entries, ablations, local, budgets=None, full_budget=None, liver_comparisons=None):
    lines = ["# Model cards", "",
             "Generated by `python scripts/evaluate_models.py --data DATA_ROOT --runs RUNS_DIR` from the model files "
             "in this folder; nothing here is typed by hand. Accuracy is on data the model never saw in training "
             "or checkpoint selection, through the same pipeline as `kdseg segment` (original image grid). Mean ± sd "
             "over cases. Speed: see `benchmarks/results/benchmarks.md`.", "",
             "All models were trained on a 2-core CPU (no GPU) with short time budgets: "
             "`bash scripts/train_all.sh all DATA_ROOT OUT` (DATA_ROOT holds the datasets or their "
             "`kdseg prepare` caches: RadCT, HCC_TACE, LIDC; DRIVE_CHASE and HRF_unlabelled from "
             "`scripts/retina_sets.py`). The exact command of each model is below and in its file "
             "(`kdseg models show NAME`). The 2D teachers were shrunk to about 2M parameters "
             "to train on a CPU; with a GPU, raise the budgets (MINUTES_SCALE) and the teachers' width.", "",
             "Liver: nine cases are few, so the accuracy reported is a 3-fold cross-validation by case "
             "(`train_all.sh liver_cv 0 1 2`: each fold's teacher and student are trained on six cases and never "
             "see the other three, not even for checkpoint selection); the shipped pair is then trained with the "
             "same recipe on all nine (`train_all.sh liver`); its student also learns from seven unlabelled CTs of "
             "another hospital through the teacher alone. The liver is scored as the organ with the tumours inside it, "
             "as LiTS scores it and as the panel shows it while the tumour segment is withheld; tumours are scored "
             "voxel by voxel and lesion by lesion. The shipped pair is checked on the TotalSegmentator example CT from "
             "another hospital and contrast phase.", ""]
    for e in entries:
        h, card = e["header"], e["header"]["card"]
        rec = card.get("recipe", {})
        lines += [f"## {e['name']}", "",
                  f"- task: `{h['task']}`, role: {h['role']}, architecture `{h['arch']}` "
                  f"{json.dumps(h['arch_args'])}",
                  f"- parameters: {card.get('parameters')}, file: {e['file_mb']:.2f} MB (fp16 weights)",
                  f"- training data: {LICENSES[h['task']]}",
                  f"- split: train {len(card.get('split', {}).get('train_cases', []))} cases, validation "
                  f"{len(card.get('split', {}).get('val_cases', []))}, held-out test "
                  f"{len(card.get('split', {}).get('held_out_test_cases', []))} "
                  f"(split seed {card.get('split', {}).get('split_seed')}, fold {card.get('split', {}).get('fold')})",
                  f"- recipe: losses `{rec.get('losses')}`"
                  + (f" (α {rec.get('alpha')}, T {rec.get('temperature')})" if 'kd' in str(rec.get('losses')) else "")
                  + f", {rec.get('steps')} steps of {rec.get('batch_size')} x {rec.get('patch')}, AdamW lr "
                    f"{rec.get('lr')}, {rec.get('schedule')}, {card.get('training_time_s')} s on {card.get('device')}"
                  + (f"; teacher `{Path(card['teacher']['path']).name if isinstance(card.get('teacher'), dict) and card['teacher'].get('path') else card.get('teacher')}`" if card.get("teacher") else ""),
                  *_threshold_line(h),
                  *_withheld_lines(h),
                  f"- reproduce: `bash scripts/train_all.sh {'liver' if h['task'] == 'liver' else e['name']} DATA_ROOT "
                  f"OUT` (after its teacher, for a student), which ran: `{card.get('command')}`", ""]
        lines += ["| held-out data | n | Dice | Jaccard | precision | recall | AP | AUC | HD95 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for res in e["evaluations"]:
            for lab in res["mean"]:
                d, sd, n = _mean(res, lab, "dice")
                row = [f"{res['title']} — {lab}", str(n), _fmt(d, sd)]
                for metric in ("jaccard", "precision", "recall", "average_precision", "auc", "hd95_mm"):
                    v, s, _ = _mean(res, lab, metric)
                    row.append(_fmt(v))
                lines.append("| " + " | ".join(row) + " |")
        for res in e["evaluations"]:
            lines += _cv_case_lines(res)
        lines.append("")
    if ablations:
        lines += ["## Does knowledge distillation earn its place?", "",
                  "Same student architecture, same data, budget and seeds, trained on the labels alone (`seg`) or "
                  "distilled from the teacher (`kd`: (1-α)·(Dice+CE) + α·T²·KL, α 0.5, T 2), each run at its own "
                  "decision threshold calibrated on the validation cases (`kdseg calibrate`). Short budgets "
                  "(`scripts/train_all.sh ablation`), so absolute numbers are below the shipped students'. "
                  "Dice on the first held-out set of each task.", "",
                  "| task | budget per run | method | seeds | Dice mean ± sd | per seed |",
                  "|---|---|---|---|---|---|"]
        for task, rows in ablations.items():
            for method, vals in rows.items():
                mean = statistics.mean(vals) if vals else None
                sd = statistics.stdev(vals) if len(vals) > 1 else None
                lines.append(f"| {task} | {(budgets or {}).get(task, '?')} min | {method} | {len(vals)} | "
                             f"{_fmt(mean, sd)} | "
                             + ", ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
        for task, rows in ablations.items():
            if rows.get("seg") and rows.get("kd"):
                gain = 100 * (statistics.mean(rows["kd"]) - statistics.mean(rows["seg"]))
                verdict = "KD helps" if gain >= 1.0 else "KD does not earn its place at this budget"
                lines.append(f"- {task}: KD {gain:+.1f} Dice points against the labels alone — {verdict}.")
        lines.append("")
    if full_budget:
        shipped = {e["name"]: e for e in entries}
        notes = []
        lines += ["At the full budget (one seed, `train_all.sh labels_only TASK`): the shipped KD student against "
                  "the same architecture trained on the labels alone for the same time, both calibrated.", "",
                  "| task | held-out data | KD student (shipped) | labels only |", "|---|---|---|---|"]
        for task, res in full_budget.items():
            lab = next(iter(res["mean"]))
            kd_res = shipped.get(f"{task}_student", {}).get("evaluations", [{}])[0]
            kd_dice = kd_res.get("mean", {}).get(lab, {}).get("dice", {}).get("mean") if kd_res else None
            lines.append(f"| {task} | {res['title']} | {_fmt(kd_dice)} | {_fmt(_mean(res, lab, 'dice')[0])} |")
            if kd_dice is not None:
                diff = 100 * (kd_dice - _mean(res, lab, "dice")[0])
                notes.append(f"- {task}: KD student {diff:+.1f} Dice points against labels only at the full budget"
                             + (" — within one point, i.e. no measurable effect of KD with one seed; the shipped "
                                "student stays the KD student." if abs(diff) < 1.0 else "."))
        lines += [""] + notes + [""]
    lines += _teacher_student_lines(entries)
    for cmp in (liver_comparisons or {}).values():
        lines += _liver_comparison_lines(cmp)
    if local:
        lines += ["## Local distillation at a new site (retina, HRF without its labels)", "",
                  "HRF (Canon CR-1) plays a hospital with its own camera. The shipped retina student was distilled "
                  "further from the shipped teacher on the 24 photographs of HRF's training half with their labels "
                  "hidden, half of each batch, the labelled training photographs the other half (`train_all.sh "
                  "local_distill`: `kdseg distill --unlabelled ... --init retina_student`, 12 CPU minutes), then "
                  "evaluated on the 21 photographs of HRF's test half, which it never saw.", "",
                  "| model | HRF test half Dice | precision | recall | AUC |", "|---|---|---|---|---|"]
        dice = []
        for name, res in local.items():
            lab = next(iter(res["mean"]))
            mean, sd, _ = _mean(res, lab, "dice")
            dice.append(mean)
            lines.append(f"| {name} | {_fmt(mean, sd)} | {_fmt(_mean(res, lab, 'precision')[0])} "
                         f"| {_fmt(_mean(res, lab, 'recall')[0])} | {_fmt(_mean(res, lab, 'auc')[0])} |")
        if len(dice) == 2 and None not in dice:
            lines += ["", f"Local distillation: {100 * (dice[1] - dice[0]):+.1f} Dice points on the new site's "
                          "held-out photographs (bar: +2)."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--runs", type=Path, help="output folder of scripts/train_all.sh (ablation, local distillation)")
    p.add_argument("--models", type=Path, default=REPO / "Resources" / "Models")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-update", action="store_true", help="do not write the metrics into the model files")
    p.add_argument("--reuse", action="store_true",
                   help="keep the held-out metrics already stored in a model file's card instead of recomputing")
    args = p.parse_args(argv)

    from KDSegmentationLib.models.files import load_model, read_header, save_model

    entries = []
    for task in EVALS:
        for role in ("teacher", "student"):
            path = args.models / f"{task}_{role}.kdseg.pt"
            if not path.is_file():
                print(f"missing {path}", flush=True)
                continue
            header = read_header(path)
            stored = header["card"].get("evaluation_full")
            if args.reuse and stored and [r["title"] for r in stored][:len(EVALS[task])] == [t for t, *_ in EVALS[task]]:
                evals = stored
                print(f"{path.name}: stored evaluation kept", flush=True)
            else:
                evals = evaluate_model(task, path, args.data, args.threads, header, args.runs)
                if task == "liver":
                    extra = totalsegmentator_example(path, args.data, args.threads)
                    if extra:
                        evals.append(extra)
            entries.append({"name": path.name[:-len(".kdseg.pt")], "header": header,
                            "evaluations": [_compact(r) for r in evals]})
    ablations, local, budgets, full_budget = {}, {}, {}, {}
    if args.runs:
        for task in ("retina", "lung_nodule"):
            folder = args.runs / f"ablation_{task}"
            rows = {}
            for method in ("seg", "kd"):
                vals = []
                for seed in range(10):
                    f = folder / f"{method}_seed{seed}.kdseg.pt"
                    if f.is_file():
                        budgets.setdefault(task, read_header(f)["card"].get("recipe", {}).get("max_minutes"))
                        res = calibrated_evaluation(task, f, args.data, args.threads)
                        lab = next(iter(res["mean"]))
                        vals.append(res["mean"][lab]["dice"]["mean"])
                        print(f"ablation {task} {method} seed {seed}: {vals[-1]:.4f}", flush=True)
                if vals:
                    rows[method] = vals
            if rows:
                ablations[task] = rows
        for task in ("retina", "lung_nodule"):
            f = args.runs / f"{task}_student_labels_only.kdseg.pt"
            if f.is_file():
                res = calibrated_evaluation(task, f, args.data, args.threads)
                res["title"] = EVALS[task][0][0]
                full_budget[task] = res
                print(f"labels only {task}: {next(iter(res['mean'].values()))['dice']['mean']:.4f}", flush=True)
        local_model = args.runs / "retina_student_local_hrf.kdseg.pt"
        if local_model.is_file():
            for name, f in (("retina_student (shipped)", args.models / "retina_student.kdseg.pt"),
                            ("retina_student + local distillation on HRF (unlabelled)", local_model)):
                local[name] = evaluate_dataset("retina", str(args.data / "retina/HRF"), model=str(f), device="cpu",
                                               split="all", threads=args.threads,
                                               case_ids=hrf_test_ids(args.data / "retina"))
    liver_comparisons = {}
    liver_cv = [r for e in entries if e["name"] == "liver_student" for r in e["evaluations"]
                if r.get("split") == "3-fold cross-validation"]
    shipped_ts = _fold_ts_dice("student", args.data, args.runs, args.threads) if args.runs and liver_cv else None
    for role in LIVER_COMPARISONS if shipped_ts is not None else ():
        cmp = liver_student_comparison(liver_cv[0], shipped_ts, role, args.data, args.runs, args.threads)
        if cmp:
            liver_comparisons[role] = cmp
    if args.reuse:  # sections whose runs are not at hand keep their committed numbers
        stored = json.loads((args.models / "evaluation.json").read_text(encoding="utf-8"))
        ablations = {**stored.get("ablation", {}), **ablations}   # per task: a task's new runs replace its old
        budgets = {**stored.get("ablation_minutes_per_run", {}), **budgets}
        full_budget = {**stored.get("labels_only_full_budget", {}), **full_budget}
        local = local or {k: {"mean": v} for k, v in stored.get("local_distillation", {}).items()}
        liver_comparisons = {**stored.get("liver_comparisons", {}), **liver_comparisons}
    for e in entries:
        path = args.models / f"{e['name']}.kdseg.pt"
        if not args.no_update:
            loaded = load_model(path)
            h = loaded.header
            card = dict(h["card"])
            card["evaluation"] = [{"title": r["title"], "data": r["data"], "split": r["split"],
                                   "n_cases": r["n_cases"], "mean": r["mean"]} for r in e["evaluations"]]
            card["evaluation_full"] = e["evaluations"]  # per case too, so that the cards can be rebuilt
            save_model(path, loaded.network, arch=h["arch"], arch_args=h["arch_args"], task=h["task"],
                       role=h["role"], version=h.get("version", "1"), preprocessing=h.get("preprocessing"),
                       labels={int(k): v for k, v in h.get("labels", {}).items()}, card=card)
            e["header"] = read_header(path)
        e["file_mb"] = path.stat().st_size / 1e6
    summary = {"machine": {"python": platform.python_version(), "platform": platform.platform()},
               "models": [{"name": e["name"], "evaluations": e["evaluations"]} for e in entries],
               "ablation": ablations, "ablation_minutes_per_run": budgets,
               "labels_only_full_budget": {k: {"title": v["title"], "mean": v["mean"]} for k, v in full_budget.items()},
               "local_distillation": {k: v["mean"] for k, v in local.items()},
               "liver_comparisons": liver_comparisons}
    write_json(args.models / "evaluation.json", summary)
    cards = card_markdown(entries, ablations, local, budgets, full_budget, liver_comparisons)
    (args.models / "MODEL_CARDS.md").write_text(cards, encoding="utf-8")
    print(f"wrote {args.models / 'MODEL_CARDS.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
