"""Run the ``kdseg`` command line in a child process and read its JSON-lines progress, without Slicer.

The Slicer panel builds its command lines here, starts a :class:`WorkerProcess`, polls
:meth:`WorkerProcess.poll_events` from a timer (the GUI never waits on a pipe) and cancels by killing the whole
process tree. Everything in this file is plain Python, so the tests run it for real against child processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from KDSegmentationLib.progress import parse_event

LIB_NAME = "KDSegmentationLib"
LIB_PARENT = Path(__file__).resolve().parent.parent  # the folder that has to be on PYTHONPATH

# Installed into Slicer's Python on first use. torch comes from the PyTorch extension (PyTorchUtils) and is not
# listed: pip would pull a CUDA build from PyPI. SimpleITK and numpy ship with Slicer and must not be replaced.
TORCH_REQUIREMENT = ">=2.1"
SLICER_REQUIREMENTS = ("monai>=1.3", "pynrrd>=1.0", "slicerio>=1.1", "tqdm>=4.60")

_GPU_OOM = re.compile(r"cuda out of memory|outofmemoryerror|cudnn_status_alloc_failed|cublas_status_alloc_failed"
                      r"|hip out of memory|mps backend out of memory", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# command lines and environment
# ---------------------------------------------------------------------------------------------------------------

def worker_env(base: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
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


def format_seed(seed_ras: Sequence[float]) -> str:
    values = [float(v) for v in seed_ras]
    if len(values) != 3:
        raise ValueError(f"a seed point needs three coordinates, got {len(values)}")
    return ",".join(repr(v) for v in values)


def _base(python_executable) -> List[str]:
    return [str(python_executable), "-m", LIB_NAME]


def segment_command(python_executable, task: str, input_path, output_path, model: str = "student",
                    device: str = "auto", seed_ras: Optional[Sequence[float]] = None,
                    threads: Optional[int] = None) -> List[str]:
    """``kdseg segment`` with JSON progress."""
    # "--opt=value" keeps values that start with "-" (negative seed coordinates) from being read as options.
    cmd = _base(python_executable) + ["segment", "--task", task, f"--input={input_path}",
                                      f"--output={output_path}", f"--model={model}", "--device", device,
                                      "--progress", "json"]
    if seed_ras is not None:
        cmd.append("--seed-ras=" + format_seed(seed_ras))
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd


def distill_command(python_executable, task: str, teacher, data, output, unlabeled=None,
                    alpha: Optional[float] = None, temperature: Optional[float] = None,
                    max_minutes: Optional[float] = None, epochs: Optional[int] = None) -> List[str]:
    """``kdseg distill`` with JSON progress; unset options are left to the engine's defaults."""
    cmd = _base(python_executable) + ["distill", "--task", task, f"--teacher={teacher}", f"--data={data}",
                                      f"--output={output}"]
    if unlabeled:
        cmd.append(f"--unlabeled={unlabeled}")
    if alpha is not None:
        cmd += ["--alpha", repr(float(alpha))]
    if temperature is not None:
        cmd += ["--temperature", repr(float(temperature))]
    if max_minutes:
        cmd += ["--max-minutes", repr(float(max_minutes))]
    if epochs:
        cmd += ["--epochs", str(int(epochs))]
    cmd += ["--progress", "json"]
    return cmd


def models_list_command(python_executable) -> List[str]:
    return _base(python_executable) + ["models", "list", "--json"]


def serve_command(python_executable, threads: Optional[int] = None) -> List[str]:
    """The persistent worker: start-up (imports, model load) is paid once, not once per segmentation."""
    cmd = _base(python_executable) + ["serve"]
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd


