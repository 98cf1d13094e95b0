"""The Slicer panel's client of the engine, run for real against child processes (no Slicer needed)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
import sys
import textwrap
import time
from pathlib import Path

import pytest

from KDSegmentationLib.client import commands, display, environment, models, resources, runs
from KDSegmentationLib.client.process import LIB_PARENT, EngineProcess, engine_env

POSIX = os.name != "nt"


def _drain(w: EngineProcess, timeout: float = 20.0, until=None):
    """Poll like the panel's timer does, until the child is done (or ``until(events)`` holds)."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += w.poll_events()
        if until is not None and until(events):
            return events
        if w.finished:
            return events
        time.sleep(0.02)
    raise AssertionError(f"engine process did not finish in {timeout} s; events so far: {events}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie nobody reaped yet (PID 1 in a container may not) is not running any more.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _script(tmp_path: Path, body: str, name: str = "stand_in.py") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


PROTOCOL_SCRIPT = """
    import json, sys, time
    def emit(**obj):
        print(json.dumps(obj), flush=True)
    print("plain text from the engine", flush=True)
    for i in range(4):
        emit(event="progress", stage="inference", fraction=i / 4)
        time.sleep(0.05)
    emit(event="metric", step=3, loss=0.5, val_dice=0.8)
    emit(event="log", level="warning", message="spacing looks odd")
    emit(event="result", path=sys.argv[1], segments={"Liver": {"volume_ml": 1523.44}})
"""


def test_protocol_lines_are_parsed_and_plain_lines_kept_as_log(tmp_path):
    script = _script(tmp_path, PROTOCOL_SCRIPT)
    w = EngineProcess([sys.executable, str(script), "out.seg.nrrd"], env=engine_env()).start()
    events = _drain(w)
    assert w.returncode == 0
    kinds = [e["event"] for e in events]
    assert kinds.count("progress") == 4
    assert events[0] == {"event": "log", "level": "info", "message": "plain text from the engine", "raw": True}
    assert [e["fraction"] for e in events if e["event"] == "progress"] == [0.0, 0.25, 0.5, 0.75]
    assert {"event": "metric", "step": 3, "loss": 0.5, "val_dice": 0.8} in events
    warning = next(e for e in events if e["event"] == "log" and e.get("level") == "warning")
    assert warning["message"] == "spacing looks odd"
    result = events[-1]
    assert result["event"] == "result" and result["path"] == "out.seg.nrrd"
    assert display.format_volumes(result) == "Liver: 1523.4 mL"
    assert w.wait(1) == 0 and w.poll_events() == []


def test_failing_run_reports_error_event_and_exit_code(tmp_path):
    script = _script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "error", "message": "input x.nrrd does not exist; give an image file"}), flush=True)
        print("kdseg: error: input x.nrrd does not exist", file=sys.stderr, flush=True)
        sys.exit(2)
    """)
    w = EngineProcess([sys.executable, str(script)], env=engine_env()).start()
    events = _drain(w)
    assert w.returncode == 2
    errors = [e for e in events if e["event"] == "error"]
    assert errors and "does not exist" in errors[0]["message"]
    # stderr is merged so the human-readable line reaches the panel's log too
    assert any(e.get("raw") and "kdseg: error" in e["message"] for e in events)


GRANDCHILD_SCRIPT = """
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"event": "log", "level": "info", "message": "grandchild %d" % child.pid}), flush=True)
    for i in range(1200):
        print(json.dumps({"event": "progress", "stage": "inference", "fraction": i / 1200}), flush=True)
        time.sleep(0.1)
