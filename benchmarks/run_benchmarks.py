#!/usr/bin/env python3
"""Speed benchmarks of the KDSegmentation students and teachers (see benchmarks/README.md).

    python benchmarks/run_benchmarks.py [--quick] [--repeats N] [--models-dir DIR] [--out benchmarks/results]

Writes ``benchmarks.json`` (every figure) and ``benchmarks.md`` (tables and the targets of the speed issue) to
``--out``. Measures: fresh-process end-to-end runs of ``python -m KDSegmentationLib segment`` (wall time, stage
split, peak RSS), warm persistent-worker runs in this process, worker start-up, model-only forward latency,
parameters and FLOPs, and, when CUDA is available, the same warm runs on the GPU.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
LIB_PARENT = REPO / "KDSegmentation"
if str(LIB_PARENT) not in sys.path:
    sys.path.insert(0, str(LIB_PARENT))

TASK_ORDER = ("retina", "liver", "lung_nodule")
ROLES = ("student", "teacher")
GB = 1e9
MB = 1e6

# targets of the speed issue (2 CPU threads, student, end to end); the liver ones on the 300-slice CT
TARGET_RETINA_S = 0.15
TARGET_LIVER_WARM_S = 2.0
TARGET_LIVER_FRESH_S = 4.0
TARGET_LIVER_RSS_B = 1.0 * GB
TARGET_FLOOR_FACTOR = 2.0       # warm worker within this factor of reading the CT + writing a labelmap
TARGET_LUNG_S = 0.3
TARGET_RATIO = 4.0              # student vs teacher, end to end (warm worker)
TARGET_NETWORK_RATIO = 10.0     # student vs teacher, the network alone
TARGET_STARTUP_S = 2.0
TARGET_GPU_LIVER_S = 0.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(values: List[float]) -> Optional[dict]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def child_env() -> dict:
    env = dict(os.environ)
    parts = [str(LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# A child's ru_maxrss (wait4) also counts the pages its parent had when it forked, before exec: a small child of
# this (large) process would report this process's size. VmHWM of the child's own memory map resets at exec, so
# Python children run through this wrapper, which reports it at exit.
_PEAK_WRAPPER = r"""
import atexit, runpy, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\nKDSEG_PEAK_RSS_KB " + line.split()[1] + "\n")
atexit.register(_peak)
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2]] + sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    code, sys.argv = sys.argv[2], ["-c"] + sys.argv[3:]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
"""


def run_child(cmd: List[str], timeout: float = 1800.0) -> dict:
    """Run a command; wall time measured here, CPU time from wait4(), peak RSS from the child's own VmHWM (Python
    children) or wait4()."""
    wrapped = cmd[0] == sys.executable and len(cmd) > 2 and cmd[1] in ("-m", "-c") and sys.platform == "linux"
    if wrapped:
        cmd = [cmd[0], "-c", _PEAK_WRAPPER] + cmd[1:]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=child_env(), cwd=str(REPO))
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
        p.stdout.close()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    peak = ru.ru_maxrss * 1024
    if wrapped and "KDSEG_PEAK_RSS_KB " in stderr:
        head, _, tail = stderr.rpartition("KDSEG_PEAK_RSS_KB ")
        peak, stderr = int(tail.split()[0]) * 1024, head.rstrip("\n")
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_b": peak, "cpu_s": ru.ru_utime + ru.ru_stime,
            "stdout": out.decode("utf-8", "replace"), "stderr": stderr}


# ---------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------

def cpu_model(default: str = "unknown") -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``default``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def machine_description(threads: int) -> dict:
    import importlib.metadata as md

    import torch

    cpu = cpu_model()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "monai", "SimpleITK", "numpy", "scipy", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "KDSegmentation"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_b": props.total_memory, "capability": f"{props.major}.{props.minor}",
               "cuda": torch.version.cuda}
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_b": mem, "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
        "torch_threads_used": threads, "torch_parallel_backend": _parallel_backend(torch),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") if os.environ.get(k)},
        "git_commit": commit, "engine_modified_since_commit": dirty, "gpu": gpu,
    }


def _parallel_backend(torch) -> Optional[str]:
    try:
        info = torch.__config__.parallel_info()
    except Exception:
        return None
    keep = [ln.strip() for ln in info.splitlines() if ln.strip().startswith(("ATen parallel backend", "MKL", "MKLDNN",
                                                                              "OpenMP"))]
    return "; ".join(keep) or None


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------

def make_standin_models(folder: Path, tasks: List[str]) -> None:
    """Random-weight models with the default architectures (for trying the benchmark before training)."""
    from KDSegmentationLib.models.files import save_model
    from KDSegmentationLib.models.networks import build_network, default_arch_args

    for task in tasks:
        for role in ROLES:
            arch, args = default_arch_args(task, role)
            net = build_network(arch, **args)
            save_model(folder / f"{task}_{role}.kdseg.pt", net, arch=arch, arch_args=args, task=task, role=role,
                       card={"name": f"{task}_{role} (stand-in, random weights)"})


def model_files(models_dir: Optional[Path], tasks: List[str]) -> Dict[str, Dict[str, Optional[dict]]]:
    from KDSegmentationLib.models.files import read_header
    from KDSegmentationLib.paths import shipped_models_dir

    folder = models_dir if models_dir else shipped_models_dir()
    out: Dict[str, Dict[str, Optional[dict]]] = {}
    for task in tasks:
        out[task] = {}
        for role in ROLES:
            path = Path(folder) / f"{task}_{role}.kdseg.pt"
            if not path.is_file():
                out[task][role] = None
                continue
            header = read_header(path)
            out[task][role] = {"path": str(path), "arch": header.get("arch"), "arch_args": header.get("arch_args"),
                               "card_name": header.get("card", {}).get("name"), "file_b": path.stat().st_size}
    return out


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------

def lung_seed_ras(mask_path: Path):
    """RAS point (mm) of the consensus centroid voxel (the mask voxel nearest to it if it falls outside)."""
    import numpy as np
    import SimpleITK as sitk

    mask = sitk.ReadImage(str(mask_path))
    arr = sitk.GetArrayViewFromImage(mask)
    idx = np.argwhere(arr > 0)  # (z, y, x)
    if len(idx) == 0:
        raise RuntimeError(f"{mask_path} is empty")
    centroid = idx.mean(axis=0)
    voxel = np.rint(centroid).astype(int)
    if not arr[tuple(voxel)]:
        voxel = idx[np.argmin(((idx - centroid) ** 2).sum(axis=1))]
    lps = mask.TransformIndexToPhysicalPoint([int(v) for v in voxel[::-1]])
    return (-lps[0], -lps[1], lps[2]), [int(v) for v in voxel[::-1]]


def _image_info(path: Path) -> dict:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return {"size": list(r.GetSize()), "spacing": [round(s, 4) for s in r.GetSpacing()]}


def resample_slices(src: Path, dst: Path, n_slices: int) -> None:
    """The same CT on n_slices axial slices over the same extent (linear), int16; an ``.nrrd`` ``dst`` is written
    uncompressed, as the Slicer panel hands a volume to the engine."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    size = list(img.GetSize())
    spacing = list(img.GetSpacing())
    new_spacing = spacing[:2] + [spacing[2] * size[2] / n_slices]
    # first and last slice centres keep the extent: origin shifts by half the change of spacing along the slice axis
    shift = 0.5 * (new_spacing[2] - spacing[2])
    direction = img.GetDirection()
    origin = [o + shift * direction[3 * i + 2] for i, o in enumerate(img.GetOrigin())]
    out = sitk.Resample(img, size[:2] + [n_slices], sitk.Transform(), sitk.sitkLinear, origin, new_spacing,
                        direction, -1024.0, sitk.sitkInt16)
    sitk.WriteImage(out, str(dst), not str(dst).endswith(".nrrd"))