def segment_request(request_id: int, task: str, input_path, output_path, model: str = "student",
                    device: str = "auto", seed_ras: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """One request line for the persistent worker (same fields as ``segment_command``)."""
    return {"id": int(request_id), "command": "segment", "task": task, "input": str(input_path),
            "output": str(output_path), "model": str(model), "device": device,
            "seed_ras": [float(v) for v in seed_ras] if seed_ras is not None else None}


# ---------------------------------------------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------------------------------------------

class WorkerProcess:
    """A child process whose stdout is read by a thread into a queue of protocol events.

    Lines that are not protocol events become ``{"event": "log", "raw": True, ...}`` so nothing the child prints is
    lost. The child gets its own process group (POSIX and Windows) so :meth:`cancel` can end
    the child and everything it started.
    """

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd=None,
                 interactive: bool = False):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = str(cwd) if cwd is not None else None
        self.interactive = interactive
        self.cancelled = False
        self.start_time: Optional[float] = None
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._eof = threading.Event()
        self._reader: Optional[threading.Thread] = None

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        if self._proc is not None:
            raise RuntimeError("worker already started")
        kwargs: Dict[str, Any] = dict(
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
        self._reader = threading.Thread(target=self._read, name="kdseg-worker-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                event = parse_event(line)
                if event is None:
                    event = {"event": "log", "level": "info", "message": line, "raw": True}
                self._queue.put(event)
        except (OSError, ValueError):  # pipe closed under us by a kill
            pass
        finally:
            self._eof.set()

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
        return (self._proc is not None and self._proc.poll() is not None and self._eof.is_set()
                and self._queue.empty())

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
        if self._reader is not None:
            # The pipe closes when the last process holding it exits; don't hang on a stray grandchild.
            self._reader.join(timeout if timeout is not None else 5.0)
        return rc

    # -- talking to it --------------------------------------------------------------------------------------
    def send(self, request: Dict[str, Any]) -> None:
        """Write one JSON request line (persistent worker)."""
        if not self.interactive or self._proc is None or self._proc.stdin is None:
            raise RuntimeError("this worker does not take requests")
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()

    def close_input(self) -> None:
        """End of requests: a persistent worker exits on its own."""
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


# ---------------------------------------------------------------------------------------------------------------
# reading what the engine says
# ---------------------------------------------------------------------------------------------------------------

def is_gpu_oom(message: Optional[str]) -> bool:
    """True when an error message is a GPU out-of-memory (worth a rerun on the CPU)."""
    return bool(message) and bool(_GPU_OOM.search(message))


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe_progress(event: Dict[str, Any]) -> str:
    """``{"stage": "inference", "fraction": 0.42}`` -> ``"Inference 42%"``."""
    stage = str(event.get("stage") or "working").replace("_", " ")
    stage = stage[:1].upper() + stage[1:]
    fraction = event.get("fraction")
    if isinstance(fraction, (int, float)):
        return f"{stage} {int(round(100 * min(max(float(fraction), 0.0), 1.0)))}%"
    return stage


def _fmt_number(value: Any, digits: int = 1) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def format_volumes(result_event: Optional[Dict[str, Any]]) -> str:
    """Segment sizes of a ``result`` event, one line per segment: mL for CT, the nodule's longest diameter, and
    pixels with the share of the field of view for 2D photographs."""
    if not result_event:
        return ""
    segments = result_event.get("segments") or {}
    lines = []
    for name, stats in segments.items():
        stats = stats or {}
        if "volume_ml" in stats:
            text = f"{name}: {_fmt_number(stats['volume_ml'], 1)} mL"
            if stats.get("longest_axial_diameter_mm") is not None:
                text += f", longest axial diameter (RECIST) {_fmt_number(stats['longest_axial_diameter_mm'], 1)} mm"
            if stats.get("max_3d_diameter_mm") is not None:
                text += f", maximum 3D diameter {_fmt_number(stats['max_3d_diameter_mm'], 1)} mm"
        elif "area_px" in stats:
            text = f"{name}: {int(stats['area_px'])} px"
            if stats.get("fraction_of_fov") is not None:
                text += f" ({_fmt_number(100 * float(stats['fraction_of_fov']), 1)}% of the field of view)"
        else:
            text = f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items())
        lines.append(text)
    if not lines:
        lines.append("No segment found.")
    for warning in result_event.get("warnings") or []:
        lines.append(f"Warning: {warning}")
    return "\n".join(lines)


def format_metric(event: Dict[str, Any]) -> str:
    parts = []
    for key, value in event.items():
        if key == "event":
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class MetricHistory:
    """Loss and validation Dice collected from ``metric`` events, ready to plot against the step."""

    LOSS_KEYS = ("loss", "train_loss", "total_loss")
    DICE_KEYS = ("val_dice", "dice", "validation_dice")

    def __init__(self) -> None:
        self.loss_x: List[float] = []
        self.loss: List[float] = []
        self.dice_x: List[float] = []
        self.dice: List[float] = []
        self._count = 0

    def add(self, event: Dict[str, Any]) -> bool:
        """Record a metric event; True when it added a point."""
        self._count += 1
        x = event.get("step", event.get("epoch", self._count))
        try:
            x = float(x)
        except (TypeError, ValueError):
            x = float(self._count)
        added = False
        loss = _first_number(event, self.LOSS_KEYS)
        if loss is not None:
            self.loss_x.append(x)
            self.loss.append(loss)
            added = True
        dice = _first_number(event, self.DICE_KEYS)
        if dice is not None:
            self.dice_x.append(x)
            self.dice.append(dice)
            added = True
        return added


def _first_number(event: Dict[str, Any], keys: Iterable[str]) -> Optional[float]:
    for key in keys:
        value = event.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return float(value)
    return None


# ---------------------------------------------------------------------------------------------------------------
# models, samples, terminology, dependencies
# ---------------------------------------------------------------------------------------------------------------

MODEL_SUFFIX = ".kdseg.pt"
LOCAL_SOURCES = ("local", "user")  # how the catalogue marks models distilled on this machine


def next_model_path(folder, task: str, kind: str = "student_local") -> Path:
    """A new versioned file name in ``folder`` (``liver_student_local_v3.kdseg.pt``); never an existing file."""
    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(task)}_{re.escape(kind)}_v(\d+){re.escape(MODEL_SUFFIX)}$")
    versions = [0]
    if folder.is_dir():
        for p in folder.iterdir():
            m = pattern.match(p.name)
            if m:
                versions.append(int(m.group(1)))
    version = max(versions) + 1
    while True:
        candidate = folder / f"{task}_{kind}_v{version}{MODEL_SUFFIX}"
        if not candidate.exists():
            return candidate
        version += 1


