"""Runs of the engine (``segment``, ``distill``, ``models``) and the state machine the panel's timer drives."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from KDSegmentationLib import protocol as P
from KDSegmentationLib.client.commands import segment_command, segment_request, serve_command
from KDSegmentationLib.client.display import MetricHistory, describe_progress, format_metric, format_volumes
from KDSegmentationLib.client.environment import engine_python
from KDSegmentationLib.client.models import parse_models_output
from KDSegmentationLib.client.process import RAW, STREAM, EngineProcess, engine_env

_GPU_OOM = re.compile(r"cuda out of memory|outofmemoryerror|cudnn_status_alloc_failed|cublas_status_alloc_failed"
                      r"|hip out of memory|mps backend out of memory", re.IGNORECASE)


def is_gpu_oom(message: Optional[str]) -> bool:
    """True when an error message is a GPU out-of-memory (worth a rerun on the CPU)."""
    return bool(message) and bool(_GPU_OOM.search(message))


class Run:
    """One engine run (``segment``, ``distill`` or ``models``): its state and, at the end, its outcome.

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
        self.process: Optional[EngineProcess] = None
        self.persistent = False  # this attempt runs inside the persistent engine process
        self.request_id: Optional[int] = None
        self.temp_dir: Optional[str] = None
        self.result: Any = None
        self.error_message: Optional[str] = None
        self.raw_lines: List[str] = []  # stdout of a ``models`` run
        self.last_raw_log = ""
        self.metrics = MetricHistory()
        self.task: Optional[str] = None
        self.model = "student"
        self.device = "auto"
        self.seed: Optional[Sequence[float]] = None
        self.input_path: Optional[str] = None
        self.output_path: Optional[str] = None
        self.model_path: Optional[Path] = None
        self.output: Any = None  # what the caller made of the result (e.g. a segmentation node)
        self.use_persistent = False  # asked for: run segmentations in the persistent engine process
        self.persistent_fallback_tried = False
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

    def log(self, message: str, level: str = P.LEVEL_INFO) -> None:
        if self.log_callback:
            self.log_callback(str(message), level or P.LEVEL_INFO)

    def report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress_callback and (force or now - self._last_progress_report > 0.25):
            self._last_progress_report = now
            self.progress_callback(self)


