"""Model cards travel with model files: no absolute path of the machine that trained them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from KDSegmentationLib.models.files import read_header
from KDSegmentationLib.training.report import portable

ABSOLUTE = re.compile(r"""(?<![\w.:/])(/(home|work|tmp|Users|root|mnt|data)/|[A-Za-z]:\\|~/)""")


@pytest.mark.parametrize("text, expected", [
    ("kdseg distill --data /home/ann/data/DRIVE --teacher /srv/t.kdseg.pt --losses kd=1,hint=0.5",
     "kdseg distill --data DRIVE --teacher t.kdseg.pt --losses kd=1,hint=0.5"),
    ("--data=/a/b/LIDC", "--data=LIDC"),
    (r"C:\Users\ann\scans\case1.nrrd", "case1.nrrd"),
    ("~/data/x.nii.gz", "x.nii.gz"),
    ("1/2 of w/o and https://x.org/a/b", "1/2 of w/o and https://x.org/a/b"),
])
def test_absolute_paths_are_cut_to_their_last_part(text, expected):
    assert portable(text) == expected


def test_nested_cards_are_cleaned_everywhere():
    card = {"data": {"train": "/work/x/DRIVE", "source": ["/tmp/a/b.nrrd"]}, "seed": 3, "command": None}
    assert portable(card) == {"data": {"train": "DRIVE", "source": ["b.nrrd"]}, "seed": 3, "command": None}


@pytest.mark.parametrize("model", sorted((REPO / "Resources" / "Models").glob("*.kdseg.pt")), ids=lambda p: p.name)
def test_shipped_cards_and_reports_hold_no_absolute_paths(model: Path):
    assert not ABSOLUTE.search(json.dumps(read_header(model)["card"]))
    assert not ABSOLUTE.search(Path(str(model) + ".report.json").read_text())