def crop_ct(src: Path, dst: Path, size_xyz) -> None:
    """Central crop (tiny inputs for --smoke)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    full = img.GetSize()
    start = [max(0, (f - s) // 2) for f, s in zip(full, size_xyz)]
    size = [min(s, f) for s, f in zip(size_xyz, full)]
    sitk.WriteImage(sitk.RegionOfInterest(img, size, start), str(dst), True)


def prepare_inputs(data: Path, tmp: Path, tasks: List[str], smoke: bool, liver_slices: int) -> Dict[str, List[dict]]:
    """Per task, the list of inputs: {name, path, source, seed_ras?, size, spacing}."""
    inputs: Dict[str, List[dict]] = {}
    if "retina" in tasks:
        folder = data / "retina" / "DRIVE" / "test" / "images"
        files = sorted(p for p in folder.iterdir() if p.is_file())[: 1 if smoke else 3] if folder.is_dir() else []
        inputs["retina"] = [{"name": p.stem, "path": str(p), "source": str(p.relative_to(data))} for p in files]
    if "liver" in tasks:
        root = data / "liver" / "RadCTTACEomics"
        cases = [c for c in sorted(root.glob("*/ct.nii.gz"))] if root.is_dir() else []
        items = []
        if cases:
            # the case with the most slices (a full-size abdominal CT)
            case = max(cases, key=lambda p: _image_info(p)["size"][2])
            src = case
            if smoke:
                src = tmp / f"{case.parent.name}_crop.nii.gz"
                crop_ct(case, src, (96, 96, 24))
            info = _image_info(src)
            name = case.parent.name.split("_")[-1]
            items.append({"name": f"{name} ({'x'.join(map(str, info['size']))})", "path": str(src),
                          "source": str(case.relative_to(data)) + (" (central crop)" if smoke else ""), **info})
            n = 2 * info["size"][2] if smoke else liver_slices
            dst = tmp / f"{case.parent.name}_{n}slices.nrrd"
            resample_slices(src, dst, n)
            info2 = _image_info(dst)
            items.append({"name": f"{name} resampled ({'x'.join(map(str, info2['size']))}, raw NRRD)",
                          "path": str(dst), "source": f"{items[0]['source']} resampled to {n} slices over the same "
                          "extent, written as uncompressed NRRD (what the panel sends)", **info2})
        inputs["liver"] = items
    if "lung_nodule" in tasks:
        root = data / "lung" / "LIDC-IDRI_c2c_slabs"
        slabs = sorted(p for p in root.iterdir() if (p / "ct.nii.gz").is_file()) if root.is_dir() else []
        items = []
        for slab in slabs[: 1 if smoke else 3]:
            seed, voxel = lung_seed_ras(slab / "nodule_consensus50.nii.gz")
            items.append({"name": slab.name, "path": str(slab / "ct.nii.gz"),
                          "source": str((slab / "ct.nii.gz").relative_to(data)),
                          "seed_ras": [round(v, 2) for v in seed], "seed_voxel_ijk": voxel,
                          **_image_info(slab / "ct.nii.gz")})
        inputs["lung_nodule"] = items
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------------------------------------

_STARTUP_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import KDSegmentationLib.cli.main as cli
from KDSegmentationLib.cli.arguments import set_threads
t1 = time.perf_counter()
cli.tune_malloc()
import torch
t2 = time.perf_counter()
import SimpleITK
t3 = time.perf_counter()
from KDSegmentationLib import tasks
from KDSegmentationLib.inference import segment as infer
set_threads(int(sys.argv[3]))
loaded, _ = infer.load_for_inference(tasks.get_task(sys.argv[1]), sys.argv[2], "cpu", compiled=False)
t4 = time.perf_counter()
print(json.dumps({"import_cli_s": t1 - t0, "import_torch_s": t2 - t1, "import_sitk_s": t3 - t2,
                  "model_load_s": t4 - t3, "in_process_s": t4 - t0, "monai_imported": "monai" in sys.modules,
                  "runtime": loaded.runtime}))
"""


_COMPILE_CODE = r"""
import json, sys
from KDSegmentationLib import tasks
from KDSegmentationLib.inference import segment as infer
loaded, _ = infer.load_for_inference(tasks.get_task(sys.argv[1]), sys.argv[2], "cpu", log=print)
print(json.dumps({"runtime": loaded.runtime}))
"""


def compile_models(models, tasks) -> Dict[str, Dict[str, str]]:
    """Each model's runtime on the CPU, compiling it first when it has no compiled form yet (what its first use
    does): the timed runs then measure the steady state a clinician sees from the second run on. In a child process:
    this process must stay small, because a child's peak RSS counts the parent's pages from before its exec."""
    out: Dict[str, Dict[str, str]] = {}
    for task in tasks:
        for role in ROLES:
            m = models[task][role]
            if m is not None:
                r = run_child([sys.executable, "-c", _COMPILE_CODE, task, m["path"]])
                lines = r["stdout"].strip().splitlines()
                out.setdefault(task, {})[role] = json.loads(lines[-1])["runtime"] if r["rc"] == 0 else \
                    f"failed: {_last_line(r['stderr'])}"
    log(f"runtimes on the CPU: {out}")
    return out


