"""One wire protocol: the client imports nothing heavy, and every event the engine writes uses the names of
KDSegmentationLib.protocol (real engine runs on the bundled retina sample with a tiny model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import LIB_PARENT, REPO
from KDSegmentationLib import protocol as P

PHOTO = REPO / "Resources" / "Samples" / "retina" / "fundus_CHASE_DB1_Image_01L.jpg"
HEAVY = ("torch", "monai", "numpy", "SimpleITK", "scipy", "nibabel", "skimage", "nrrd", "tqdm")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(LIB_PARENT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_client_package_imports_with_the_heavy_packages_blocked():
    code = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Blocker())
        import KDSegmentationLib.client as client
        names = ["KDSegmentationLib.protocol"] + [
            "KDSegmentationLib.client." + m.name for m in pkgutil.iter_modules(client.__path__)]
        for name in names:
            importlib.import_module(name)
        engine = sorted(m for m in sys.modules if m.startswith("KDSegmentationLib.")
                        and not m.startswith(("KDSegmentationLib.client", "KDSegmentationLib.protocol")))
        print(json.dumps({{"modules": names, "engine": engine,
                          "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout)
    assert {"KDSegmentationLib.client.runs", "KDSegmentationLib.client.process"} <= set(loaded["modules"])
    # only the protocol, never the engine's own layers (which would pull torch in Slicer's process)
    assert loaded["engine"] == [] and loaded["heavy"] == [], loaded


def test_progress_writes_only_protocol_names(capsys):
    from KDSegmentationLib.progress import Progress

    progress = Progress("json")
    progress.progress(P.STAGE_INFERENCE, 0.5)
    progress.metric(step=1, loss=0.5)
    progress.log("x", P.LEVEL_WARNING)
    progress.result("out.seg.nrrd")
    progress.error("bad")
    events = [P.parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert [e[P.EVENT] for e in events] == list(P.EVENTS)


@pytest.fixture(scope="module")
def tiny_retina_model(tmp_path_factory):
    """A student with random weights and width 4: enough to run every stage of the retina pipeline."""
    import torch
    from KDSegmentationLib.models.files import save_model
    from KDSegmentationLib.models.networks import build_network, default_arch_args

    torch.manual_seed(0)
    arch, args = default_arch_args("retina", "student")
    args = dict(args, width=4)
    return save_model(tmp_path_factory.mktemp("models") / "retina_tiny.kdseg.pt", build_network(arch, **args),
                      arch=arch, arch_args=args, task="retina", role="student")


def _check_events(lines):
    events = []
    for line in lines:
        event = P.parse_event(line)
        assert event is not None, f"not a protocol event: {line[:300]}"
        assert event[P.EVENT] in P.EVENTS
        if event[P.EVENT] == P.EVENT_PROGRESS:
            assert event[P.STAGE] in P.STAGES, event
            assert 0.0 <= event[P.FRACTION] <= 1.0
        elif event[P.EVENT] == P.EVENT_LOG:
            assert event[P.LEVEL] in P.LEVELS, event
        events.append(event)
    return events


def test_segment_events_use_the_protocol_names(tmp_path, tiny_retina_model):
    out = tmp_path / "vessels.seg.nrrd"
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "segment", "--task", "retina",
                           f"--input={PHOTO}", f"--output={out}", f"--model={tiny_retina_model}", "--device", "cpu",
                           "--threads", "1", "--progress", "json"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _check_events(proc.stdout.splitlines())
    stages = [e[P.STAGE] for e in events if e[P.EVENT] == P.EVENT_PROGRESS]
    assert set(stages) <= set(P.SEGMENT_STAGES) and stages[-1] == P.STAGE_DONE
    result = events[-1]
    assert result[P.EVENT] == P.EVENT_RESULT and result[P.PATH] == str(out)
    assert isinstance(result[P.RESULT_SEGMENTS], dict) and isinstance(result[P.RESULT_WARNINGS], list)
    assert result[P.RESULT_DEVICE] == "cpu"


def test_serve_reads_protocol_requests_and_tags_its_events(tmp_path, tiny_retina_model):
    from KDSegmentationLib.client.commands import quit_request, segment_request

    requests = [segment_request(7, "retina", PHOTO, tmp_path / "a.seg.nrrd", model=str(tiny_retina_model),
                                device="cpu"),
                {P.ID: 8, P.COMMAND: "unknown"},
                quit_request()]
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "serve", "--threads", "1"],
                          input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _check_events(proc.stdout.splitlines())
    assert events[0] == {P.EVENT: P.EVENT_LOG, P.LEVEL: P.LEVEL_INFO, P.MESSAGE: P.READY_MESSAGE}
    assert all(e[P.ID] in (7, 8) for e in events[1:])
    final = [(e[P.ID], e[P.EVENT]) for e in events if e[P.EVENT] in (P.EVENT_RESULT, P.EVENT_ERROR)]
    assert final == [(7, P.EVENT_RESULT), (8, P.EVENT_ERROR)]
    assert ", ".join(P.COMMANDS) in events[-1][P.MESSAGE]


def test_models_list_json_is_one_document_on_stdout(tmp_path, tiny_retina_model):
    user = tmp_path / "user models"
    user.mkdir()
    (user / "retina_student_local_v1.kdseg.pt").write_bytes(tiny_retina_model.read_bytes())
    (user / "broken_v1.kdseg.pt").write_bytes(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "KDSegmentationLib", "models", "list", "--json"],
                          capture_output=True, text=True, env=dict(_env(), KDSEG_USER_MODELS=str(user)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from KDSegmentationLib.client.models import is_local_model, parse_models_output

    entries = parse_models_output(proc.stdout)
    assert entries == json.loads(proc.stdout)
    sources = {e[P.MODEL_SOURCE] for e in entries}
    assert sources <= set(P.MODEL_SOURCES)
    local = {e["name"]: e for e in entries if is_local_model(e)}
    assert set(local) == {"retina_student_local_v1", "broken_v1"} and local["broken_v1"].get("error")
