"""Speed and memory of the tools a user would pick instead of KDSegmentation, side by side (offline, not a test).

Runs, on the same CT(s), in interleaved rounds (student, teacher, TotalSegmentator --fast, --fastest, SegResNet,
then again), one fresh process per run with 2 CPU threads for everyone (OMP/MKL/OpenBLAS_NUM_THREADS=2; torch
threads 2: `--threads 2` for kdseg and SegResNet, TotalSegmentator sets torch to the machine's core count):

- student / teacher: `kdseg segment --task liver --input CT --output OUT.seg.nrrd --model student|teacher
  --threads 2 --device cpu --progress json` (this repository's environment);
- TotalSegmentator 2.18 `--fast` / `--fastest` (`-i CT -o OUT.nii.gz --ml -d cpu`) through its own pipeline, with
  random weights of the reconstructed nnU-Net plans (make_peer_weights.py) under a TOTALSEG_HOME_DIR outside the
  repository; started through totalseg_cli.py (TotalSegmentator's main(), see there why);
- MONAI SegResNet as SlicerMONAIAuto3DSeg runs it (segresnet_infer.py), random weights.

Each run is timed from outside (wall clock from start to exit). Memory: the process tree (the process and all its
descendants, found through /proc every 0.1 s) - peak of the summed PSS (shared pages split between the processes
sharing them), of the summed RSS, and of the largest single process - and, from os.wait4, ru_maxrss (largest process among those reaped) and CPU time (user + system).

Writes benchmarks/results/peers.json (everything, written after every run) and peers.md (tables). The peers
environment comes from setup_peers.sh.

Usage: python benchmarks/peers/run_peers.py [--rounds 3] [--cases RadCTTACEomics_1211] [--max-minutes 40]
       python benchmarks/peers/run_peers.py --report-only      (rewrite peers.md from peers.json)
"""
import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")

TOOLS = {
    "student": "KDSegmentation student (`kdseg segment --model student`)",
    "teacher": "KDSegmentation teacher (`kdseg segment --model teacher`)",
    "ts_fast": "TotalSegmentator 2.18 `--fast` (nnU-Net Dataset297, 3 mm, random weights)",
    "ts_fastest": "TotalSegmentator 2.18 `--fastest` (nnU-Net Dataset298, 6 mm, random weights)",
    "segresnet": "MONAI SegResNet as SlicerMONAIAuto3DSeg runs it (3 mm, 25 classes, random weights)",
}
ORDER = list(TOOLS)


# ----------------------------------------------------------------------------------------------------------------
# process-tree measurement

def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(root):
    """(sum of RSS, sum of PSS, largest RSS, number of processes) over root and its descendants."""
    kids = _children_map()
    todo, total, pss, largest, n = [root], 0, 0, 0, 0
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
        except OSError:
            rss = 0
        total += rss
        pss += _pss(pid)
        largest = max(largest, rss)
        n += 1
        todo.extend(kids.get(pid, ()))
    return total, pss, largest, n


def measure(cmd, env, log_path, poll_s=0.1, timeout_s=3600):
    load = os.getloadavg()[0]
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(log_path.parent))
        peak_tree = peak_pss = peak_single = max_procs = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            tree, pss, single, n = _tree_rss(p.pid)
            peak_tree, peak_pss = max(peak_tree, tree), max(peak_pss, pss)
            peak_single, max_procs = max(peak_single, single), max(max_procs, n)
            if time.perf_counter() - t0 > timeout_s:
                p.kill()
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 3), "returncode": p.returncode, "load_1min_at_start": round(load, 2),
            "peak_tree_rss_mb": round(peak_tree / 2**20, 1), "peak_tree_pss_mb": round(peak_pss / 2**20, 1),
            "peak_single_rss_mb": round(peak_single / 2**20, 1),
            "wait4_maxrss_mb": round(ru.ru_maxrss / 1024, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "max_processes": max_procs}


# ----------------------------------------------------------------------------------------------------------------
# tools

def kdseg_cmd():
    exe = Path(sys.executable).parent / "kdseg"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "KDSegmentationLib"]


