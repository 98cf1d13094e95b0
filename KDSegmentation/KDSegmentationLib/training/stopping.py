"""Stopping a run cleanly (signals, a cancel file, a callable) and the torchrun process group.

The first SIGINT/SIGTERM, a cancel file or a ``should_stop`` callable stop the run after the current step; under
torchrun every rank stops at the same step (:meth:`Distributed.any_flag`).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


class Stopper:
    """Collects stop requests; the loop polls :meth:`requested` after each step.

    The first SIGINT/SIGTERM only sets a flag (and restores the previous handler, so a second Ctrl-C interrupts
    at once); handlers are installed only from the main thread and removed by :meth:`close`.
    """

    def __init__(self, cancel_file: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None):
        self.cancel_file = Path(cancel_file) if cancel_file else None
        self.should_stop = should_stop
        self.signal: Optional[int] = None
        self.reason: Optional[str] = None
        self._old: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                    pass

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        self.reason = signal.Signals(signum).name
        if signum in self._old:
            signal.signal(signum, self._old[signum])

    def requested(self) -> bool:
        if self.reason is None:
            if self.cancel_file is not None and self.cancel_file.exists():
                self.reason = f"cancel file {self.cancel_file}"
            elif self.should_stop is not None and self.should_stop():
                self.reason = "stop requested"
        return self.reason is not None

    def close(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):  # pragma: no cover
                pass
        self._old = {}


class Distributed:
    """torchrun environment: rank, world size, local rank; a no-op when WORLD_SIZE is 1 or unset."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            from datetime import timedelta

            backend = "nccl" if device.type == "cuda" else "gloo"
            # long timeout: rank 0 validates and writes checkpoints while the others wait at a barrier
            torch.distributed.init_process_group(backend=backend, timeout=timedelta(minutes=60))
            self.active = True

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def any_flag(self, flags: Sequence[bool], device: torch.device) -> List[bool]:
        """Element-wise OR of boolean flags over all ranks (every rank stops at the same step)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.active = False