def bench_startup(models, tasks, repeats: int, threads: int) -> dict:
    """Fresh processes: bare interpreter, single imports, and worker start-up (imports + model load) per model."""
    py = sys.executable
    probes = {"python -c pass": [py, "-c", "pass"],
              "import KDSegmentationLib.cli.main": [py, "-c", "import KDSegmentationLib.cli.main"],
              "import torch": [py, "-c", "import torch"],
              "import SimpleITK": [py, "-c", "import SimpleITK"],
              "import monai.inferers": [py, "-c", "import monai.inferers"]}
    out = {"imports": {}, "worker": {}}
    for name, cmd in probes.items():
        walls = []
        for _ in range(repeats):
            r = run_child(cmd)
            if r["rc"] == 0:
                walls.append(r["wall_s"])
        out["imports"][name] = stats(walls)
        log(f"start-up: {name}: {_fmt_stats(out['imports'][name])}")
    for task in tasks:
        for role in ROLES:
            m = models[task][role]
            if m is None:
                continue
            runs = []
            for _ in range(repeats):
                r = run_child([py, "-c", _STARTUP_CODE, task, m["path"], str(threads)])
                if r["rc"] != 0:
                    runs.append({"error": _last_line(r["stderr"])})
                    continue
                parts = json.loads(r["stdout"].strip().splitlines()[-1])
                runs.append({"wall_s": r["wall_s"], "peak_rss_b": r["peak_rss_b"], **parts})
            ok = [x for x in runs if "error" not in x]
            out["worker"].setdefault(task, {})[role] = {
                "runs": runs, "wall_s": stats([x["wall_s"] for x in ok]),
                "parts_median_s": {k: statistics.median(x[k] for x in ok) for k in
                                   ("import_cli_s", "import_torch_s", "import_sitk_s", "model_load_s")} if ok else None,
                "monai_imported": ok[0]["monai_imported"] if ok else None,
                "runtime": ok[0]["runtime"] if ok else None,
                "peak_rss_b": stats([x["peak_rss_b"] for x in ok])}
            log(f"start-up: {task} {role}: {_fmt_stats(out['worker'][task][role]['wall_s'])}")
    return out


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "no message"