def parse_models_output(lines: Iterable[str]) -> List[Dict[str, Any]]:
    """The JSON printed by ``kdseg models list --json`` (possibly spread over several lines)."""
    text = "\n".join(lines).strip()
    if not text:
        return []
    start = text.find("[")
    if start < 0:
        raise ValueError("no model list in the worker's output")
    entries, _ = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(entries, list):
        raise ValueError("the model list is not a JSON array")
    return [e for e in entries if isinstance(e, dict)]


def model_label(entry: Dict[str, Any]) -> str:
    card = entry.get("card") or {}
    name = entry.get("name") or Path(str(entry.get("path", "model"))).name
    role = entry.get("role", "")
    source = entry.get("source", "")
    if entry.get("error"):  # listed, so the user sees why it is not offered, instead of it silently missing
        return f"{name} (unusable, {'local' if source in LOCAL_SOURCES else source or 'local'})"
    bits = [b for b in (entry.get("task"), role, "local" if source in LOCAL_SOURCES else source) if b]
    label = f"{name} ({', '.join(bits)})" if bits else str(name)
    version = entry.get("version") or card.get("version")
    if version and not str(name).endswith(f"v{version}"):
        label += f" v{version}"
    return label


def model_card_text(entry: Dict[str, Any]) -> str:
    """The model card as text: what it was trained on, how well it does, how fast it is."""
    card = dict(entry.get("card") or {})
    lines = [model_label(entry)]
    if entry.get("error"):
        lines.append(f"Error: {entry['error']}")
    if entry.get("path"):
        lines.append(f"File: {entry['path']}")
    for key, title in (("data", "Data"), ("training_data", "Training data"), ("metrics", "Metrics"),
                       ("speed", "Speed"), ("parameters", "Parameters"), ("teacher", "Teacher"),
                       ("created", "Created"), ("notes", "Notes")):
        if key in card:
            lines.append(f"{title}: {_card_value(card.pop(key))}")
    for key, value in card.items():
        lines.append(f"{key}: {_card_value(value)}")
    return "\n".join(lines)