def command(tool, ct, out_dir, args):
    py = str(Path(args.peers_venv) / "bin" / "python")
    if tool in ("student", "teacher"):
        return kdseg_cmd() + ["segment", "--task", "liver", "--input", str(ct), "--output",
                              str(out_dir / f"{tool}.seg.nrrd"), "--model", tool, "--threads", str(args.threads),
                              "--device", "cpu", "--progress", "json"]
    if tool in ("ts_fast", "ts_fastest"):
        return [py, str(HERE / "totalseg_cli.py"), "-i", str(ct), "-o", str(out_dir / f"{tool}.nii.gz"), "--ml",
                "--fast" if tool == "ts_fast" else "--fastest", "-d", "cpu"]
    if tool == "segresnet":
        return [py, str(HERE / "segresnet_infer.py"), str(Path(args.home) / "monai_segresnet" / "model.pt"), str(ct),
                str(out_dir / "segresnet.nii.gz"), "--threads", str(args.threads)]
    raise ValueError(tool)


def tool_env(tool, args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "TOTALSEG_"))}
    n = str(args.threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, PYTHONUNBUFFERED="1")
    if tool.startswith("ts_"):
        env["TOTALSEG_HOME_DIR"] = str(args.home)
    return env


def stages(tool, log_text):
    """Stage times the tool reports itself (seconds)."""
    if tool in ("student", "teacher", "segresnet"):
        for line in reversed(log_text.splitlines()):
            if line.startswith("{") and '"event": "result"' in line:
                ev = json.loads(line)
                if tool == "segresnet":
                    return {k: v for k, v in ev.items() if k.endswith("_s")}
                return ev.get("timings_s", {})
        return {}
    out, order = {}, {"Resampled in": "resample", "Predicted in": "predict", "Saved in": "save"}
    for label, key in order.items():
        vals = [float(x) for x in re.findall(label + r" ([0-9.]+)s", log_text)]
        if key == "resample" and len(vals) == 2:
            out["resample_in"], out["resample_back"] = vals
        elif vals:
            out[key] = sum(vals)
    return out


# ----------------------------------------------------------------------------------------------------------------
# context

def _run(cmd, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw).stdout.strip()
    except Exception as e:  # reported, not fatal
        return f"failed: {e}"


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    busy = _run(["ps", "-eo", "pcpu=,args=", "--sort=-pcpu"]).splitlines()[:6]
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "memory_gb": round(mem / 2**20, 1), "platform": platform.platform(),
            "busiest_processes_at_start": [b.strip()[:160] for b in busy]}


VERSIONS_SNIPPET = r"""
import json, importlib.metadata as md
out = {}
for p in ("torch", "nnunetv2", "TotalSegmentator", "dynamic_network_architectures", "monai", "numpy", "SimpleITK",
          "nibabel", "torchvision", "timm", "KDSegmentation"):
    try:
        out[p] = md.version(p)
    except md.PackageNotFoundError:
        pass
import platform; out["python"] = platform.python_version()
print(json.dumps(out))
"""


def versions(python):
    try:
        return json.loads(_run([python, "-c", VERSIONS_SNIPPET]).splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}


def git_state():
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", "KDSegmentation"])
    return {"commit": commit, "engine_uncommitted_changes": [ln[3:] for ln in dirty.splitlines()]}


def image_info(ct):
    code = ("import SimpleITK as s, json, sys; i = s.ReadImage(sys.argv[1]); "
            "print(json.dumps({'size': i.GetSize(), 'spacing': [round(x, 4) for x in i.GetSpacing()]}))")
    try:
        return json.loads(_run([sys.executable, "-c", code, str(ct)]))
    except Exception:
        return {}


def list_data(data):
    out = []
    for d in sorted(data.iterdir()):
        if d.is_dir():
            cases = sorted(x.name for x in d.iterdir() if x.is_dir())
            out.append({"folder": d.name, "cases": cases})
    return out


# ----------------------------------------------------------------------------------------------------------------
# report

def _med(xs):
    return statistics.median(xs) if xs else None


