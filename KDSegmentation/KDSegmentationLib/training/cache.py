"""The prepared cache: every case read once into model space and stored as numpy arrays.

:func:`prepare_cache` reads every case once (SimpleITK, imported lazily by ``reading``), brings it to the task's
model space and writes one compressed ``.npz`` per case plus ``manifest.json``. Training machines without SimpleITK
train from such a cache: :func:`layouts.find_cases` on a cache folder returns cases that point into it.

Cache format (``kdseg-cache/1``), arrays in model space, (z, y, x) / (h, w) order:

- CT volume tasks (liver): ``image`` int16 HU on the model grid; ``label`` uint8; ``spacing`` float64 (x, y, z) mm.
- retina: ``image`` uint8 (h, w, 3) RGB rescaled to the task's field-of-view diameter; ``fov`` bool (h, w) found
  from the photo as at inference; ``fov_ref`` bool (h, w) the dataset's own FOV mask when it has one (metrics);
  ``label`` uint8 (h, w); ``scale`` (model pixels per input pixel).
- lung nodule slices: ``image`` uint8 (n, 128, 128) slice stack; ``label`` uint8 (n, h, w) reader consensus;
  ``soft`` float16 (n, h, w) fraction of readers marking each pixel.

Unlabelled cases simply have no ``label``. ``manifest.json`` holds the task, the preprocessing parameters, the
layout and source folder, a fingerprint of the source files, and per case its id, file, split, group and shape.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from KDSegmentationLib import protocol as P
from KDSegmentationLib.errors import CancelledError, InputError
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.layouts import Case, find_cases, layout_of
from KDSegmentationLib.training.reading import prepare_case

# Bump when a task's preparation (tasks/ct.py, tasks/retina.py, tasks/lung_nodule.py) changes its output: caches
# made by the old preparation are then rebuilt.
PREPROCESS_VERSION = "1"
CACHE_FORMAT = "kdseg-cache/1"


def is_cache(path) -> bool:
    return (Path(path) / "manifest.json").is_file()


@dataclass
class PreparedCache:
    """A prepared cache folder: its manifest and its cases (``Case.cache_file`` set)."""

    path: Path
    manifest: Dict[str, Any]
    cases: List[Case]

    @property
    def task(self) -> str:
        return self.manifest["task"]


def task_preprocessing(task: TaskSpec) -> Dict[str, Any]:
    """The parameters that define model space for a task (stored in caches and model files)."""
    d: Dict[str, Any] = {"task": task.name, "input_kind": task.input_kind, "spatial_dims": task.spatial_dims}
    if task.spacing_mm is not None:
        d["spacing_mm"] = list(task.spacing_mm)
    if task.hu_window is not None:
        d["hu_window"] = list(task.hu_window)
    if task.fov_diameter_px is not None:
        d["fov_diameter_px"] = task.fov_diameter_px
    d["preprocess_version"] = PREPROCESS_VERSION
    return d


def _record_paths(record: Any) -> List[str]:
    """Every path held by a dataset record (e.g. a LIDC nodule's slice files and reader folders)."""
    out: List[str] = []
    values = list(vars(record).values()) if hasattr(record, "__dict__") else \
        [getattr(record, f) for f in getattr(record, "__dataclass_fields__", {})]
    for v in values:
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(item, Path):
                out.append(str(item))
    return out


def source_fingerprint(cases: Sequence[Case]) -> str:
    """sha1 over every source file's path, size and mtime (a changed dataset invalidates its cache)."""
    h = hashlib.sha1()
    for c in cases:
        paths = [c.image, c.label, c.fov] + [c.structures[k] for k in sorted(c.structures)]
        if c.record is not None:
            paths += _record_paths(c.record)
        h.update(c.case_id.encode())
        for p in paths:
            if not p:
                continue
            pp = Path(str(p))
            files = [pp] if pp.is_file() else (sorted(f for f in pp.rglob("*") if f.is_file()) if pp.is_dir() else [])
            for f in files:
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _prepare_one(args) -> Dict[str, Any]:
    case, task, out_dir = args
    arrays = prepare_case(case, task)
    fname = case.case_id + ".npz"
    np.savez_compressed(out_dir / fname, **arrays)
    entry = case.describe()
    entry.update(file=fname, labelled="label" in arrays, shape=list(arrays["image"].shape))
    for k in ("image", "label", "fov", "cache_file", "structures", "record"):
        entry.pop(k, None)
    entry["source"] = {"image": case.image, "label": case.label, "fov": case.fov,
                       "structures": {str(k): v for k, v in case.structures.items()}}
    return entry


def prepare_cache(cases: Sequence[Case], task: TaskSpec, out_dir, progress=None,
                  should_stop: Optional[Callable[[], bool]] = None, workers: int = 0,
                  source: Optional[str] = None, fingerprint: Optional[str] = None) -> Path:
    """Read every case once and write ``out_dir`` (one ``<case>.npz`` each + ``manifest.json``), atomically.

    The folder is built under a temporary name beside ``out_dir`` and renamed at the end, so an interrupted
    preparation never leaves a half cache behind. ``workers > 1`` reads cases in parallel processes.
    """
    out_dir = Path(out_dir)
    cases = list(cases)
    if not cases:
        raise InputError("no cases to prepare")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=str(out_dir.parent)))
    try:
        entries: List[Dict[str, Any]] = []
        jobs = [(c, task, tmp) for c in cases]
        if workers and workers > 1 and len(cases) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, entry in enumerate(pool.map(_prepare_one, jobs, chunksize=4)):
                    entries.append(entry)
                    _prep_tick(progress, should_stop, i, len(cases), entry)
        else:
            for i, job in enumerate(jobs):
                entries.append(_prepare_one(job))
                _prep_tick(progress, should_stop, i, len(cases), entries[-1])
        manifest = {
            "format": CACHE_FORMAT, "task": task.name, "layout": layout_of(cases),
            "source": str(source) if source else None, "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "preprocessing": task_preprocessing(task),
            "cases": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _prep_tick(progress, should_stop, i, n, entry) -> None:
    if progress is not None:
        progress.progress(P.STAGE_PREPARE, (i + 1) / n, case=entry["case_id"])
    if should_stop is not None and should_stop():
        raise CancelledError("cancelled while preparing the data cache")


def load_cache(cache_dir) -> PreparedCache:
    """Read a cache's manifest (arrays are loaded on demand with :func:`load_arrays`). Never imports SimpleITK."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{cache_dir} is not a readable data cache ({exc}); prepare it again with 'kdseg prepare'")
    if manifest.get("format") != CACHE_FORMAT:
        raise InputError(f"{cache_dir} has cache format {manifest.get('format')!r}, expected {CACHE_FORMAT}; "
                         "prepare it again with 'kdseg prepare'")
    cases = []
    for e in manifest["cases"]:
        c = Case(case_id=e["case_id"], split=e.get("split"), group=e.get("group") or e["case_id"],
                 layout=manifest.get("layout", "cache"), cache_file=str(cache_dir / e["file"]),
                 labelled=bool(e.get("labelled")))
        cases.append(c)
    return PreparedCache(path=cache_dir, manifest=manifest, cases=cases)


def load_arrays(case: Case) -> Dict[str, np.ndarray]:
    """All arrays of a cached case, fully read into memory."""
    if not case.cache_file:
        raise ValueError(f"case {case.case_id} is not from a prepared cache")
    try:
        with np.load(case.cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cached case {case.cache_file} is unreadable ({exc}); prepare the cache again")


def default_cache_root() -> Path:
    from KDSegmentationLib.paths import user_cache_dir

    env = os.environ.get("KDSEG_CACHE")
    return Path(env) if env else user_cache_dir("datasets")


def ensure_cache(data_dir, task: TaskSpec, cache_dir=None, progress=None, should_stop=None,
                 workers: int = 0) -> PreparedCache:
    """A prepared cache for ``data_dir``: the folder itself when it is one, else a cache prepared (or reused when the
    source files and preprocessing are unchanged) in ``cache_dir`` or the user's cache folder."""
    data_dir = Path(data_dir)
    if is_cache(data_dir):
        find_cases(data_dir, task)  # checks the task
        return load_cache(data_dir)
    cases = find_cases(data_dir, task)
    fp = source_fingerprint(cases)
    if cache_dir is None:
        key = hashlib.sha1(f"{data_dir.resolve()}|{task.name}".encode()).hexdigest()[:12]
        cache_dir = default_cache_root() / f"{task.name}-{data_dir.name}-{key}"
    cache_dir = Path(cache_dir)
    if is_cache(cache_dir):
        try:
            cache = load_cache(cache_dir)
            if (cache.task == task.name and cache.manifest.get("fingerprint") == fp
                    and cache.manifest.get("preprocessing") == task_preprocessing(task)):
                if progress is not None:
                    progress.log(f"reusing prepared cache {cache_dir} ({_megabytes(cache_dir)}; "
                                 f"'kdseg cache clear' frees it)")
                return cache
        except InputError:
            pass
    if progress is not None:
        progress.log(f"preparing {len(cases)} cases of {data_dir} into {cache_dir}")
    prepare_cache(cases, task, cache_dir, progress=progress, should_stop=should_stop, workers=workers,
                  source=str(data_dir.resolve()), fingerprint=fp)
    if progress is not None:
        progress.log(f"prepared cache {cache_dir}: {_megabytes(cache_dir)} ('kdseg cache clear' frees it)")
    return load_cache(cache_dir)


def _megabytes(folder: Path) -> str:
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return f"{size / 2 ** 20:.1f} MB"