"""


def test_cancel_mid_run_kills_the_whole_process_tree(tmp_path):
    script = _script(tmp_path, GRANDCHILD_SCRIPT)
    w = EngineProcess([sys.executable, str(script)], env=engine_env()).start()
    events = _drain(w, until=lambda ev: sum(e["event"] == "progress" for e in ev) >= 3)
    grandchild = next(int(e["message"].split()[-1]) for e in events
                      if str(e.get("message", "")).startswith("grandchild"))
    assert _alive(w.pid) and _alive(grandchild)
    started = time.monotonic()
    rc = w.cancel()
    assert time.monotonic() - started < 10
    assert w.cancelled
    assert rc is not None and rc != 0
    assert _wait_dead(w.pid), "engine process still running after cancel"
    assert _wait_dead(grandchild), "grandchild survived cancel"
    _drain(w, timeout=5)  # the reader thread reaches EOF and the queue empties
    assert w.finished


@pytest.mark.skipif(not POSIX, reason="graceful stop is SIGTERM on POSIX")
def test_cancel_with_grace_lets_the_child_stop_cleanly(tmp_path):
    script = _script(tmp_path, """
        import json, signal, sys, time
        def stop(signum, frame):
            print(json.dumps({"event": "log", "level": "info", "message": "checkpoint saved"}), flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print(json.dumps({"event": "progress", "stage": "epoch", "fraction": 0.1}), flush=True)
        time.sleep(60)
    """)
    w = EngineProcess([sys.executable, str(script)], env=engine_env()).start()
    _drain(w, until=lambda ev: any(e["event"] == "progress" for e in ev))
    assert w.cancel(grace_s=10) == 143
    events = _drain(w, timeout=5)
    assert any(e.get("message") == "checkpoint saved" for e in events)


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder = tmp_path / "dossier avec espaces é 肝臓"
    script = _script(folder, """
        import json, sys
        import KDSegmentationLib.progress  # importable through engine_env's PYTHONPATH
        print(json.dumps({"event": "result", "path": sys.argv[1]}), flush=True)
    """, name="stand in é.py")
    target = str(folder / "résultat 1.seg.nrrd")
    env = engine_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    w = EngineProcess([sys.executable, str(script), target], env=env, cwd=folder).start()
    events = _drain(w)
    assert w.returncode == 0, events
    assert events[-1] == {"event": "result", "path": target}


def test_interactive_engine_process_takes_requests(tmp_path):
    script = _script(tmp_path, """
        import json, sys
        print(json.dumps({"event": "log", "level": "info", "message": "ready"}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            print(json.dumps({"event": "result", "id": req["id"], "path": req["output"]}), flush=True)
    """)
    w = EngineProcess([sys.executable, str(script)], env=engine_env(), interactive=True).start()
    w.send(commands.segment_request(1, "liver", "in.nrrd", "a.seg.nrrd"))
    w.send(commands.segment_request(2, "lung_nodule", "in.nrrd", "b.seg.nrrd", seed_ras=(-1.5, 2, 3)))
    events = _drain(w, until=lambda ev: sum(e["event"] == "result" for e in ev) == 2)
    assert [(e["id"], e["path"]) for e in events if e["event"] == "result"] == [(1, "a.seg.nrrd"), (2, "b.seg.nrrd")]
    w.close_input()
    assert w.wait(10) == 0


def test_engine_env_puts_the_engine_first_and_keeps_output_unbuffered():
    env = engine_env({"PYTHONPATH": os.pathsep.join(["/elsewhere", str(LIB_PARENT)]), "A": "1"},
                            extra={"CUDA_VISIBLE_DEVICES": -1})
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(LIB_PARENT) and parts.count(str(LIB_PARENT)) == 1
    assert "/elsewhere" in parts
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8"
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["A"] == "1"


def test_command_lines():
    cmd = commands.segment_command("/opt/Slicer dir/bin/PythonSlicer", "lung_nodule", "/tmp/a b/in.nrrd",
                                 "/tmp/a b/out.seg.nrrd", model="teacher", device="cpu",
                                 seed_ras=(-56.37, -86.32, -115.99), threads=2)
    assert cmd[:3] == ["/opt/Slicer dir/bin/PythonSlicer", "-m", "KDSegmentationLib"]
    assert cmd[3] == "segment"
    assert "--input=/tmp/a b/in.nrrd" in cmd and "--output=/tmp/a b/out.seg.nrrd" in cmd
    assert "--seed-ras=-56.37,-86.32,-115.99" in cmd
    assert cmd[cmd.index("--progress") + 1] == "json"
    assert cmd[cmd.index("--threads") + 1] == "2"
    d = commands.distill_command("py", "retina", "/m/t.kdseg.pt", "/d", "/o/s.kdseg.pt", unlabelled="/u",
                               alpha=0.5, temperature=2, max_minutes=10, epochs=0)
    assert d[3] == "distill" and "--unlabelled=/u" in d and "--epochs" not in d
    assert d[d.index("--alpha") + 1] == "0.5" and d[d.index("--temperature") + 1] == "2.0"
    assert d[d.index("--max-minutes") + 1] == "10.0"
    assert not any(a.startswith("--init") for a in d) and "--teacher-targets" not in d
    d = commands.distill_command("py", "retina", "/m/t.kdseg.pt", "/d", "/o/s.kdseg.pt", init="/m/s.kdseg.pt",
                                 teacher_targets="stored")
    assert "--init=/m/s.kdseg.pt" in d and d[d.index("--teacher-targets") + 1] == "stored"
    assert commands.models_list_command("py")[3:] == ["models", "list", "--json"]
    assert commands.serve_command("py", threads=3)[3:] == ["serve", "--threads", "3"]


def _cli_parser():
    try:
        from KDSegmentationLib.cli.main import build_parser
    except Exception as exc:  # the command line is written in parallel
        pytest.skip(f"KDSegmentationLib.cli.main does not import yet: {exc}")
    return build_parser()


def test_segment_command_matches_the_command_line_contract():
    parser = _cli_parser()
    cmd = commands.segment_command("py", "lung_nodule", "/in dir/é.nrrd", "/out/x.seg.nrrd", device="cuda",
                                 seed_ras=(-56.37, -86.32, -115.99))
    args = parser.parse_args(cmd[3:])
    assert (args.task, args.input, args.output, args.device, args.progress) == (
        "lung_nodule", "/in dir/é.nrrd", "/out/x.seg.nrrd", "cuda", "json")
    from KDSegmentationLib.cli.arguments import parse_seed

    assert parse_seed(args.seed_ras) == (-56.37, -86.32, -115.99)


def test_models_list_through_the_real_command_line(tmp_path):
    _cli_parser()
    if importlib.util.find_spec("KDSegmentationLib.models.catalog") is None:
        pytest.skip("KDSegmentationLib.models.catalog (behind 'kdseg models list') is not written yet")
    env = engine_env(extra={"KDSEG_USER_MODELS": str(tmp_path / "user models")})
    w = EngineProcess(commands.models_list_command(sys.executable), env=env, merge_stderr=False,
                      read_events=False).start()
    events = _drain(w, timeout=120)
    assert w.returncode == 0, events
    entries = models.parse_models_output(e["message"] for e in events if e.get("raw") and not e.get("stream"))
    assert isinstance(entries, list)
    for entry in entries:
        assert {"name", "task"} <= set(entry)


# ---------------------------------------------------------------------------------------------------------------
# small helpers the panel shows to the user
# ---------------------------------------------------------------------------------------------------------------

def test_format_volumes_for_each_task():
    liver = {"event": "result", "segments": {"Liver": {"volume_ml": 1523.449}, "Liver tumor": {"volume_ml": 0.0}}}
    assert display.format_volumes(liver) == "Liver: 1523.4 mL\nLiver tumor: 0.0 mL"
    nodule = {"segments": {"Lung nodule": {"volume_ml": 0.5234, "longest_axial_diameter_mm": 11.26,
                                           "max_3d_diameter_mm": 13.04}},
              "warnings": ["seed is near the image border"]}
    assert display.format_volumes(nodule) == ("Lung nodule: 0.5 mL, longest axial diameter (RECIST) 11.3 mm, "
                                             "maximum 3D diameter 13.0 mm\n"
                                             "Warning: seed is near the image border")
    retina = {"segments": {"Retinal vessels": {"area_px": 30211, "fraction_of_fov": 0.1123}}}
    assert display.format_volumes(retina) == "Retinal vessels: 30211 px (11.2% of the field of view)"
    assert display.format_volumes({"segments": {}}) == "No segment found."
    assert display.format_volumes(None) == ""


def test_progress_and_time_text():
    assert display.describe_progress({"stage": "sliding_window", "fraction": 0.424}) == "Sliding window 42%"
    assert display.describe_progress({"stage": "reading"}) == "Reading"
    assert display.format_elapsed(7.4) == "0:07"
    assert display.format_elapsed(3725) == "1:02:05"


def test_gpu_oom_detection():
    assert runs.is_gpu_oom("internal error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert runs.is_gpu_oom("RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
    # the engine's CPU out-of-memory message mentions --device cuda: that is not a GPU failure
    assert not runs.is_gpu_oom("out of memory; use a machine with more memory, a smaller image, or --device cuda")
    assert not runs.is_gpu_oom(None)


def test_metric_history():
    h = display.MetricHistory()
    assert h.add({"event": "metric", "step": 10, "epoch": 1, "loss": 0.9})
    assert h.add({"event": "metric", "step": 20, "loss": 0.7, "val_dice": 0.55})
    assert not h.add({"event": "metric", "step": 30, "eta_s": 12})
    # only the keys training writes are plotted
    assert not h.add({"event": "metric", "step": 40, "train_loss": 0.3, "dice": 0.9, "validation_dice": 0.9})
    assert (h.loss_x, h.loss, h.dice_x, h.dice) == ([10.0, 20.0], [0.9, 0.7], [20.0], [0.55])
    assert display.format_metric({"event": "metric", "step": 2, "loss": 0.123456}) == "step=2 loss=0.1235"


def test_next_model_path_never_overwrites(tmp_path):
    assert models.next_model_path(tmp_path / "missing", "liver").name == "liver_student_local_v1.kdseg.pt"
    (tmp_path / "liver_student_local_v1.kdseg.pt").write_bytes(b"x")
    (tmp_path / "liver_student_local_v7.kdseg.pt").write_bytes(b"x")
    (tmp_path / "retina_student_local_v9.kdseg.pt").write_bytes(b"x")
    assert models.next_model_path(tmp_path, "liver").name == "liver_student_local_v8.kdseg.pt"
    assert models.next_model_path(tmp_path, "retina").name == "retina_student_local_v10.kdseg.pt"


def test_models_output_choices_card_and_delete(tmp_path):
    user = tmp_path / "user models"
    user.mkdir()
    model = user / "liver_student_local_v2.kdseg.pt"
    model.write_bytes(b"m")
    (user / "liver_student_local_v2.json").write_text("{}")
    (user / "liver_student_local_v2.png").write_bytes(b"p")
    keep = user / "liver_student_local_v20.kdseg.pt"
    keep.write_bytes(b"k")
    entries = [
        {"name": "liver_student", "task": "liver", "role": "student", "source": "shipped",
         "path": str(tmp_path / "liver_student.kdseg.pt"), "card": {"parameters": 150000}},
        {"name": model.name, "task": "liver", "role": "student", "source": "local", "path": str(model),
         "card": {"data": "12 local CTs", "metrics": {"dice": 0.91}, "speed": "1.2 s on CPU"}},
    ]
    lines = json.dumps(entries, indent=2).splitlines()
    assert models.parse_models_output(lines) == entries
    assert models.parse_models_output(json.dumps(entries)) == entries
    for bad in ([], ["", "  "], ["warning: something", "[]"], ["[]", "[]"], ['{"name": "x"}'], ["[1, 2]"],
                ["[{"]):
        with pytest.raises(ValueError):
            models.parse_models_output(bad)
    choices = models.model_choices(entries, "liver")
    assert [v for _, v in choices] == ["student", "teacher", str(model)]
    assert [v for _, v in models.model_choices(entries, "retina")] == ["student", "teacher"]
    card = models.model_card_text(entries[1])
    assert "Data: 12 local CTs" in card and "Metrics: dice 0.91" in card and "Speed: 1.2 s on CPU" in card
    with pytest.raises(ValueError):
        models.delete_user_model(entries[0], user)
    removed = models.delete_user_model(entries[1], user)
    assert sorted(p.name for p in removed) == ["liver_student_local_v2.json", "liver_student_local_v2.kdseg.pt",
                                               "liver_student_local_v2.png"]
    assert keep.exists()


def test_missing_requirements_reads_metadata_only():
    versions = {"monai": "1.2.0", "pynrrd": "1.0.0", "slicerio": None, "tqdm": "4.66.1", "onnxruntime": "1.20.1",
                "onnx": "1.17.0"}
    missing = environment.missing_requirements(environment.SLICER_REQUIREMENTS, version_of=versions.get)
    assert missing == ["monai>=1.3", "slicerio>=1.1"]
    assert environment.missing_requirements(["numpy"], version_of=lambda n: "2.0.1") == []
    assert environment.missing_requirements(["monai>=1.3"], version_of=lambda n: "1.3.0rc1") == []
    with pytest.raises(ValueError):
        environment.missing_requirements(["monai==1.3"], version_of=lambda n: "1.3")


def test_bundled_samples_are_found(repo_root):
    samples = resources.find_samples(repo_root / "Resources" / "Samples")
    tasks = {s["task"] for s in samples}
    assert tasks, "no bundled samples found"
    for s in samples:
        assert Path(s["path"]).is_file()
        assert len(s["sha256"]) == 64
    nodule = [s for s in samples if s["task"] == "lung_nodule"]
    for s in nodule:
        assert s["seed_ras"] and len(s["seed_ras"]) == 3


def test_terminology_files_and_safe_names(tmp_path):
    (tmp_path / "a.term.json").write_text(json.dumps({"SegmentationCategoryTypeContextName": "x"}))
    (tmp_path / "b.json").write_text(json.dumps({"AnatomicContextName": "y"}))
    (tmp_path / "c.json").write_text("not json")
    kinds = {Path(p).name: k for p, k in resources.terminology_files(tmp_path)}
    assert kinds == {"a.term.json": "category", "b.json": "anatomic"}
    assert resources.safe_name("CT chest: 1/2 é") == "CT_chest_1_2_é"
    assert resources.safe_name("///") == "case"


def test_client_package_stays_light():
    code = ("import sys; import KDSegmentationLib.client; "
            "heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'numpy') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], env=engine_env(), capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------------------------
# RunManager: the state machine the panel's timer drives, against a stand-in engine
# ---------------------------------------------------------------------------------------------------------------

FAKE_ENGINE = '''
import json, os, signal, sys, time
mode = os.environ.get("FAKE_MODE", "ok")
args = sys.argv[1:]


def emit(**o):
    print(json.dumps(o), flush=True)


def opt(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return args[args.index(name) + 1] if name in args else None


def segment(inp, out, device, extra):
    assert os.path.isfile(inp), inp
    for i in range(3):
        emit(event="progress", stage="inference", fraction=i / 3, **extra)
        time.sleep(0.01)
    if mode == "slow":
        time.sleep(60)
    if mode == "oom" and device != "cpu":
        return "internal error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    if mode == "fail":
        return "input is not a CT; give an abdominal CT"
    open(out, "w").write("seg")
    emit(event="result", path=out, device=device, pid=os.getpid(),
         segments={"Liver": {"volume_ml": 1500.25}}, **extra)


cmd = args[0]
if cmd == "serve":
    if mode == "noserve":
        print("kdseg: error: invalid choice: 'serve'", file=sys.stderr)
        sys.exit(2)
    emit(event="log", level="info", message="ready")
    for line in sys.stdin:
        req = json.loads(line)
        err = segment(req["input"], req["output"], req["device"], {"id": req["id"]})
        if err:
            emit(event="error", message=err, id=req["id"])
elif cmd == "segment":
    err = segment(opt("--input"), opt("--output"), opt("--device"), {})
    if err:
        emit(event="error", message=err)
        sys.exit(2 if mode == "fail" else 1)
elif cmd == "models":
    print("UserWarning: a library talks on stderr", file=sys.stderr, flush=True)
    if mode == "badmodels":
        print("loading models...", flush=True)
    print(json.dumps([{"name": "liver_student", "task": "liver", "role": "student", "source": "shipped",
                       "path": "/m/liver_student.kdseg.pt", "card": {}}], indent=2))
elif cmd == "distill":
    def stop(*_):
        emit(event="log", level="info", message="checkpoint kept")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    for step in range(1, 6):
        emit(event="metric", step=step * 10, loss=1.0 / step, **({"val_dice": 0.1 * step} if step % 2 == 0 else {}))
        emit(event="progress", stage="training", fraction=step / 5)
        time.sleep(2 if mode == "slow" else 0.01)
    open(opt("--output"), "w").write("model")
    emit(event="result", path=opt("--output"))
'''


@pytest.fixture
def engine(tmp_path):
    """A RunManager whose engine is a stand-in; ``engine.mode = ...`` picks its behaviour."""
    package = tmp_path / "fake engine é" / "KDSegmentationLib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_ENGINE, encoding="utf-8")

    class Engine:
        mode = "ok"

    state = Engine()
    def env():
        e = engine_env(extra={"FAKE_MODE": state.mode})
        e["PYTHONPATH"] = str(package.parent)  # the stand-in instead of the real engine
        return e

    manager = runs.RunManager(python_executable=lambda: sys.executable, env=env)
    state.manager = manager
    state.tmp = tmp_path
    yield state
    manager.shutdown()


def _segment_run(engine, keep, device="auto", log=None):
    run = runs.Run("segment", log_callback=log)
    run.task, run.device, run.use_persistent = "liver", device, keep
    run.temp_dir = tempfile.mkdtemp(dir=engine.tmp)
    run.input_path = os.path.join(run.temp_dir, "input.nrrd")
    Path(run.input_path).write_text("img")
    run.output_path = os.path.join(run.temp_dir, "result.seg.nrrd")
    return engine.manager.start_segment(run)


@pytest.mark.parametrize("keep", [False, True], ids=["one-shot", "persistent"])
def test_run_manager_segments_and_cleans_up(engine, keep):
    finished = []
    run = _segment_run(engine, keep)
    run.finished_callback = finished.append
    temp_dir = run.temp_dir
    engine.manager.wait(run, timeout_s=30)
    assert run.status == "succeeded", run.message
    assert run.message == "Liver: 1500.2 mL" and finished == [run]
    assert not os.path.exists(temp_dir) and not engine.manager.active
    if keep:
        second = engine.manager.wait(_segment_run(engine, keep), timeout_s=30)
        assert second.status == "succeeded"
        assert second.result["pid"] == run.result["pid"], "the persistent engine process was not reused"


@pytest.mark.parametrize("keep", [False, True], ids=["one-shot", "persistent"])
def test_run_manager_reruns_on_cpu_after_gpu_out_of_memory(engine, keep):
    engine.mode = "oom"
    logs = []
    run = engine.manager.wait(_segment_run(engine, keep, device="cuda", log=lambda m, lvl: logs.append((lvl, m))),
                              timeout_s=30)
    assert run.status == "succeeded", run.message
    assert run.device == "cpu" and run.retried_on_cpu
    assert any(lvl == "warning" and "running again on the CPU" in m for lvl, m in logs)


@pytest.mark.parametrize("keep", [False, True], ids=["one-shot", "persistent"])
def test_run_manager_reports_the_engine_error(engine, keep):
    engine.mode = "fail"
    run = engine.manager.wait(_segment_run(engine, keep, device="cuda"), timeout_s=30)
    assert run.status == "failed" and run.message == "input is not a CT; give an abdominal CT"
    assert not run.retried_on_cpu


def test_run_manager_result_hook_failure_fails_the_run(engine):
    def broken(run):
        raise RuntimeError("scene is gone")

    engine.manager.on_segment_result = broken
    run = engine.manager.wait(_segment_run(engine, False), timeout_s=30)
    assert run.status == "failed" and "scene is gone" in run.message


@pytest.mark.parametrize("keep", [False, True], ids=["one-shot", "persistent"])
def test_run_manager_cancel_kills_and_cleans_up(engine, keep):
    engine.mode = "slow"
    run = _segment_run(engine, keep)
    deadline = time.monotonic() + 20
    while not run.stage and time.monotonic() < deadline:
        engine.manager.poll()
        time.sleep(0.02)
    assert run.stage.startswith("Inference")
    pid, temp_dir = run.process.pid, run.temp_dir
    engine.manager.cancel(run)
    assert run.status == "cancelled" and not engine.manager.active
    assert _wait_dead(pid) and not os.path.exists(temp_dir)


def test_run_manager_falls_back_when_the_persistent_mode_is_missing(engine):
    engine.mode = "noserve"
    logs = []
    run = engine.manager.wait(_segment_run(engine, True, log=lambda m, lvl: logs.append(m)), timeout_s=30)
    assert run.status == "succeeded" and run.persistent_fallback_tried and not run.persistent
    assert any("running this segmentation in a new process" in m for m in logs)
    again = engine.manager.wait(_segment_run(engine, True), timeout_s=30)
    assert again.status == "succeeded" and not again.use_persistent  # not tried again


def test_run_manager_lists_models_and_distils_with_metrics(engine, tmp_path):
    listing = runs.Run("models")
    engine.manager.start_command(listing, commands.models_list_command(sys.executable))
    engine.manager.wait(listing, timeout_s=30)
    assert listing.status == "succeeded" and listing.result[0]["name"] == "liver_student"

    plotted = []
    engine.manager.on_metric = lambda run: plotted.append(len(run.metrics.loss))
    output = models.next_model_path(tmp_path / "user models", "liver")
    output.parent.mkdir()
    run = runs.Run("distill")
    run.model_path = output
    engine.manager.start_command(run, commands.distill_command(sys.executable, "liver", "t.kdseg.pt", tmp_path,
                                                             output, epochs=2))
    engine.manager.wait(run, timeout_s=30)
    assert run.status == "succeeded" and run.message == "New model: liver_student_local_v1.kdseg.pt"
    assert run.model_path == output and output.is_file()
    assert run.metrics.loss == [1.0, 0.5, 1 / 3, 0.25, 0.2] and len(run.metrics.dice) == 2
    assert plotted and plotted[-1] == 5  # the last call sees every point


def test_run_manager_refuses_a_model_list_that_is_not_one_json_document(engine):
    engine.mode = "badmodels"
    logs = []
    listing = runs.Run("models", log_callback=lambda m, lvl: logs.append(m))
    engine.manager.start_command(listing, commands.models_list_command(sys.executable))
    engine.manager.wait(listing, timeout_s=30)
    assert listing.status == "failed" and "model list is not JSON" in listing.message
    assert "loading models..." in listing.message
    assert "UserWarning: a library talks on stderr" in logs  # stderr is logged, never parsed


@pytest.mark.skipif(not POSIX, reason="a clean stop is SIGTERM on POSIX")
def test_run_manager_stops_a_distillation_cleanly(engine, tmp_path):
    engine.mode = "slow"
    logs = []
    run = runs.Run("distill", log_callback=lambda m, lvl: logs.append(m))
    engine.manager.start_command(run, commands.distill_command(sys.executable, "liver", "t", tmp_path,
                                                             tmp_path / "x.kdseg.pt", max_minutes=5))
    deadline = time.monotonic() + 20
    while not run.metrics.loss and time.monotonic() < deadline:
        engine.manager.poll()
        time.sleep(0.02)
    engine.manager.request_stop(run, grace_s=20)
    engine.manager.wait(run, timeout_s=30)
    assert run.status == "cancelled" and "checkpoint" in run.message
    assert "checkpoint kept" in logs
    assert not (tmp_path / "x.kdseg.pt").exists()