def _fmt_stats(s: Optional[dict], unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median'] * scale:.{digits}f} {unit}"
    return f"{s['median'] * scale:.{digits}f} {unit} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


# ---------------------------------------------------------------------------------------------------------------
# end to end, fresh process
# ---------------------------------------------------------------------------------------------------------------

STAGES = ("read", "model_load", "preprocess", "inference", "postprocess", "write", "total")


def segment_cmd(task: str, inp: dict, model_path: str, out_path: Path, threads: int, device: str = "cpu"):
    cmd = [sys.executable, "-m", "KDSegmentationLib", "segment", "--task", task, "--input", inp["path"],
           "--output", str(out_path), "--model", model_path, "--threads", str(threads), "--progress", "json",
           "--device", device]
    if inp.get("seed_ras"):
        cmd.append("--seed-ras=" + ",".join(f"{v:.3f}" for v in inp["seed_ras"]))
    return cmd


def bench_end_to_end(models, inputs, tasks, repeats: int, teacher_cap: Dict[str, int], threads: int,
                     tmp: Path) -> dict:
    """Student and teacher interleaved, a fresh worker process per run."""
    res: Dict[str, dict] = {t: {inp["name"]: {r: [] for r in ROLES} for inp in inputs.get(t, [])} for t in tasks}
    plan = []
    for rep in range(repeats):
        order = ROLES if rep % 2 == 0 else tuple(reversed(ROLES))
        for task in tasks:
            for i, inp in enumerate(inputs.get(task, [])):
                for role in order:
                    if models[task][role] is None or rep >= teacher_cap.get(task, repeats) and role == "teacher":
                        continue
                    plan.append((rep, task, i, inp, role))
    for k, (rep, task, i, inp, role) in enumerate(plan, 1):
        out_path = tmp / "out" / f"{task}_{role}_{i}.seg.nrrd"
        r = run_child(segment_cmd(task, inp, models[task][role]["path"], out_path, threads))
        run = {"repeat": rep, "wall_s": r["wall_s"], "peak_rss_b": r["peak_rss_b"], "cpu_s": r["cpu_s"], "rc": r["rc"]}
        result, error = None, None
        for line in r["stdout"].splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "result":
                result = ev
            elif ev.get("event") == "error":
                error = ev.get("message")
        if r["rc"] != 0 or result is None:
            run["error"] = error or _last_line(r["stderr"])
        else:
            t = result.get("timings_s", {})
            run["timings_s"] = t
            run["outside_engine_s"] = r["wall_s"] - t.get("total", 0.0)  # interpreter, imports, argument parsing
            run["warnings"] = result.get("warnings", [])
        res[task][inp["name"]][role].append(run)
        log(f"end-to-end {k}/{len(plan)}: {task} {inp['name']} {role}: "
            + (f"{r['wall_s']:.2f} s, {r['peak_rss_b'] / MB:.0f} MB" if "error" not in run else f"FAILED {run['error']}"))
    summary = {}
    for task, per_input in res.items():
        summary[task] = {}
        for name, per_role in per_input.items():
            summary[task][name] = {}
            for role, runs in per_role.items():
                ok = [x for x in runs if "error" not in x]
                summary[task][name][role] = {
                    "runs": runs,
                    "wall_s": stats([x["wall_s"] for x in ok]),
                    "peak_rss_b": stats([x["peak_rss_b"] for x in ok]),
                    "cpu_s": stats([x["cpu_s"] for x in ok]),
                    "outside_engine_s": stats([x["outside_engine_s"] for x in ok]),
                    "stages_median_s": {s: statistics.median(x["timings_s"].get(s, 0.0) for x in ok)
                                        for s in STAGES} if ok else None,
                    "errors": [x["error"] for x in runs if "error" in x],
                }
    return summary


# ---------------------------------------------------------------------------------------------------------------
# in process: warm worker, model only, FLOPs
# ---------------------------------------------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_b() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --warm-compiled: the warm worker runs compiled models as one-shot processes do (to compare the two runtimes warm)
WARM_COMPILED = False


def warm_runs(task: str, role: str, model_path: str, inputs: List[dict], repeats: int, device: str,
              tmp: Path) -> dict:
    """Load once, one warm-up run, then timed runs of cli.run_segment (what each `kdseg serve` request does)."""
    import torch

    from KDSegmentationLib.cli.segment import run_segment
    from KDSegmentationLib.inference import segment as infer
    from KDSegmentationLib.models.files import load_model
    from KDSegmentationLib.tasks import get_task

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    infer._MODEL_CACHE.clear()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = _reset_peak_rss() if not cuda else False
    t0 = time.perf_counter()
    loaded, _ = infer.load_for_inference(get_task(task), model_path, device, log=log, compiled=WARM_COMPILED)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    # the torch network: its forward shapes (hooked), the model-only timing and the FLOPs
    network = loaded.network if loaded.runtime == "torch" else load_model(model_path).network

    calls: List[tuple] = []
    if loaded.runtime == "torch":
        hook = network.register_forward_pre_hook(lambda mod, a: calls.append(tuple(a[0].shape)))
    else:
        hook = _CompiledCallRecorder(loaded.network, calls)

    def once(inp, out):
        seed = tuple(inp["seed_ras"]) if inp.get("seed_ras") else None
        t = time.perf_counter()
        s = run_segment(task, inp["path"], str(out), model=model_path, device=device, seed_ras=seed,
                        one_shot=WARM_COMPILED)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, s["timings_s"]

    out_dir = tmp / "out"
    try:
        first_s, first_t = once(inputs[0], out_dir / f"warm_{task}_{role}.seg.nrrd")
    finally:
        hook.remove()
    forward_shapes = list(calls)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = {inp["name"]: [] for inp in inputs}
    for rep in range(repeats):
        for i, inp in enumerate(inputs):
            wall, timings = once(inp, out_dir / f"warm_{task}_{role}_{i}.seg.nrrd")
            runs[inp["name"]].append({"wall_s": wall, "timings_s": timings})
    result = {
        "device": device, "runtime": loaded.runtime, "model_load_s": load_s, "first_call_s": first_s,
        "first_call_timings_s": first_t,
        "forward_input_shapes": [list(s) for s in forward_shapes], "per_input": {}}
    for name, rs in runs.items():
        result["per_input"][name] = {
            "runs": rs, "wall_s": stats([r["wall_s"] for r in rs]),
            "stages_median_s": {s: statistics.median(r["timings_s"].get(s, 0.0) for r in rs) for s in STAGES}
            if rs else None}
    if cuda:
        result["cuda_max_memory_allocated_b"] = torch.cuda.max_memory_allocated()
    elif rss_reset:
        result["process_peak_rss_b"] = _peak_rss_b()
    result["_network"] = network  # used by the model-only benchmark, dropped before writing
    return result


class _CompiledCallRecorder:
    """Records the input shape of each compiled forward (as a torch forward hook does) until ``remove()``."""

    def __init__(self, compiled, calls: List[tuple]):
        self.compiled, self.real = compiled, compiled.probabilities

        def recording(x):
            calls.append(tuple(x.shape))
            return self.real(x)

        compiled.probabilities = recording

    def remove(self) -> None:
        self.compiled.probabilities = self.real


def count_flops(net, shape) -> dict:
    """FLOPs of one forward (torch.utils.flop_counter; convolutions and matmuls count 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(net).to("meta")
        x = torch.empty(shape, device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            meta(x)
        return {"flops": int(fc.get_total_flops()), "method": "FlopCounterMode on the meta device"}
    except Exception as exc:  # some op without a meta kernel: count on a real (CPU) forward instead
        meta_error = f"{type(exc).__name__}: {exc}"[:300]
    try:
        cpu = copy.deepcopy(net).to("cpu")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            cpu(torch.zeros(shape))
        return {"flops": int(fc.get_total_flops()), "method": "FlopCounterMode on CPU", "meta_error": meta_error}
    except Exception as exc:
        return {"flops": None, "error": f"FlopCounterMode failed: {type(exc).__name__}: {exc}"[:300]}


def model_only(net, shape, device: str, repeats: int, budget_s: float, amp: bool = False) -> dict:
    """Median forward latency on one input of the model-grid shape.

    On CPU the network is already warm (the warm-worker runs used the same shape), so every forward is a sample;
    on CUDA three untimed forwards come first (AMP and fp32 kernels differ). Slow forwards are repeated fewer
    times: at most ``budget_s`` of samples after the first."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    x = torch.rand(shape, device=dev)

    def fwd():
        t = time.perf_counter()
        if amp and cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                net(x)
        else:
            net(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm = [fwd() for _ in range(3)] if cuda else []
        times = [fwd()]
        n = min(repeats - 1, int(budget_s / max(times[0], 1e-6)))
        times += [fwd() for _ in range(max(0, n))]
    out = {"input_shape": list(shape), "warmup_s": warm, "forward_s": stats(times), "amp": bool(amp and cuda)}
    if cuda:
        out["cuda_max_memory_allocated_b"] = torch.cuda.max_memory_allocated()
    return out


def bench_floor(inputs, tasks, repeats: int, tmp: Path) -> dict:
    """The floor of a liver run: SimpleITK reads the CT and writes a compressed UInt8 labelmap of its grid (the CT
    thresholded at 100 HU: a labelmap of the same size and a similar amount of structure). Seconds per input."""
    import SimpleITK as sitk

    out: Dict[str, dict] = {}
    for inp in inputs.get("liver", []) if "liver" in tasks else []:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            img = sitk.ReadImage(inp["path"])
            sitk.WriteImage(sitk.Cast(img > 100, sitk.sitkUInt8), str(tmp / "out" / "floor.nii.gz"), True)
            times.append(time.perf_counter() - t0)
        out[inp["name"]] = {"wall_s": stats(times)}
        log(f"floor: {inp['name']}: {_fmt_stats(out[inp['name']]['wall_s'])}")
    return out


def bench_in_process(models, inputs, tasks, repeats: int, teacher_cap: Dict[str, int], model_repeats: int,
                     budget_s: float, device: str, tmp: Path) -> dict:
    """Warm-worker runs, then model-only latency, parameters and FLOPs, for every task and role."""
    import torch

    from KDSegmentationLib.models.networks import count_parameters

    warm: Dict[str, dict] = {}
    mo: Dict[str, dict] = {}
    for task in tasks:
        if not inputs.get(task):
            continue
        for role in ROLES:
            m = models[task][role]
            if m is None:
                continue
            reps = repeats if role == "student" else min(repeats, teacher_cap.get(task, repeats))
            try:
                w = warm_runs(task, role, m["path"], inputs[task], reps, device, tmp)
            except Exception as exc:
                warm.setdefault(task, {})[role] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"warm {device}: {task} {role}: FAILED {exc}")
                continue
            net = w.pop("_network")
            warm.setdefault(task, {})[role] = w
            for name, pi in w["per_input"].items():
                log(f"warm {device}: {task} {name} {role}: {_fmt_stats(pi['wall_s'])} (first call {w['first_call_s']:.2f} s)")
            shapes = [tuple(s) for s in w["forward_input_shapes"]]
            if not shapes:
                continue
            entry = {"forward_calls_per_image": len(shapes), "parameters": count_parameters(net)}
            try:
                entry.update(model_only(net, shapes[0], device, model_repeats, budget_s))
                if device == "cuda":
                    entry["amp_fp16"] = model_only(net, shapes[0], device, model_repeats, budget_s, amp=True)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if device == "cpu":
                per_shape = {}
                for s in sorted(set(shapes)):
                    per_shape[s] = count_flops(net, s)
                fl = [per_shape[s].get("flops") for s in shapes]
                entry["flops_per_forward"] = per_shape[shapes[0]].get("flops")
                entry["flops_per_image"] = sum(fl) if all(f is not None for f in fl) else None
                entry["flops_method"] = per_shape[shapes[0]].get("method") or per_shape[shapes[0]].get("error")
            mo.setdefault(task, {})[role] = entry
            log(f"model-only {device}: {task} {role}: {_fmt_stats(entry.get('forward_s'), 'ms', 1000, 1)} "
                f"on {list(shapes[0])}")
            del net
        from KDSegmentationLib.inference import segment as infer

        infer._MODEL_CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"warm": warm, "model_only": mo}


