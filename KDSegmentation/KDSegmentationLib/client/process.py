"""The engine process (``python -m KDSegmentationLib ...``) as a child: started with a safe environment and
working directory, its stdout read by a thread into a queue of protocol events, requests written to its stdin,
and cancelled by killing its whole process tree. The GUI polls :meth:`EngineProcess.poll_events` from a timer and
never waits on a pipe.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from KDSegmentationLib import protocol as P

LIB_NAME = "KDSegmentationLib"
LIB_PARENT = Path(__file__).resolve().parent.parent.parent  # the folder that has to be on PYTHONPATH

# Marks an event the client made from a line that is not a protocol event (plain text, a traceback, a JSON
# document); ``stream`` says which pipe it came from when stderr is read apart.
RAW = "raw"
STREAM = "stream"


def engine_env(base: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Environment for the child: the engine importable, unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    paths = [str(LIB_PARENT)]
    for p in env.get("PYTHONPATH", "").split(os.pathsep):
        if p and p not in paths:
            paths.append(p)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Unbuffered: progress lines must arrive while the child works, not when it exits.
    env["PYTHONUNBUFFERED"] = "1"
    # A Windows console code page would otherwise mangle non-ASCII paths in messages.
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    # Python >= 3.11: the current directory is not put on sys.path, so a numpy.py or KDSegmentationLib/ lying in
    # the folder Slicer was started from is never imported by the engine (older versions ignore it; see safe_cwd).
    env["PYTHONSAFEPATH"] = "1"
    for key, value in (extra or {}).items():
        env[str(key)] = str(value)
    return env


def safe_cwd() -> str:
    """Working directory for the engine: its own installed folder, which only the installer writes. Not the panel's
    current directory (anyone's download folder) nor the shared temp folder, where others can plant modules that
    an interpreter without ``-P`` would import first."""
    return str(LIB_PARENT) if LIB_PARENT.is_dir() else str(Path.home())


_SAFE_PATH_SUPPORT: Dict[str, bool] = {}


def supports_safe_path(python_executable) -> bool:
    """Whether ``python_executable`` understands ``-P`` (Python >= 3.11: no script/current folder on sys.path).
    Another interpreter (PythonSlicer) is asked once; any doubt answers False and the safe working directory and
    PYTHONSAFEPATH still apply."""
    exe = str(python_executable)
    if exe in _SAFE_PATH_SUPPORT:
        return _SAFE_PATH_SUPPORT[exe]
    try:
        same = Path(exe).resolve() == Path(sys.executable).resolve()
    except OSError:
        same = False
    if same:
        ok = sys.version_info >= (3, 11)
    else:
        try:
            probe = subprocess.run([exe, "-P", "-c", "import sys; sys.exit(0 if sys.flags.safe_path else 3)"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   cwd=safe_cwd(), timeout=20)
            ok = probe.returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    _SAFE_PATH_SUPPORT[exe] = ok
    return ok


def with_safe_path(command: Sequence[str]) -> List[str]:
    """``python -m KDSegmentationLib ...`` with ``-P`` added where the interpreter has it. Only engine command lines:
    a plain script may rely on its own folder being importable."""
    cmd = [str(c) for c in command]
    if len(cmd) >= 3 and cmd[1:3] == ["-m", LIB_NAME] and supports_safe_path(cmd[0]):
        return [cmd[0], "-P"] + cmd[1:]
    return cmd


def raw_event(line: str, stream: Optional[str] = None) -> Dict[str, Any]:
    """A ``log`` event holding a line that is not a protocol event, so nothing the child prints is lost."""
    event = {P.EVENT: P.EVENT_LOG, P.LEVEL: P.LEVEL_INFO, P.MESSAGE: line, RAW: True}
    if stream:
        event[STREAM] = stream
    return event


class EngineProcess:
    """A child process whose output is read by threads into a queue of protocol events.

    Lines that are not protocol events become :func:`raw_event` logs; with ``read_events=False`` every stdout
    line does (a command whose stdout is a JSON document, not events). stderr is merged into stdout unless
    ``merge_stderr`` is False, then its lines are raw logs marked ``"stream": "stderr"``. The child gets its own
    process group (POSIX and Windows) so :meth:`cancel` can end the child and everything it started.
    """

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd=None,
                 interactive: bool = False, merge_stderr: bool = True, read_events: bool = True):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = str(cwd) if cwd is not None else None
        self.interactive = interactive
        self.merge_stderr = merge_stderr
        self.read_events = read_events
        self.cancelled = False
        self.start_time: Optional[float] = None
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._open_pipes = 0
        self._lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        if self._proc is not None:
            raise RuntimeError("engine process already started")
        kwargs: Dict[str, Any] = dict(
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if self.merge_stderr else subprocess.PIPE,
            stdin=subprocess.PIPE if self.interactive else subprocess.DEVNULL,
            env=self.env, cwd=self.cwd if self.cwd is not None else safe_cwd(), text=True, encoding="utf-8",
            errors="replace", bufsize=1)
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(with_safe_path(self.command), **kwargs)
        self.start_time = time.monotonic()
        pipes = [(self._proc.stdout, None)]
        if not self.merge_stderr:
            pipes.append((self._proc.stderr, "stderr"))
        self._open_pipes = len(pipes)
        for pipe, stream in pipes:
            reader = threading.Thread(target=self._read, args=(pipe, stream), name="kdseg-engine-reader",
                                      daemon=True)
            self._readers.append(reader)
            reader.start()
        return self

    def _read(self, pipe, stream: Optional[str]) -> None:
        parse = self.read_events and stream is None
        try:
            for line in pipe:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                event = P.parse_event(line) if parse else None
                self._queue.put(event if event is not None else raw_event(line, stream))
        except (OSError, ValueError):  # pipe closed under us by a kill
            pass
        finally:
            with self._lock:
                self._open_pipes -= 1

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def finished(self) -> bool:
        """Exited and every line it printed has been handed out by :meth:`poll_events`."""
        with self._lock:
            eof = self._open_pipes == 0
        return self._proc is not None and self._proc.poll() is not None and eof and self._queue.empty()

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time if self.start_time is not None else 0.0

    def poll_events(self, max_events: Optional[int] = None) -> List[dict]:
        """Events read so far; never blocks."""
        events: List[dict] = []
        while max_events is None or len(events) < max_events:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return events

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Return code, or None if the child is still running after ``timeout`` seconds."""
        if self._proc is None:
            return None
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            # The pipe closes when the last process holding it exits; don't hang on a stray grandchild.
            reader.join(timeout if timeout is not None else 5.0)
        return rc

    # -- talking to it --------------------------------------------------------------------------------------
    def send(self, request: Dict[str, Any]) -> None:
        """Write one JSON request line (``kdseg serve``)."""
        if not self.interactive or self._proc is None or self._proc.stdin is None:
            raise RuntimeError("this engine process does not take requests")
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()

    def close_input(self) -> None:
        """End of requests: ``kdseg serve`` exits on its own."""
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    # -- stopping it ----------------------------------------------------------------------------------------
    def terminate(self) -> None:
        """Ask the child to stop cleanly (it may save a checkpoint); returns at once."""
        if not self.running:
            return
        self.cancelled = True
        try:
            if os.name == "nt":
                self._proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                # Only the leader: it stops its own helpers in order (data loader workers, ...).
                os.kill(self._proc.pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass

    def cancel(self, grace_s: float = 0.0) -> Optional[int]:
        """Kill the child and every process it started; returns the return code.

        With ``grace_s`` the child first gets :meth:`terminate` and that many seconds to exit on its own.
        """
        if self._proc is None:
            return None
        self.cancelled = True
        if grace_s > 0 and self.running:
            self.terminate()
            self.wait(grace_s)
        self._kill_tree()
        rc = self.wait(10.0)
        self.close_input()
        return rc

    def _kill_tree(self) -> None:
        assert self._proc is not None
        pid = self._proc.pid
        if os.name == "nt":
            if self._proc.poll() is None:
                # taskkill /T walks the parent links, which only works while the parent is alive.
                subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            try:
                # The child leads its own process group (id = its pid); this also reaches
                # grandchildren that outlived it.
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except OSError:
                pass