def summarise(res):
    rows = {}
    for case in res["cases"]:
        name = case["name"]
        by_tool = {}
        for t in ORDER:
            runs = [r for r in res["runs"] if r["case"] == name and r["tool"] == t and r["returncode"] == 0]
            if not runs:
                continue
            st = {}
            for r in runs:
                for k, v in r.get("stages", {}).items():
                    st.setdefault(k, []).append(v)
            by_tool[t] = {
                "runs": len(runs), "wall_median_s": _med([r["wall_s"] for r in runs]),
                "wall_min_s": min(r["wall_s"] for r in runs), "wall_max_s": max(r["wall_s"] for r in runs),
                "cpu_median_s": _med([r["cpu_s"] for r in runs]),
                "peak_tree_rss_median_mb": _med([r["peak_tree_rss_mb"] for r in runs]),
                "peak_tree_rss_max_mb": max(r["peak_tree_rss_mb"] for r in runs),
                "peak_tree_pss_median_mb": _med([r["peak_tree_pss_mb"] for r in runs]),
                "peak_tree_pss_max_mb": max(r["peak_tree_pss_mb"] for r in runs),
                "peak_single_rss_median_mb": _med([r["peak_single_rss_mb"] for r in runs]),
                "wait4_maxrss_median_mb": _med([r["wait4_maxrss_mb"] for r in runs]),
                "max_processes": max(r["max_processes"] for r in runs),
                "stages_median_s": {k: round(_med(v), 2) for k, v in st.items()},
            }
        s = by_tool.get("student")
        for t, v in by_tool.items():
            v["ratio_to_student_wall"] = round(v["wall_median_s"] / s["wall_median_s"], 2) if s else None
            v["ratio_to_student_peak_tree_pss"] = (round(v["peak_tree_pss_median_mb"] / s["peak_tree_pss_median_mb"], 2)
                                                   if s else None)
            # ratio per round (same round, adjacent in time): median of the per-round ratios
            if s and t != "student":
                per = []
                for r in res["runs"]:
                    if r["case"] == name and r["tool"] == t and r["returncode"] == 0:
                        st_r = [x for x in res["runs"] if x["case"] == name and x["tool"] == "student"
                                and x["round"] == r["round"] and x["returncode"] == 0]
                        if st_r:
                            per.append(r["wall_s"] / st_r[0]["wall_s"])
                v["ratio_to_student_wall_per_round_median"] = round(_med(per), 2) if per else None
        rows[name] = by_tool
    return rows