# ---------------------------------------------------------------------------------------------------------------
# summary: ratios, targets, markdown
# ---------------------------------------------------------------------------------------------------------------

def _median(d: Optional[dict]) -> Optional[float]:
    return d["median"] if d else None


def _sum_medians(per_input: dict, role: str, key: str = "wall_s", names=None) -> Optional[float]:
    vals = []
    for name, v in per_input.items():
        if names is not None and name not in names:
            continue
        m = _median(v.get(role, {}).get(key)) if role in v else None
        if m is None:
            return None
        vals.append(m)
    return sum(vals) if vals else None


def _warm_median(warm, task, role, name) -> Optional[float]:
    w = warm.get(task, {}).get(role, {})
    return _median(w.get("per_input", {}).get(name, {}).get("wall_s")) if "per_input" in w else None


def compute_ratios(e2e, warm, mo, inputs, tasks) -> dict:
    """Teacher time / student time (same run, same inputs); parameter and FLOP ratios."""
    out = {}
    for task in tasks:
        names = [i["name"] for i in inputs.get(task, [])]
        r: Dict[str, Optional[float]] = {}
        # fresh process: only inputs where both have runs
        both = [n for n in names if _median(e2e.get(task, {}).get(n, {}).get("student", {}).get("wall_s"))
                and _median(e2e.get(task, {}).get(n, {}).get("teacher", {}).get("wall_s"))]
        if both:
            s = sum(_median(e2e[task][n]["student"]["wall_s"]) for n in both)
            t = sum(_median(e2e[task][n]["teacher"]["wall_s"]) for n in both)
            r["end_to_end_fresh_process"] = t / s
            s_eng = sum(e2e[task][n]["student"]["stages_median_s"]["total"] for n in both)
            t_eng = sum(e2e[task][n]["teacher"]["stages_median_s"]["total"] for n in both)
            r["engine_total_fresh_process"] = t_eng / s_eng if s_eng else None
        wb = [n for n in names if _warm_median(warm, task, "student", n) and _warm_median(warm, task, "teacher", n)]
        if wb:
            r["end_to_end_warm_worker"] = (sum(_warm_median(warm, task, "teacher", n) for n in wb)
                                           / sum(_warm_median(warm, task, "student", n) for n in wb))
        ms, mt = mo.get(task, {}).get("student", {}), mo.get(task, {}).get("teacher", {})
        if _median(ms.get("forward_s")) and _median(mt.get("forward_s")):
            r["model_only"] = ((_median(mt["forward_s"]) * mt["forward_calls_per_image"])
                               / (_median(ms["forward_s"]) * ms["forward_calls_per_image"]))
        if ms.get("parameters") and mt.get("parameters"):
            r["parameters"] = mt["parameters"] / ms["parameters"]
        if ms.get("flops_per_image") and mt.get("flops_per_image"):
            r["flops"] = mt["flops_per_image"] / ms["flops_per_image"]
        out[task] = r
    return out


