#!/usr/bin/env python
"""The retina training and new-site sets, as folders of links to the original photographs (nothing is copied).

    python scripts/retina_sets.py SHARED_RETINA DATA_ROOT   # DATA_ROOT/DRIVE_CHASE, DATA_ROOT/HRF_unlabelled

- DRIVE_CHASE: the 20 DRIVE training photographs and CHASE_DB1 children 01-10 (20 photographs), two cameras
  (Canon CR5 45 degrees, Nidek NM-200-D 30 degrees), in the generic layout (images/, labels/, fov/). CHASE_DB1
  children 11-14 stay the held-out CHASE test set; DRIVE's test set stays held out.
- HRF_unlabelled: the 24 photographs of HRF's own "training" half (Canon CR-1), images only: a new site's unlabelled
  photographs for local distillation. Its "test" half (:func:`hrf_test_ids`) is the labelled held-out half.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List

CHASE_TRAIN_CHILDREN = [f"{n:02d}" for n in range(1, 11)]


def hrf_ids(retina_root: Path, split_in_source: str) -> List[str]:
    """HRF case ids of one half of its source split ('training' or 'test'), from HRF/cases.json."""
    cases = json.loads((Path(retina_root) / "HRF" / "cases.json").read_text(encoding="utf-8"))
    return [c["id"] for c in cases if c["split_in_source"] == split_in_source]


def hrf_test_ids(retina_root: Path) -> List[str]:
    return hrf_ids(retina_root, "test")


def _link(target: Path, link: Path) -> None:
    if not os.path.lexists(link):
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(target), link)


def link_drive_chase(retina_root: Path, out: Path) -> Path:
    """DRIVE training + CHASE_DB1 children 01-10 under ``out`` (images/, labels/, fov/); returns ``out``."""
    drive, chase = Path(retina_root) / "DRIVE" / "training", Path(retina_root) / "CHASE_DB1"
    for image in sorted((drive / "images").iterdir()):
        n = image.name.split("_")[0]
        _link(image, out / "images" / f"drive_{n}.tif")
        _link(drive / "1st_manual" / f"{n}_manual1.gif", out / "labels" / f"drive_{n}.gif")
        _link(drive / "mask" / f"{n}_training_mask.gif", out / "fov" / f"drive_{n}.gif")
    for n in CHASE_TRAIN_CHILDREN:
        for eye in "LR":
            _link(chase / "images" / f"Image_{n}{eye}.jpg", out / "images" / f"chase_{n}{eye}.jpg")
            _link(chase / "manual" / f"Image_{n}{eye}_1stHO.png", out / "labels" / f"chase_{n}{eye}.png")
    return out


def link_hrf_unlabelled(retina_root: Path, out: Path) -> Path:
    """The photographs of HRF's training half, without masks, under ``out``; returns ``out``."""
    for case in hrf_ids(retina_root, "training"):
        _link(Path(retina_root) / "HRF" / "images" / f"{case}.jpg", out / f"{case}.jpg")
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    retina_root, data_root = Path(args[0]), Path(args[1])
    link_drive_chase(retina_root, data_root / "DRIVE_CHASE")
    link_hrf_unlabelled(retina_root, data_root / "HRF_unlabelled")
    print(",".join(hrf_test_ids(retina_root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
