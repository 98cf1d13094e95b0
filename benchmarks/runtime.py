"""Would a lighter runtime (ONNX Runtime, TorchScript) run the shipped students faster, or start faster, than torch?

For each student (``Resources/Models/<task>_student.kdseg.pt``) this script

* exports it to ONNX (``torch.onnx.export``, legacy TorchScript-based exporter, dynamic batch and spatial axes) and to
  TorchScript (``torch.jit.script``, falling back to ``torch.jit.trace``), softmax included in both graphs;
* builds the bundled sample's real network input with the task pipeline (``pipeline_for(get_task(t)).prepare``);
* compares the softmax of each runtime with torch's (``Inferer.probabilities``, the engine's forward): max |difference|
  and the share of voxels whose argmax label differs;
* times the forward (median of ``--runs`` after a warm-up) with 2 threads, in this process;
* in FRESH processes (``--fresh`` repeats, median): ``import torch`` vs ``import onnxruntime``, and import + load + one
  forward for each runtime (torch: ``models.files.load_model`` + ``Inferer``; ONNX Runtime: ``InferenceSession``;
  TorchScript: ``torch.jit.load``), plus the process's wall time (interpreter start and exit included);
* times a larger liver input (the sample's network input tiled to about 4x its voxels) and checks that the
  dynamic-shape exports still match torch there.

    pip install onnxruntime onnx          # only for this measurement; not a dependency of the project
    python benchmarks/runtime.py          # about 5 minutes on 2 CPU cores
    python benchmarks/runtime.py --runs 3 --fresh 2 --out /tmp/x   # quicker

Writes ``runtime.json`` (every figure) and ``runtime.md`` (tables and verdict) to ``--out``
(default ``benchmarks/results``). numpy is imported before every timer in the child processes: a ``kdseg segment``
run imports numpy and SimpleITK whatever the runtime, so only the runtime's own cost is counted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("liver", "lung_nodule", "retina")
TOLERANCE = 1e-4  # max |softmax difference| accepted as "identical" (float32 reassociation noise is ~1e-6)


# ----------------------------------------------------------------------------------------------- child processes
def _child(mode: str, model: str, inp: str, threads: int) -> None:
    """Run in a fresh interpreter; prints one JSON line of seconds. numpy is already imported (see module doc)."""
    import numpy as np

    x = np.load(inp) if inp else None
    out = {}
    t0 = time.perf_counter()
    if mode == "import_torch":
        import torch  # noqa: F401
        out["import"] = time.perf_counter() - t0
    elif mode == "import_ort":
        import onnxruntime  # noqa: F401
        out["import"] = time.perf_counter() - t0
    elif mode == "torch":
        import torch
        out["import"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        torch.set_num_threads(threads)
        from KDSegmentationLib.inference.inferer import Inferer
        from KDSegmentationLib.models.files import load_model
        net = load_model(model).network.eval()
        inferer = Inferer(net, torch.device("cpu"))
        out["load"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        p = inferer.numpy_probabilities(x)
        out["forward"] = time.perf_counter() - t2
    elif mode == "ort":
        import onnxruntime as ort
        out["import"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        out["load"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        p = sess.run(None, {"x": x})[0]
        out["forward"] = time.perf_counter() - t2
    elif mode == "jit":
        import torch
        out["import"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        torch.set_num_threads(threads)
        net = torch.jit.load(model, map_location="cpu").eval()
        out["load"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        with torch.inference_mode():
            p = net(torch.from_numpy(x)).numpy()
        out["forward"] = time.perf_counter() - t2
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["total"] = time.perf_counter() - t0
    out["torch_imported"] = "torch" in sys.modules
    if x is not None:
        out["checksum"] = float(np.asarray(p, dtype=np.float64).sum())
    print(json.dumps(out))


def _fresh(mode: str, model: str = "", inp: str = "", threads: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, model, inp, str(threads)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed: {proc.stderr.strip()[-800:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall"] = wall
    return res


def _medians(runs: list) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], float) and k != "checksum"]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


# ------------------------------------------------------------------------------------------------ main process
def _wrap(network):
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.softmax(self.net(x).float(), dim=1)

    return WithSoftmax(network).eval()


def _sample_input(task: str):
    from KDSegmentationLib.io.images import read_image
    from KDSegmentationLib.tasks import get_task
    from KDSegmentationLib.tasks.base import pipeline_for

    folder = ROOT / "Resources" / "Samples" / task
    sample = json.loads((folder / "sample.json").read_text())
    image = read_image(folder / sample["file"])
    prepared = pipeline_for(get_task(task)).prepare(image, sample.get("seed_ras"))
    import numpy as np
    return np.ascontiguousarray(prepared.tensor, dtype=np.float32), prepared.roi_zyx


def _time(fn, runs: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs_s": ts}


def _compare(ref, other) -> dict:
    import numpy as np

    diff = float(np.abs(ref - other).max())
    la, lb = ref.argmax(1), other.argmax(1)
    return {"max_abs_softmax_diff": diff, "label_diff_share": float((la != lb).mean()),
            "label_diff_voxels": int((la != lb).sum()), "within_tolerance": diff <= TOLERANCE}


@contextlib.contextmanager
def _shape_dynamic_blocks():
    """While exporting, replace the student's padding, cropping and upsampling helpers (``models.blocks``, which turn
    sizes into Python ints, so a trace bakes the example's shape in) with versions that keep sizes symbolic. Same
    arithmetic: pad at the end of each axis to the multiple (replicate), upsample to the skip's size, crop back. The
    exported graphs are checked against the unpatched torch forward on a second, larger shape."""
    import torch.nn.functional as F

    import KDSegmentationLib.models.student as student

    def pad_to_multiple(x, multiple):
        size = x.shape[2:]
        pads = []
        for n in reversed(list(size)):
            pads += [0, (multiple - n % multiple) % multiple]
        return F.pad(x, pads, mode="replicate"), size

    def upsample(x, size, mode="linear"):
        if mode == "linear":
            return F.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)
        return F.interpolate(x, size=size, mode="nearest")

    def crop_to(x, size):
        for d, n in enumerate(size):
            x = x.narrow(2 + d, 0, n)
        return x

    saved = {k: getattr(student, k) for k in ("pad_to_multiple", "upsample", "crop_to")}
    student.pad_to_multiple, student.upsample, student.crop_to = pad_to_multiple, upsample, crop_to
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(student, k, v)


def _export(task: str, tmp: Path, example):
    """(onnx path or None, torchscript path or None, notes)."""
    import torch

    from KDSegmentationLib.models.files import load_model

    net = load_model(ROOT / "Resources" / "Models" / f"{task}_student.kdseg.pt").network.eval()
    wrapped = _wrap(net)
    x = torch.from_numpy(example)
    notes = {}
    onnx_path = tmp / f"{task}.onnx"
    spatial = x.dim() - 2
    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(spatial)}}
    t = time.perf_counter()
    try:
        with torch.no_grad(), _shape_dynamic_blocks():
            torch.onnx.export(wrapped, (x,), str(onnx_path), input_names=["x"], output_names=["p"],
                              dynamic_axes={"x": axes, "p": axes}, opset_version=17, dynamo=False)
        notes["onnx_export"] = f"legacy exporter (dynamo=False), opset 17, {time.perf_counter() - t:.1f} s"
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        notes["onnx_export"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        onnx_path = None
    jit_path = tmp / f"{task}.ts.pt"
    try:
        scripted = torch.jit.script(wrapped)
        notes["torchscript"] = "torch.jit.script"
    except Exception as exc:  # noqa: BLE001
        notes["torchscript_script_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        try:
            with torch.no_grad(), _shape_dynamic_blocks():
                scripted = torch.jit.trace(wrapped, (x,), check_trace=False)
            notes["torchscript"] = "torch.jit.trace (script failed)"
        except Exception as exc2:  # noqa: BLE001
            notes["torchscript"] = f"failed: {type(exc2).__name__}: {str(exc2)[:300]}"
            scripted = None
    if scripted is not None:
        scripted.save(str(jit_path))
    else:
        jit_path = None
    return net, onnx_path, jit_path, notes


def _measure_input(name, net, onnx_path, jit_path, x, runs, threads) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from KDSegmentationLib.inference.inferer import Inferer

    inferer = Inferer(net, torch.device("cpu"))
    ref = inferer.numpy_probabilities(x)
    res = {"input": name, "shape": list(x.shape), "voxels": int(np.prod(x.shape[2:]) * x.shape[0])}
    res["torch"] = _time(lambda: inferer.numpy_probabilities(x), runs)
    if onnx_path is not None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        try:
            out = sess.run(None, {"x": x})[0]
            res["onnxruntime"] = {**_compare(ref, out), **_time(lambda: sess.run(None, {"x": x}), runs)}
        except Exception as exc:  # noqa: BLE001
            res["onnxruntime"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if jit_path is not None:
        ts = torch.jit.load(str(jit_path), map_location="cpu").eval()
        xt = torch.from_numpy(x)

        def run_ts():
            with torch.inference_mode():
                return ts(xt).numpy()
        try:
            out = run_ts()
            res["torchscript"] = {**_compare(ref, out), **_time(run_ts, runs)}
        except Exception as exc:  # noqa: BLE001
            res["torchscript"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return res


def _machine() -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from run_benchmarks import cpu_model  # the script's own folder is on sys.path

    return {"cpu": cpu_model(default=""), "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "loadavg_start": list(os.getloadavg())}


def _ms(s) -> str:
    return "-" if s is None else f"{1000 * s:.0f}"


def _write_md(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = ["# Lighter runtimes for the students: ONNX Runtime and TorchScript vs torch", "",
             "Generated by `python benchmarks/runtime.py`; do not edit, rerun the script.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; Python {m['python']}, torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}. {res['threads']} threads in "
             f"every runtime (ONNX Runtime: intra-op {res['threads']}, inter-op 1). Load average at start / end: "
             f"{m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f}.", "",
             f"Tolerance: max |softmax difference| <= {TOLERANCE:g} counts as identical to torch. Forward: median of "
             f"{res['runs']} runs after 2 warm-ups, softmax included, in one process. Fresh processes: median of "
             f"{res['fresh']} runs; numpy is imported before the timer starts.", "",
             "## Agreement with torch and warm forward time", "",
             "| student | input (shape) | torch ms | ORT ms | TorchScript ms | ORT max abs diff / labels differing | "
             "TorchScript max abs diff / labels differing |", "|---|---|---|---|---|---|---|"]
    for r in res["forward"]:
        def cell(k):
            v = r.get(k)
            if v is None:
                return "-", "not run"
            if "error" in v:
                return "error", v["error"][:80]
            return _ms(v["median_s"]), f"{v['max_abs_softmax_diff']:.1e} / {100 * v['label_diff_share']:.4f}%"
        o, oc = cell("onnxruntime")
        j, jc = cell("torchscript")
        lines.append(f"| {r['task']} | {r['input']} {tuple(r['shape'])} | {_ms(r['torch']['median_s'])} | {o} | {j} "
                     f"| {oc} | {jc} |")
    lines += ["", "## Start-up in a fresh process (medians, ms)", "",
              f"`import torch` alone: {_ms(res['imports']['torch']['import'])} ms; `import onnxruntime` alone: "
              f"{_ms(res['imports']['onnxruntime']['import'])} ms (onnxruntime pulls in torch: "
              f"{res['imports']['onnxruntime_imports_torch']}). Process wall (interpreter start to exit, numpy "
              f"included): {_ms(res['imports']['torch']['process_wall'])} vs "
              f"{_ms(res['imports']['onnxruntime']['process_wall'])} ms.", "",
              "| student | runtime | import | load | first forward | import+load+forward | process wall |",
              "|---|---|---|---|---|---|---|"]
    for task, per in res["startup"].items():
        for rt, v in per.items():
            if "error" in v:
                lines.append(f"| {task} | {rt} | error: {v['error'][:100]} | | | | |")
                continue
            lines.append(f"| {task} | {rt} | {_ms(v['import'])} | {_ms(v['load'])} | {_ms(v['forward'])} | "
                         f"{_ms(v['total'])} | {_ms(v['process_wall'])} |")
    lines += ["", "## Export notes", ""]
    for task, n in res["export_notes"].items():
        lines.append(f"- {task}: " + "; ".join(f"{k}: {v}" for k, v in n.items()))
    if res.get("not_measured"):
        lines += ["", "## Not measured", "", *[f"- {x}" for x in res["not_measured"]]]
    lines += ["", "## Verdict", "", res.get("verdict", "(no verdict written)"), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--fresh", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--verdict", default="", help="text of the verdict paragraph (written after reading the numbers)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite runtime.md (and the verdict in runtime.json) from an existing runtime.json")
    args = ap.parse_args(argv)
    if args.render:
        out = Path(args.out)
        res = json.loads((out / "runtime.json").read_text())
        if args.verdict:
            res["verdict"] = args.verdict
            (out / "runtime.json").write_text(json.dumps(res, indent=1))
        _write_md(res, out / "runtime.md")
        return 0

    import numpy as np
    import torch

    from KDSegmentationLib.cli.main import tune_malloc

    tune_malloc()  # as the engine's processes run torch (large 3D activations stay in the heap)
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "runs": args.runs, "fresh": args.fresh, "tolerance": TOLERANCE,
           "machine": _machine(), "forward": [], "startup": {}, "export_notes": {}, "not_measured": []}
    tmp = Path(tempfile.mkdtemp(prefix="kdseg_runtime_"))
    for task in args.tasks.split(","):
        print(f"[{task}] export", flush=True)
        x, roi = _sample_input(task)
        net, onnx_path, jit_path, notes = _export(task, tmp, x)
        model_file = ROOT / "Resources" / "Models" / f"{task}_student.kdseg.pt"
        notes["file_sizes_kB"] = {"kdseg.pt (fp16)": model_file.stat().st_size // 1024,
                                  **({"onnx (fp32)": onnx_path.stat().st_size // 1024} if onnx_path else {}),
                                  **({"torchscript (fp32)": jit_path.stat().st_size // 1024} if jit_path else {})}
        res["export_notes"][task] = notes
        print(f"[{task}] forward {x.shape}", flush=True)
        r = _measure_input("sample", net, onnx_path, jit_path, x, args.runs, args.threads)
        r["task"] = task
        res["forward"].append(r)
        inputs = [("sample", x)]
        if task == "liver":
            big = np.ascontiguousarray(np.tile(x, (1, 1, 2, 2, 1)))  # 4x the voxels; still below the whole-volume cap
            print(f"[{task}] forward {big.shape}", flush=True)
            r = _measure_input("sample tiled 2x2 (z, y)", net, onnx_path, jit_path, big, args.runs, args.threads)
            r["task"] = task
            res["forward"].append(r)
            inputs.append(("big", big))
        inp = tmp / f"{task}_sample.npy"
        np.save(inp, x)
        per = {}
        for rt, path in (("torch", model_file), ("onnxruntime", onnx_path), ("torchscript", jit_path)):
            if path is None:
                per[rt] = {"error": "no exported model"}
                continue
            print(f"[{task}] fresh {rt}", flush=True)
            mode = {"torch": "torch", "onnxruntime": "ort", "torchscript": "jit"}[rt]
            try:
                runs = [_fresh(mode, str(path), str(inp), args.threads) for _ in range(args.fresh)]
                per[rt] = {**_medians(runs), "torch_imported": runs[0]["torch_imported"], "all": runs}
            except RuntimeError as exc:
                per[rt] = {"error": str(exc)[:400]}
        res["startup"][task] = per
    print("[imports] fresh", flush=True)
    ti = [_fresh("import_torch") for _ in range(args.fresh)]
    oi = [_fresh("import_ort") for _ in range(args.fresh)]
    res["imports"] = {"torch": _medians(ti), "onnxruntime": _medians(oi),
                      "onnxruntime_imports_torch": oi[0]["torch_imported"], "all": {"torch": ti, "onnxruntime": oi}}
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.verdict:
        res["verdict"] = args.verdict
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps(res, indent=1))
    _write_md(res, out / "runtime.md")
    print(f"wrote {out / 'runtime.json'} and {out / 'runtime.md'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