def evaluate_targets(e2e, warm, startup, ratios, inputs, gpu, tasks, floor=None) -> List[dict]:
    """Targets of the speed issue, judged on the warm worker (how the panel runs); fresh-process shown beside."""
    rows = []
    floor = floor or {}

    def row(target, measured, fresh, ok, note=""):
        rows.append({"target": target, "measured": measured, "fresh_process": fresh,
                     "status": "n/a" if ok is None else ("pass" if ok else "gap"), "note": note})

    def per_input_max(task, role="student"):
        vals = [_warm_median(warm, task, role, i["name"]) for i in inputs.get(task, [])]
        return max(vals) if vals and all(v is not None for v in vals) else None

    def fresh_max(task, role="student"):
        vals = [_median(e2e.get(task, {}).get(i["name"], {}).get(role, {}).get("wall_s")) for i in inputs.get(task, [])]
        return max(vals) if vals and all(v is not None for v in vals) else None

    if "retina" in tasks:
        w, f = per_input_max("retina"), fresh_max("retina")
        row(f"retina student <= {TARGET_RETINA_S} s per image", w, f,
            None if w is None else w <= TARGET_RETINA_S,
            "" if w is None or w <= TARGET_RETINA_S else f"gap {w - TARGET_RETINA_S:.3f} s ({w / TARGET_RETINA_S:.1f}x)"
            + "; slowest of the DRIVE images")
    if "liver" in tasks and inputs.get("liver"):
        name = inputs["liver"][-1]["name"]  # the 300-slice CT, as the panel sends it
        w = _warm_median(warm, "liver", "student", name)
        f = _median(e2e.get("liver", {}).get(name, {}).get("student", {}).get("wall_s"))
        row(f"liver student warm <= {TARGET_LIVER_WARM_S} s ({name})", w, f,
            None if w is None else w <= TARGET_LIVER_WARM_S,
            "" if w is None or w <= TARGET_LIVER_WARM_S else f"gap {w - TARGET_LIVER_WARM_S:.2f} s")
        row(f"liver student fresh process <= {TARGET_LIVER_FRESH_S} s ({name})", f, f,
            None if f is None else f <= TARGET_LIVER_FRESH_S,
            "" if f is None or f <= TARGET_LIVER_FRESH_S else f"gap {f - TARGET_LIVER_FRESH_S:.2f} s")
        rss = _median(e2e.get("liver", {}).get(name, {}).get("student", {}).get("peak_rss_b"))
        row(f"liver student peak memory <= {TARGET_LIVER_RSS_B / GB:.1f} GB ({name})",
            None if rss is None else rss / GB, None, None if rss is None else rss <= TARGET_LIVER_RSS_B,
            "peak RSS of the fresh `kdseg segment` process, in GB"
            + ("" if rss is None or rss <= TARGET_LIVER_RSS_B else f"; gap {(rss - TARGET_LIVER_RSS_B) / GB:.2f} GB"))
        fl = _median(floor.get(name, {}).get("wall_s"))
        ratio = None if (w is None or not fl) else w / fl
        row(f"liver student warm within {TARGET_FLOOR_FACTOR:.0f}x of the floor ({name})", ratio, None,
            None if ratio is None else ratio <= TARGET_FLOOR_FACTOR,
            f"warm run / (SimpleITK read + compressed labelmap write: {_s(fl)} s)")
    if "lung_nodule" in tasks:
        w, f = per_input_max("lung_nodule"), fresh_max("lung_nodule")
        row(f"lung nodule student <= {TARGET_LUNG_S} s per seed", w, f, None if w is None else w <= TARGET_LUNG_S,
            ("" if w is None or w <= TARGET_LUNG_S else f"gap {w - TARGET_LUNG_S:.3f} s") + "; slowest of the slabs")
    for task in tasks:
        r = ratios.get(task, {})
        w, f = r.get("end_to_end_warm_worker"), r.get("end_to_end_fresh_process")
        row(f"{task}: student >= {TARGET_RATIO:.0f}x faster than teacher end to end", w, f,
            None if w is None else w >= TARGET_RATIO,
            "ratio teacher/student (x)" + ("" if w is None or w >= TARGET_RATIO else f"; gap: {w:.1f}x measured"))
        n = r.get("model_only")
        row(f"{task}: student network >= {TARGET_NETWORK_RATIO:.0f}x faster than teacher", n, None,
            None if n is None else n >= TARGET_NETWORK_RATIO,
            "model-only forward ratio (x)" + ("" if n is None or n >= TARGET_NETWORK_RATIO
                                                else f"; gap: {n:.1f}x measured"))
    st = [(t, _median(startup.get("worker", {}).get(t, {}).get("student", {}).get("wall_s"))) for t in tasks]
    st = [(t, v) for t, v in st if v is not None]
    if st:
        worst_task, worst = max(st, key=lambda x: x[1])
        row(f"worker start-up (imports + model load) <= {TARGET_STARTUP_S} s", worst, None,
            worst <= TARGET_STARTUP_S,
            f"slowest student ({worst_task}), fresh interpreter to model loaded"
            + ("" if worst <= TARGET_STARTUP_S else f"; gap {worst - TARGET_STARTUP_S:.2f} s"))
    gw = None
    if gpu.get("available") and inputs.get("liver"):
        gw = _warm_median(gpu.get("warm", {}), "liver", "student", inputs["liver"][0]["name"])
    row(f"GPU (H100 class): liver student <= {TARGET_GPU_LIVER_S} s warm", gw, None,
        None if gw is None else gw <= TARGET_GPU_LIVER_S,
        "no GPU in this environment" if not gpu.get("available") else gpu.get("device_name", ""))
    row("student >= 97% of the teacher's Dice", None, None, None, "accuracy is not measured by this benchmark")
    return rows


