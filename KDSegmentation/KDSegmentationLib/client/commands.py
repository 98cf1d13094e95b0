"""Engine command lines (``kdseg segment``, ``distill``, ``models list``, ``serve``) and ``kdseg serve`` requests."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from KDSegmentationLib import protocol as P
from KDSegmentationLib.client.process import LIB_NAME


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


def distill_command(python_executable, task: str, teacher, data, output, unlabelled=None,
                    alpha: Optional[float] = None, temperature: Optional[float] = None,
                    max_minutes: Optional[float] = None, epochs: Optional[int] = None, init=None,
                    teacher_targets: Optional[str] = None) -> List[str]:
    """``kdseg distill`` with JSON progress; unset options are left to the engine's defaults. ``init``: the student
    to start from (local distillation adapts it); ``teacher_targets``: 'online' or 'stored'."""
    cmd = _base(python_executable) + ["distill", "--task", task, f"--teacher={teacher}", f"--data={data}",
                                      f"--output={output}"]
    if unlabelled:
        cmd.append(f"--unlabelled={unlabelled}")
    if init:
        cmd.append(f"--init={init}")
    if teacher_targets:
        cmd += ["--teacher-targets", teacher_targets]
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
    """``kdseg models list --json``: one JSON array of model entries on stdout."""
    return _base(python_executable) + ["models", "list", "--json"]


def serve_command(python_executable, threads: Optional[int] = None) -> List[str]:
    """The persistent engine process: start-up (imports, model load) is paid once, not once per segmentation."""
    cmd = _base(python_executable) + ["serve"]
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd


def segment_request(request_id: int, task: str, input_path, output_path, model: str = "student",
                    device: str = "auto", seed_ras: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """One request line for ``kdseg serve`` (same fields as ``segment_command``)."""
    return {P.ID: int(request_id), P.COMMAND: P.COMMAND_SEGMENT, P.REQUEST_TASK: task,
            P.REQUEST_INPUT: str(input_path), P.REQUEST_OUTPUT: str(output_path), P.REQUEST_MODEL: str(model),
            P.REQUEST_DEVICE: device,
            P.REQUEST_SEED_RAS: [float(v) for v in seed_ras] if seed_ras is not None else None}


def quit_request() -> Dict[str, Any]:
    """The request that ends ``kdseg serve``."""
    return {P.COMMAND: P.COMMAND_QUIT}