def write_md(res, path):
    summ = res["summary"]
    m, L = res["machine"], []
    L.append("# Peers: KDSegmentation vs TotalSegmentator and MONAI SegResNet, speed and memory on CPU\n")
    L.append(f"Generated by `python benchmarks/peers/run_peers.py` on {res['started']} (took "
             f"{res.get('took_min', '?')} min). Do not edit: rerun the script (`--report-only` rewrites this file "
             "from peers.json). Not part of the test suite.\n")
    if res.get("incomplete"):
        L.append(f"**Incomplete:** {res['incomplete']}\n")
    L.append("**The peers run with random weights**: their outputs are meaningless; only time and memory are "
             "measured. The student and teacher are the shipped models.\n")
    for c in res["cases"]:
        rows = summ.get(c["name"], {})
        if "student" in rows:
            L.append(f"**Headline ({c['name']}, medians, ratio to the student):** " + "; ".join(
                f"{t} {r['wall_median_s']:.0f} s ({r['ratio_to_student_wall']:.1f}x), peak "
                f"{r['peak_tree_pss_median_mb'] / 1024:.1f} GB ({r['ratio_to_student_peak_tree_pss']:.1f}x)"
                for t, r in rows.items()) + ".\n")
    L.append("## Machine and load\n")
    L.append(f"- {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['memory_gb']} GB RAM; "
             f"{m['platform']}")
    L.append("- **Shared machine**: other work ran at the same time (busiest processes at start, %CPU and command):")
    for b in m.get("busiest_processes_at_start", [])[:4]:
        L.append(f"  - `{b}`")
    lo = [r["load_1min_at_start"] for r in res["runs"]]
    if lo:
        L.append(f"- 1-minute load average at the start of each run: {min(lo):.2f}-{max(lo):.2f} (median "
                 f"{statistics.median(lo):.2f}); load at start of the benchmark {res['load_start']}, at end "
                 f"{res.get('load_end', '?')}.")
    cw = [r["cpu_s"] / r["wall_s"] for r in res["runs"] if r["wall_s"] > 0]
    if cw:
        L.append(f"- CPU time / wall time per run was {min(cw):.2f}-{max(cw):.2f} (2.0 would be both cores for the "
                 "whole run): every tool got roughly one of the two cores.")
    L.append("- Because of that load, absolute seconds are inflated and noisy; the tools ran interleaved (one round "
             "= " + ", ".join(res["order"]) + ") so that the load falls on all alike: **the ratios to the student "
             "are the reliable figures.**")
    L.append(f"- Threads: {res['threads']} for every tool (OMP/MKL/OPENBLAS_NUM_THREADS={res['threads']}; "
             "torch threads: `--threads` for kdseg and SegResNet; TotalSegmentator calls "
             "`torch.set_num_threads(cpu_count)` = 2 on this machine).")
    v, pv = res["versions_repo"], res["versions_peers"]
    L.append(f"- This repository: Python {v.get('python')}, torch {v.get('torch')}, MONAI {v.get('monai')}, "
             f"SimpleITK {v.get('SimpleITK')}; commit {res['git']['commit']}"
             + (f" with uncommitted engine changes in {', '.join(res['git']['engine_uncommitted_changes'])}"
                if res["git"]["engine_uncommitted_changes"] else ""))
    L.append(f"- Peers environment ({res['peers_venv']}): Python {pv.get('python')}, torch {pv.get('torch')}, "
             f"TotalSegmentator {pv.get('TotalSegmentator')}, nnunetv2 {pv.get('nnunetv2')}, "
             f"dynamic_network_architectures {pv.get('dynamic_network_architectures')}, MONAI {pv.get('monai')}, "
             f"nibabel {pv.get('nibabel')}, SimpleITK {pv.get('SimpleITK')}\n")

    L.append("## Input\n")
    for c in res["cases"]:
        L.append(f"- `{c['path']}`: {'x'.join(map(str, c['info'].get('size', [])))} voxels at "
                 f"{' x '.join(map(str, c['info'].get('spacing', [])))} mm (the RadCTTACEomics CT with the most "
                 "voxels among the 512 x 512 abdominal CTs here)")
    L.append("- Other CT data in `../shared/data/liver/`: " + "; ".join(
        f"`{d['folder']}/` ({len(d['cases'])} cases: {', '.join(d['cases'])})" if d["cases"] else f"`{d['folder']}/`"
        for d in res["data_listing"]) + ". RadCTTACEomics cases other than 1211 have 41-58 slices at 5 mm; "
        "unlabelled_HCC-TACE-Seg is stored at 3 mm (113-133 voxels in-plane); TotalSegmentator_example is "
        "122 x 101 x 30 at 3 mm.\n")

    for c in res["cases"]:
        rows = summ.get(c["name"], {})
        L.append(f"## Results: {c['name']}\n")
        L.append("Fresh process per run, wall time measured outside; median (min-max) over the rounds. *ratio*: "
                 "median wall / the student's median wall (in brackets: median of the per-round ratios).  *peak PSS "
                 "tree*: peak of the summed proportional set size (PSS, /proc/PID/smaps_rollup: a page shared by n "
                 "processes counts 1/n in each) of the process and all its descendants, sampled every 0.1 s - the "
                 "memory the run occupies; *RSS sum*: the same with resident set sizes (shared pages of forked "
                 "workers counted in every process); *largest process*: peak RSS of the biggest single process; "
                 "*CPU*: user + system seconds of the tree (os.wait4).\n")
        L.append("| tool | runs | wall s | ratio to student | CPU s (CPU/wall) | peak PSS tree MB (median / max) | ratio | "
                 "RSS sum MB | largest process MB | processes |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in ORDER:
            if t not in rows:
                continue
            r = rows[t]
            pr = r.get("ratio_to_student_wall_per_round_median")
            L.append(f"| {TOOLS[t]} | {r['runs']} | {r['wall_median_s']:.1f} ({r['wall_min_s']:.1f}-"
                     f"{r['wall_max_s']:.1f}) | {r['ratio_to_student_wall']:.1f}x"
                     + (f" ({pr:.1f}x)" if pr is not None else "") + f" | {r['cpu_median_s']:.1f} ({r['cpu_median_s'] / r['wall_median_s']:.2f}) | "
                     f"{r['peak_tree_pss_median_mb']:.0f} / {r['peak_tree_pss_max_mb']:.0f} | "
                     f"{r['ratio_to_student_peak_tree_pss']:.1f}x | {r['peak_tree_rss_median_mb']:.0f} | "
                     f"{r['peak_single_rss_median_mb']:.0f} | "
                     f"{r['max_processes']} |")
        L.append("")
        L.append("Stages as each tool reports them (median seconds): kdseg's result event; TotalSegmentator's "
                 "printed *Resampled / Predicted / Saved in*; the SegResNet script's own clock.\n")
        L.append("| tool | stages |")
        L.append("|---|---|")
        for t in ORDER:
            if t in rows:
                L.append(f"| {t} | " + ", ".join(f"{k} {v}" for k, v in rows[t]["stages_median_s"].items()) + " |")
        L.append("")
        L.append("Every run:\n")
        L.append("| round | tool | wall s | peak PSS tree MB | CPU s | 1-min load at start | exit |")
        L.append("|---|---|---|---|---|---|---|")
        for r in res["runs"]:
            if r["case"] == c["name"]:
                L.append(f"| {r['round']} | {r['tool']} | {r['wall_s']:.1f} | {r['peak_tree_pss_mb']:.0f} | "
                         f"{r['cpu_s']:.1f} | {r['load_1min_at_start']:.2f} | {r['returncode']} |")
        L.append("")

    L.append("## Commands\n")
    for t in ORDER:
        if t in res["commands"]:
            L.append(f"- {t}: `{' '.join(res['commands'][t])}`")
    L.append(f"\nEnvironment for all: `OMP_NUM_THREADS={res['threads']} MKL_NUM_THREADS={res['threads']} "
             f"OPENBLAS_NUM_THREADS={res['threads']}`; TotalSegmentator also `TOTALSEG_HOME_DIR={res['home']}` "
             "(weights and a config.json with usage statistics off). Outputs went to a temporary folder.\n")

    w = res.get("weights", {})
    L.append("## How the peers were set up\n")
    L.append("**TotalSegmentator's nnU-Net plans, reconstructed** (`benchmarks/peers/make_peer_weights.py`). "
             "TotalSegmentator 2.18 maps `--fast` to nnU-Net task 297 (`Dataset297_TotalSegmentator_total_3mm_1559subj`) "
             "and `--fastest` to task 298 (`Dataset298_TotalSegmentator_total_6mm_1559subj`), trainer "
             "`nnUNetTrainer_4000epochs_NoMirroring`, plans `nnUNetPlans`, configuration `3d_fullres`, fold 0, "
             "tile step 0.8, no mirroring; it downloads weights only when that folder is missing under "
             "`$TOTALSEG_HOME_DIR/nnunet/results`. The published plans cannot be downloaded here, so they were "
             "written as follows:\n")
    rec = w.get("reconstruction", {})
    for k, val in rec.items():
        L.append(f"- {k.replace('_', ' ')}: {val if not isinstance(val, list) else ', '.join(map(str, val))}")
    for ts in w.get("totalsegmentator", []):
        L.append(f"- built by nnunetv2 (PlansManager -> `{TRAINER_NAME}.build_network_architecture`, then loaded "
                 f"back by `nnUNetPredictor.initialize_from_trained_model_folder`): task {ts['task_id']} "
                 f"({ts['mode']}): {ts['network']}, {ts['parameters']:,} parameters, {ts['outputs']} outputs, patch "
                 f"{'x'.join(map(str, ts['patch_size']))}, spacing {ts['spacing']}, features "
                 f"{ts['features_per_stage']}, strides {ts['strides']}")
    L.append("- `--fastest` got the same patch and network as `--fast` (only its 6 mm spacing is known). At 6 mm this "
             "CT (about 67 x 67 x 35) fits one tile, padded up to the patch; the real 6 mm plans may well have a "
             "smaller patch (nnU-Net caps the patch at the median image size), so the `--fastest` forward measured "
             "here is an upper bound.")
    L.append("- The 3 mm grid of this CT (about 133 x 133 x 71 after resampling) is covered by 2 x 2 x 1 tiles "
             "whichever of the 112/128 patch axes lies along z, so the axis order of the reconstructed patch does "
             "not change the work.")
    L.append("- TotalSegmentator is started through `benchmarks/peers/totalseg_cli.py`, which calls "
             "TotalSegmentator's own `main()` after registering one empty module: the torchvision wheel on the index "
             "is built against CUDA torch and cannot load its operators with CPU torch, and nnU-Net 2.8's trainer "
             "search imports every trainer module, including the Primus trainers (timm -> torchvision), so "
             "TotalSegmentator would stop before predicting. (nnunetv2 2.5, which has no Primus trainers, does not "
             "work with TotalSegmentator 2.18.) The output is written with `--ml` (one label map, as the Slicer "
             "extension reads it) instead of 117 separate files.\n")
    sr = w.get("segresnet", {})
    L.append(f"**MONAI SegResNet** (`benchmarks/peers/segresnet_infer.py`): the steps of SlicerMONAIAuto3DSeg's "
             "`auto3dseg_segresnet_inference.py` - torch.load the model file and build the network from its config, "
             "LoadImaged, Orientationd RAS, CropForegroundd (margin 10, voxels > 0), Spacingd 3 mm, "
             "ScaleIntensityRanged + sigmoid, SlidingWindowInfererAdapt (overlap 0.625, gaussian), softmax, Invertd of "
             "the class probabilities to the input grid, argmax, nibabel write. Network: "
             f"{sr.get('network')} ({sr.get('parameters', 0):,} parameters, init_filters 32, blocks_down 1,2,2,4,4, "
             f"dsdepth 4), {sr.get('classes')} classes (the 'Low Res Abdominal organs TS2 - 3mm' model: 24 organs + "
             f"background), roi {sr.get('roi_size')} (assumed: the real value is in the model file, which cannot be "
             "downloaded; MONAI pads the image up to the roi, so the forward always runs on at least this size).\n")
    L.append("## What differs between the tools (read before comparing)\n")
    L.append("- TotalSegmentator segments 117 structures of the whole body and SegResNet 24 abdominal organs; "
             "KDSegmentation segments the liver. The peers' networks compute all their classes in every run, whatever "
             "the user keeps.")
    L.append("- Random weights change what the post-processing and the writers see (label maps of noise compress "
             "worse than real ones; TotalSegmentator's --ml writer and SegResNet's argmax see random labels), so the "
             "peers' writing stages may differ somewhat from a trained model; the network forward, resampling and "
             "probability inversion do not depend on the weights.")
    L.append("- TotalSegmentator (nnU-Net) forks worker processes for preprocessing and export; their memory is in "
             "the tree's PSS (shared pages split between them) and, counted once per process, in the RSS sum.")
    L.append("- PSS and RSS are read one after the other at each sample, so for a single process whose memory is "
             "changing fast the two peaks can differ by a few tens of MB (PSS can come out above RSS).")
    path.write_text("\n".join(L) + "\n")


TRAINER_NAME = "nnUNetTrainer_4000epochs_NoMirroring"


# ----------------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers-venv", default=os.environ.get("KDSEG_PEERS_VENV", "/work/peers-venv"))
    p.add_argument("--home", default=os.environ.get("KDSEG_PEERS_HOME", "/work/peers-totalseg-home"),
                   help="TOTALSEG_HOME_DIR for the random weights (outside the repository)")
    p.add_argument("--data", default=os.environ.get("KDSEG_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--cases", default="RadCTTACEomics_1211", help="RadCTTACEomics case names, comma separated")
    p.add_argument("--tools", default=",".join(ORDER))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=None, help="start no round that would end after this")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "peers.json", out / "peers.md"
    if a.report_only:
        res = json.loads(jpath.read_text())
        res["summary"] = summarise(res)
        write_md(res, mpath)
        return 0

    home = Path(a.home).resolve()
    if str(home).startswith(str(REPO) + os.sep):
        sys.exit(f"--home must lie outside the repository: {home}")
    a.home = str(home)
    py = str(Path(a.peers_venv) / "bin" / "python")
    if not Path(py).exists():
        sys.exit(f"no peers environment at {a.peers_venv}: run benchmarks/peers/setup_peers.sh first")
    tools = [t for t in a.tools.split(",") if t]
    t_start = time.time()
    print("preparing random weights ...", flush=True)
    w = subprocess.run([py, str(HERE / "make_peer_weights.py"), a.home], capture_output=True, text=True)
    if w.returncode:
        sys.exit("make_peer_weights.py failed:\n" + w.stderr[-3000:])
    weights = json.loads(w.stdout.strip().splitlines()[-1])

    data = Path(a.data) / "liver"
    cases = [{"name": c, "path": str(data / "RadCTTACEomics" / c / "ct.nii.gz")} for c in a.cases.split(",")]
    for c in cases:
        c["info"] = image_info(c["path"])
    res = {"started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "load_start": [round(x, 2) for x in os.getloadavg()], "machine": machine(), "threads": a.threads,
           "versions_repo": versions(sys.executable), "versions_peers": versions(py), "git": git_state(),
           "peers_venv": a.peers_venv, "home": a.home, "weights": weights, "cases": cases, "order": tools,
           "data_listing": list_data(data), "commands": {}, "runs": [], "rounds_planned": a.rounds}
    work = Path(tempfile.mkdtemp(prefix="kdseg_peers_"))
    round_s = None
    try:
        for rnd in range(1, a.rounds + 1):
            if a.max_minutes and round_s and (time.time() - t_start + round_s) / 60 > a.max_minutes:
                res["incomplete"] = (f"{rnd - 1} of {a.rounds} rounds ran: the next round would have ended after "
                                     f"--max-minutes {a.max_minutes}.")
                break
            t_round = time.time()
            for c in cases:
                for t in tools:
                    d = work / f"r{rnd}_{c['name']}_{t}"
                    d.mkdir()
                    cmd = command(t, c["path"], d, a)
                    res["commands"][t] = [x.replace(str(d), "OUT") for x in cmd]
                    r = measure(cmd, tool_env(t, a), d / "log.txt")
                    text = (d / "log.txt").read_text(errors="replace")
                    r.update(round=rnd, case=c["name"], tool=t, stages=stages(t, text))
                    if r["returncode"]:
                        r["log_tail"] = text[-2000:]
                    outs = [f for f in d.iterdir() if f.name != "log.txt"]
                    r["output_bytes"] = sum(f.stat().st_size for f in outs if f.is_file())
                    res["runs"].append(r)
                    print(f"round {rnd} {c['name']} {t}: {r['wall_s']:.1f} s, tree PSS {r['peak_tree_pss_mb']:.0f} MB,"
                          f" exit {r['returncode']}", flush=True)
                    shutil.rmtree(d, ignore_errors=True)
                    res["summary"] = summarise(res)
                    jpath.write_text(json.dumps(res, indent=1))
            round_s = time.time() - t_round
    finally:
        shutil.rmtree(work, ignore_errors=True)
        res["load_end"] = [round(x, 2) for x in os.getloadavg()]
        res["took_min"] = round((time.time() - t_start) / 60, 1)
        res["summary"] = summarise(res)
        jpath.write_text(json.dumps(res, indent=1))
        write_md(res, mpath)
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
