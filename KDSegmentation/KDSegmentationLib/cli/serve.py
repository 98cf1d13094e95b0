"""``kdseg serve``: the persistent engine process, one JSON request per stdin line, events on stdout.

Request: ``{"id": 1, "command": "segment", "task": ..., "input": ..., "output": ..., "model": ..., "device": ...,
"seed_ras": [x, y, z]}``; ``{"command": "quit"}`` or end of input stops it. Every event written for a request
carries the request's ``id``. Any line, whatever it holds, is answered (an ``error`` event at worst) and the
process stays alive for the next one. Names are those of :mod:`KDSegmentationLib.protocol`.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Optional

from KDSegmentationLib import protocol as P
from KDSegmentationLib.cli.arguments import bound_message, bound_text, set_threads
from KDSegmentationLib.cli.cancel import install_cancel_handlers
from KDSegmentationLib.cli.segment import run_segment
from KDSegmentationLib.errors import InputError

# One request line at most; longer ones are skipped up to their end (the line is never held whole in memory) and
# answered with an error, so a runaway client cannot exhaust the process's memory.
MAX_REQUEST_BYTES = 1 << 20
MAX_FIELD_CHARS = 4096


def cmd_serve(args) -> int:
    """Answer requests until ``quit`` or end of input. Start-up (imports, model load) is paid once per session
    instead of once per run."""
    import torch  # noqa: F401  (import once, up front: that is the point of the persistent process)

    set_threads(args.threads)
    out = sys.stdout
    out.write(json.dumps({P.EVENT: P.EVENT_LOG, P.LEVEL: P.LEVEL_INFO, P.MESSAGE: P.READY_MESSAGE}) + "\n")
    out.flush()
    restore = install_cancel_handlers()
    try:
        for line, problem in request_lines(getattr(sys.stdin, "buffer", sys.stdin)):
            req, problem = parse_request(line, problem)
            progress = TaggedProgress(request_id_of(req, line), out)
            if problem:
                progress.error(problem)
                continue
            if req.get(P.COMMAND) == P.COMMAND_QUIT:
                break
            stop = answer(req, progress)
            if stop is not None:
                return stop
    except KeyboardInterrupt as exc:  # signalled between requests: nothing to answer
        return 128 + int(getattr(exc, "signal", None) or 2)
    finally:
        if restore:
            restore()
    return 0


def answer(req: dict, progress) -> Optional[int]:
    """Run one request and write its ``result`` or ``error``; returns an exit code when the process must stop."""
    try:
        if req.get(P.COMMAND) != P.COMMAND_SEGMENT:
            raise InputError(f"unknown command {bound_text(repr(req.get(P.COMMAND)), 80)}; the worker "
                             f"understands {', '.join(P.COMMANDS)}")
        fields = request_fields(req)
        summary = run_segment(fields[P.REQUEST_TASK], fields[P.REQUEST_INPUT], fields[P.REQUEST_OUTPUT],
                              model=fields[P.REQUEST_MODEL], device=fields[P.REQUEST_DEVICE],
                              seed_ras=fields[P.REQUEST_SEED_RAS], progress=progress)
        progress.result(**summary)
    except KeyboardInterrupt as exc:
        progress.error(f"cancelled ({str(exc) or 'SIGINT'}); the worker stops")
        return 128 + int(getattr(exc, "signal", None) or 2)
    except InputError as exc:
        progress.error(str(exc))
    except KeyError as exc:
        progress.error(f"request is missing {exc}")
    except RecursionError:
        progress.error("request is nested too deeply")
    except Exception as exc:  # keep the process alive for the next request
        progress.error(f"internal error: {type(exc).__name__}: {exc}")
    return None


def request_lines(stream):
    """Yield (line bytes, None) or (first bytes, problem) for each non-empty line of ``stream``."""
    while True:
        line = stream.readline(MAX_REQUEST_BYTES + 1)
        if isinstance(line, str):  # a text stream (tests, embedding)
            line = line.encode("utf-8", "surrogateescape")
        if not line:
            return
        if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
            head = line[:4096]
            while True:
                chunk = stream.readline(MAX_REQUEST_BYTES)
                if not chunk or chunk.endswith(b"\n" if isinstance(chunk, bytes) else "\n"):
                    break
            yield head, f"request line longer than {MAX_REQUEST_BYTES // 1024} KiB"
            continue
        if line.strip():
            yield line, None


def parse_request(line: bytes, problem: Optional[str]):
    """(request dict or None, problem or None)."""
    if problem:
        return None, problem
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "request is not valid UTF-8"
    try:
        req = json.loads(text)
    except RecursionError:
        return None, "request is nested too deeply"
    except ValueError:
        return None, "request is not valid JSON"
    if not isinstance(req, dict):
        return None, f"request must be a JSON object, got {type(req).__name__}"
    return req, None


_ID_IN_TEXT = re.compile(rb'"' + P.ID.encode() + rb'"\s*:\s*(-?\d{1,18}|"[^"\\]{0,200}")')


def request_id_of(req, line: bytes):
    """The request's id when it has a usable one (a 64-bit integer or short text), also dug out of a line that
    failed to parse, so the client can match the error to its request."""
    if isinstance(req, dict):
        rid = req.get(P.ID)
    else:
        m = _ID_IN_TEXT.search(line[:4096] if line else b"")
        if not m:
            return None
        try:
            rid = json.loads(m.group(1).decode("utf-8"))
        except ValueError:
            return None
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    if isinstance(rid, str):
        return bound_text(rid, 200)
    return rid if -2 ** 63 <= rid < 2 ** 63 else None


def request_fields(req: dict) -> dict:
    """The segment request's fields, typed: a wrong type is a bad request, not an internal error."""
    fields = {}
    for key, default in P.SEGMENT_TEXT_FIELDS:
        value = req[key] if default is None else req.get(key, default)
        if not isinstance(value, str):
            raise InputError(f"request field '{key}' must be text, got {type(value).__name__}")
        if len(value) > MAX_FIELD_CHARS:
            raise InputError(f"request field '{key}' is {len(value)} characters long; paths and names are at most "
                             f"{MAX_FIELD_CHARS}")
        fields[key] = value
    seed = req.get(P.REQUEST_SEED_RAS)
    if seed is not None:
        if not isinstance(seed, list) or len(seed) != 3 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in seed):
            raise InputError(f"request field '{P.REQUEST_SEED_RAS}' must be three numbers [x, y, z] in RAS "
                             "millimetres")
        seed = tuple(float(v) for v in seed)
    fields[P.REQUEST_SEED_RAS] = seed or None
    return fields


class TaggedProgress:
    """A JSON :class:`~KDSegmentationLib.progress.Progress` whose events carry the request id and bounded
    messages."""

    def __init__(self, request_id, stream):
        from KDSegmentationLib.progress import Progress

        self._p = Progress("json", stream=_TagStream(request_id, stream))

    def __getattr__(self, name):
        return getattr(self._p, name)


class _TagStream:
    def __init__(self, request_id, stream):
        self.request_id = request_id
        self.stream = stream

    def write(self, text):
        for line in text.splitlines():
            if line.strip():
                obj = json.loads(line)
                obj[P.ID] = self.request_id
                if isinstance(obj.get(P.MESSAGE), str):
                    obj[P.MESSAGE] = bound_message(obj[P.MESSAGE])
                self.stream.write(json.dumps(obj) + "\n")

    def flush(self):
        self.stream.flush()


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="persistent worker: JSON requests on stdin, JSON events on stdout")
    s.add_argument("--threads", type=str)
    s.set_defaults(func=cmd_serve)
