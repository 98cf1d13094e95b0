#!/usr/bin/env python
"""Draws the shipped students' results on the bundled samples (one panel per task) into a PNG for the README and
the extension listing.

    python scripts/make_results_figure.py [--output docs/screenshots/results.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "KDSegmentation"))

import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "screenshots" /
                   "results.png")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from KDSegmentationLib.cli.segment import run_segment
    from KDSegmentationLib.io.samples import write_sample
    from KDSegmentationLib.tasks import get_task

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    with tempfile.TemporaryDirectory() as tmp:
        for ax, task_name in zip(axes, ("liver", "lung_nodule", "retina")):
            task = get_task(task_name)
            info = write_sample(task_name, Path(tmp))
            out = Path(tmp) / f"{task_name}.nii.gz"
            summary = run_segment(task_name, info["path"], str(out), seed_ras=info.get("seed_ras"), threads=2)
            img, lab = sitk.ReadImage(info["path"]), sitk.ReadImage(str(out))
            if task.input_kind != "2d-rgb":  # radiological view: anterior up, patient's right on the left
                img, lab = sitk.DICOMOrient(img, "LPS"), sitk.DICOMOrient(lab, "LPS")
            img, lab = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
            if task.input_kind == "2d-rgb":
                base, lab2 = img.reshape(img.shape[-3:]), lab.reshape(img.shape[-3:-1])
            else:
                k = int(np.argmax((lab > 0).sum(axis=(1, 2)))) if lab.any() else lab.shape[0] // 2
                base = np.clip((img[k].astype(float) + 1000) / 1400, 0, 1)
                lab2 = lab[k]
            ax.imshow(base, cmap="gray" if base.ndim == 2 else None)
            for label in task.labels:
                mask = np.ma.masked_where(lab2 != label.value, np.ones_like(lab2, float))
                ax.imshow(mask, cmap=matplotlib.colors.ListedColormap([np.array(label.color) / 255]), alpha=0.55,
                          vmin=0, vmax=1)
            seg = "; ".join(f"{n}: {s.get('volume_ml', s.get('area_px'))}{' mL' if 'volume_ml' in s else ' px'}"
                            for n, s in summary["segments"].items())
            ax.set_title(f"{task.title}\n{seg}\nstudent, {summary['timings_s']['total']:.2f} s on 2 CPU threads",
                         fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