def _card_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_card_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_card_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_choices(entries: Iterable[Dict[str, Any]], task: str) -> List[tuple]:
    """(label, value) pairs for the panel's model list: the shipped student and teacher, then local models."""
    choices = [("Student (fast)", "student"), ("Teacher (slower, more accurate)", "teacher")]
    for entry in entries:
        if entry.get("task") == task and entry.get("source") in LOCAL_SOURCES and entry.get("path"):
            choices.append((model_label(entry), str(entry["path"])))
    return choices


def delete_user_model(entry: Dict[str, Any], user_dir) -> List[Path]:
    """Delete a locally distilled model and its report files; refuses anything outside ``user_dir``."""
    path = Path(str(entry.get("path", ""))).resolve()
    user_dir = Path(user_dir).resolve()
    if entry.get("source") not in (None,) + LOCAL_SOURCES or user_dir not in path.parents:
        raise ValueError(f"{path} is not a locally distilled model in {user_dir}; shipped models cannot be deleted")
    if not path.name.endswith(MODEL_SUFFIX):
        raise ValueError(f"{path} is not a model file")
    stem = path.name[: -len(MODEL_SUFFIX)]
    removed = []
    for p in sorted(path.parent.iterdir()):
        # the model and the report written beside it (same stem: .json, .png, ...)
        if p.is_file() and (p == path or p.name.startswith(stem + ".") or p.name.startswith(stem + "_report")):
            p.unlink()
            removed.append(p)
    return removed


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_samples(samples_dir) -> List[Dict[str, Any]]:
    """Bundled samples, one ``<task>/sample.json`` each: ``{"file": ..., "seed_ras": [...], "sha256": ...}``."""
    samples_dir = Path(samples_dir)
    found = []
    if not samples_dir.is_dir():
        return found
    for meta in sorted(samples_dir.glob("*/sample.json")):
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        path = meta.parent / str(info.get("file", ""))
        if not info.get("file") or not path.is_file():
            continue
        task = str(info.get("task") or meta.parent.name)
        name = path.name
        for suffix in (".nii.gz", ".seg.nrrd"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            name = path.stem
        found.append({"task": task, "path": str(path), "file_name": path.name, "node_name": name,
                      "sample_name": f"KD {task.replace('_', ' ')} sample",
                      "sha256": str(info.get("sha256") or sha256_file(path)),
                      "seed_ras": info.get("seed_ras")})
    return found


def terminology_files(folder) -> List[tuple]:
    """``(path, kind)`` for Slicer terminology files: kind ``"category"`` or ``"anatomic"``."""
    folder = Path(folder)
    result = []
    if not folder.is_dir():
        return result
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        if "AnatomicContextName" in content or "AnatomicRegion" in content:
            result.append((str(path), "anatomic"))
        elif "SegmentationCategoryTypeContextName" in content or "SegmentationCodes" in content:
            result.append((str(path), "category"))
    return result


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _split_requirement(requirement: str) -> tuple:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$", requirement)
    if not m:
        raise ValueError(f"unsupported requirement {requirement!r} (use 'name' or 'name>=version')")
    return m.group(1), m.group(2)


def installed_version(name: str) -> Optional[str]:
    """Installed version of a distribution, from its metadata (nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str] = SLICER_REQUIREMENTS,
                         version_of: Callable[[str], Optional[str]] = installed_version) -> List[str]:
    """The requirements (``name>=x.y``) that are absent or too old."""
    missing = []
    for req in requirements:
        name, minimum = _split_requirement(req)
        version = version_of(name)
        if version is None or (minimum and _version_tuple(version) < _version_tuple(minimum)):
            missing.append(req)
    return missing


def safe_name(text: str, fallback: str = "case") -> str:
    """A file-name-safe version of a node name (letters, digits, ``-`` and ``_``; non-ASCII letters kept)."""
    name = re.sub(r"[^\w\-]+", "_", str(text), flags=re.UNICODE).strip("_")
    return name or fallback


def python_for_worker(app_python: Optional[str] = None) -> str:
    """PythonSlicer when available (Slicer's environment), otherwise this interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    exe = Path(app_python or sys.executable)
    candidate = exe.with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(candidate) if candidate.exists() else str(exe)


# ---------------------------------------------------------------------------------------------------------------
# runs: what the panel's timer drives
# ---------------------------------------------------------------------------------------------------------------

class Run:
    """One worker run (``segment``, ``distill`` or ``models``): its state and, at the end, its outcome.

    ``status`` is ``running``, then ``succeeded``, ``failed`` or ``cancelled``; callbacks receive the run.
    ``context`` holds the caller's own objects (in Slicer: the input and output nodes).
    """

    def __init__(self, kind: str, progress_callback: Optional[Callable[["Run"], None]] = None,
                 log_callback: Optional[Callable[[str, str], None]] = None,
                 finished_callback: Optional[Callable[["Run"], None]] = None):
        self.kind = kind
        self.status = "running"
        self.message = ""
        self.stage = ""
        self.fraction = 0.0
        self.start_time = time.monotonic()
        self.worker: Optional[WorkerProcess] = None
        self.warm = False
        self.request_id: Optional[int] = None
        self.temp_dir: Optional[str] = None
        self.result: Any = None
        self.error_message: Optional[str] = None
        self.raw_lines: List[str] = []
        self.metrics = MetricHistory()
        self.task: Optional[str] = None
        self.model = "student"
        self.device = "auto"
        self.seed: Optional[Sequence[float]] = None
        self.input_path: Optional[str] = None
        self.output_path: Optional[str] = None
        self.model_path: Optional[Path] = None
        self.output: Any = None  # what the caller made of the result (e.g. a segmentation node)
        self.use_warm_worker = False
        self.warm_fallback_tried = False
        self.retried_on_cpu = False
        self.stop_deadline: Optional[float] = None
        self.context: Dict[str, Any] = {}
        self.progress_callback = progress_callback
        self.log_callback = log_callback
        self.finished_callback = finished_callback
        self._last_progress_report = 0.0

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def log(self, message: str, level: str = "info") -> None:
        if self.log_callback:
            self.log_callback(str(message), level or "info")

    def report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress_callback and (force or now - self._last_progress_report > 0.25):
            self._last_progress_report = now
            self.progress_callback(self)


class RunManager:
    """Starts worker runs and advances them each time :meth:`poll` is called (from a GUI timer).

    Segmentations go to a persistent worker (``kdseg serve``) when ``use_warm_worker`` is set, so the start-up
    cost is paid once; a GPU out-of-memory error is retried once on the CPU; a run is cancelled by killing its
    process tree; a distillation is first asked to stop cleanly (:meth:`request_stop`). Hooks let the caller
    turn a result into its own objects (:attr:`on_segment_result`) and plot metrics (:attr:`on_metric`).
    """

    def __init__(self, python_executable: Optional[Callable[[], str]] = None,
                 env: Optional[Callable[[], Dict[str, str]]] = None):
        self.python_executable = python_executable or python_for_worker
        self.env = env or worker_env
        self.active: List[Run] = []
        self.on_segment_result: Optional[Callable[[Run], str]] = None
        self.on_metric: Optional[Callable[[Run], None]] = None
        self._warm: Optional[WorkerProcess] = None
        self._warm_unavailable = False  # the engine has no persistent mode: stop trying it
        self._request_id = 0
        self._leftover_dirs: List[str] = []

    # -- starting -------------------------------------------------------------------------------------------
    def busy(self, kind: str) -> Optional[Run]:
        return next((r for r in self.active if r.kind == kind), None)

    def start_segment(self, run: Run) -> Run:
        """``run`` has task, input_path, output_path, model, device, seed and use_warm_worker set."""
        run.use_warm_worker = run.use_warm_worker and not self._warm_unavailable
        self._launch_segment(run)
        self.active.append(run)
        return run

    def start_command(self, run: Run, command: Sequence[str]) -> Run:
        run.log("Command: " + subprocess.list2cmdline([str(c) for c in command]))
        run.worker = WorkerProcess(command, env=self.env()).start()
        self.active.append(run)
        return run

    def _new_warm_worker(self) -> WorkerProcess:
        self._warm = WorkerProcess(serve_command(self.python_executable()), env=self.env(), interactive=True).start()
        return self._warm

    def _launch_segment(self, run: Run) -> None:
        run.result = None
        run.error_message = None
        if run.use_warm_worker:
            if self._warm is None or not self._warm.running:
                run.log("Starting the worker process (kept running for the next runs).")
                self._new_warm_worker()
            self._request_id += 1
            run.request_id = self._request_id
            run.warm = True
            run.worker = self._warm
            request = segment_request(run.request_id, run.task, run.input_path, run.output_path, model=run.model,
                                      device=run.device, seed_ras=run.seed)
            try:
                run.worker.send(request)
            except OSError:
                # it exited between two runs: start a fresh one
                run.worker.cancel()
                run.worker = self._new_warm_worker()
                run.worker.send(request)
        else:
            command = segment_command(self.python_executable(), run.task, run.input_path, run.output_path,
                                      model=run.model, device=run.device, seed_ras=run.seed)
            run.log("Command: " + subprocess.list2cmdline(command))
            run.warm = False
            run.worker = WorkerProcess(command, env=self.env()).start()

    # -- stopping -------------------------------------------------------------------------------------------
    def cancel(self, run: Run) -> None:
        self.stop(run, "cancelled", "Cancelled.")

    def stop(self, run: Run, status: str, message: str) -> None:
        """Kill the run's process tree and end it."""
        if run.done:
            return
        if run.worker is not None:
            # A request inside the persistent worker cannot be interrupted alone, so that worker goes too.
            run.worker.cancel()
            if run.warm and run.worker is self._warm:
                self._warm = None
        self._finish(run, status, message)

    def request_stop(self, run: Run, grace_s: float = 30.0) -> None:
        """Ask the run to stop cleanly (a trainer keeps its last checkpoint); killed after ``grace_s``."""
        if run.done or run.stop_deadline is not None or run.worker is None:
            return
        run.log("Stopping (the last good checkpoint is kept)...", "warning")
        run.worker.terminate()
        run.stop_deadline = time.monotonic() + grace_s

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop everything: the module is unloaded or the application closes."""
        for run in list(self.active):
            if run.kind == "distill" and run.worker is not None:
                run.worker.cancel(grace_s=grace_s)  # time to keep the last checkpoint
            self.stop(run, "cancelled", "Cancelled.")
        if self._warm is not None:
            self._warm.cancel()
            self._warm = None
        self._remove_leftovers()

    def wait(self, run: Run, timeout_s: Optional[float] = None, idle: Optional[Callable[[], None]] = None) -> Run:
        """Block until ``run`` ends (scripts and tests); ``idle`` keeps a GUI responsive."""
        start = time.monotonic()
        while not run.done:
            self.poll()
            if idle:
                idle()
            time.sleep(0.02)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                self.stop(run, "failed", f"No result after {timeout_s:.0f} s.")
        return run

    # -- polling --------------------------------------------------------------------------------------------
    def poll(self) -> None:
        for run in list(self.active):
            if run.done:
                continue
            try:
                self._poll_run(run)
            except Exception as exc:  # a bug must end the run, not the timer
                logging.getLogger(__name__).exception("worker run failed")
                self.stop(run, "failed", f"{type(exc).__name__}: {exc}")
        self._remove_leftovers()

    def _poll_run(self, run: Run) -> None:
        w = run.worker
        for event in w.poll_events(500):
            if run.warm:
                event_id = event.get("id")
                if event_id is not None and event_id != run.request_id:
                    continue  # left over from a request that was cancelled
            self._handle_event(run, event)
            if run.warm and event.get("id") == run.request_id and event.get("event") in ("result", "error"):
                self._process_done(run, 0 if event["event"] == "result" else None)
                return
        if run.done:
            return
        if run.stop_deadline is not None and (w.finished or time.monotonic() > run.stop_deadline):
            w.cancel()
            self._finish(run, "cancelled", "Cancelled; the last good checkpoint was kept.")
            return
        if run.warm:
            if w.finished:
                self._warm = None
                if not run.warm_fallback_tried:
                    # e.g. an engine without the persistent mode: run this one as a plain process instead
                    run.warm_fallback_tried = True
                    run.use_warm_worker = False
                    self._warm_unavailable = not run.stage  # it never got to work on the request
                    run.log(f"The persistent worker stopped (exit code {w.returncode}); running this "
                            "segmentation in a new process.", "warning")
                    self._launch_segment(run)
                    return
                self._fail(run, run.error_message or f"The worker process stopped unexpectedly "
                                                     f"(exit code {w.returncode}); see the log.")
                return
        elif w.finished:
            self._process_done(run, w.returncode)
            return
        run.report_progress()

    def _handle_event(self, run: Run, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            run.stage = describe_progress(event)
            try:
                run.fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
            except (TypeError, ValueError):
                pass
            run.report_progress()
        elif kind == "log":
            if run.kind == "models" and event.get("raw"):
                run.raw_lines.append(str(event.get("message", "")))
            else:
                run.log(str(event.get("message", "")), str(event.get("level") or "info"))
        elif kind == "metric":
            if run.metrics.add(event) and self.on_metric:
                self.on_metric(run)
            run.log(format_metric(event))
        elif kind == "result":
            run.result = event
        elif kind == "error":
            run.error_message = str(event.get("message") or "unknown error")
            run.log(run.error_message, "error")

    def _process_done(self, run: Run, return_code: Optional[int]) -> None:
        failure = run.error_message or f"The worker exited with code {return_code}; see the log."
        if run.kind == "segment":
            if return_code != 0 or not run.result:
                self._fail(run, failure)
                return
            if run.result.get("device"):
                run.device = str(run.result["device"])
            try:
                summary = self.on_segment_result(run) if self.on_segment_result else format_volumes(run.result)
            except Exception as exc:
                self._finish(run, "failed", f"The result could not be loaded: {exc}")
                return
            self._finish(run, "succeeded", summary)
        elif run.kind == "distill":
            if self.on_metric:
                self.on_metric(run)
            if return_code == 0 and run.result:
                run.model_path = Path(run.result.get("path") or run.model_path)
                self._finish(run, "succeeded", f"New model: {run.model_path.name}")
            elif run.stop_deadline is not None:
                self._finish(run, "cancelled", "Cancelled; the last good checkpoint was kept.")
            else:
                self._fail(run, failure)
        elif run.kind == "models":
            if return_code != 0:
                self._finish(run, "failed", run.error_message or (run.raw_lines[-1] if run.raw_lines else failure))
                return
            try:
                run.result = parse_models_output(run.raw_lines)
            except ValueError as exc:
                self._finish(run, "failed", str(exc))
                return
            self._finish(run, "succeeded", "")
        else:
            self._finish(run, "succeeded" if return_code == 0 else "failed",
                         "" if return_code == 0 else failure)

    def _fail(self, run: Run, message: str) -> None:
        if run.kind == "segment" and not run.retried_on_cpu and run.device != "cpu" and is_gpu_oom(message):
            run.retried_on_cpu = True
            run.device = "cpu"
            run.log("The GPU ran out of memory; running again on the CPU (slower, same result).", "warning")
            try:
                self._launch_segment(run)
            except Exception as exc:
                self._finish(run, "failed", f"{message}; the CPU rerun could not start: {exc}")
            return
        self._finish(run, "failed", message)

    def _finish(self, run: Run, status: str, message: str) -> None:
        if run.done:
            return
        run.status = status
        run.message = message
        if run in self.active:
            self.active.remove(run)
        if run.worker is not None and not run.warm and run.worker.running:
            run.worker.cancel()  # never leave a child behind
        self._remove_temp_dir(run)
        run.report_progress(force=True)
        if run.finished_callback:
            run.finished_callback(run)

    def _remove_temp_dir(self, run: Run) -> None:
        import shutil

        if run.temp_dir:
            temp_dir, run.temp_dir = run.temp_dir, None
            shutil.rmtree(temp_dir, ignore_errors=True)
            if os.path.exists(temp_dir):
                # Windows keeps the files of a just-killed process locked for a moment: retried on later polls
                self._leftover_dirs.append(temp_dir)

    def _remove_leftovers(self) -> None:
        import shutil

        for temp_dir in list(self._leftover_dirs):
            shutil.rmtree(temp_dir, ignore_errors=True)
            if not os.path.exists(temp_dir):
                self._leftover_dirs.remove(temp_dir)