def _s(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _range(d: Optional[dict], digits: int = 2, scale: float = 1.0) -> str:
    if not d:
        return "n/a"
    if d["n"] == 1:
        return f"{d['median'] * scale:.{digits}f}"
    return f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}-{d['max'] * scale:.{digits}f})"


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    cfg = res["config"]
    L = ["# KDSegmentation speed benchmarks", "",
         f"Generated by `python benchmarks/run_benchmarks.py{cfg['command_flags']}` on {m['date_utc']} UTC "
         f"(took {res['duration_s'] / 60:.1f} min). Do not edit: rerun the script.", "",
         f"- Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
         f"{(m['memory_b'] or 0) / GB:.0f} GB RAM; load average at start {m['load_average_at_start'][0]:.2f}, "
         f"at end {res['load_average_at_end'][0]:.2f}",
         f"- Software: Python {m['python']}, torch {m['versions'].get('torch')}, MONAI {m['versions'].get('monai')}, "
         f"SimpleITK {m['versions'].get('SimpleITK')}, numpy {m['versions'].get('numpy')}, onnxruntime "
         f"{m['versions'].get('onnxruntime')}; torch threads "
         f"{m['torch_threads_used']}; commit {str(m['git_commit'])[:10]}"
         + (" (engine modified)" if m.get("engine_modified_since_commit") else ""),
         f"- Models: {cfg['models_source']}; repeats {cfg['repeats']} (teacher on liver: "
         f"{cfg['teacher_repeats']['liver']})" + ("; QUICK run" if cfg["quick"] else ""),
         f"- Runtime on the CPU (KDSEG_RUNTIME={cfg.get('runtime_env', 'auto')}): "
         + ", ".join(f"{t} {r} {rt}" for t, per in (cfg.get("runtimes") or {}).items() for r, rt in per.items())
         + " in one-shot `kdseg segment` processes (compiled before timing: a model's first use compiles it once, "
         f"`models/compiled.py`); warm worker: {cfg.get('warm_worker_runtime', 'torch')}"
         + ("; SMOKE run on tiny inputs, not a benchmark" if cfg["smoke"] else ""),
         f"- GPU: {res['gpu'].get('device_name') if res['gpu'].get('available') else 'no GPU in this environment'}",
         ""]
    if cfg.get("stand_in_models"):
        L += ["**Stand-in models with random weights: architecture-level timings only; post-processing and the "
              "nodule/liver sizes differ from trained models.**", ""]

    L += ["## Targets", "",
          "Judged on the warm worker (`kdseg serve`, model loaded once: how the Slicer panel runs); a fresh "
          "`kdseg segment` process per image (start-up included) is shown beside it.", "",
          "| target | warm worker | fresh process | status | note |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        L.append(f"| {t['target']} | {_s(t['measured'])} | {_s(t['fresh_process'])} | {t['status']} | {t['note']} |")
    L.append("")

    L += ["## Per task: student vs teacher", "",
          "Seconds, median (min-max) over repeats. *fresh*: wall time of one `kdseg segment` process, measured "
          "outside; *start/exit*: the part of it outside the engine's own clock (interpreter start, CLI import, "
          "argument parsing, interpreter exit); stages as reported by the result event (imports done inside a "
          "stage count in that stage: torch in model load when torch runs the model); *other*: engine "
          "time between stages (imports of SimpleITK and the pipeline); *peak RSS*: of that process; *warm*: one "
          "request to a warm worker (model loaded, after a warm-up run); *model-only*: one forward on the "
          "model-grid input, ms.", ""]
    e2e, warm, mo, ratios = res["end_to_end"], res["warm"], res["model_only"], res["ratios"]
    for task in cfg["tasks"]:
        L += [f"### {task}", "",
              "| input | model | fresh s | start/exit | read | model load | preprocess | inference | postprocess "
              "| write | other | peak RSS MB | warm s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for inp in res["inputs"].get(task, []):
            for role in ROLES:
                e = e2e.get(task, {}).get(inp["name"], {}).get(role)
                if not e:
                    continue
                sm = e.get("stages_median_s") or {}
                w = warm.get(task, {}).get(role, {}).get("per_input", {}).get(inp["name"], {})
                err = f" (failed: {e['errors'][0]})" if e.get("errors") else ""
                other = sm["total"] - sum(sm.get(s, 0.0) for s in STAGES[:-1]) if sm else None
                L.append(f"| {inp['name']} | {role}{err} | {_range(e['wall_s'])} | {_s(_median(e['outside_engine_s']), 2)} | "
                         + " | ".join(_s(sm.get(s), 2) for s in STAGES[:-1])
                         + f" | {_s(other, 2)} | {_s(_median(e['peak_rss_b']) / MB if e['peak_rss_b'] else None, 0)} "
                         f"| {_range(w.get('wall_s'), 3)} |")
        L += ["", "| model | params | GFLOPs / image | forward calls / image | model-only ms | input (model grid) "
              "| worker: model load s | worker: first request s |",
              "|---|---|---|---|---|---|---|---|"]
        for role in ROLES:
            x = mo.get(task, {}).get(role)
            if not x:
                continue
            gf = x.get("flops_per_image")
            gf_text = _s(gf / 1e9, 2) if gf else "FlopCounterMode failed (see JSON)"
            w = warm.get(task, {}).get(role, {})
            L.append(f"| {role} | {x.get('parameters', 0):,} | {gf_text} "
                     f"| {x.get('forward_calls_per_image')} | {_range(x.get('forward_s'), 1, 1000)} "
                     f"| {'x'.join(map(str, x.get('input_shape', [])))} | {_s(w.get('model_load_s'), 2)} "
                     f"| {_s(w.get('first_call_s'), 2)} |")
        for role in ROLES:
            err = warm.get(task, {}).get(role, {}).get("error") or mo.get(task, {}).get(role, {}).get("error")
            if err:
                L += ["", f"In-process {role} measurement failed: {err}"]
        r = ratios.get(task, {})
        L += ["", "Teacher/student ratio (x): " + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f}" for k, v in r.items() if v is not None), ""]

    su = res["startup"]
    L += ["## Start-up (fresh processes, seconds)", "", "| what | median (min-max) |", "|---|---|"]
    for name, s in su.get("imports", {}).items():
        L.append(f"| `python -c '{name}'` | {_range(s)} |" if name != "python -c pass"
                 else f"| bare interpreter (`python -c pass`) | {_range(s)} |")
    for task, per_role in su.get("worker", {}).items():
        for role, s in per_role.items():
            p = s.get("parts_median_s") or {}
            parts = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}" for k, v in p.items())
            L.append(f"| worker start-up {task} {role} (imports + model load; {s.get('runtime')}; MONAI loaded: "
                     f"{s.get('monai_imported')}) | {_range(s.get('wall_s'))} ({parts}) |")
    L.append("")

    g = res["gpu"]
    L += ["## GPU", ""]
    if not g.get("available"):
        L += ["No GPU in this environment: the CUDA section (warm runs with AMP, max GPU memory) was skipped.", ""]
    else:
        L += [f"{g.get('device_name')}; warm worker on CUDA (AMP fp16 in the pipeline), synchronised timings.", "",
              "| task | input | model | warm s | max GPU memory MB | model-only fp32 ms | model-only AMP ms |",
              "|---|---|---|---|---|---|---|"]
        for task in cfg["tasks"]:
            for role in ROLES:
                w = g.get("warm", {}).get(task, {}).get(role)
                if not w:
                    continue
                x = g.get("model_only", {}).get(task, {}).get(role, {})
                for name, pi in w.get("per_input", {}).items():
                    L.append(f"| {task} | {name} | {role} | {_range(pi.get('wall_s'), 3)} "
                             f"| {_s((w.get('cuda_max_memory_allocated_b') or 0) / MB, 0)} "
                             f"| {_range(x.get('forward_s'), 2, 1000)} "
                             f"| {_range((x.get('amp_fp16') or {}).get('forward_s'), 2, 1000)} |")
        L.append("")
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    path.write_text("\n".join(L))


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def _strip(obj):
    """JSON-safe copy (tuples to lists, drop private keys)."""
    if isinstance(obj, dict):
        return {str(k): _strip(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat of everything (about a third of the time)")
    p.add_argument("--repeats", type=int, help="runs per measurement (default 3; --quick 1)")
    p.add_argument("--teacher-liver-repeats", type=int, default=2,
                   help="cap on the (slow) liver teacher's repeats (default 2)")
    p.add_argument("--models-dir", type=Path, help="folder with <task>_<role>.kdseg.pt (default: Resources/Models)")
    p.add_argument("--random-models", action="store_true",
                   help="build stand-in models with random weights (default architectures) in a temporary folder")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("KDSEG_SHARED_DATA", REPO.parent / "shared" / "data")),
                   help="real data (default ../shared/data beside the checkout, or $KDSEG_SHARED_DATA)")
    p.add_argument("--tasks", default=",".join(TASK_ORDER), help="comma-separated subset of " + ",".join(TASK_ORDER))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--liver-slices", type=int, default=300, help="slices of the resampled liver CT (default 300)")
    p.add_argument("--model-repeats", type=int, help="model-only forwards timed (default 5; --quick 2)")
    p.add_argument("--model-budget-s", type=float, default=20.0,
                   help="time budget per model-only measurement: slow forwards are repeated fewer times")
    p.add_argument("--warm-compiled", action="store_true",
                   help="the warm worker runs compiled models (ONNX Runtime) instead of torch, to compare the two")
    p.add_argument("--smoke", action="store_true",
                   help="tiny inputs and one repeat, to check that the script runs (results are not benchmarks)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary inputs and outputs")
    args = p.parse_args(argv)
    global WARM_COMPILED
    WARM_COMPILED = args.warm_compiled

    t_start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_ORDER]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {TASK_ORDER}")
    quick = args.quick or args.smoke
    repeats = args.repeats or (1 if quick else 3)
    model_repeats = args.model_repeats or (2 if quick else 5)
    teacher_cap = {t: repeats for t in tasks}
    teacher_cap["liver"] = max(1, min(repeats, args.teacher_liver_repeats))
    out_dir = args.out
    if args.smoke and args.out == p.get_default("out"):
        out_dir = Path(tempfile.mkdtemp(prefix="kdseg-bench-smoke-results-"))
    if not args.data.is_dir():
        p.error(f"data folder {args.data} not found; pass --data or set KDSEG_SHARED_DATA")

    import torch

    from KDSegmentationLib.cli import main as cli
    from KDSegmentationLib.cli.arguments import set_threads

    tuned = True
    cli.tune_malloc()  # what the CLI's main() does: warm and model-only figures match the worker
    set_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="kdseg-bench-"))
    (tmp / "out").mkdir()
    notes: List[str] = []
    try:
        machine = machine_description(args.threads)
        models_dir = args.models_dir
        stand_in = False
        if args.random_models:
            models_dir = tmp / "models"
            models_dir.mkdir()
            make_standin_models(models_dir, tasks)
            stand_in = True
        models = model_files(models_dir, tasks)
        for task in tasks:
            for role in ROLES:
                if models[task][role] is None:
                    notes.append(f"{task} {role}: no model file found; skipped")
                    log(notes[-1])
        log("preparing inputs")
        inputs = prepare_inputs(args.data, tmp, tasks, args.smoke, args.liver_slices)
        for task in tasks:
            if not inputs.get(task):
                notes.append(f"{task}: no input data found under {args.data}; skipped")
                log(notes[-1])
        flags = (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats else "") \
            + (" --random-models" if args.random_models else "") + (" --smoke" if args.smoke else "") \
            + (f" --tasks {args.tasks}" if args.tasks != p.get_default("tasks") else "") \
            + (" --warm-compiled" if args.warm_compiled else "")
        config = {"tasks": tasks, "repeats": repeats, "quick": quick, "smoke": args.smoke,
                  "teacher_repeats": dict(teacher_cap),
                  "model_repeats": model_repeats, "model_budget_s": args.model_budget_s, "threads": args.threads,
                  "stand_in_models": stand_in, "malloc_tuned_in_process": tuned, "command_flags": flags,
                  "models_source": "stand-ins with random weights" if stand_in else
                  (str(models_dir) if models_dir else "shipped (Resources/Models)"),
                  "models": models}
        if teacher_cap["liver"] < repeats and "liver" in tasks:
            notes.append(f"the liver teacher runs {teacher_cap['liver']} time(s) per input instead of {repeats} "
                         "(it dominates the benchmark's run time)")

        config["runtime_env"] = os.environ.get("KDSEG_RUNTIME", "auto")
        config["warm_worker_runtime"] = "compiled (ONNX Runtime)" if WARM_COMPILED else "torch"
        config["runtimes"] = compile_models(models, tasks)
        log("start-up")
        startup = bench_startup(models, tasks, repeats, args.threads)
        log("end to end (fresh process per run)")
        e2e = bench_end_to_end(models, inputs, tasks, repeats, teacher_cap, args.threads, tmp)
        log("warm worker and model-only (CPU)")
        inproc = bench_in_process(models, inputs, tasks, repeats, teacher_cap, model_repeats, args.model_budget_s,
                                  "cpu", tmp)
        gpu = {"available": bool(torch.cuda.is_available())}
        if gpu["available"]:
            log("GPU")
            gpu["device_name"] = torch.cuda.get_device_name(0)
            g = bench_in_process(models, inputs, tasks, repeats, {t: repeats for t in tasks}, model_repeats,
                                 args.model_budget_s, "cuda", tmp)
            gpu.update(g)
        else:
            gpu["note"] = "no GPU in this environment"
        log("floor (read + labelmap write)")
        floor = bench_floor(inputs, tasks, repeats, tmp)
        ratios = compute_ratios(e2e, inproc["warm"], inproc["model_only"], inputs, tasks)
        targets = evaluate_targets(e2e, inproc["warm"], startup, ratios, inputs, gpu, tasks, floor)
        if "liver" in tasks and len(inputs.get("liver", [])) > 1:
            notes.append("the resampled liver CT covers the same extent with more, thinner slices: the model grid "
                         "(3 mm) is unchanged, so it shows how reading, resampling back, post-processing and writing "
                         "scale with the voxel count")
        result = {"schema": "kdseg-benchmarks/1", "machine": machine, "config": config, "inputs": inputs,
                  "startup": startup, "end_to_end": e2e, "warm": inproc["warm"], "model_only": inproc["model_only"],
                  "floor": floor, "ratios": ratios, "targets": targets, "gpu": gpu, "notes": notes,
                  "load_average_at_end": list(os.getloadavg()), "duration_s": time.perf_counter() - t_start}
        for task_inputs in result["inputs"].values():  # temporary paths mean nothing later
            for inp in task_inputs:
                inp.pop("path", None)
        for per_role in config["models"].values():
            for m in per_role.values():
                if m:
                    m["path"] = os.path.relpath(m["path"], REPO) if not stand_in else Path(m["path"]).name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "benchmarks.json").write_text(json.dumps(_strip(result), indent=1) + "\n")
        write_markdown(result, out_dir / "benchmarks.md")
        log(f"wrote {out_dir / 'benchmarks.json'} and {out_dir / 'benchmarks.md'} "
            f"in {(time.perf_counter() - t_start) / 60:.1f} min")
    finally:
        if args.keep_temp:
            log(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