class RunManager:
    """Starts engine runs and advances them each time :meth:`poll` is called (from a GUI timer).

    Segmentations go to a persistent engine process (``kdseg serve``) when the run's ``use_persistent`` is set, so
    the start-up cost is paid once; a GPU out-of-memory error is retried once on the CPU; a run is cancelled by
    killing its process tree; a distillation is first asked to stop cleanly (:meth:`request_stop`). Hooks let the
    caller turn a result into its own objects (:attr:`on_segment_result`) and plot metrics (:attr:`on_metric`).
    """

    def __init__(self, python_executable: Optional[Callable[[], str]] = None,
                 env: Optional[Callable[[], Dict[str, str]]] = None):
        self.python_executable = python_executable or engine_python
        self.env = env or engine_env
        self.active: List[Run] = []
        self.on_segment_result: Optional[Callable[[Run], str]] = None
        self.on_metric: Optional[Callable[[Run], None]] = None
        self._persistent: Optional[EngineProcess] = None
        self._persistent_unavailable = False  # the engine has no persistent mode: stop trying it
        self._request_id = 0
        self._leftover_dirs: List[str] = []

    # -- starting -------------------------------------------------------------------------------------------
    def busy(self, kind: str) -> Optional[Run]:
        return next((r for r in self.active if r.kind == kind), None)

    def start_segment(self, run: Run) -> Run:
        """``run`` has task, input_path, output_path, model, device, seed and use_persistent set."""
        run.use_persistent = run.use_persistent and not self._persistent_unavailable
        self._launch_segment(run)
        self.active.append(run)
        return run

    def start_command(self, run: Run, command: Sequence[str]) -> Run:
        """Run a one-shot engine command; a ``models`` run reads stdout as one JSON document, stderr as log."""
        run.log("Command: " + subprocess.list2cmdline([str(c) for c in command]))
        document = run.kind == "models"
        run.process = EngineProcess(command, env=self.env(), merge_stderr=not document,
                                    read_events=not document).start()
        self.active.append(run)
        return run

    def _new_persistent(self) -> EngineProcess:
        self._persistent = EngineProcess(serve_command(self.python_executable()), env=self.env(),
                                         interactive=True).start()
        return self._persistent

    def _launch_segment(self, run: Run) -> None:
        run.result = None
        run.error_message = None
        if not run.use_persistent:
            command = segment_command(self.python_executable(), run.task, run.input_path, run.output_path,
                                      model=run.model, device=run.device, seed_ras=run.seed)
            run.log("Command: " + subprocess.list2cmdline(command))
            run.persistent = False
            run.process = EngineProcess(command, env=self.env()).start()
            return
        if self._persistent is None or not self._persistent.running:
            run.log("Starting the worker process (kept running for the next runs).")
            self._new_persistent()
        self._request_id += 1
        run.request_id = self._request_id
        run.persistent = True
        run.process = self._persistent
        request = segment_request(run.request_id, run.task, run.input_path, run.output_path, model=run.model,
                                  device=run.device, seed_ras=run.seed)
        try:
            run.process.send(request)
        except OSError:
            # it exited between two runs: start a fresh one
            run.process.cancel()
            run.process = self._new_persistent()
            run.process.send(request)

    # -- stopping -------------------------------------------------------------------------------------------
    def cancel(self, run: Run) -> None:
        self.stop(run, "cancelled", "Cancelled.")

    def stop(self, run: Run, status: str, message: str) -> None:
        """Kill the run's process tree and end it."""
        if run.done:
            return
        if run.process is not None:
            # A request inside the persistent process cannot be interrupted alone, so that process goes too.
            run.process.cancel()
            if run.persistent and run.process is self._persistent:
                self._persistent = None
        self._finish(run, status, message)

    def request_stop(self, run: Run, grace_s: float = 30.0) -> None:
        """Ask the run to stop cleanly (a trainer keeps its last checkpoint); killed after ``grace_s``."""
        if run.done or run.stop_deadline is not None or run.process is None:
            return
        run.log("Stopping (the last good checkpoint is kept)...", P.LEVEL_WARNING)
        run.process.terminate()
        run.stop_deadline = time.monotonic() + grace_s

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop everything: the module is unloaded or the application closes."""
        for run in list(self.active):
            if run.kind == "distill" and run.process is not None:
                run.process.cancel(grace_s=grace_s)  # time to keep the last checkpoint
            self.stop(run, "cancelled", "Cancelled.")
        if self._persistent is not None:
            self._persistent.cancel()
            self._persistent = None
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
                logging.getLogger(__name__).exception("engine run failed")
                self.stop(run, "failed", f"{type(exc).__name__}: {exc}")
        self._remove_leftovers()

    def _poll_run(self, run: Run) -> None:
        process = run.process
        for event in process.poll_events(500):
            event_id = event.get(P.ID)
            if run.persistent and event_id is not None and event_id != run.request_id:
                continue  # left over from a request that was cancelled
            self._handle_event(run, event)
            if run.persistent and event_id == run.request_id and event.get(P.EVENT) in (P.EVENT_RESULT,
                                                                                         P.EVENT_ERROR):
                self._process_done(run, 0 if event[P.EVENT] == P.EVENT_RESULT else None)
                return
        if run.done:
            return
        if run.stop_deadline is not None and (process.finished or time.monotonic() > run.stop_deadline):
            process.cancel()
            self._finish(run, "cancelled", "Cancelled; the last good checkpoint was kept.")
        elif run.persistent and process.finished:
            self._persistent_stopped(run, process)
        elif not run.persistent and process.finished:
            self._process_done(run, process.returncode)
        else:
            run.report_progress()

    def _persistent_stopped(self, run: Run, process: EngineProcess) -> None:
        """The persistent process exited before answering: run this request in a one-shot process, once."""
        self._persistent = None
        if run.persistent_fallback_tried:
            self._fail(run, run.error_message or f"The worker process stopped unexpectedly "
                                                 f"(exit code {process.returncode}); see the log.")
            return
        # e.g. an engine without the persistent mode
        run.persistent_fallback_tried = True
        run.use_persistent = False
        self._persistent_unavailable = not run.stage  # it never got to work on the request
        run.log(f"The persistent worker stopped (exit code {process.returncode}); running this "
                "segmentation in a new process.", P.LEVEL_WARNING)
        self._launch_segment(run)

    def _handle_event(self, run: Run, event: Dict[str, Any]) -> None:
        kind = event.get(P.EVENT)
        if kind == P.EVENT_PROGRESS:
            run.stage = describe_progress(event)
            try:
                run.fraction = min(max(float(event.get(P.FRACTION) or 0.0), 0.0), 1.0)
            except (TypeError, ValueError):
                pass
            run.report_progress()
        elif kind == P.EVENT_LOG:
            if run.kind == "models" and event.get(RAW) and not event.get(STREAM):
                run.raw_lines.append(str(event.get(P.MESSAGE, "")))
                return
            if event.get(RAW):
                run.last_raw_log = str(event.get(P.MESSAGE, ""))
            run.log(str(event.get(P.MESSAGE, "")), str(event.get(P.LEVEL) or P.LEVEL_INFO))
        elif kind == P.EVENT_METRIC:
            if run.metrics.add(event) and self.on_metric:
                self.on_metric(run)
            run.log(format_metric(event))
        elif kind == P.EVENT_RESULT:
            run.result = event
        elif kind == P.EVENT_ERROR:
            run.error_message = str(event.get(P.MESSAGE) or "unknown error")
            run.log(run.error_message, P.LEVEL_ERROR)

    def _process_done(self, run: Run, return_code: Optional[int]) -> None:
        failure = run.error_message or f"The worker exited with code {return_code}; see the log."
        if run.kind == "segment":
            self._segment_done(run, return_code, failure)
        elif run.kind == "distill":
            self._distill_done(run, return_code, failure)
        elif run.kind == "models":
            self._models_done(run, return_code, failure)
        else:
            self._finish(run, "succeeded" if return_code == 0 else "failed",
                         "" if return_code == 0 else failure)

    def _segment_done(self, run: Run, return_code: Optional[int], failure: str) -> None:
        if return_code != 0 or not run.result:
            self._fail(run, failure)
            return
        if run.result.get(P.RESULT_DEVICE):
            run.device = str(run.result[P.RESULT_DEVICE])
        try:
            summary = self.on_segment_result(run) if self.on_segment_result else format_volumes(run.result)
        except Exception as exc:
            self._finish(run, "failed", f"The result could not be loaded: {exc}")
            return
        self._finish(run, "succeeded", summary)

    def _distill_done(self, run: Run, return_code: Optional[int], failure: str) -> None:
        if self.on_metric:
            self.on_metric(run)
        if return_code == 0 and run.result:
            run.model_path = Path(run.result.get(P.PATH) or run.model_path)
            self._finish(run, "succeeded", f"New model: {run.model_path.name}")
        elif run.stop_deadline is not None:
            self._finish(run, "cancelled", "Cancelled; the last good checkpoint was kept.")
        else:
            self._fail(run, failure)

    def _models_done(self, run: Run, return_code: Optional[int], failure: str) -> None:
        if return_code != 0:
            self._finish(run, "failed", run.error_message or run.last_raw_log or failure)
            return
        try:
            run.result = parse_models_output(run.raw_lines)
        except ValueError as exc:
            self._finish(run, "failed", str(exc))
            return
        self._finish(run, "succeeded", "")

    def _fail(self, run: Run, message: str) -> None:
        if run.kind == "segment" and not run.retried_on_cpu and run.device != "cpu" and is_gpu_oom(message):
            run.retried_on_cpu = True
            run.device = "cpu"
            run.log("The GPU ran out of memory; running again on the CPU (slower, same result).", P.LEVEL_WARNING)
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
        if run.process is not None and not run.persistent and run.process.running:
            run.process.cancel()  # never leave a child behind
        self._remove_temp_dir(run)
        run.report_progress(force=True)
        if run.finished_callback:
            run.finished_callback(run)

    def _remove_temp_dir(self, run: Run) -> None:
        if run.temp_dir:
            temp_dir, run.temp_dir = run.temp_dir, None
            shutil.rmtree(temp_dir, ignore_errors=True)
            if os.path.exists(temp_dir):
                # Windows keeps the files of a just-killed process locked for a moment: retried on later polls
                self._leftover_dirs.append(temp_dir)

    def _remove_leftovers(self) -> None:
        for temp_dir in list(self._leftover_dirs):
            shutil.rmtree(temp_dir, ignore_errors=True)
            if not os.path.exists(temp_dir):
                self._leftover_dirs.remove(temp_dir)
