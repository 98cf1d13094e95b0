"""The panel starts the engine in a child process: whatever lies in the folder Slicer was started from (a
``numpy.py``, a ``KDSegmentationLib/``) is never imported by it. Real child processes, no stand-ins."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from KDSegmentationLib.client import commands, models
from KDSegmentationLib.client.process import LIB_NAME, EngineProcess, engine_env, safe_cwd, supports_safe_path, \
    with_safe_path


def _hostile_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    marker = tmp_path / "HOSTILE-CODE-RAN"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    folder.mkdir()
    (folder / "numpy.py").write_text(payload + "raise SystemExit('hostile numpy imported')\n")
    (folder / "torch.py").write_text(payload)
    package = folder / "KDSegmentationLib"
    package.mkdir()
    (package / "__init__.py").write_text(payload)
    (package / "__main__.py").write_text(payload + "raise SystemExit(42)\n")
    return marker


def _drain(w: EngineProcess, timeout: float = 180.0):
    events, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        events += w.poll_events()
        if w.finished:
            break
        time.sleep(0.05)
    events += w.poll_events()
    return events


@pytest.mark.parametrize("command", ["models", "engine import"])
def test_engine_started_from_a_hostile_folder_imports_nothing_from_it(command, tmp_path, monkeypatch):
    marker = _hostile_folder(tmp_path)
    monkeypatch.chdir(tmp_path / "downloads")  # the panel's current directory
    env = engine_env(extra={"KDSEG_USER_MODELS": str(tmp_path / "user models")})
    if command == "models":
        cmd = commands.models_list_command(sys.executable)
    else:  # the engine's own imports (numpy, torch) as a persistent worker would do them
        cmd = [sys.executable, "-m", LIB_NAME, "serve", "--threads", "1"]
    w = EngineProcess(cmd, env=env, interactive=command != "models", merge_stderr=command != "models",
                      read_events=command != "models").start()
    if command != "models":
        w.send({"command": "quit"})
    events = _drain(w)
    assert w.returncode == 0, events
    assert not marker.exists(), marker.read_text()
    if command == "models":
        stdout = [e["message"] for e in events if e.get("raw") and not e.get("stream")]
        assert isinstance(models.parse_models_output(stdout), list)


def test_engine_env_and_command_keep_the_current_directory_off_sys_path():
    env = engine_env({})
    assert env["PYTHONSAFEPATH"] == "1"
    cmd = with_safe_path(commands.serve_command(sys.executable))
    if sys.version_info >= (3, 11):
        assert cmd[:4] == [sys.executable, "-P", "-m", LIB_NAME]
    assert with_safe_path([sys.executable, "script.py"]) == [sys.executable, "script.py"]
    assert supports_safe_path(str(Path(sys.executable).parent / "no-such-python")) is False
    assert Path(safe_cwd()).is_dir() and Path(safe_cwd()).resolve() != Path(os.getcwd()).resolve()
