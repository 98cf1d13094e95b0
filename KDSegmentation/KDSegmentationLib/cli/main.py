"""The ``kdseg`` command line (contract in the project's design notes; keep it stable, extend it compatibly).

Each command group has its module in this package (segment, evaluate, models, serve, train) with its ``cmd_*``
functions and its parsers; this module builds the parser, runs a command and turns failures into exit codes.
Exit codes: 0 success; 2 bad input (one line on stderr, and an ``error`` event with ``--progress json``);
130/143 cancelled by SIGINT/SIGTERM; 1 unexpected internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from KDSegmentationLib import protocol as P
from KDSegmentationLib.cli.arguments import bound_message, parse_threads
from KDSegmentationLib.cli.cancel import install_cancel_handlers
from KDSegmentationLib.errors import CancelledError, InputError


def build_parser() -> argparse.ArgumentParser:
    from KDSegmentationLib.cli import cache, evaluate, models, segment, serve, train
    from KDSegmentationLib.tasks import TASKS

    p = argparse.ArgumentParser(prog="kdseg", description="Fast distilled segmentation of liver, lung nodule and "
                                "retinal vessels; teacher training and local distillation.")
    sub = p.add_subparsers(dest="command", required=True)
    task_names = list(TASKS)
    segment.add_parsers(sub, task_names)
    evaluate.add_parsers(sub, task_names)
    models.add_parsers(sub)
    serve.add_parsers(sub)
    train.add_subcommands(sub)
    cache.add_parsers(sub)
    return p


def tune_malloc() -> None:
    """Keep large tensors on glibc's heap instead of fresh mmaps.

    Why: every mmap-backed tensor pays page faults on first touch; with many large temporaries (3D inference) that
    made the CPU pipeline about 3x slower. No effect elsewhere than glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    json_mode = getattr(args, "progress", None) == "json"
    restore = install_cancel_handlers() if args.command in _CANCEL_COMMANDS else None
    try:
        if getattr(args, "threads", None) is not None:
            args.threads, warning = parse_threads(args.threads)
            if warning:
                _report_warning(warning, json_mode)
        return int(args.func(args) or 0)
    except InputError as exc:
        _report_error(str(exc), json_mode)
        return 2
    except CancelledError as exc:
        _report_error(f"cancelled: {exc}" if str(exc) else "cancelled", json_mode)
        return 128 + int(getattr(exc, "signal", None) or 2)
    except KeyboardInterrupt as exc:
        signum = int(getattr(exc, "signal", None) or 2)
        _report_error("cancelled" if signum == 2 else f"cancelled ({exc})", json_mode)
        return 128 + signum
    except MemoryError:
        _report_error("out of memory; use a machine with more memory, a smaller image, or --device cuda", json_mode)
        return 2
    except Exception as exc:
        if os.environ.get("KDSEG_DEBUG"):
            raise
        _report_error(f"internal error: {type(exc).__name__}: {exc} (set KDSEG_DEBUG=1 for a traceback)", json_mode)
        return 1
    finally:
        if restore:
            restore()


# Commands whose SIGTERM becomes a clean cancellation (exit 143, temp files removed by the writers' cleanup);
# training has its own handler that checkpoints first.
_CANCEL_COMMANDS = ("segment", "demo", "evaluate", "calibrate", "sample", "models")


def _report_warning(message: str, json_mode: bool) -> None:
    message = bound_message(message)
    if json_mode:
        print(json.dumps({P.EVENT: P.EVENT_LOG, P.LEVEL: P.LEVEL_WARNING, P.MESSAGE: message}), flush=True)
    print(f"kdseg: warning: {message}", file=sys.stderr, flush=True)


def _report_error(message: str, json_mode: bool) -> None:
    message = bound_message(message)  # one line, always, and bounded
    if json_mode:
        print(json.dumps({P.EVENT: P.EVENT_ERROR, P.MESSAGE: message}), flush=True)
    print(f"kdseg: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
