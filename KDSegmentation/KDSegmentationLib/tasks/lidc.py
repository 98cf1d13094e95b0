"""The LIDC-IDRI slice-crop dataset of the lung nodule task: nodules, readers' masks and their consensus, the
patient split.

Training data are the LIDC-IDRI nodule crops (``LIDC-IDRI-XXXX/nodule-Y/{images,mask-0..3}/slice-Z.png``): stacks of
consecutive native axial slices, 128 x 128 pixels at the scan's native pixel spacing, centred on the nodule, 8-bit
(see :mod:`KDSegmentationLib.tasks.lung_nodule` for their orientation and intensities).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import InputError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class NoduleRecord:
    """One nodule of the LIDC-IDRI slice dataset.

    ``slice_paths``: the ``images/slice-Z.png`` files sorted by Z (inferior -> superior, consecutive native slices).
    ``reader_mask_dirs``: the ``mask-R`` folders present, sorted by R; a missing folder is a reader who did not mark it.
    """

    patient_id: str
    nodule_id: str
    slice_paths: Tuple[Path, ...]
    reader_mask_dirs: Tuple[Path, ...]


def _number(name: str) -> int:
    """Trailing integer of a file or folder name ('slice-12.png' -> 12), so that 10 sorts after 9."""
    m = re.search(r"(\d+)(?:\.\w+)?$", name)
    return int(m.group(1)) if m else -1


def iter_lidc_nodules(root) -> List[NoduleRecord]:
    """All nodules under ``root`` (the ``LIDC-IDRI-slices`` folder, or a folder that contains it).

    Returns records sorted by patient ID then nodule number. Nodules without image slices are skipped.
    """
    root = Path(root)
    if (root / "LIDC-IDRI-slices").is_dir():
        root = root / "LIDC-IDRI-slices"
    if not root.is_dir():
        raise InputError(f"LIDC-IDRI slice folder not found: {root}; pass the folder that holds LIDC-IDRI-XXXX/")
    records = []
    for pdir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("LIDC-IDRI-")):
        for ndir in sorted((n for n in pdir.iterdir() if n.is_dir() and n.name.startswith("nodule-")),
                           key=lambda n: _number(n.name)):
            slices = sorted((ndir / "images").glob("slice-*.png"), key=lambda f: _number(f.name))
            if not slices:
                continue
            masks = sorted((m for m in ndir.glob("mask-*") if m.is_dir()), key=lambda m: _number(m.name))
            records.append(NoduleRecord(pdir.name, ndir.name, tuple(slices), tuple(masks)))
    return records


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def consensus_from_readers(reader_masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Consensus and soft label from per-reader masks.

    ``reader_masks``: uint8 0/1, shape (r, n, H, W). A reader whose mask is all zero over every slice did not mark
    the nodule and is left out of the vote (LIDC readers mark only the nodules they judged to be nodules).
    Returns ``consensus`` uint8 (n, H, W): pixels marked by at least half of the m readers who marked the nodule
    (2 * count >= m, so 1 of 2, 2 of 3, 2 of 4), and ``soft`` float32 (n, H, W): count / m. Both zero when m == 0.
    """
    reader_masks = np.asarray(reader_masks)
    n_shape = reader_masks.shape[1:]
    marked = reader_masks.reshape(reader_masks.shape[0], -1).any(axis=1)
    m = int(marked.sum())
    if m == 0:
        return np.zeros(n_shape, np.uint8), np.zeros(n_shape, np.float32)
    count = reader_masks[marked].astype(np.int32).sum(axis=0)
    return (2 * count >= m).astype(np.uint8), (count / m).astype(np.float32)


def load_nodule(record: NoduleRecord):
    """Read one nodule.

    Returns ``(images, reader_masks, consensus, soft)``:
    images uint8 (n, 128, 128) as stored (see the module docstring for the intensity mapping);
    reader_masks uint8 0/1 (r, n, 128, 128), one per ``record.reader_mask_dirs`` (a slice missing from a reader's
    folder is zeros); consensus uint8 0/1 (n, 128, 128) and soft float32 (n, 128, 128), see
    :func:`consensus_from_readers`.
    """
    images = np.stack([_read_png(p) for p in record.slice_paths])
    n, h, w = images.shape
    readers = np.zeros((len(record.reader_mask_dirs), n, h, w), np.uint8)
    for r, mdir in enumerate(record.reader_mask_dirs):
        for z, sp in enumerate(record.slice_paths):
            mp = mdir / sp.name
            if mp.is_file():
                readers[r, z] = _read_png(mp) > 0
    consensus, soft = consensus_from_readers(readers)
    return images, readers, consensus, soft


# Patients that also exist in Hounsfield units (the LIDC-IDRI chest-CT slabs): always test, so that the HU-domain
# evaluation of the full seed-point pipeline is on patients no model has seen.
RESERVED_TEST_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003")


def split_patients(patient_ids: Sequence[str], seed: int = 0,
                   fractions: Tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Dict[str, List[str]]:
    """Split patients (never their nodules) into train/val/test.

    Rule: the unique IDs are ordered by SHA-256 of ``f"{seed}:{patient_id}"``; the first ``round(f_train * N)`` go to
    train, the next ``round(f_val * N)`` to val, the rest to test. It depends only on the set of IDs and the seed
    (not on their order, the platform or the numpy version), so a model card can name its split by the seed.
    :data:`RESERVED_TEST_PATIENTS` are taken out first and always go to test.
    Returns ``{"train": [...], "val": [...], "test": [...]}``, each sorted.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    all_ids = sorted(set(str(p) for p in patient_ids))
    reserved = [p for p in all_ids if p in RESERVED_TEST_PATIENTS]
    ids = [p for p in all_ids if p not in RESERVED_TEST_PATIENTS]
    ordered = sorted(ids, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_train = int(round(fractions[0] * len(ids)))
    n_val = min(int(round(fractions[1] * len(ids))), len(ids) - n_train)
    parts = (ordered[:n_train], ordered[n_train:n_train + n_val], ordered[n_train + n_val:] + reserved)
    return {name: sorted(part) for name, part in zip(SPLITS, parts)}
