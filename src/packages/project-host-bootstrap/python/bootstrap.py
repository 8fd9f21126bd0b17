#!/usr/bin/env python3
"""bootstrap.py - turn a fresh VM into a CoCalc project host.

Reads one JSON config (see @cocalc/project-host-bootstrap's schema), validates
all of it before touching the machine, then runs the bootstrap steps as a
dependency graph, in parallel unless the config says `"parallel": false`.

Stdlib only; runs on the distribution's python3 (3.10 or newer). Importing
this file does nothing, so tests import it.

Built by python/build.py from the modules in python/cocalc_bootstrap/ (one
section per module below, in dependency order); edit those, not this file.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import enum
import errno
import fcntl
import graphlib
import grp
import gzip
import hashlib
import http.client
import itertools
import json
import lzma
import math
import os
import platform
import pwd
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import traceback
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Annotated, Any, ClassVar, Literal, TextIO, TypeVar, Union, get_args

# ============================================================================
# errors: Constants, exit codes and the error types every other module raises.
# ============================================================================


__version__ = "0.1.0"

T = TypeVar("T")

SCHEMA_VERSION = 1
MIN_PYTHON = (3, 10)
TOKEN_FILE_NAME = "bootstrap-token"  # noqa: S105 - a file name, not a secret
CONFIG_FILE_NAME = "bootstrap-config.json"

# Exit codes of `run` (documented in --help).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2  # bad config or usage; nothing was changed
EXIT_LOCKED = 3  # another run holds the lock
EXIT_INTERRUPTED = 130


# ============================================================================
# errors
# ============================================================================


class BootstrapError(Exception):
    """An expected failure: a message, an actionable hint, an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log_tail = log_tail


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in the config: where (a JSON path as a list) and what."""

    path: tuple[str | int, ...]
    message: str
    value: Any = None

    def json_path(self) -> str:
        return format_json_path(self.path)


class ConfigError(BootstrapError):
    """The config is invalid; carries every issue at once."""

    exit_code = EXIT_CONFIG

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        lines = [f"{source}: {len(issues)} problem(s) in the config:"]
        for issue in issues:
            lines.append(f"  {printable(issue.json_path())}: {issue.message} (got {short_repr(issue.value)})")
        super().__init__(
            "\n".join(lines),
            hint="Fix the fields listed above (or rebuild the config with the hub's builder); nothing was changed.",
        )
        self.issues = tuple(issues)


class UsageError(BootstrapError):
    exit_code = EXIT_CONFIG


def format_json_path(path: Sequence[str | int]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """Text safe on a terminal and in a log line: control characters, line separators and
    unpaired surrogates written as \\uXXXX (a config's keys can hold any of them)."""
    return _UNPRINTABLE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def short_repr(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, _Missing) else "nothing"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Missing:
    """Marker for a field that is absent from the JSON document."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


# ============================================================================
# log: The run's log: JSON lines plus a console, with secrets redacted.
# ============================================================================

# JSON lines at $BOOTSTRAP_ROOT/logs/bootstrap.log plus a console. Steps call
# log.info/warn/error(message, **fields); every record carries the current
# step from a contextvar that the plan sets in each worker thread, so parallel
# steps stay readable. Known secrets are redacted from every record.

CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("bootstrap_step", default=None)
TAIL_LINES = 20
TAIL_CHARS = 4000
MAX_TEXT = 8192  # the hub's limit on an event's text fields (src/events.ts)
# bootstrap.log rotates at this size into bootstrap.log.1 (.1 -> .2, ...), keeping
# this many old generations: constants, not config (a host's log must stay
# bounded even when its config cannot be read). 4 MiB x (1 + 3) at most.
LOG_MAX_BYTES = 4 * 1024 * 1024
LOG_GENERATIONS = 3


class Redactor:
    """The known secrets (the bootstrap token, fetched secrets), replaced by
    `***` in everything that is logged, printed or sent to the hub."""

    MIN_LEN = 6  # shorter values would redact ordinary words

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        secret = secret.strip()
        if len(secret) < self.MIN_LEN:
            return
        with self._lock:
            # longest first, so a secret containing another is replaced whole
            self._secrets = tuple(sorted({*self._secrets, secret}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def deep(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, Mapping):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.deep(v) for v in value]
        return value


REDACTOR = Redactor()


def add_secret(value: str) -> None:
    """Steps call this with every secret they fetch, before logging anything."""
    REDACTOR.add(value)


def output_tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])[-chars:]


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def utc_timestamp(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def rotate_log(path: Path, generations: int = LOG_GENERATIONS) -> None:
    """bootstrap.log -> bootstrap.log.1 -> ... -> .<generations>; the oldest goes."""
    for n in range(generations, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        newer = path if n == 1 else path.with_name(f"{path.name}.{n - 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(newer, older)
    if generations <= 0:
        path.unlink(missing_ok=True)


def cut_torn_tail(path: Path, window: int = 1 << 20) -> int:
    """A JSON-lines file whose end was lost to a power cut ends in a partial
    line, often zeros (its size reached the disk, its data did not): cut it
    back to the last complete line, so what is appended next stays JSON
    lines. Returns the bytes removed (0: nothing torn, or no file)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - window)
            f.seek(start)
            tail = f.read()
            keep = tail.rfind(b"\n") + 1
            if keep == len(tail) or (keep == 0 and start > 0):
                return 0
            f.truncate(start + keep)
            return len(tail) - keep
    except OSError:
        return 0


class Log:
    """The JSON-lines log file (optional) and the console (optional).

    On a terminal the console shows a line per step start and end plus an
    overall progress line kept at the bottom; otherwise (cloud-init, a pipe)
    plain lines only. `Log()` alone prints to stderr and writes no file.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        run_id: str = "",
        console: TextIO | None = None,
        echo: bool = True,
        tty: bool | None = None,
        redactor: Redactor = REDACTOR,
        max_bytes: int = LOG_MAX_BYTES,
        generations: int = LOG_GENERATIONS,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.generations = generations
        self._size = 0
        self.run_id = run_id
        self.echo = echo
        self._console = console
        self._tty = tty
        self.redact = redactor
        self._lock = threading.RLock()
        self._file: TextIO | None = None
        self._status = ""  # the progress line currently shown on a terminal
        torn = 0
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            torn = cut_torn_tail(path)
            self._open_file()
        if torn:
            self.record("warning", f"removed a torn end of {path} ({torn} bytes, lost to a crash or power cut)")

    def _open_file(self) -> None:
        assert self.path is not None
        if self.path.exists() and self.path.stat().st_size >= self.max_bytes:
            rotate_log(self.path, self.generations)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._size = os.fstat(fd).st_size

    def _write_line(self, line: str) -> None:
        """Append one record; rotate first when it would take the file past max_bytes."""
        if self._file is None or self.path is None:
            return
        size = len(line.encode("utf-8")) + 1
        if self._size > 0 and self._size + size > self.max_bytes:
            self._file.close()
            rotate_log(self.path, self.generations)
            self._open_file()
        assert self._file is not None
        self._file.write(line + "\n")
        self._file.flush()
        self._size += size

    # -- the steps' interface --------------------------------------------

    def info(self, message: str, **fields: Any) -> None:
        self.record("info", message, **fields)

    def warn(self, message: str, **fields: Any) -> None:
        self.record("warning", message, **fields)

    def error(self, message: str, **fields: Any) -> None:
        self.record("error", message, **fields)

    def debug(self, message: str, **fields: Any) -> None:
        """File only: command records, tracebacks, sender chatter."""
        self.record("debug", message, **fields)

    # -- the engine's interface ------------------------------------------

    def record(self, level: str, message: str, *, event: str = "log", **fields: Any) -> None:
        step = fields.pop("step", None) or CURRENT_STEP.get()
        entry: dict[str, Any] = {
            "ts": utc_timestamp(),
            "run_id": self.run_id,
            "step": step,
            "event": event,
            "level": level,
            "message": message,
        }
        entry.update({k: v for k, v in fields.items() if v is not None})
        entry = self.redact.deep(entry)
        line = json.dumps(entry, default=str, ensure_ascii=False)
        with self._lock:
            self._write_line(line)
            if self.echo and level != "debug":
                prefix = "" if level == "info" else f"{level}: "
                where = f"{step}: " if step else ""
                self._print(f"    {prefix}{where}{entry['message']}")

    def step_started(self, step: str, percent: float) -> None:
        self.record("debug", "started", event="step_start", step=step)
        self._console_line(f"==> {step}", percent)

    def step_finished(
        self,
        step: str,
        outcome: str,
        duration_s: float,
        percent: float,
        detail: str = "",
        *,
        hint: str | None = None,
        tail: str | None = None,
    ) -> None:
        self.record(
            "debug",
            detail or outcome,
            event="step_end",
            step=step,
            outcome=outcome,
            duration_s=round(duration_s, 3),
            hint=hint,
            tail=tail,
        )
        extra = f": {self.redact(detail)}" if detail and outcome in ("failed", "blocked") else ""
        self._console_line(f"<== {step} {outcome} in {duration_s:.1f}s{extra}", percent)

    def progress(self, percent: float, running: Sequence[str]) -> None:
        """The overall progress line (terminal only)."""
        if not self._is_tty():
            return
        status = f"[{percent:3.0f}%] running: {', '.join(running) or '-'}"
        with self._lock:
            self._status = status[:200]
            self._draw("")

    def close(self) -> None:
        with self._lock:
            if self._status:
                self._status = ""
                self._draw("")
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- console -----------------------------------------------------------

    def _console_line(self, text: str, percent: float) -> None:
        if not self.echo:
            return
        if self._is_tty():
            self._print(text)
        else:
            self._print(f"[{percent:3.0f}%] {text}")

    def _stream(self) -> TextIO:
        return self._console if self._console is not None else sys.stderr

    def _is_tty(self) -> bool:
        if not self.echo:
            return False
        if self._tty is None:
            isatty = getattr(self._stream(), "isatty", None)
            self._tty = bool(isatty and isatty())
        return self._tty

    def _print(self, text: str) -> None:
        if not self.echo:
            return
        with self._lock:
            if self._is_tty():
                self._draw(text + "\n")
            else:
                stream = self._stream()
                stream.write(text + "\n")
                stream.flush()

    def _draw(self, lines: str) -> None:
        # Clear the progress line, print the new lines, redraw the progress line.
        stream = self._stream()
        stream.write("\r\x1b[K" + lines + self._status)
        stream.flush()


_active_log = Log()


def active_log() -> Log:
    """The run's log, for run_command and retry (which take no log argument)."""
    return _active_log


def set_active_log(log: Log) -> None:
    global _active_log
    _active_log = log


# ============================================================================
# events: The progress event contract (src/events.ts's twin): typed events to emit,
# ============================================================================

# Every event bootstrap.py sends is one of the dataclasses below, emitted
# through an EventSink (engine.py); the spool adds the envelope (run_id,
# seq, ts, type). check_event() is the zod schema's twin: the same verdict,
# the same error paths and the same output (defaults filled in) for every
# vector in fixtures/events/ (python/tests and test/events-conformance.test.ts).

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{7,63}")
STEP_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
MAX_SEQ = 1_000_000
MAX_PLAN_STEPS = 128
MAX_STEP_DEPS = 64


class StrEnum(str, enum.Enum):
    """enum.StrEnum for Python 3.10: members are their values as strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Outcome(StrEnum):
    """How a step ended (STEP_OUTCOMES in src/events.ts)."""

    CHANGED = "changed"  # check() found work, apply() ran, check() is now satisfied
    UNCHANGED = "unchanged"  # nothing to do (skipped, or applied with nothing to change)
    FAILED = "failed"
    BLOCKED = "blocked"  # a dependency failed, or the run stopped first


class EventType(StrEnum):
    RUN_START = "run_start"
    STEP_START = "step_start"
    STEP_END = "step_end"
    PROGRESS = "progress"
    RUN_END = "run_end"


@dataclass(frozen=True)
class StepInfo:
    name: str
    deps: tuple[str, ...]
    weight: float  # expected seconds, weights percent


@dataclass(frozen=True)
class RunStartEvent:
    type: ClassVar[EventType] = EventType.RUN_START
    version: str
    parallel: bool
    steps: tuple[StepInfo, ...]


@dataclass(frozen=True)
class StepStartEvent:
    type: ClassVar[EventType] = EventType.STEP_START
    step: str


@dataclass(frozen=True)
class StepCpuSeconds:
    """CPU-seconds of one step: its thread and the child processes it reaped."""

    user_s: float
    sys_s: float
    children_user_s: float
    children_sys_s: float


@dataclass(frozen=True)
class StepEndEvent:
    type: ClassVar[EventType] = EventType.STEP_END
    step: str
    outcome: Outcome
    duration_s: float
    message: str = ""
    hint: str | None = None
    log_tail: str | None = None
    cpu: StepCpuSeconds | None = None  # null: not measured (a blocked step, an older bootstrap.py)


@dataclass(frozen=True)
class ProgressEvent:
    type: ClassVar[EventType] = EventType.PROGRESS
    phase: str
    percent: float


@dataclass(frozen=True)
class RunEndEvent:
    type: ClassVar[EventType] = EventType.RUN_END
    ok: bool
    wall_s: float
    failed_step: str | None = None
    hint: str | None = None
    log_tail: str | None = None


Event = Union[RunStartEvent, StepStartEvent, StepEndEvent, ProgressEvent, RunEndEvent]  # noqa: UP007 - 3.10 runtime


# -- the validator: zod's rules, paths and defaults -------------------------------------

EventIssues = list[tuple[str, str]]  # (JSON path as in formatPath: $.steps[0].name, message)
EventCheck = Callable[[Any, str, EventIssues], Any]  # returns the parsed value (valid only if no issue was added)
_EV_ABSENT = object()


def _ev_string(*, max_len: int | None = None, pattern: re.Pattern[str] | None = None) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, str):
            issues.append((path, "expected a string"))
        elif pattern is not None and not pattern.fullmatch(value):
            issues.append((path, f"must match {pattern.pattern}"))
        elif max_len is not None and len(value) > max_len:  # code points, as zod counts
            issues.append((path, f"at most {max_len} characters"))
        return value

    return check


def _ev_number(*, minimum: float | None = None, maximum: float | None = None, integer: bool = False) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            issues.append((path, "expected a finite number"))
        elif integer and value != int(value):
            issues.append((path, "expected an integer"))
        elif minimum is not None and value < minimum:
            issues.append((path, f"must be >= {minimum}"))
        elif maximum is not None and value > maximum:
            issues.append((path, f"must be <= {maximum}"))
        else:
            return int(value) if integer else value
        return value

    return check


def _ev_boolean(value: Any, path: str, issues: EventIssues) -> Any:
    if not isinstance(value, bool):
        issues.append((path, "expected true or false"))
    return value


def _ev_choice(enum_type: type[StrEnum]) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, str) or value not in {m.value for m in enum_type}:
            issues.append((path, f"one of {', '.join(m.value for m in enum_type)}"))
        return value

    return check


def _ev_nullable(inner: EventCheck) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        return None if value is None else inner(value, path, issues)

    return check


def _ev_array(item: EventCheck, *, max_len: int) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, list):
            issues.append((path, "expected an array"))
            return value
        if len(value) > max_len:
            issues.append((path, f"at most {max_len} items"))
        return [item(v, f"{path}[{i}]", issues) for i, v in enumerate(value)]

    return check


EventField = tuple[EventCheck, Any]  # (check, default; _EV_ABSENT = required)


def _ev_object(fields: Mapping[str, EventField]) -> EventCheck:
    """z.strictObject: every field in order, then one issue for unknown keys."""

    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, dict):
            issues.append((path, "expected an object"))
            return value
        out: dict[str, Any] = {}
        for key, (field_check, default) in fields.items():
            if key in value:
                out[key] = field_check(value[key], f"{path}.{key}", issues)
            elif default is _EV_ABSENT:
                issues.append((f"{path}.{key}", "required"))
            else:
                out[key] = default
        unknown = [k for k in value if k not in fields]
        if unknown:
            issues.append((path, "unknown key(s): " + ", ".join(map(str, unknown))))
        return out

    return check


_EV_TEXT = _ev_string(max_len=MAX_TEXT)
_EV_STEP = _ev_string(pattern=STEP_NAME_RE)
_EV_REQUIRED: Any = _EV_ABSENT
_EV_ENVELOPE: dict[str, EventField] = {
    "run_id": (_ev_string(pattern=RUN_ID_RE), _EV_REQUIRED),
    "seq": (_ev_number(minimum=0, maximum=MAX_SEQ, integer=True), _EV_REQUIRED),
    "ts": (_ev_number(minimum=0), _EV_REQUIRED),
}
_EV_STEP_INFO = _ev_object(
    {
        "name": (_EV_STEP, _EV_REQUIRED),
        "deps": (_ev_array(_EV_STEP, max_len=MAX_STEP_DEPS), _EV_REQUIRED),
        "weight": (_ev_number(minimum=0), _EV_REQUIRED),
    }
)
_EV_SECONDS = _ev_number(minimum=0)
_EV_STEP_CPU = _ev_object(
    {
        "user_s": (_EV_SECONDS, _EV_REQUIRED),
        "sys_s": (_EV_SECONDS, _EV_REQUIRED),
        "children_user_s": (_EV_SECONDS, _EV_REQUIRED),
        "children_sys_s": (_EV_SECONDS, _EV_REQUIRED),
    }
)
_EV_FIELDS: dict[EventType, dict[str, EventField]] = {
    EventType.RUN_START: {
        "version": (_ev_string(max_len=64), _EV_REQUIRED),
        "parallel": (_ev_boolean, _EV_REQUIRED),
        "steps": (_ev_array(_EV_STEP_INFO, max_len=MAX_PLAN_STEPS), _EV_REQUIRED),
    },
    EventType.STEP_START: {"step": (_EV_STEP, _EV_REQUIRED)},
    EventType.STEP_END: {
        "step": (_EV_STEP, _EV_REQUIRED),
        "outcome": (_ev_choice(Outcome), _EV_REQUIRED),
        "duration_s": (_ev_number(minimum=0), _EV_REQUIRED),
        "message": (_EV_TEXT, ""),
        "hint": (_ev_nullable(_EV_TEXT), None),
        "log_tail": (_ev_nullable(_EV_TEXT), None),
        "cpu": (_ev_nullable(_EV_STEP_CPU), None),
    },
    EventType.PROGRESS: {
        "phase": (_ev_string(max_len=128), _EV_REQUIRED),
        "percent": (_ev_number(minimum=0, maximum=100), _EV_REQUIRED),
    },
    EventType.RUN_END: {
        "ok": (_ev_boolean, _EV_REQUIRED),
        "wall_s": (_ev_number(minimum=0), _EV_REQUIRED),
        "failed_step": (_ev_nullable(_EV_STEP), None),
        "hint": (_ev_nullable(_EV_TEXT), None),
        "log_tail": (_ev_nullable(_EV_TEXT), None),
    },
}
_EV_CHECKS: dict[str, EventCheck] = {
    t.value: _ev_object({**_EV_ENVELOPE, "type": (_ev_string(), _EV_REQUIRED), **fields})
    for t, fields in _EV_FIELDS.items()
}


class EventError(ValueError):
    """An event that does not fit the contract; issues are (path, message)."""

    def __init__(self, issues: EventIssues) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in issues))
        self.issues = issues


def check_event(data: Any) -> dict[str, Any]:
    """One event as the hub's zod schema parses it: the event with defaults
    filled in, or EventError with every issue (zod's paths)."""
    if not isinstance(data, dict):
        raise EventError([("$", "expected an object")])
    check = _EV_CHECKS.get(data["type"]) if isinstance(data.get("type"), str) else None
    if check is None:
        raise EventError([("$.type", f"one of {', '.join(t.value for t in EventType)}")])
    issues: EventIssues = []
    out = check(data, "$", issues)
    if issues:
        raise EventError(issues)
    return dict(out)


def event_fields(event: Event) -> dict[str, Any]:
    """An event's own fields as JSON (without the envelope)."""
    if isinstance(event, RunStartEvent):
        steps = [{"name": s.name, "deps": list(s.deps), "weight": s.weight} for s in event.steps]
        return {"version": event.version, "parallel": event.parallel, "steps": steps}
    if isinstance(event, StepEndEvent):
        fields = {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in vars(event).items()}
        fields["cpu"] = None if event.cpu is None else dict(vars(event.cpu))
        return fields
    return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in vars(event).items()}


def parse_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The valid events of a spool file's lines, in order; stops at the
    first line that is not JSON (the torn last line of a killed run) and
    leaves out lines that break the contract."""
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            break
        try:
            events.append(check_event(data))
        except EventError:
            continue
    return events


# ============================================================================
# commands: Running commands: argv only, minimal environment, timeouts, retries.
# ============================================================================

# One way to run a command: argv only, a minimal explicit environment, stdin
# from /dev/null, its own session (process group) so a timeout kills apt's
# children too: SIGTERM to the group, SIGKILL after KILL_GRACE_S for anything
# that ignores it. One log record per call, secrets redacted.

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE_S = 5.0
_running_groups: set[int] = set()
_running_groups_lock = threading.Lock()


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    duration_s: float
    output: str  # stdout and stderr, interleaved (not redacted: the caller's data)
    tail: str  # last lines of output, redacted, for error messages
    timed_out: bool = False


class StepCpu:
    """CPU-seconds one step used: its own thread (RUSAGE_THREAD around the
    step's work, engine.py) and the child processes it waited for (their
    wait4 rusage, which includes the grandchildren they reaped). Helper
    threads a step starts are not counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = resource.getrusage(resource.RUSAGE_THREAD)
        self.user_s = 0.0
        self.sys_s = 0.0
        self.children_user_s = 0.0
        self.children_sys_s = 0.0

    def add_child(self, ru: resource.struct_rusage) -> None:
        with self._lock:
            self.children_user_s += ru.ru_utime
            self.children_sys_s += ru.ru_stime

    def stop(self) -> dict[str, float]:
        """Call from the step's own thread: its CPU since the meter was made."""
        now = resource.getrusage(resource.RUSAGE_THREAD)
        self.user_s = max(0.0, now.ru_utime - self._start.ru_utime)
        self.sys_s = max(0.0, now.ru_stime - self._start.ru_stime)
        with self._lock:
            return {
                "user_s": round(self.user_s, 3),
                "sys_s": round(self.sys_s, 3),
                "children_user_s": round(self.children_user_s, 3),
                "children_sys_s": round(self.children_sys_s, 3),
            }


STEP_CPU: contextvars.ContextVar[StepCpu | None] = contextvars.ContextVar("bootstrap_step_cpu", default=None)


def charge_child(ru: resource.struct_rusage | None) -> None:
    """Count a reaped child's rusage to the current step (no step: nothing)."""
    meter = STEP_CPU.get()
    if meter is not None and ru is not None:
        meter.add_child(ru)


class MeteredPopen(subprocess.Popen[bytes]):
    """Popen that reaps its child with os.wait4, keeping the child's rusage
    (CPU of the child and of every descendant it waited for). Popen.wait()
    and communicate() reap through _try_wait; a child reaped by poll() is
    not metered (rusage stays None)."""

    rusage: resource.struct_rusage | None = None

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        try:
            pid, sts, ru = os.wait4(self.pid, wait_flags)
        except ChildProcessError:  # as Popen: SIGCHLD ignored, the status is lost
            return self.pid, 0
        if pid == self.pid:
            self.rusage = ru
        return pid, sts


class CommandError(BootstrapError):
    def __init__(self, message: str, result: CommandResult, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, log_tail=result.tail)
        self.result = result


def base_env() -> dict[str, str]:
    return {
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PATH": BASE_PATH,
        "HOME": os.environ.get("HOME", "/"),
        "DEBIAN_FRONTEND": "noninteractive",
    }


def sudo_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """`sudo -n` (never prompt) + `env -i K=V ...`: sudo resets the environment,
    so the command gets exactly the one we pass, no more."""
    return ["sudo", "-n", "--", "env", "-i", *[f"{k}={v}" for k, v in sorted(env.items())], *argv]


def run_command(
    argv: Sequence[str],
    *,
    sudo: bool = False,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    check: bool = True,
    cwd: str | None = None,
    hint: str | None = None,
) -> CommandResult:
    """Run argv (never a shell string) with a minimal explicit environment.

    `env` is added to the base environment (LANG=C.UTF-8, PATH, HOME, ...);
    with sudo=True the command runs as `sudo -n -- env -i K=V ... argv`.
    Raises CommandError on a non-zero exit when check=True, and always on a
    timeout (after killing the whole process group) or when argv cannot run.
    """
    if isinstance(argv, str):
        raise TypeError("run_command takes an argv list, never a shell string")
    args = tuple(argv)
    full_env = {**base_env(), **(env or {})}
    cmd = sudo_argv(args, full_env) if sudo else list(args)
    start = time.monotonic()
    try:
        proc = MeteredPopen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        result = CommandResult(args, 127, time.monotonic() - start, str(e), REDACTOR(str(e)))
        log_command(result, sudo=sudo)
        raise CommandError(
            REDACTOR(f"cannot run {args[0]}: {e.strerror or e}"),
            result,
            hint=hint or f"Is {args[0]} installed and on PATH ({BASE_PATH})?",
        ) from None
    with _running_groups_lock:
        _running_groups.add(proc.pid)
    try:
        raw, timed_out = _communicate(proc, timeout_s)
    finally:
        with _running_groups_lock:
            _running_groups.discard(proc.pid)
    charge_child(proc.rusage)
    output = raw.decode("utf-8", "replace")
    result = CommandResult(
        args, proc.returncode, time.monotonic() - start, output, REDACTOR(output_tail(output)), timed_out
    )
    log_command(result, sudo=sudo)
    if timed_out:
        message = f"{shown_argv(args)} timed out after {timeout_s:g}s and was killed"
        raise CommandError(REDACTOR(message), result, hint=hint)
    if check and result.returncode != 0:
        raise CommandError(REDACTOR(f"{shown_argv(args)} exited with {result.returncode}"), result, hint=hint)
    return result


def shown_argv(argv: Sequence[str], limit: int = 200) -> str:
    text = " ".join(argv)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_command(result: CommandResult, *, sudo: bool) -> None:
    failed = result.returncode != 0 or result.timed_out
    active_log().debug(
        f"{'sudo ' if sudo else ''}{shown_argv(result.argv)} -> {result.returncode}",
        event="command",
        argv=list(result.argv),
        sudo=sudo,
        exit_code=result.returncode,
        duration_s=round(result.duration_s, 3),
        timed_out=result.timed_out or None,
        tail=result.tail if failed else None,
    )


def _communicate(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[bytes, bool]:
    """Wait for the output; on timeout kill the whole group, escalating."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return out, False
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    # Always: children that ignore SIGTERM outlive their leader and hold the pipe.
    kill_group(proc.pid, signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:  # something left the group and holds the pipe
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        out = b""
    return out, True


def kill_group(pgid: int, sig: int) -> None:
    # PermissionError: members running as root under sudo; sudo relays SIGTERM to them.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def tracked_process(pgid: int) -> Iterator[None]:
    """A process group started elsewhere (e.g. an extraction worker) that an
    interrupt stops like a command: terminate_running_commands() reaches it."""
    with _running_groups_lock:
        _running_groups.add(pgid)
    try:
        yield
    finally:
        with _running_groups_lock:
            _running_groups.discard(pgid)


def terminate_running_commands() -> None:
    """On an interrupt: SIGTERM every running command's group, so steps end."""
    with _running_groups_lock:
        groups = list(_running_groups)
    for pgid in groups:
        kill_group(pgid, signal.SIGTERM)


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 3,
    deadline_s: float = 300.0,
    base_s: float = 1.0,
    max_s: float = 30.0,
    retry_if: Callable[[BaseException], bool] = lambda e: isinstance(e, BootstrapError),
) -> T:
    """Call fn until it succeeds: exponential backoff with jitter, bounded by
    attempts and by a total deadline; re-raises the last error."""
    deadline = time.monotonic() + deadline_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            delay = backoff_delay(attempt, base_s, max_s)
            if attempt == attempts or not retry_if(e) or time.monotonic() + delay > deadline:
                raise
            active_log().warn(
                f"{what} failed (attempt {attempt}/{attempts}): {e}; retrying in {delay:.1f}s", event="retry"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential, capped, with jitter so parallel retries spread out."""
    delay: float = min(max_s, base_s * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto


# ============================================================================
# slots: CPU slots: CPU-heavy work (decompressing and extracting archives) limited to what the cores do at once.
# ============================================================================

# The engine runs every ready step at once (they mostly wait: network, apt,
# locks), but four extractions on two cores only slow each other down and
# push the one on the critical path back. So CPU-heavy work takes a slot
# first: at most `slots` hold one (os.cpu_count() unless the config says),
# and a free slot goes to the waiter with the highest priority (the biggest
# archive: the longest install is on the critical path), first come first
# served among equals. Downloads and apt (waiting on the network and on
# dpkg's locks) take no slot.


@dataclass(order=True)
class SlotWaiter:
    key: tuple[float, int]  # (-priority, arrival): the smallest is served first
    who: str = field(compare=False)


class CpuSlots:
    """A counting semaphore served by priority; `granted` records who got a
    slot, in order, and `peak` the most slots held at once (for the tests and
    the log). on_wait(who, holders) is called when a request has to wait,
    on_granted(who, waited_s) when a waiting request gets its slot."""

    def __init__(
        self,
        slots: int,
        *,
        on_wait: Callable[[str, list[str]], None] | None = None,
        on_granted: Callable[[str, float], None] | None = None,
    ) -> None:
        self.slots = max(1, slots)
        self.on_wait = on_wait
        self.on_granted = on_granted
        self._cond = threading.Condition()
        self._holders: list[str] = []
        self._waiting: list[SlotWaiter] = []
        self._arrivals = itertools.count()
        self.granted: list[str] = []
        self.peak = 0

    def waiting(self) -> list[str]:
        with self._cond:
            return [w.who for w in sorted(self._waiting)]

    def holders(self) -> list[str]:
        with self._cond:
            return list(self._holders)

    @contextlib.contextmanager
    def slot(self, who: str, priority: float = 0.0) -> Iterator[None]:
        me = SlotWaiter((-priority, next(self._arrivals)), who)
        start = time.monotonic()
        with self._cond:
            self._waiting.append(me)
            waited = not self._my_turn(me)
            holders = list(self._holders)
        try:
            if waited and self.on_wait is not None:
                self.on_wait(who, holders)  # outside the lock: it logs and emits events
        except BaseException:
            with self._cond:
                self._waiting.remove(me)
                self._cond.notify_all()
            raise
        with self._cond:
            try:
                while not self._my_turn(me):
                    self._cond.wait()
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()  # the next waiter may be served now (or we left the queue)
            self._holders.append(who)
            self.granted.append(who)
            self.peak = max(self.peak, len(self._holders))
        if waited and self.on_granted is not None:
            self.on_granted(who, time.monotonic() - start)
        try:
            yield
        finally:
            with self._cond:
                self._holders.remove(who)
                self._cond.notify_all()

    def _my_turn(self, me: SlotWaiter) -> bool:
        return len(self._holders) < self.slots and min(self._waiting) is me


@contextlib.contextmanager
def cpu_slot(slots: CpuSlots | None, who: str, priority: float = 0.0) -> Iterator[None]:
    """A slot of `slots`, or no limit at all when there is none (a step run outside the engine)."""
    if slots is None:
        yield
        return
    with slots.slot(who, priority):
        yield


# The link, too, is a resource the critical path should get first. On a
# cold host apt is the longest chain (update, its downloads, then dpkg), and
# when the bundles' downloads start at the same moment they take most of a
# shared link: measured at 50 MB/s, `apt-get update` took 7-13 s instead of
# 2.6 s alone. So while apt fetches (its lists and its packages, a few tens
# of MB) our own downloads wait, and start the moment apt's downloads are
# done; dpkg then works while they run. Bounded: a download never waits
# longer than LINK_MAX_WAIT_S for it.
LINK_MAX_WAIT_S = 120.0


class LinkFirst:
    """Who has the link first: `holder` (a step name) until it releases it,
    or nobody (holder None: open from the start). turn() waits for the
    release, at most max_wait_s; release() is idempotent. on_wait(who,
    holder) is called when a turn has to wait, on_granted(who, waited_s,
    timed_out) when it ends."""

    def __init__(
        self,
        holder: str | None,
        *,
        max_wait_s: float = LINK_MAX_WAIT_S,
        on_wait: Callable[[str, str], None] | None = None,
        on_granted: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self.holder = holder
        self.max_wait_s = max_wait_s
        self.on_wait = on_wait
        self.on_granted = on_granted
        self._free = threading.Event()
        if holder is None:
            self._free.set()

    @property
    def held(self) -> bool:
        return not self._free.is_set()

    def release(self) -> None:
        self._free.set()

    def turn(self, who: str) -> float:
        """Wait until the holder has released the link (or max_wait_s); returns the seconds waited."""
        if self._free.is_set() or who == self.holder:
            return 0.0
        start = time.monotonic()
        if self.on_wait is not None:
            self.on_wait(who, self.holder or "")
        released = self._free.wait(self.max_wait_s)
        waited = time.monotonic() - start
        if self.on_granted is not None:
            self.on_granted(who, waited, not released)
        return waited


# ============================================================================
# config_rules: Config rules: the checks a field declares, and the validator derived from its declaration.
# ============================================================================

#
# Each config field is declared once, in its dataclass (config.py): its type
# annotation carries the checks (typing.Annotated, e.g. `Annotated[str,
# Matches(USER_RE)]`), its dataclass default is the schema's default, and no
# default means required. `validator_for` derives the validator from that one
# declaration, re-implementing zod 4's semantics for exactly the schema
# constructs src/config.ts uses, because the shared vectors in fixtures/configs/
# require the same verdict and the same error paths from both sides:
#
# - An issue is either fatal (wrong type, wrong literal or enum value, bad
#   record key, array longer than its maximum) or continuable (regex, range,
#   length, refinement). After a fatal issue zod runs no further checks on that
#   value, and an object's cross-field rules (zod's superRefine; the spec's
#   `cross_field_issues`, yielding (path, message, value)) run only when no
#   fatal issue occurred inside it.
# - Unknown keys of a strict object are one continuable issue at the object's
#   own path.
# - A JSON number is an integer when it has no fraction (1.0 is 1); booleans
#   are never numbers; integers must be within +-(2**53 - 1).
# - String lengths count code points, as zod 4 does.
#
# What a type means:   str -> z.string()      int -> z.int() (needs a Range)
#   bool -> z.boolean()    Literal[1] -> z.literal(1)    Literal["a", "b"] -> z.enum
#   X | None -> .nullable()   tuple[X, ...] -> z.array (needs Items)
#   Mapping[K, V] -> z.record (K carries Matches)   a dataclass -> z.strictObject

JsonPath = tuple[str | int, ...]

MAX_SAFE_INTEGER = 2**53 - 1
MAX_JSON_DEPTH = 32  # a config needs 5; deeper input is refused as a whole, at $ (as checkConfig does)
DEPTH_MESSAGE = f"is nested more than {MAX_JSON_DEPTH} levels deep"


class _IssueLog:
    """Issues in the order zod reports them, each marked fatal or continuable."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self._fatal: list[bool] = []

    def add(self, path: JsonPath, message: str, value: Any, *, fatal: bool = False) -> None:
        self.issues.append(ConfigIssue(path, message, value))
        self._fatal.append(fatal)

    def mark(self) -> int:
        return len(self.issues)

    def fatal_since(self, mark: int = 0) -> bool:
        return any(self._fatal[mark:])


Validator = Callable[[Any, JsonPath, _IssueLog], Any]


# --- the checks a declaration carries (typing.Annotated metadata) -------------


class StringRule:
    """A continuable check on a string: a problem, or None when it passes."""

    def problem(self, value: str) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Matches(StringRule):
    """.regex(pattern): fullmatch() is JS's ^...$ (no m flag)."""

    pattern: re.Pattern[str]
    message: str | None = None

    def problem(self, value: str) -> str | None:
        if self.pattern.fullmatch(value):
            return None
        return self.message or f"must match /^{self.pattern.pattern}$/"


@dataclass(frozen=True)
class MinLen(StringRule):
    n: int

    def problem(self, value: str) -> str | None:
        return None if len(value) >= self.n else f"must be at least {self.n} character(s) long"


@dataclass(frozen=True)
class MaxLen(StringRule):
    n: int

    def problem(self, value: str) -> str | None:
        return None if len(value) <= self.n else f"must be at most {self.n} characters long"


@dataclass(frozen=True)
class Holds(StringRule):
    """.refine(predicate, {message})."""

    predicate: Callable[[str], bool]
    message: str

    def problem(self, value: str) -> str | None:
        return None if self.predicate(value) else self.message


@dataclass(frozen=True)
class Range:
    """z.int().min(low).max(high): every int field declares one."""

    low: int
    high: int


@dataclass(frozen=True)
class Items:
    """z.array(...).min(low).max(high): every array field declares one."""

    high: int
    low: int = 0


# --- validators (each mirrors one zod construct) ------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, _Missing):
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a number too large for a double"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _type_error(log: _IssueLog, path: JsonPath, expected: str, value: Any) -> None:
    message = "is required" if isinstance(value, _Missing) else f"expected {expected}, got {_json_type(value)}"
    log.add(path, message, value, fatal=True)


def _string(rules: tuple[StringRule, ...]) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str):
            _type_error(log, path, "a string", value)
            return value
        for rule in rules:
            problem = rule.problem(value)
            if problem:
                log.add(path, problem, value)
        return value

    return validate


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)  # a huge JSON integer is Infinity to JavaScript
    except OverflowError:
        return False


def _int(low: int, high: int) -> Validator:
    """z.int().min(low).max(high)."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not _is_finite_number(value):
            _type_error(log, path, "an integer", value)
            return value
        if isinstance(value, float) and not value.is_integer():
            log.add(path, "expected an integer, got a fraction", value, fatal=True)
            return value
        number = int(value)
        # zod reports an unsafe integer and then the range too; say it once when the range says it already.
        if abs(number) > MAX_SAFE_INTEGER and low <= number <= high:
            log.add(path, f"must be within +-{MAX_SAFE_INTEGER}", value)
        if number < low:
            log.add(path, f"must be >= {low}", value)
        if number > high:
            log.add(path, f"must be <= {high}", value)
        return number

    return validate


def _boolean(value: Any, path: JsonPath, log: _IssueLog) -> Any:
    if not isinstance(value, bool):
        _type_error(log, path, "a boolean", value)
    return value


def _literal(expected: int) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != expected:
            log.add(path, "is required" if isinstance(value, _Missing) else f"must be {expected}", value, fatal=True)
            return value
        return expected

    return validate


def _enum(options: tuple[str, ...]) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str) or value not in options:
            problem = "is required" if isinstance(value, _Missing) else "must be one of " + ", ".join(options)
            log.add(path, problem, value, fatal=True)
        return value

    return validate


def _array(item: Validator, items: Items) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, list):
            _type_error(log, path, "an array", value)
            return value
        if len(value) > items.high:  # zod refuses before looking at any element
            log.add(path, f"must have at most {items.high} item(s), got {len(value)}", value, fatal=True)
            return value
        parsed = tuple(item(v, (*path, i), log) for i, v in enumerate(value))
        if len(value) < items.low:
            log.add(path, f"must have at least {items.low} item(s)", value)
        return parsed

    return validate


def _record(key: Matches, item: Validator) -> Validator:
    """z.record(z.string().regex(key), item): a bad key is fatal, its value unchecked."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return value
        parsed: dict[str, Any] = {}  # wrapped read-only below: the config is frozen all the way down
        for name, entry in value.items():
            if name == "__proto__":  # zod drops it silently
                continue
            if not key.pattern.fullmatch(name):
                log.add((*path, name), f"key must match /^{key.pattern.pattern}$/", name, fatal=True)
                continue
            parsed[name] = item(entry, (*path, name), log)
        return MappingProxyType(parsed)

    return validate


def _nullable(inner: Validator) -> Validator:
    return lambda value, path, log: None if value is None else inner(value, path, log)


def _default(default: Any, inner: Validator) -> Validator:
    return lambda value, path, log: default if isinstance(value, _Missing) else inner(value, path, log)


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The schema default of a declared field: its dataclass default, or MISSING when required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _object(spec: type[Any]) -> Validator:
    """z.strictObject(...).superRefine(...): every declared field, one issue listing the
    unknown keys, then the spec's cross-field rules when nothing fatal happened inside."""
    hints = typing.get_type_hints(spec, include_extras=True)
    fields: dict[str, Validator] = {}
    for f in dataclasses.fields(spec):
        check = validator_for(hints[f.name], f"{spec.__name__}.{f.name}")
        default = field_default(f)
        fields[f.name] = check if isinstance(default, _Missing) else _default(default, check)
    cross_field: Callable[[Any], Iterable[tuple[JsonPath, str, Any]]] | None = getattr(spec, "cross_field_issues", None)

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return None
        mark = log.mark()
        parsed = {name: check(value.get(name, MISSING), (*path, name), log) for name, check in fields.items()}
        unknown = [key for key in value if key not in fields]
        if unknown:
            log.add(path, "unknown key(s): " + ", ".join(unknown), unknown)
        # Built even from invalid parts (the cross-field rules read them); discarded when there are issues.
        result = spec(**parsed)
        if cross_field is not None and not log.fatal_since(mark):
            for where, message, found in cross_field(result):
                log.add((*path, *where), message, found)
        return result

    return validate


_VALIDATORS: dict[Any, Validator] = {}


def validator_for(tp: Any, where: str = "") -> Validator:
    """The validator a declared type means (see the table at the top of this module)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp not in _VALIDATORS:
            _VALIDATORS[tp] = _object(tp)
        return _VALIDATORS[tp]
    base: Any = tp
    rules: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        base, rules = tp.__origin__, tp.__metadata__
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _nullable(validator_for(args[0] if args[1] is type(None) else args[1], where))
    string_rules = tuple(r for r in rules if isinstance(r, StringRule))
    if base is str:
        return _string(string_rules)
    if base is bool:
        return _boolean
    if base is int:
        return _int(_one(rules, Range, where).low, _one(rules, Range, where).high)
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            return _enum(args)
        if len(args) == 1 and isinstance(args[0], int):
            return _literal(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _array(validator_for(args[0], f"{where}[]"), _one(rules, Items, where))
    if origin is Mapping and len(args) == 2:
        key_rules = typing.get_args(args[0])[1:] if typing.get_origin(args[0]) is Annotated else ()
        return _record(_one(key_rules, Matches, f"{where} key"), validator_for(args[1], f"{where}{{}}"))
    raise TypeError(f"config field {where}: no validator for the declared type {tp!r}")


_R = typing.TypeVar("_R")


def _one(rules: Iterable[Any], kind: type[_R], where: str) -> _R:
    found: list[_R] = []
    for rule in rules:
        if isinstance(rule, kind):
            found.append(rule)
    if len(found) != 1:
        raise TypeError(f"config field {where}: declare exactly one {kind.__name__}(...)")
    return found[0]


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, [] and {} are 1), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (list, dict)):
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in (item if isinstance(item, list) else item.values()))
    return deepest


def validate_spec(spec: type[Any], data: Any) -> tuple[Any, list[ConfigIssue]]:
    """Run the derived validator of a spec class; the parsed value and every issue."""
    log = _IssueLog()
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        return None, [ConfigIssue((), DEPTH_MESSAGE, f"<{depth} levels>")]
    parsed = validator_for(spec)(data, (), log)
    return parsed, log.issues


# ============================================================================
# config: The config: one declaration per field (type, default, checks), twins of src/config.ts.
# ============================================================================

#
# Frozen dataclasses mirroring src/config.ts field for field. Each field is
# declared once: its annotation is its type with its checks (`Annotated[...]`,
# the zod chain's twin), its default is the schema's default (none: required).
# config_rules.validator_for derives the validator from that declaration;
# `from_dict` collects every issue with its JSON path; `to_dict` round-trips.

S = TypeVar("S", bound="ConfigSpec")

MAX_PATH = 4096

# Twins of the *_RE constants in config.ts; fullmatch() is JS's ^...$ (no m flag).
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
NODE_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
DEB_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*[a-z0-9.+]")  # no trailing -: apt-get reads `name-` as "remove"
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
OS_ID_RE = re.compile(r"[a-z0-9._-]+")
OS_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
SYSTEMD_UNIT_RE = re.compile(r"cocalc-[A-Za-z0-9_.-]{1,200}")  # our own namespace
IP_RE = re.compile(r"([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*)")
HOST_PORT_RE = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")
REGION_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")

# --- path, text and URL rules (twins of config.ts's) ------------------------------

# C0 and C1 controls, DEL, U+2028/U+2029 and (json.loads joins escaped pairs) unpaired surrogates.
UNSAFE_CHAR_RE = re.compile(r"[\u0000-\u001f\u007f-\u009f\u2028\u2029\ud800-\udfff]")
SAFE_TEXT_MESSAGE = (
    "must not contain control characters (U+0000-U+001F, U+007F-U+009F, U+2028, U+2029) or unpaired surrogates"
)

# Names to refuse, not temporary files (hence the noqa).
SYSTEM_DIRS = (
    *("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt"),
    *("/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var"),  # noqa: S108
    *("/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt", "/var/spool"),
    "/var/tmp",  # noqa: S108
)
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
)


def is_safe_text(text: str) -> bool:
    return UNSAFE_CHAR_RE.search(text) is None


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/") if segment)


def is_abs_path(path: str) -> bool:
    """Absolute and normalised: starts with /, no . or .. segments, no //, no trailing /."""
    return (
        path.startswith("/")
        and "//" not in path
        and (path == "/" or not path.endswith("/"))
        and not _has_dot_segment(path)
    )


def is_rel_path(path: str) -> bool:
    """Relative and inside its base: no leading /, no . or .. segments."""
    return not path.startswith("/") and "//" not in path and not path.endswith("/") and not _has_dot_segment(path)


def is_inside(child: str, parent: str) -> bool:
    return child != "/" if parent == "/" else child.startswith(parent + "/")


def is_system_path(path: str) -> bool:
    return path in SYSTEM_DIRS or any(is_inside(path, tree) for tree in SYSTEM_TREES)


def is_not_system_path(path: str) -> bool:
    # A named function, not a lambda: get_type_hints evaluates annotations with the class
    # namespace as globals, so a lambda written in one could not see this module's names.
    return not is_system_path(path)


# isHttpUrl's plain form, the same regexes and steps as config.ts (fullmatch() is JS's ^...$).
_HOST_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME_RE = re.compile(rf"(?:{_HOST_LABEL}\.)*{_TOP_LABEL}\.?")
IPV4_RE = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)
URL_PARTS_RE = re.compile(r"https?:\/\/([^/?#]*)([/?#].*)?", re.DOTALL)
URL_REST_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*")
_HOST_PORT_RE = re.compile(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?")
_IPV6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+")
_IPV6_GROUP_RE = re.compile(r"[0-9A-Fa-f]{1,4}")


def is_host_name(host: str) -> bool:
    """An ASCII host name (at most 253 characters) or a dotted-quad IPv4 address."""
    return (len(host) <= 253 and DNS_NAME_RE.fullmatch(host) is not None) or IPV4_RE.fullmatch(host) is not None


def is_ipv6(text: str) -> bool:
    """An IPv6 address as RFC 4291 writes it (hex groups, one ::, an IPv4 tail at the very end); no zone."""
    if not _IPV6_CHARS_RE.fullmatch(text):
        return False
    halves = text.split("::")
    if len(halves) > 2:
        return False
    groups = [g for half in halves if half != "" for g in half.split(":")]
    count = 0
    for i, group in enumerate(groups):
        if i == len(groups) - 1 and "." in group and not text.endswith(":"):
            if not IPV4_RE.fullmatch(group):
                return False
            count += 2
        elif _IPV6_GROUP_RE.fullmatch(group):
            count += 1
        else:
            return False
    return count <= 7 if len(halves) == 2 else count == 8


def is_http_url(text: str) -> bool:
    """isHttpUrl of config.ts: lower-case http(s)://, a host name, IPv4 or [IPv6]
    host, an optional port, then only URL characters (see config.ts)."""
    parts = URL_PARTS_RE.fullmatch(text)
    if not parts:
        return False
    host_port = _HOST_PORT_RE.fullmatch(parts.group(1))
    if not host_port or (host_port.group(2) is not None and int(host_port.group(2)) > 65535):
        return False
    host = host_port.group(1)
    host_ok = is_ipv6(host[1:-1]) if host.startswith("[") else is_host_name(host)
    return host_ok and URL_REST_RE.fullmatch(parts.group(2) or "") is not None


# --- field types: the twins of config.ts's primitives ---------------------------

Arch = Literal["amd64", "arm64"]
ARCHES: tuple[str, ...] = get_args(Arch)

Url = Annotated[
    str,
    MaxLen(2048),
    Holds(
        is_http_url,
        "must be an http:// or https:// URL in plain ASCII "
        "(a host name, IPv4 or [IPv6] host; internationalized names as punycode, xn--)",
    ),
]
Sha256 = Annotated[str, Matches(SHA256_RE, "must be 64 lowercase hex digits (a sha256)")]
Version = Annotated[str, Matches(VERSION_RE)]
AbsPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(is_safe_text, SAFE_TEXT_MESSAGE),
    Holds(
        is_abs_path,
        "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
    ),
]
RelPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(is_safe_text, SAFE_TEXT_MESSAGE),
    Holds(is_rel_path, "must be a relative path inside the bundle (no leading /, no . or .. segments)"),
]
UserName = Annotated[str, Matches(USER_RE)]
Port = Annotated[int, Range(1, 65535)]
SizeGb = Annotated[int, Range(1, 1 << 20)]
EnvName = Annotated[str, Matches(ENV_NAME_RE)]
DebPackage = Annotated[
    str,
    Matches(
        DEB_PACKAGE_RE,
        "must be a Debian package name (a-z 0-9 . + -, 2 or more, starting with a letter or digit) "
        "not ending in - (apt-get would remove the package)",
    ),
]
EnvValue = Annotated[str, MaxLen(4096), Holds(is_safe_text, SAFE_TEXT_MESSAGE)]


class ConfigSpec:
    """Base of the config dataclasses: validated in with from_dict, JSON out with to_dict."""

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "config") -> S:
        """Validate `data` exactly as the zod schema does; raise ConfigError with every issue."""
        parsed, issues = validate_spec(cls, data)
        if issues:
            raise ConfigError(source, issues)
        assert isinstance(parsed, cls)
        return parsed

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (output side of the schema, defaults filled in)."""

        def convert(value: Any) -> Any:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, tuple):
                return [convert(v) for v in value]
            if isinstance(value, Mapping):
                return {k: convert(v) for k, v in value.items()}
            return value

        result = convert(self)
        assert isinstance(result, dict)
        return result


# --- the schema, field for field as in config.ts (declaration order is zod's) ----


@dataclass(frozen=True, kw_only=True)
class HostSpec(ConfigSpec):
    id: Annotated[str, Matches(UUID_RE, "must be a lowercase UUID")]
    name: Annotated[str, Matches(HOST_NAME_RE, "must be a lowercase RFC 1123 host label")]


@dataclass(frozen=True, kw_only=True)
class OsSpec(ConfigSpec):
    id: Annotated[str, Matches(OS_ID_RE)]
    min_version: Annotated[str, Matches(OS_VERSION_RE)]


@dataclass(frozen=True, kw_only=True)
class HubSpec(ConfigSpec):
    url: Url
    events_url: Url
    secrets_url: Url


@dataclass(frozen=True, kw_only=True)
class ImageSpec(ConfigSpec):
    url: Url
    sha256: Sha256
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None


@dataclass(frozen=True, kw_only=True)
class ArtifactSpec(ConfigSpec):
    url: Url
    sha256: Sha256 | None = None
    version: Version
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None
    strip_components: Annotated[int, Range(0, 8)] = 0
    expected_files: Annotated[tuple[RelPath, ...], Items(64)] = ()
    executables: Annotated[tuple[RelPath, ...], Items(64)] = ()
    image: ImageSpec | None = None


@dataclass(frozen=True, kw_only=True)
class ArtifactsSpec(ConfigSpec):
    project_host: ArtifactSpec
    project: ArtifactSpec
    tools: ArtifactSpec

    def items(self) -> tuple[tuple[str, ArtifactSpec], ...]:
        return (("project_host", self.project_host), ("project", self.project), ("tools", self.tools))


@dataclass(frozen=True, kw_only=True)
class NvmSpec(ConfigSpec):
    version: Version
    url: Url
    sha256: Sha256


@dataclass(frozen=True, kw_only=True)
class NodeSpec(ConfigSpec):
    version: Annotated[str, Matches(NODE_VERSION_RE, "must be x.y.z")]
    dist_url: Url
    nvm: NvmSpec | None = None


@dataclass(frozen=True, kw_only=True)
class AptSpec(ConfigSpec):
    packages: Annotated[tuple[DebPackage, ...], Items(200)] = ()
    lists_max_age_s: Annotated[int, Range(0, 7 * 86400)] = 3600
    lock_timeout_s: Annotated[int, Range(1, 3600)] = 600


@dataclass(frozen=True, kw_only=True)
class DataDiskSpec(ConfigSpec):
    candidates: Annotated[tuple[AbsPath, ...], Items(16, low=1)]
    min_size_gb: SizeGb
    wait_s: Annotated[int, Range(0, 3600)] = 600


@dataclass(frozen=True, kw_only=True)
class BtrfsSpec(ConfigSpec):
    mount_point: Annotated[AbsPath, Holds(is_not_system_path, "must not be / or a system directory (e.g. /btrfs)")] = (
        "/btrfs"
    )
    image_path: AbsPath
    image_size_gb: SizeGb
    data_disk: DataDiskSpec | None = None


@dataclass(frozen=True, kw_only=True)
class ServiceSpec(ConfigSpec):
    unit: Annotated[
        str,
        Matches(SYSTEMD_UNIT_RE, "must be cocalc- and a plain name (letters, digits, _ . -): our own unit namespace"),
    ] = "cocalc-project-host"
    exec: RelPath
    health_url: Url
    health_timeout_s: Annotated[int, Range(1, 3600)] = 120
    args: Annotated[
        tuple[
            Annotated[
                str,
                MinLen(1),
                MaxLen(4096),
                Holds(lambda v: "\n" not in v and "\0" not in v, "must not contain newlines or NUL"),
            ],
            ...,
        ],
        Items(32),
    ] = ()


@dataclass(frozen=True, kw_only=True)
class TunnelSpec(ConfigSpec):
    host: Annotated[
        str,
        Holds(is_host_name, "must be a host name or IPv4 address in ASCII (internationalized names as punycode, xn--)"),
    ]
    port: Port = 22
    user: UserName
    remote_port: Port
    local_port: Port


DnsName = Annotated[str, MinLen(1), MaxLen(253), Matches(DNS_NAME_RE)]


@dataclass(frozen=True, kw_only=True)
class DaemonSpec(ConfigSpec):
    """What the daemon's environment (UPSTREAM 13) needs beyond the rest of the config."""

    region: Annotated[str, Matches(REGION_RE)] = ""
    public_url: Url | None = None
    internal_url: Url | None = None
    public_ip: Annotated[str, Matches(IP_RE)] | None = None
    ssh_server: Annotated[str, Matches(HOST_PORT_RE)] | None = None
    https_hostname: DnsName | None = None
    software_base_url: Url | None = None
    port: Port = 443
    https: bool = True


@dataclass(frozen=True, kw_only=True)
class CloudflaredDebSpec(ConfigSpec):
    url: Url
    sha256: Sha256
    version: Version
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None


@dataclass(frozen=True, kw_only=True)
class CloudflaredSpec(ConfigSpec):
    """A Cloudflare tunnel to the daemon (UPSTREAM 16), pinned and verified."""

    deb: CloudflaredDebSpec
    hostname: DnsName
    port: Port = 9002
    token_secret: Annotated[str, Matches(SECRET_NAME_RE)] = "cloudflared-token"  # noqa: S105 (a name)


@dataclass(frozen=True, kw_only=True)
class GpuSpec(ConfigSpec):
    """NVIDIA's container toolkit for GPU hosts (UPSTREAM 4)."""

    repo_url: Url
    keyring_url: Url
    keyring_sha256: Sha256
    packages: Annotated[tuple[Annotated[str, Matches(DEB_PACKAGE_RE)], ...], Items(16, low=1)] = (
        "nvidia-container-toolkit",
    )
    cdi_interval_s: Annotated[int, Range(1, 86400)] = 300


METADATA_ADDRESS = "169.254.169.254"  # every big cloud's metadata service (GCP, AWS, Azure, OpenStack)


@dataclass(frozen=True, kw_only=True)
class MetadataBlockSpec(ConfigSpec):
    """Cloud metadata services serve user-data (the stub and its token) to any
    process that asks: only root may reach these addresses (an nftables rule)."""

    addresses: Annotated[tuple[Annotated[str, Matches(IPV4_RE, "must be an IPv4 address")], ...], Items(8, low=1)] = (
        METADATA_ADDRESS,
    )


@dataclass(frozen=True, kw_only=True)
class Config(ConfigSpec):
    schema_version: Literal[1]
    host: HostSpec
    bootstrap_user: Annotated[
        str,
        Matches(USER_RE, "must be a POSIX user name"),
        Holds(lambda u: u != "root", "must not be root: the bootstrap runs as a non-root user with sudo"),
    ]
    home: Annotated[
        AbsPath,
        Holds(
            is_not_system_path,
            "must be a real home directory, not / or a system directory (e.g. /home/<user>)",
        ),
    ]
    bootstrap_root: AbsPath
    bootstrap_dir: AbsPath
    arch: Arch
    os: OsSpec
    parallel: bool = True
    # Installed versions kept per artifact (current included); older ones are pruned
    # once the daemon is healthy on the new one. 1 keeps only current.
    keep_versions: Annotated[int, Range(1, 20)] = 2
    cpu_slots: Annotated[int, Range(1, 256)] | None = None
    hub: HubSpec
    conat_urls: Annotated[tuple[Url, ...], Items(8, low=1)]
    secrets: Annotated[tuple[Annotated[str, Matches(SECRET_NAME_RE)], ...], Items(16)] = ()
    artifacts: ArtifactsSpec
    node: NodeSpec
    apt: AptSpec
    btrfs: BtrfsSpec
    service: ServiceSpec
    tunnel: TunnelSpec | None = None
    daemon: DaemonSpec = DaemonSpec()
    cloudflared: CloudflaredSpec | None = None
    gpu: GpuSpec | None = None
    metadata_block: MetadataBlockSpec | None = MetadataBlockSpec()
    env: Mapping[EnvName, EnvValue] = field(default_factory=lambda: MappingProxyType({}))

    def cross_field_issues(self) -> Iterator[tuple[JsonPath, str, Any]]:
        """BootstrapConfigSchema's superRefine: (path, problem, value) for each rule broken."""
        if not is_inside(self.bootstrap_dir, self.bootstrap_root):
            yield ("bootstrap_dir",), "must be inside bootstrap_root", self.bootstrap_dir
        if not is_inside(self.bootstrap_root, self.home):
            yield ("bootstrap_root",), "must be inside home", self.bootstrap_root
        image, mount_point = self.btrfs.image_path, self.btrfs.mount_point
        if (
            not is_inside(image, self.bootstrap_root)
            or image == self.bootstrap_dir
            or is_inside(image, self.bootstrap_dir)
        ):
            problem = "must be inside bootstrap_root and outside bootstrap_dir (a file bootstrap.py owns)"
            yield ("btrfs", "image_path"), problem, image
        elif is_inside(image, mount_point):
            yield ("btrfs", "image_path"), "must not be inside btrfs.mount_point", image
        if mount_point == self.home or is_inside(self.home, mount_point):
            yield ("btrfs", "mount_point"), "must not be home or above it (it would hide home)", mount_point

    @property
    def token_file(self) -> Path:
        return Path(self.bootstrap_dir) / TOKEN_FILE_NAME

    @property
    def logs_dir(self) -> Path:
        return Path(self.bootstrap_root) / "logs"


# Deeper than this many [ or { at once, json.loads would recurse into the C stack's limit (RecursionError).
_JSON_TOKENS_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def text_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in _JSON_TOKENS_RE.finditer(text):
        found = match.group()
        if found in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif found in ("]", "}"):
            depth -= 1
    return deepest


def _big_int(digits: str) -> int | float:
    """An integer as JSON.parse reads it: Infinity past a double's range (float() says so
    without int()'s 4300-digit limit, CPython's guard against quadratic conversion)."""
    if len(digits) <= 300:
        return int(digits)
    as_float = float(digits)
    return as_float if math.isinf(as_float) else int(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_config_text(text: str, source: str) -> Any:
    """JSON as JavaScript's JSON.parse reads it (no NaN or Infinity; huge numbers are Infinity);
    ConfigError at $ when it is not JSON or nested too deeply to parse."""
    depth = text_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(source, [ConfigIssue((), DEPTH_MESSAGE, f"<{depth} levels>")])
    try:
        return json.loads(text, parse_int=_big_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(source, [ConfigIssue((), f"not valid JSON: {e}", None)]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; ConfigError (exit 2) on any problem."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, [ConfigIssue((), "config file not found", source)]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [ConfigIssue((), f"cannot read config: {e}", source)]) from None
    return Config.from_dict(parse_config_text(text, source), source)


# ============================================================================
# facts: Small read-only probes of the real system.
# ============================================================================

# Small read-only probes of the real system, used by the steps' check() and
# apply(). None of them changes anything; the ones that need root say so.

ENV_FILE = Path("/etc/cocalc/project-host.env")
FSTAB = Path("/etc/fstab")
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock")
APT_LISTS_DIR = Path("/var/lib/apt/lists")
APT_LISTS_LOCK = "/var/lib/apt/lists/lock"
APT_UPDATE_STAMP = Path("/var/lib/apt/periodic/update-success-stamp")  # Ubuntu's, when present
DPKG_UPDATES_DIR = Path("/var/lib/dpkg/updates")
DPKG_ARCH_BY_MACHINE = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
NODE_ARCH_BY_DPKG = {"amd64": "x64", "arm64": "arm64"}
BTRFS_SUBVOLUME_INO = 256  # the root directory of every btrfs subvolume has inode 256


def read_text_or(path: str | os.PathLike[str], default: str = "") -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return default


def read_os_release(path: str = "/etc/os-release") -> dict[str, str]:
    """os-release(5) as a dict, quotes removed."""
    result: dict[str, str] = {}
    for line in read_text_or(path).splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip().startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key.strip()] = value
    return result


def version_tuple(text: str) -> tuple[int, ...]:
    """'24.04' -> (24, 4), compared numerically; a non-numeric part ends it."""
    parts: list[int] = []
    for part in text.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(parts)


def systemd_is_pid1() -> bool:
    # sd_booted(3)'s own test, with /proc/1/comm as a second opinion.
    return Path("/run/systemd/system").is_dir() or read_text_or("/proc/1/comm").strip() == "systemd"


def machine_arch() -> str:
    """This machine's architecture in Debian's naming (amd64, arm64)."""
    if shutil.which("dpkg"):
        found = run_command(["dpkg", "--print-architecture"], check=False, timeout_s=30)
        if found.returncode == 0 and found.output.strip():
            return found.output.strip()
    machine = platform.machine()
    return DPKG_ARCH_BY_MACHINE.get(machine, machine)


def passwd_entry(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def user_ids(user: str) -> tuple[int, int, str]:
    """(uid, gid, primary group name) of an existing user."""
    entry = pwd.getpwnam(user)
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return entry.pw_uid, entry.pw_gid, group


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages dpkg does not list as installed ('ii')."""
    if not packages:
        return []
    found = run_command(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\n", *packages], check=False, timeout_s=60
    )
    installed = set()
    for line in found.output.splitlines():  # "no packages found" lines (stderr) have no tab
        name, tab, status = line.partition("\t")
        if tab and status.strip() == "ii":
            installed.add(name)
    return [p for p in packages if p not in installed]


def dpkg_interrupted() -> bool:
    """dpkg was killed mid-run: pending records in /var/lib/dpkg/updates."""
    try:
        return any(DPKG_UPDATES_DIR.iterdir())
    except OSError:
        return False


def apt_lists_age_s(own_stamp: Path | None = None) -> float | None:
    """Seconds since the package lists were last refreshed, or None when there
    are no lists at all. apt sets a list's mtime to the server's Last-Modified,
    so a list's mtime only bounds the age; stamps written after a successful
    update are more precise."""
    newest: float | None = None
    try:
        for entry in os.scandir(APT_LISTS_DIR):
            if entry.is_file() and entry.name != "lock":
                newest = max(newest or 0.0, entry.stat().st_mtime)
    except OSError:
        return None
    if newest is None:
        return None
    for stamp in [s for s in (APT_UPDATE_STAMP, own_stamp) if s is not None]:
        with contextlib.suppress(OSError):
            newest = max(newest, stamp.stat().st_mtime)
    return max(0.0, time.time() - newest)


def lock_holders(path: str) -> list[tuple[int, str]]:
    """Processes holding a POSIX (fcntl) lock on `path`, as (PID, command line),
    from /proc/locks. apt and dpkg lock with fcntl, so this names whoever holds
    the dpkg/apt locks, and needs no root."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    exact: list[int] = []
    same_inode: list[int] = []
    for line in read_text_or("/proc/locks").splitlines():
        # "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->"
        fields = line.split()
        if len(fields) < 6 or "->" in fields or not fields[4].lstrip("-").isdigit():
            continue
        dev_ino = fields[5].rsplit(":", 1)
        if len(dev_ino) != 2 or dev_ino[1] != str(st.st_ino) or int(fields[4]) <= 0:
            continue
        # btrfs and overlayfs report a different device in stat() than in /proc/locks.
        (exact if dev_ino[0] == device else same_inode).append(int(fields[4]))
    pids = exact or same_inode
    return [(pid, process_command(pid)) for pid in sorted(set(pids))]


def process_command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")[:200] or "?"


def describe_lock_holders(paths: Sequence[str]) -> str:
    """'PID 1234 (apt-get install foo) holds /var/lib/dpkg/lock-frontend', or ''."""
    found = [f"PID {pid} ({cmd}) holds {path}" for path in paths for pid, cmd in lock_holders(path)]
    return "; ".join(found)


def unescape_mount_field(text: str) -> str:
    """/proc/self/mountinfo and fstab escape space, tab, newline, backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_at(mount_point: str) -> tuple[str, str] | None:
    """(source, fstype) of the filesystem mounted at mount_point (the topmost), or None."""
    found = None
    for line in read_text_or("/proc/self/mountinfo").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if sep and len(fields) >= 5 and len(tail) >= 2 and unescape_mount_field(fields[4]) == mount_point:
            found = (unescape_mount_field(tail[1]), tail[0])
    return found


BTRFS_IOC_FS_INFO = 0x8400941F  # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): 1024 bytes, fsid at 16


def btrfs_fsid(mount_point: str) -> str | None:
    """The fsid (UUID) of the btrfs filesystem mounted at `mount_point`, asked
    of the filesystem itself (no root needed); None when it is not btrfs."""
    try:
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        info = bytearray(1024)
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, info)
    except OSError:
        return None
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(info[16:32])))


def btrfs_sysfs_dir(mount_point: str) -> Path | None:
    """/sys/fs/btrfs/<fsid> of the filesystem mounted at `mount_point`. By fsid, not by
    device name: a lazily unmounted filesystem whose loop device was detached and
    reused still lists that device's name in /sys/fs/btrfs/<its fsid>/devices."""
    fsid = btrfs_fsid(mount_point)
    path = Path("/sys/fs/btrfs") / fsid if fsid else None
    return path if path is not None and path.is_dir() else None


def btrfs_quota_enabled(mount_point: str) -> bool:
    """Quota (qgroups) on for the btrfs at `mount_point`: from sysfs when it is
    visible, else (in a container /sys/fs/btrfs is hidden) from btrfs itself."""
    fs = btrfs_sysfs_dir(mount_point)
    if fs is not None:
        return (fs / "qgroups").is_dir()
    found = run_command(["btrfs", "qgroup", "show", mount_point], sudo=True, check=False, timeout_s=60)
    return found.returncode == 0


def is_btrfs_subvolume(path: Path) -> bool:
    try:
        return path.stat().st_ino == BTRFS_SUBVOLUME_INO and not path.is_symlink()
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def systemctl_state(verb: str, unit: str) -> str:
    """`systemctl is-active|is-enabled unit` as a word ('active', 'enabled', ...)."""
    found = run_command(["systemctl", verb, unit], check=False, timeout_s=30)
    return found.output.strip().splitlines()[-1] if found.output.strip() else "unknown"


# ============================================================================
# step: The Step base class and the file operations steps share.
# ============================================================================

# (steps) one class per step of the flow, each a subclass of Step; the
# tuple STEPS lists them all and is what the plan is built from.


@dataclass(frozen=True)
class StepState:
    """What check() found: satisfied (nothing to do) or not, and why."""

    satisfied: bool
    detail: str


@dataclass
class Context:
    """What every step gets: the validated config and the logger (and, in
    the engine, the CPU slots its CPU-heavy work takes and who has the link
    first; None: no limit)."""

    config: Config
    log: Log
    cpu: CpuSlots | None = None
    link: LinkFirst | None = None


class Step:
    """A unit of the bootstrap: check() reads the real state (read-only);
    apply() runs when check() found work (or the step has no record of a
    successful run), and check() runs again after it: the step succeeds only
    if it is then satisfied. inputs() is fingerprinted into state.json so a
    changed input re-runs the step."""

    name: ClassVar[str]
    deps: ClassVar[tuple[str, ...]] = ()
    weight_s: ClassVar[float] = 1.0  # expected seconds, weights progress percent
    phase: ClassVar[str] = "bootstrapping"
    hint: ClassVar[str] = "See the log for the failing command's output."
    version: ClassVar[int] = 1  # bump when apply() changes meaning: part of the fingerprint
    uses_link: ClassVar[bool] = False  # its downloads wait while apt has the link first (link_turn)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = ctx.log

    def inputs(self) -> Mapping[str, Any]:
        return {}

    def check(self) -> StepState:
        """Every step has its own: the engine re-runs it after apply() to
        verify the step did its job (the plan refuses a step without one)."""
        raise NotImplementedError(f"step {self.name} has no check()")

    def apply(self) -> None:
        pass

    @classmethod
    def link_first(cls, ctx: Context) -> bool:
        """Should this step have the link first in this run (slots.LinkFirst)? Only apt says so, and not always."""
        return False

    def link_turn(self) -> None:
        """Before a download: wait while the step with the link first (apt) still fetches (slots.LinkFirst).
        Only for steps that say so (uses_link): the engine counts them to be sure apt always gets a thread."""
        if self.ctx.link is not None and self.uses_link:
            self.ctx.link.turn(self.name)


# -- files owned by root, written through sudo ---------------------------------


def atomic_write_text(path: Path, text: str, mode: int = 0o600, *, durable: bool = True) -> None:
    """temp file in the same directory + fsync + rename + fsync the directory:
    a reader (or a crash) sees the old file or the new one, never half.
    durable=False skips the fsyncs (still atomic for readers and for kills)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_root_file(path: Path, content: str, *, mode: int, owner: str = "root", group: str = "root") -> None:
    """Replace a root-owned file atomically: the content goes to a 0600 temp
    file of ours, `install` copies it beside the target with its final mode
    and owner, `mv` renames it over the target (one filesystem: atomic)."""
    fd, source = tempfile.mkstemp(prefix="cocalc-bootstrap-")
    staged = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        # -m: the stub runs us under umask 077, and the daemon's user must reach
        # the file; mkdir -p never re-modes an existing directory.
        make_root_dirs(path.parent)
        run_command(["install", "-m", f"{mode:04o}", "-o", owner, "-g", group, source, staged], sudo=True, timeout_s=30)
        run_command(["mv", "-f", "-T", staged, str(path)], sudo=True, timeout_s=30)
    except BaseException:
        run_command(["rm", "-f", staged], sudo=True, check=False, timeout_s=30)
        raise
    finally:
        os.unlink(source)


def make_root_dirs(path: Path) -> None:
    """Create path and its missing parents as root, mode 0755 whatever the
    umask (the stub runs us under umask 077); existing ones are left alone."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        run_command(["install", "-d", "-m", "0755", str(missing)], sudo=True, timeout_s=30)


def file_matches(path: Path, content: str, *, mode: int, uid: int | None = None, gid: int | None = None) -> bool:
    """The file exists with exactly this content, mode (and owner)."""
    try:
        st = path.stat()
        same = path.read_text(encoding="utf-8") == content
    except (OSError, UnicodeDecodeError):
        return False
    return (
        same
        and stat.S_IMODE(st.st_mode) == mode
        and (uid is None or st.st_uid == uid)
        and (gid is None or st.st_gid == gid)
    )


def write_user_file(path: Path, content: str, mode: int) -> bool:
    """Atomically write a file of ours when it differs; True when it changed."""
    if file_matches(path, content, mode=mode):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, content, mode)
    return True


# ============================================================================
# fetch: HTTP from the host: verified, resumable downloads.
# ============================================================================

# -- downloads -------------------------------------------------------------------

DOWNLOAD_CHUNK = 1 << 20
DOWNLOAD_ATTEMPTS = 8
DOWNLOAD_ATTEMPT_TIMEOUT_S = 30.0  # per socket operation: a stalled server fails the attempt
DOWNLOAD_DEADLINE_S = 1800.0
USER_AGENT = f"cocalc-bootstrap/{__version__}"
SHA256_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})(?:[ \t]+\*?(\S(?:.*\S)?))?$")
DOWNLOAD_HINT = (
    "Check that the URL answers from this host (curl -fI <url>) and that the hub's manifest is right; "
    "the partial download is kept and resumed on the next run."
)


class TransientError(BootstrapError):
    """A failure worth retrying: network errors, 5xx/429, a cut connection."""


CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")


class RedirectRefused(BootstrapError):
    """A redirect that would carry a credential to another origin, downgrade
    https to http, or re-send a POST (as a GET, or elsewhere)."""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what a credential is issued for."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # a malformed port never equals a real origin
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port if port is not None else default


def redirect_refusal(request: urllib.request.Request, new_url: str) -> str | None:
    """Why a redirect from request to new_url must not be followed, or None."""
    method = request.get_method()
    old, new = origin(request.full_url), origin(new_url)
    if method not in ("GET", "HEAD"):
        return f"a {method} is never re-sent, neither as a GET nor to another address"
    if new[0] not in ("http", "https"):
        return f"{new[0] or 'no'} scheme: only http and https are followed"
    if old[0] == "https" and new[0] == "http":
        return "a downgrade from https to http"
    if new != old and any(request.has_header(h) for h in CREDENTIAL_HEADERS):
        return "the request carries a credential for its own origin, never sent to another one"
    return None


class GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, minus what leaks or changes a request: see
    redirect_refusal. A credential-free GET (a public artifact) may follow a
    redirect to another origin, with any credential header stripped."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        why = redirect_refusal(req, newurl)
        if why is not None:
            fp.close()
            raise RedirectRefused(
                f"{req.get_method()} {req.full_url}: HTTP {code} redirect to {newurl} refused: {why}",
                hint="Point the config at the final URL (same origin, https stays https); "
                "nothing was sent to the redirect's target.",
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()  # urllib would turn a HEAD into a GET
        if new is not None and origin(newurl) != origin(req.full_url):
            for header in CREDENTIAL_HEADERS:
                new.remove_header(header)
        return new


def open_request(request: urllib.request.Request, timeout_s: float) -> Any:
    """urlopen with GuardedRedirects (the only way this program opens a URL
    that may carry a credential). Raises what urlopen raises, and RedirectRefused."""
    opener = urllib.request.build_opener(GuardedRedirects)
    return opener.open(request, timeout=timeout_s)


def http_open(url: str, *, timeout_s: float, headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
    """GET url; TransientError for what a retry may fix, BootstrapError otherwise
    (RedirectRefused for a redirect that would leak or downgrade)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        response = open_request(request, timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (408, 425, 429) or e.code >= 500:
            raise TransientError(f"GET {url}: HTTP {e.code} {e.reason}", hint=DOWNLOAD_HINT) from None
        raise HttpStatusError(url, e.code, str(e.reason)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise TransientError(f"GET {url}: {reason}", hint=DOWNLOAD_HINT) from None
    assert isinstance(response, http.client.HTTPResponse)
    if (
        headers
        and any(h.lower() in ("authorization", "cookie") for h in headers)
        and (origin(response.geturl()) != origin(url))
    ):  # belt and braces: GuardedRedirects refuses this before it happens
        response.close()
        raise RedirectRefused(f"GET {url}: answered from {response.geturl()}, another origin")
    return response


class HttpStatusError(BootstrapError):
    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"GET {url}: HTTP {status} {reason}", hint=DOWNLOAD_HINT)
        self.status = status


def http_get_text(url: str, *, limit: int = 1 << 20, timeout_s: float = DOWNLOAD_ATTEMPT_TIMEOUT_S) -> str:
    """A small text resource (a checksum file), retried when transient."""

    def attempt() -> str:
        with http_open(url, timeout_s=timeout_s) as response:
            try:
                body = response.read(limit + 1)
            except (OSError, http.client.HTTPException) as e:
                raise TransientError(f"GET {url}: {e}", hint=DOWNLOAD_HINT) from None
        if len(body) > limit:
            raise BootstrapError(f"GET {url}: more than {limit} bytes; not a checksum file", hint=DOWNLOAD_HINT)
        return body.decode("utf-8", "replace")

    return retry(attempt, what=f"GET {url}", attempts=4, retry_if=lambda e: isinstance(e, TransientError))


def url_basename(url: str) -> str:
    return urllib.parse.unquote(os.path.basename(urllib.parse.urlsplit(url).path))


def parse_sha256_file(text: str, name: str) -> str:
    """The sha256 for `name` in sha256sum(1) format (`<hex>  <name>`, or a
    lone `<hex>`). Anything else, or no entry or two different ones, is an error."""
    found: set[str] = set()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        m = SHA256_LINE_RE.match(line)
        if not m:
            raise ValueError(f"not a sha256sum line: {line[:100]!r}")
        listed = m.group(2)
        if (listed is None and len(lines) == 1) or listed in (name, f"./{name}"):
            found.add(m.group(1).lower())
    if len(found) != 1:
        raise ValueError(f"{'no' if not found else 'more than one'} sha256 for {name!r}")
    return found.pop()


def published_sha256(url: str) -> str:
    """The checksum published beside an artifact, at `<url>.sha256`."""
    parts = urllib.parse.urlsplit(url)
    sha_url = urllib.parse.urlunsplit(parts._replace(path=parts.path + ".sha256"))
    hint = (
        f"Publish {url_basename(url)}.sha256 beside the artifact, or put its sha256 in the config; "
        "bootstrap.py never installs an unverified download."
    )
    try:
        text = http_get_text(sha_url, limit=64 * 1024)
    except HttpStatusError as e:
        raise BootstrapError(
            f"no checksum for {url}: the config has none and {sha_url} answered HTTP {e.status}", hint=hint
        ) from None
    try:
        return parse_sha256_file(text, url_basename(url))
    except ValueError as e:
        raise BootstrapError(f"{sha_url} is not a usable checksum file: {e}", hint=hint) from None


def fetch_to_part(url: str, part: Path, *, deadline: float, timeout_s: float) -> str:
    """One attempt: continue `part` from its current size (Range), hashing
    as it streams; returns the sha256 of the whole file. A server that
    ignores Range (200) starts the file and the hash over."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = http_open(url, timeout_s=timeout_s, headers=headers)
    except HttpStatusError as e:
        if e.status != 416:
            raise
        part.unlink()  # longer than the file: it changed upstream; start over
        raise TransientError(f"GET {url}: the partial download does not fit the file; starting over") from None
    with response:
        if offset and response.status == 206 and content_range_start(response) == offset:
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(DOWNLOAD_CHUNK):
                    digest.update(chunk)
            append = True
        else:
            digest, append, offset = hashlib.sha256(), False, 0
        length = response.getheader("Content-Length")
        try:
            received = stream_into(response, part, append, digest, deadline=deadline, url=url)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            have = part.stat().st_size if part.exists() else 0
            total = offset + int(length) if length is not None and length.isdigit() else None
            needed = None if total is None else total - have
            raise no_space_error(part, needed, what=f"downloading {url_basename(url)}") from None
    if length is not None and length.isdigit() and received != int(length):
        raise TransientError(f"GET {url}: connection closed after {offset + received} bytes; resuming")
    return digest.hexdigest()


def mount_point_of(path: Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def no_space_error(path: Path, needed_bytes: int | None, *, what: str) -> BootstrapError:
    """ENOSPC as a failure that names the file system, what is free and what is needed."""
    mount = mount_point_of(path)
    try:
        st = os.statvfs(mount)
        free = f"{human_size(st.f_bavail * st.f_frsize)} free of {human_size(st.f_blocks * st.f_frsize)}"
    except OSError:
        free = "free space unknown"
    need = f"{human_size(needed_bytes)} ({needed_bytes} bytes) more needed" if needed_bytes else "more space needed"
    return BootstrapError(
        f"no space left on the file system at {mount} while {what} into {path}: {free}, {need}",
        hint=f"Free at least {human_size(needed_bytes) if needed_bytes else 'some'} on {mount} (df -h {mount}) "
        "or give the host a bigger disk, then run the bootstrap again; the partial download is kept and resumed.",
    )


def content_range_start(response: http.client.HTTPResponse) -> int | None:
    m = re.match(r"bytes (\d+)-", response.getheader("Content-Range") or "")
    return int(m.group(1)) if m else None


def stream_into(
    response: http.client.HTTPResponse, part: Path, append: bool, digest: Any, *, deadline: float, url: str
) -> int:
    received = 0
    with open(part, "ab" if append else "wb") as f:
        while True:
            if time.monotonic() > deadline:
                raise BootstrapError(f"GET {url}: still downloading at the deadline", hint=DOWNLOAD_HINT)
            try:
                chunk = response.read1(DOWNLOAD_CHUNK)  # what has arrived: a reset loses nothing written
            except (OSError, http.client.HTTPException) as e:
                raise TransientError(f"GET {url}: {e!r} after {received} bytes; resuming") from None
            if not chunk:
                return received
            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)


def download_verified(
    url: str,
    target: Path,
    sha256: str | None,
    *,
    log: Log,
    size_bytes: int | None = None,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    attempt_timeout_s: float = DOWNLOAD_ATTEMPT_TIMEOUT_S,
) -> str:
    """Download url to target, verified: stream to `<target>.part` while
    hashing, resume after breaks, and rename to target only when the sha256
    (from the config, else `<url>.sha256`) matches. Returns the sha256."""
    expected = sha256 or published_sha256(url)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + deadline_s
    start = time.monotonic()
    digest = retry(
        lambda: fetch_to_part(url, part, deadline=deadline, timeout_s=attempt_timeout_s),
        what=f"download {url_basename(url)}",
        attempts=DOWNLOAD_ATTEMPTS,
        deadline_s=deadline_s,
        base_s=1.0,
        max_s=15.0,
        retry_if=lambda e: isinstance(e, TransientError),
    )
    size = part.stat().st_size
    if digest != expected or (size_bytes is not None and size != size_bytes):
        part.unlink()
        raise BootstrapError(
            f"{url}: verification failed: sha256 {digest}, {size} bytes; expected sha256 {expected}"
            + (f", {size_bytes} bytes" if size_bytes is not None else ""),
            hint="The download is not the published artifact (wrong checksum in the manifest, or a broken mirror). "
            "Nothing was installed; fix the artifact or its sha256 and run again.",
        )
    os.replace(part, target)
    write_user_file(checksum_path(target), f"{digest}  {target.name}\n", 0o644)
    took = time.monotonic() - start
    log.info(f"downloaded {url_basename(url)}: {human_size(size)} in {took:.1f}s, sha256 verified", bytes=size)
    return digest


def checksum_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def verified_download(target: Path, sha256: str | None) -> bool:
    """A download we verified earlier (its .sha256 beside it) that matches sha256, when given."""
    try:
        recorded = parse_sha256_file(checksum_path(target).read_text(encoding="utf-8"), target.name)
    except (OSError, ValueError):
        return False
    return target.is_file() and (sha256 is None or recorded == sha256)


def remove_download(target: Path) -> None:
    for path in (target, checksum_path(target), target.with_name(target.name + ".part")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ============================================================================
# archive: Safe extraction of bundle archives and atomic installs.
# ============================================================================

# -- safe extraction and atomic installs -------------------------------------------

INSTALLED_MARKER = ".bootstrap-installed.json"  # written last into staging: its presence means complete
STAGING_PREFIX = ".staging-"


class UnsafeArchiveError(BootstrapError):
    def __init__(self, archive: Path, member: str, why: str) -> None:
        super().__init__(
            f"{archive.name}: refusing member {member!r}: {why}",
            hint="The archive tries to write outside its directory, contains special files or modes, or "
            "expands beyond the extraction budget; rebuild the bundle with plain files, directories and "
            "links that stay inside it (nothing was installed).",
        )
        self.member = member
        self.why = why


# Per-artifact extraction budget. A real bundle (the project bundle: about
# 1 GiB, 100k entries, xz ratio under 10) fits in it ten times over; a bomb
# (a small .tar.xz of zeros, a GNU sparse member) does not.
EXTRACT_MAX_BYTES = 32 << 30  # total size of the regular files extracted
EXTRACT_MAX_ENTRIES = 1_000_000  # files, directories and links created
EXTRACT_MAX_RATIO = 100.0  # extracted bytes per byte of the archive on disk...
EXTRACT_RATIO_FLOOR = 64 << 20  # ...counted once more than this has been extracted
EXTRACT_HEADER_SLACK = 1 << 20  # stream bytes allowed between accepted members (headers, padding, trailer)
MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4000


@dataclass(frozen=True)
class ExtractBudget:
    max_bytes: int = EXTRACT_MAX_BYTES
    max_entries: int = EXTRACT_MAX_ENTRIES
    max_ratio: float = EXTRACT_MAX_RATIO
    ratio_floor: int = EXTRACT_RATIO_FLOOR


ARCHIVE_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gz"), (b"\x28\xb5\x2f\xfd", "zst"), (b"BZh", "bz2"))


ZSTD_URL_RE = re.compile(r"\.(?:tar\.zst|tar\.zstd|tzst)$")
ZSTD_HINT = (
    "Install zstd on the host before the bootstrap (in its image, or cloud-init's packages: the install "
    "steps do not wait for the apt step), or publish .tar.xz bundles."
)


def decompressor_problems(config: Config) -> list[tuple[str, str]]:
    """Preflight: a bundle published as .tar.zst (without an image to mount instead) needs the zstd
    command, since Python reads zstd only from 3.14 on. (what is wrong, what to do) for each."""
    if shutil.which("zstd") is not None:
        return []
    zstd = [
        name
        for name, spec in config.artifacts.items()
        if spec.image is None and ZSTD_URL_RE.search(urllib.parse.urlsplit(spec.url).path)
    ]
    if not zstd:
        return []
    what = f"artifacts {', '.join(zstd)} {'is' if len(zstd) == 1 else 'are'} .tar.zst and the zstd command is missing"
    return [(what, ZSTD_HINT)]


def archive_compression(path: Path) -> str:
    """'xz', 'gz', 'zst', 'bz2' or '' (plain tar), from the file's magic bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in ARCHIVE_MAGIC if head.startswith(magic)), "")


class BudgetedReader:
    """The decompressed tar stream, read through a limit the extractor raises
    as it accepts members: tarfile never reads (into memory) more than the
    accepted members' data plus EXTRACT_HEADER_SLACK, however large a header
    or trailer claims to be."""

    def __init__(self, raw: IO[bytes], archive: Path, total_limit: int) -> None:
        self.raw = raw
        self.archive = archive
        self.count = 0
        self.limit = EXTRACT_HEADER_SLACK
        self.total_limit = total_limit
        self.after = "(the first header)"

    def allow(self, data_bytes: int, after: str) -> None:
        self.limit = min(self.count + data_bytes + EXTRACT_HEADER_SLACK, self.total_limit)
        self.after = after

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = DOWNLOAD_CHUNK
        data = self.raw.read(max(0, min(n, self.limit - self.count + 1)))
        self.count += len(data)
        if self.count > self.limit:
            raise UnsafeArchiveError(
                self.archive,
                self.after,
                f"more than {EXTRACT_HEADER_SLACK} bytes of headers or padding after it "
                f"(or over {self.total_limit} bytes in all)",
            )
        return data


@contextlib.contextmanager
def open_tar_stream(archive: Path, total_limit: int = EXTRACT_MAX_BYTES) -> Iterator[tuple[tarfile.TarFile, Any]]:
    """The archive as a tar stream (mode "r|") over a BudgetedReader, and the
    reader. xz and zstd go through their command-line tools when present
    (`xz -T0` is much faster than Python's lzma); zstd has no Python fallback
    before 3.14. The stream is read to its end, so a damaged archive fails."""
    kind = archive_compression(archive)
    tool = {"xz": ["xz", "-T0", "-dc"], "zst": ["zstd", "-dc"]}.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        if kind == "zst":
            raise BootstrapError(
                f"{archive.name} is zstd-compressed and zstd is not installed",
                hint=ZSTD_HINT,
            )
        with open_decompressed(archive, kind) as raw:
            reader = BudgetedReader(raw, archive, total_limit)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    yield tar, reader
                reader.allow(0, "(the end of the archive)")
                while reader.read(DOWNLOAD_CHUNK):  # the padding after the end marker; checks the stream
                    pass
            except (lzma.LZMAError, EOFError, OSError, zlib.error) as e:
                if isinstance(e, OSError) and e.errno is not None:
                    raise
                raise BootstrapError(
                    f"could not decompress {archive.name}: {e}", hint="The archive is damaged; delete it and run again."
                ) from None
        return
    with tempfile.TemporaryFile() as errors:
        # Streaming, so not run_command: the tar reader consumes stdout as it comes.
        proc = MeteredPopen(
            [*tool, "--", str(archive)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
        assert proc.stdout is not None
        reader = BudgetedReader(proc.stdout, archive, total_limit)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                yield tar, reader
            reader.allow(0, "(the end of the archive)")
            while reader.read(DOWNLOAD_CHUNK):  # the padding after the tar's end marker
                pass
            returncode = proc.wait(timeout=60)
            charge_child(proc.rusage)
        except BaseException:
            proc.kill()  # we stopped reading early (a refused member, an interrupt)
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if returncode != 0:
            errors.seek(0)
            message = errors.read().decode("utf-8", "replace").strip()
            raise BootstrapError(
                f"{tool[0]} could not decompress {archive.name} (exit {returncode}): {message}",
                hint="The archive is damaged; delete it and run again.",
            )


def open_decompressed(archive: Path, kind: str) -> Any:  # a binary file object
    if kind == "xz":
        return lzma.open(archive)
    if kind == "gz":
        return gzip.open(archive)
    if kind == "bz2":
        return bz2.open(archive)
    return open(archive, "rb")


def member_parts(name: str, strip: int) -> list[str] | None:
    """The path components of a member after stripping, [] for the root,
    None when stripped away. Raises ValueError for absolute paths and `..`."""
    if name.startswith("/"):
        raise ValueError("absolute path")
    # GNU tar counts "." as a component when stripping (upstream's project-host bundle holds
    # ./cocalc-project-host-<v>-<arch>-<os>/..., unpacked with strip 2) and skips empty ones.
    counted = [p for p in name.split("/") if p != ""]
    if ".." in counted:
        raise ValueError("'..' in the path")
    if any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in counted) or len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise ValueError("name too long")
    return [p for p in counted[strip:] if p != "."] if len(counted) >= strip else None


def link_stays_inside(depth: int, linkname: str) -> bool:
    """A symlink's target, read from a real directory `depth` levels below
    the root, is relative, climbs only at its start and not above the root;
    later components only descend, so the link stays inside however other
    (equally checked) links resolve and whatever later members replace."""
    if not linkname or linkname.startswith("/"):
        return False
    parts = [p for p in linkname.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ".." not in parts[ups:] and ups <= depth


class LeavesRoot(Exception):
    pass


def resolve_dir(root: str, parts: Sequence[str]) -> tuple[list[str], int]:
    """Resolve the directory parts below root as the kernel would, but against
    root and refusing (LeavesRoot) what leaves it: every symlink on the way is
    read and followed (chains too, at most MAX_LINK_HOPS), `..` never climbs
    above root, absolute link targets are refused, and every component that
    exists must be a directory. Returns the real path's parts (no symlink
    among them) and how many of them exist: the missing ones are at the end."""
    todo = list(reversed(parts))
    resolved: list[str] = []
    hops = 0
    existing: int | None = None  # set when a component is missing
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if existing is not None:
            if part == "..":
                raise LeavesRoot("'..' after a directory that does not exist")
            resolved.append(part)
            continue
        if part == "..":
            if not resolved:
                raise LeavesRoot("climbs above the bundle's root")
            resolved.pop()
            continue
        path = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            existing = len(resolved)
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise LeavesRoot("too many levels of links")
            target = os.readlink(path)
            if target.startswith("/"):
                raise LeavesRoot(f"goes through the link {'/'.join([*resolved, part])!r} to an absolute path")
            todo.extend(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LeavesRoot(f"goes through {'/'.join([*resolved, part])!r}, which is not a directory")
        resolved.append(part)
    return resolved, len(resolved) if existing is None else existing


def mode_problem(member: tarfile.TarInfo) -> str | None:
    mode = member.mode
    if mode & (stat.S_ISUID | stat.S_ISGID):
        return f"setuid/setgid mode {mode:04o} is not allowed"
    if mode & stat.S_ISVTX:
        return f"sticky mode {mode:04o} is not allowed"
    if mode & stat.S_IWOTH:
        return f"world-writable mode {mode:04o} is not allowed"
    return None


class Extraction:
    """One archive into one (new) directory: every member is checked against
    what is already extracted before anything is created for it."""

    def __init__(self, archive: Path, dest: Path, strip: int, budget: ExtractBudget) -> None:
        self.archive = archive
        self.root = str(dest)
        self.strip = strip
        self.budget = budget
        self.compressed = archive.stat().st_size
        self.bytes = 0
        self.entries = 0

    def refuse(self, member: tarfile.TarInfo, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(self.archive, member.name, why)

    def resolve(self, member: tarfile.TarInfo, parts: Sequence[str], what: str) -> tuple[list[str], int]:
        try:
            return resolve_dir(self.root, parts)
        except LeavesRoot as e:
            raise self.refuse(member, f"{what} {e}") from None

    def path(self, parts: Sequence[str]) -> str:
        return os.path.join(self.root, *parts)

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, reader: BudgetedReader) -> bool:
        """Check one member, then create it; False when it creates nothing."""
        try:
            parts = member_parts(member.name, self.strip)
        except ValueError as e:
            raise self.refuse(member, str(e)) from None
        if parts is None or (not parts and member.isdir()):
            if member.isreg():  # not written, but decompressed all the same
                self.check_bytes(member)
                self.bytes += member.size
            reader.allow(member.size if member.isreg() else 0, member.name)
            return False
        if not parts:
            raise self.refuse(member, "a non-directory at the bundle root")
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            raise self.refuse(member, "devices, fifos and other special files are not allowed")
        if member.isdir() or member.isreg():
            problem = mode_problem(member)
            if problem:
                raise self.refuse(member, problem)
        parent, existing = self.resolve(member, parts[:-1], "its directory")
        new_dirs = len(parent) - existing
        target = [*parent, parts[-1]]
        try:
            st: os.stat_result | None = os.lstat(self.path(target)) if new_dirs == 0 else None
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            if member.isdir():
                reader.allow(0, member.name)
                return False
            raise self.refuse(member, "replaces a directory")
        source: list[str] | None = None
        if member.issym() and not link_stays_inside(len(parent), member.linkname):
            raise self.refuse(member, f"symlink to {member.linkname!r} leads outside")
        if member.islnk():
            source = self.hard_link_source(member, parent, target)
            if source == target:  # tar(1) records a file added twice as a hard link to itself
                reader.allow(0, member.name)
                return False
        if self.entries + 1 + new_dirs > self.budget.max_entries:
            raise self.refuse(member, f"more than {self.budget.max_entries} entries (the extraction budget)")
        if member.isreg():
            self.check_bytes(member)
        # accepted: now, and only now, create it
        for i in range(existing, len(parent)):
            os.mkdir(self.path(parent[: i + 1]), 0o755)
        self.entries += new_dirs + 1
        if st is not None:
            os.unlink(self.path(target))  # a duplicate entry: the later one wins, as with tar(1)
        reader.allow(member.size if member.isreg() else 0, member.name)
        path = self.path(target)
        if member.isdir():
            os.mkdir(path, (member.mode & 0o777) | 0o700)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif source is not None:
            os.link(self.path(source), path, follow_symlinks=False)
        else:
            self.write_file(tar, member, path)
        return True

    def hard_link_source(self, member: tarfile.TarInfo, parent: Sequence[str], target: Sequence[str]) -> list[str]:
        try:
            parts = member_parts(member.linkname, self.strip)
        except ValueError as e:
            raise self.refuse(member, f"hard link target {member.linkname!r}: {e}") from None
        if not parts:
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not in the bundle")
        source_dir, existing = self.resolve(member, parts[:-1], "its hard link target's directory")
        source = [*source_dir, parts[-1]]
        try:
            st = os.lstat(self.path(source)) if existing == len(source_dir) else None
        except FileNotFoundError:
            st = None
        if st is None:
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not extracted before it")
        if stat.S_ISLNK(st.st_mode):
            # a hard link to a symlink is a copy of that link in another directory: check it there
            if not link_stays_inside(len(parent), os.readlink(self.path(source))):
                raise self.refuse(member, f"hard link to the symlink {member.linkname!r} leads outside from here")
        elif not stat.S_ISREG(st.st_mode):
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not a file")
        return source

    def check_bytes(self, member: tarfile.TarInfo) -> None:
        total = self.bytes + member.size
        b = self.budget
        if total > b.max_bytes:
            raise self.refuse(member, f"{total} bytes in all: more than the extraction budget of {b.max_bytes} bytes")
        if total > b.ratio_floor and total > b.max_ratio * self.compressed:
            raise self.refuse(
                member,
                f"expands {self.compressed} bytes of archive to {total} bytes: "
                f"a ratio over the extraction budget of {b.max_ratio:g}",
            )

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        fileobj = tar.extractfile(member)
        assert fileobj is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := fileobj.read(DOWNLOAD_CHUNK):
                written += len(chunk)
                if written > member.size:
                    raise self.refuse(member, "more data than its header says")
                out.write(chunk)
        self.bytes += written
        os.chmod(path, member.mode & 0o777)
        os.utime(path, (member.mtime, member.mtime))


def extract_safely(archive: Path, dest: Path, *, strip: int = 0, budget: ExtractBudget | None = None) -> int:
    """Extract into the (new, empty) directory dest: regular files, directories,
    and links that stay inside, within the budget; anything else refuses the
    whole archive (UnsafeArchiveError naming the member), and a refused member
    creates nothing. Returns the number of members extracted."""
    budget = budget or ExtractBudget()
    extraction = Extraction(archive, dest, strip, budget)
    count = 0
    try:
        with open_tar_stream(archive, budget.max_bytes + budget.max_entries * 4096) as (tar, reader):
            for member in tar:
                if extraction.member(tar, member, reader):
                    count += 1
    except tarfile.TarError as e:  # a truncated or garbled stream (not a refusal: those are checked)
        raise BootstrapError(
            f"could not read {archive.name} as a tar archive: {e}",
            hint="The archive is damaged; delete it and run again.",
        ) from None
    return count


# -- extraction in a worker process -------------------------------------------------
#
# Installs run as threads of one process; extracting in them would serialise
# on the interpreter lock (tarfile's parsing, the checks, the writes' Python
# side). So each extraction runs in its own process: bootstrap.py itself,
# imported by a fresh `python3 -I` (importing it does nothing), running the
# very same extract_safely: every check of the hostile-input work is the one
# code path, only its process differs. The request goes in on stdin and the
# outcome comes back as one JSON line on stdout; an error is rebuilt in the
# parent as the same exception with the same message (UnsafeArchiveError,
# BootstrapError, OSError), so a step says what it said in-process.

WORKER_HINT = "The extraction worker (python3 running bootstrap.py) died; see its output above and run again."


def worker_argv() -> list[str]:
    """python3 importing this very code: the built bootstrap.py, or (in development) the package."""
    package = __spec__.parent if __spec__ is not None else ""
    if package:
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); "
            f"from {package}.archive import extract_worker_main; sys.exit(extract_worker_main())"
        )
    else:
        code = (
            "import importlib.util as u, sys; s = u.spec_from_file_location('cocalc_bootstrap_worker', "
            f"{str(Path(__file__).resolve())!r}); m = sys.modules[s.name] = u.module_from_spec(s); "
            "s.loader.exec_module(m); "
            "sys.exit(m.extract_worker_main())"
        )
    return [sys.executable or "python3", "-I", "-c", code]


def extract_worker_main() -> int:
    """The worker: one request on stdin, one JSON outcome on stdout."""
    request = json.loads(sys.stdin.read())
    archive = Path(request["archive"])
    try:
        count = extract_safely(
            archive, Path(request["dest"]), strip=int(request["strip"]), budget=ExtractBudget(**request["budget"])
        )
        outcome: dict[str, Any] = {"ok": True, "count": count}
    except UnsafeArchiveError as e:
        outcome = {"kind": "unsafe", "member": e.member, "why": e.why}
    except BootstrapError as e:
        outcome = {"kind": "bootstrap", "message": e.message, "hint": e.hint, "log_tail": e.log_tail}
    except OSError as e:
        outcome = {"kind": "os", "errno": e.errno, "strerror": e.strerror, "filename": e.filename, "text": str(e)}
    except Exception as e:  # a bug: still one clear message
        outcome = {"kind": "other", "text": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return 0


def worker_error(archive: Path, outcome: Mapping[str, Any]) -> BaseException:
    kind = outcome.get("kind")
    if kind == "unsafe":
        return UnsafeArchiveError(archive, str(outcome["member"]), str(outcome["why"]))
    if kind == "bootstrap":
        return BootstrapError(str(outcome["message"]), hint=outcome.get("hint"), log_tail=outcome.get("log_tail"))
    if kind == "os" and outcome.get("errno") is not None:
        return OSError(outcome["errno"], outcome.get("strerror") or "", outcome.get("filename"))
    text = str(outcome.get("text", outcome))
    return BootstrapError(
        f"extracting {archive.name} failed: {text}",
        hint="An unexpected error in bootstrap.py's extraction (a bug); nothing was installed.",
    )


def extract_in_worker(archive: Path, dest: Path, *, strip: int = 0, budget: ExtractBudget | None = None) -> int:
    """extract_safely in a separate python3 process (outside this one's
    interpreter lock); same result, same errors. Interrupting the caller
    kills the worker (it is a tracked process group, like any command)."""
    request = {
        "archive": str(archive),
        "dest": str(dest),
        "strip": strip,
        "budget": dataclasses.asdict(budget or ExtractBudget()),
    }
    with tempfile.TemporaryFile() as errors:
        proc = MeteredPopen(
            worker_argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        )
        with tracked_process(proc.pid):
            try:
                out, _ = proc.communicate(json.dumps(request).encode())
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        charge_child(proc.rusage)  # the worker's CPU-seconds count to the installing step
        lines = out.decode("utf-8", "replace").strip().splitlines()
        try:
            outcome = json.loads(lines[-1]) if lines else None
        except ValueError:
            outcome = None
        if not isinstance(outcome, dict):
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace").strip()[-2000:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            raise BootstrapError(
                f"extracting {archive.name} failed: the worker ended ({how}) without an answer",
                hint=WORKER_HINT,
                log_tail=said or None,
            )
    if outcome.get("ok") is True:
        return int(outcome["count"])
    raise worker_error(archive, outcome)


def bundle_problems(root: Path, expected_files: Sequence[str], executables: Sequence[str]) -> list[str]:
    problems = [f"{name} is missing" for name in expected_files if not (root / name).exists()]
    for name in executables:
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif not os.access(path, os.X_OK):
            problems.append(f"{name} is not executable")
    return problems


def read_marker(version_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((version_dir / INSTALLED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def install_archive(
    archive: Path,
    final: Path,
    *,
    strip: int,
    expected_files: Sequence[str] = (),
    executables: Sequence[str] = (),
    marker: Mapping[str, Any],
    verify: Callable[[Path], None] | None = None,
    budget: ExtractBudget | None = None,
    in_process: bool = False,
) -> None:
    """Extract into `<parent>/.staging-<name>-<random>`, check it, mark it
    complete, and rename it to `final` in one step. A failure anywhere leaves
    `final` untouched (or absent) and no staging directory behind."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_staging_dirs(parent)
    staging = parent / f"{STAGING_PREFIX}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        (extract_safely if in_process else extract_in_worker)(archive, staging, strip=strip, budget=budget)
        problems = bundle_problems(staging, expected_files, executables)
        if problems:
            raise BootstrapError(
                f"{archive.name} is incomplete: {'; '.join(problems)}",
                hint="The bundle does not have the files the config expects; check the artifact and the "
                "config's expected_files, executables and strip_components.",
            )
        if verify is not None:
            verify(staging)
        # The extracted files reach the disk before the marker that says they are complete: after
        # a power cut a marker never vouches for files that came back empty (the daemon would not
        # start, and no check would see why). One sync(2) for the whole tree.
        os.sync()
        atomic_write_text(staging / INSTALLED_MARKER, json.dumps(dict(marker), indent=2, sort_keys=True) + "\n", 0o644)
        if os.path.lexists(final):  # an older attempt not made by us, or without a marker: set it aside
            final.rename(parent / f"{STAGING_PREFIX}{final.name}-old-{secrets.token_hex(4)}")
        staging.rename(final)
        fsync_dir(parent)  # the rename too: else a power cut brings back staging (removed) and costs a re-install
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_staging_dirs(parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_staging_dirs(parent: Path) -> None:
    """Leftovers of a killed run: never used, always removed."""
    with contextlib.suppress(FileNotFoundError):
        for entry in parent.iterdir():
            if entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


def point_symlink(link: Path, target: str) -> bool:
    """Make `link` a symlink to `target` atomically (new link + rename); True when it changed."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            return False
    temp = link.with_name(f".{link.name}-{secrets.token_hex(4)}")
    os.symlink(target, temp)
    try:
        os.replace(temp, link)
    except BaseException:
        temp.unlink()
        raise
    return True


# ============================================================================
# apt: apt and dpkg: locks, quiescing the timers, update and install.
# ============================================================================

# -- apt -------------------------------------------------------------------------

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "NEEDRESTART_MODE": "a",  # Ubuntu's needrestart: restart services itself, never ask
    "APT_LISTCHANGES_FRONTEND": "none",
}
APT_OPTIONS = (
    "-o", "Dpkg::Options::=--force-confold",
    "-o", "Dpkg::Options::=--force-unsafe-io",
    "-o", "Acquire::Retries=3",
    "-o", "Acquire::http::Timeout=20",
    "-o", "Acquire::https::Timeout=20",
    "-o", "Acquire::ftp::Timeout=20",
    "-o", "Acquire::CompressionTypes::Order::=gz",
)  # fmt: skip
APT_LOCK_ERROR_RE = re.compile(r"Could not get lock|Unable to lock|Unable to acquire the dpkg frontend lock")
APT_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")
MAN_DB_AUTO_UPDATE = Path("/var/lib/man-db/auto-update")
APT_HINT = (
    "Run the failing apt-get command by hand to see the whole error (often a mirror problem or a held "
    "package), fix it, and run the bootstrap again."
)


def apt_get_argv(args: Sequence[str], lock_timeout_s: int) -> list[str]:
    return ["apt-get", "-y", *APT_OPTIONS, "-o", f"DPkg::Lock::Timeout={lock_timeout_s}", *args]


def wait_for_locks(paths: Sequence[str], deadline: float, log: Log, *, poll_s: float = 1.0) -> None:
    """Wait until nobody holds these fcntl locks, naming the holder while we
    wait. The holder is never killed: it may be dpkg halfway through a package."""
    said = 0.0
    while holders := describe_lock_holders(paths):
        if time.monotonic() >= deadline:
            raise BootstrapError(
                f"still locked at the deadline: {holders}",
                hint="Another package manager run holds the lock. Let it finish (see `ps -fp <PID>`), "
                "or raise apt.lock_timeout_s; then run the bootstrap again.",
            )
        if time.monotonic() - said >= 15:
            log.info(f"waiting: {holders}", event="lock_wait")
            said = time.monotonic()
        time.sleep(poll_s)


@contextlib.contextmanager
def apt_quiesced(record: Path, log: Log) -> Iterator[None]:
    """For the length of the run: apt's timers stopped (unattended-upgrades
    cannot grab the lock) and man-db's trigger off, then put back exactly as
    found. What was changed is recorded first, so a killed run is repaired
    by the next one."""
    previous = load_quiesce_record(record)
    stopped = list(previous.get("stopped_timers", []))
    man_db_was_on = bool(previous.get("man_db_auto_update", False))
    try:
        for timer in APT_TIMERS:
            if timer not in stopped and systemctl_state("is-active", timer) == "active":
                stopped.append(timer)
                save_quiesce_record(record, stopped, man_db_was_on)
                run_command(["systemctl", "stop", timer], sudo=True, timeout_s=60)
                log.info(f"stopped {timer} for the run (restarted at the end)")
        if MAN_DB_AUTO_UPDATE.exists():
            man_db_was_on = True
            save_quiesce_record(record, stopped, man_db_was_on)
            run_command(["rm", "-f", str(MAN_DB_AUTO_UPDATE)], sudo=True, timeout_s=30)
        yield
    finally:
        if man_db_was_on:
            run_command(["touch", str(MAN_DB_AUTO_UPDATE)], sudo=True, check=False, timeout_s=30)
        for timer in stopped:
            run_command(["systemctl", "start", timer], sudo=True, check=False, timeout_s=60)
        with contextlib.suppress(FileNotFoundError):
            record.unlink()


def load_quiesce_record(record: Path) -> dict[str, Any]:
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def save_quiesce_record(record: Path, stopped: Sequence[str], man_db_was_on: bool) -> None:
    atomic_write_text(record, json.dumps({"stopped_timers": list(stopped), "man_db_auto_update": man_db_was_on}), 0o644)


def apt_update(lock_timeout_s: int, log: Log) -> None:
    """`apt-get update`, retried with backoff. The lists lock ignores
    DPkg::Lock::Timeout, so a lock failure waits for the holder and tries
    again (not counted as an attempt) until the lock deadline."""
    deadline = time.monotonic() + lock_timeout_s

    def attempt() -> None:
        while True:
            wait_for_locks((APT_LISTS_LOCK,), deadline, log)
            found = run_command(
                apt_get_argv(["update"], lock_timeout_s), sudo=True, env=APT_ENV, timeout_s=900, check=False
            )
            if found.returncode == 0:
                return
            if APT_LOCK_ERROR_RE.search(found.output) and time.monotonic() < deadline:
                log.info("apt-get update found the lists locked; waiting for the holder")
                time.sleep(1)
                continue
            raise CommandError(f"apt-get update exited with {found.returncode}", found, hint=APT_HINT)

    retry(attempt, what="apt-get update", attempts=3, deadline_s=lock_timeout_s + 1800, base_s=5.0)


def apt_download(packages: Sequence[str], lock_timeout_s: int, log: Log) -> None:
    """`apt-get install --download-only`: the packages (and what they need) into apt's cache, nothing installed."""
    apt_install(packages, lock_timeout_s, log, download_only=True)


def apt_install(packages: Sequence[str], lock_timeout_s: int, log: Log, *, download_only: bool = False) -> None:
    wait_for_locks(DPKG_LOCKS, time.monotonic() + lock_timeout_s, log)
    only = ["--download-only"] if download_only else []
    run_command(
        apt_get_argv(["install", *only, "--no-install-recommends", *packages], lock_timeout_s),
        sudo=True,
        env=APT_ENV,
        timeout_s=lock_timeout_s + 1800,
        hint=APT_HINT,
    )


# ============================================================================
# system: fstab, block devices, the grow helper, systemd quoting, health checks.
# ============================================================================

# -- btrfs -------------------------------------------------------------------------

FSTAB_TAG = "x-cocalc-bootstrap"  # a userspace mount option (ignored by mount): the tag lives in the line
FSTAB_MARKER = "# cocalc-bootstrap: the next line is managed by bootstrap.py"
BTRFS_LABEL = "cocalc-btrfs"
# under the mount point, owned by the user: what upstream's daemon expects
BTRFS_DIR_MODES = {"data": 0o755, "data/tmp": 0o1777, "data/secrets": 0o700}
MIN_DATA_DISK_UNIT = 2**30  # min_size_gb counts GiB: upstream's 10 GiB is 10737418240 bytes


def fstab_escape(field: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def fstab_entry(source: str, mount_point: str, *, loop: bool) -> str:
    options = ["defaults", "nofail", "noatime", *(["loop"] if loop else []), FSTAB_TAG]
    return f"{fstab_escape(source)} {fstab_escape(mount_point)} btrfs {','.join(options)} 0 0"


def fstab_with_entry(text: str, entry: str) -> str:
    """fstab text with our tagged line (and its marker comment) replaced by
    `entry`, or appended; every other line kept as it was."""
    kept = fstab_lines_not_ours(text)
    return "\n".join([*kept, FSTAB_MARKER, entry]) + "\n"


def fstab_lines_not_ours(text: str) -> list[str]:
    """fstab's lines but our tagged ones and their marker comments."""

    def ours(line: str) -> bool:
        fields = line.split()
        is_tagged = len(fields) >= 4 and not line.lstrip().startswith("#") and FSTAB_TAG in fields[3].split(",")
        return is_tagged or line.strip() == FSTAB_MARKER

    return [line for line in text.splitlines() if not ours(line)]


def fstab_without_ours(text: str) -> str:
    """fstab text without our tagged lines (deprovision); unchanged when there are none."""
    kept = fstab_lines_not_ours(text)
    return text if len(kept) == len(text.splitlines()) else "\n".join(kept) + ("\n" if kept else "")


def block_device_probe(device: str) -> dict[str, str]:
    """What is on a block device or image (blkid's TYPE, PTTYPE, UUID...); {} when nothing."""
    found = run_command(["blkid", "-p", "-o", "export", device], sudo=True, check=False, timeout_s=60)
    if found.returncode == 2:  # blkid: nothing found
        return {}
    if found.returncode != 0:
        raise CommandError(f"blkid {device} exited with {found.returncode}", found)
    pairs = (line.partition("=") for line in found.output.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def block_device_size(device: str) -> int | None:
    """Size in bytes from sysfs (no root needed); None when unknown."""
    name = os.path.basename(os.path.realpath(device))
    try:
        with open(f"/sys/class/block/{name}/size", encoding="ascii") as f:
            return int(f.read().strip()) * 512
    except (OSError, ValueError):
        return None


def mounted_sources() -> dict[str, str]:
    """Real path of every mounted block device -> where it is mounted."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith("/dev/"):
                out.setdefault(os.path.realpath(fields[0]), fields[1])
    return out


def data_disk_verdict(candidate: str, min_bytes: int) -> str | None:
    """None when `candidate` is a usable data disk, else why not."""
    try:
        if not stat.S_ISBLK(os.stat(candidate).st_mode):
            return "not a block device"
    except OSError:
        return "not there"
    where = mounted_sources().get(os.path.realpath(candidate))
    if where is not None:
        return f"mounted at {where}"
    size = block_device_size(candidate)
    if size is None:
        return "size unknown"
    if size < min_bytes:
        return f"{size / 2**30:.1f} GiB, less than the minimum {min_bytes / 2**30:g} GiB"
    return None


def wait_for_block_device(candidates: Sequence[str], wait_s: int, min_bytes: int, log: Log) -> str:
    """The first candidate that is a block device, not mounted and at least
    min_bytes big (the boot disk was once taken for the data disk), waiting up
    to wait_s for one to appear."""
    deadline = time.monotonic() + wait_s
    said = 0.0
    while True:
        why = {candidate: data_disk_verdict(candidate, min_bytes) for candidate in candidates}
        for candidate, verdict in why.items():
            if verdict is None:
                return candidate
        if time.monotonic() >= deadline:
            raise BootstrapError(
                f"no usable data disk within {wait_s}s: " + "; ".join(f"{c}: {w}" for c, w in why.items()),
                hint="Attach the data disk (unmounted, at least btrfs.data_disk.min_size_gb GiB), or fix "
                "btrfs.data_disk.candidates. With a data disk configured the bootstrap never falls back "
                "to a loop image.",
            )
        if time.monotonic() - said >= 15:
            log.info(f"waiting for a data disk: {', '.join(candidates)}", event="disk_wait")
            said = time.monotonic()
        time.sleep(1)


def render_grow_helper(mount_point: str, image_path: str | None, env_file: str) -> str:
    """/usr/local/sbin/cocalc-grow-btrfs [GB], root only, the command line upstream's
    self-host connector and project-host call through sudo: for a loop image,
    grow the file to GB (never shrinks), `losetup -c`, resize, record the size
    (COCALC_BTRFS_IMAGE_GB in the env file); for a device, only the resize.
    Without GB it just fills the device (what the boot-time unit runs)."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Written by bootstrap.py; edits are overwritten.",
        "# cocalc-grow-btrfs [GB]: grow the btrfs filesystem at " + mount_point + ".",
        "set -eu",
        f"MP={q(mount_point)}",
        f"ENV_FILE={q(env_file)}",
        "usage() {",
        '  echo "usage: cocalc-grow-btrfs [GB]   (as root; GB: new size of the loop image, never shrinks)" >&2',
        "  exit 2",
        "}",
        "[ $# -le 1 ] || usage",
        "GB=${1:-}",
        'case $GB in *[!0-9]*) echo "cocalc-grow-btrfs: GB must be a whole number, got \\"$GB\\"" >&2; usage;; esac',
        '[ "$(id -u)" -eq 0 ] || { echo "cocalc-grow-btrfs: run it as root (sudo)" >&2; exit 1; }',
        'mountpoint -q "$MP" || { echo "cocalc-grow-btrfs: nothing is mounted at $MP" >&2; exit 1; }',
    ]
    if image_path is not None:
        lines += [
            f"IMAGE={q(image_path)}",
            'if [ -n "$GB" ]; then truncate -s ">${GB}G" "$IMAGE"; fi',
            'dev=$(losetup -n -O NAME -j "$IMAGE" | head -n 1)',
            '[ -n "$dev" ] || { echo "cocalc-grow-btrfs: $IMAGE is not attached to a loop device" >&2; exit 1; }',
            'losetup -c "$dev"',
            'btrfs filesystem resize max "$MP" >/dev/null',
            'size=$(( $(stat -c %s "$IMAGE") / 1073741824 ))',
            'if [ -f "$ENV_FILE" ] && ! grep -qx "COCALC_BTRFS_IMAGE_GB=$size" "$ENV_FILE"; then',
            '  sed -i "s/^COCALC_BTRFS_IMAGE_GB=.*/COCALC_BTRFS_IMAGE_GB=$size/" "$ENV_FILE"',
            "fi",
        ]
    else:
        lines += [
            '[ -z "$GB" ] || echo "cocalc-grow-btrfs: $MP is on a disk: grow the disk itself; resizing to fill it" >&2',
            'btrfs filesystem resize max "$MP" >/dev/null',
        ]
    lines += ['df -h "$MP"']
    return "\n".join(lines) + "\n"


# -- the service ----------------------------------------------------------------------


def systemd_quote(value: str) -> str:
    """A unit-file value: specifiers (%) escaped, quoted when it has spaces."""
    value = value.replace("%", "%%")
    if re.search(r"[\s\"'\\]", value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


ENV_PLAIN_RE = re.compile(r"[A-Za-z0-9_@%+=:,./*\[\]-]*")


def env_line(key: str, value: str) -> str:
    """KEY=VALUE that systemd's EnvironmentFile= and the daemon's own parser
    (plain KEY=VALUE, one pair of surrounding quotes stripped, no escapes)
    read as the same value: plain when it is plain, else in single quotes
    (literal for systemd), else in double quotes when nothing in it is an
    escape for systemd; anything else cannot be written so both agree."""
    if "\n" in value or "\0" in value or "\r" in value:
        raise BootstrapError(f"env {key}: the value has a line break or NUL", hint="Fix env in the host's config.")
    if ENV_PLAIN_RE.fullmatch(value):
        return f"{key}={value}"
    if "'" not in value:
        return f"{key}='{value}'"
    if not re.search(r'["\\`$]', value):
        return f'{key}="{value}"'
    raise BootstrapError(
        f'env {key}: the value has a single quote and one of " \\ ` $, '
        "which systemd and the daemon would read differently",
        hint="Change the value in the host's config (env or the daemon section).",
    )


def http_status(url: str, timeout_s: float) -> tuple[int | None, str]:
    """(status, what happened) of one GET; status None when nothing answered."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": USER_AGENT}), timeout=timeout_s
        ) as response:
            return int(response.status), f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        e.close()
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return None, str(getattr(e, "reason", None) or e)


def wait_until_healthy(url: str, timeout_s: float, *, poll_s: float = 0.5, first_poll_s: float = 0.02) -> str:
    """The first 2xx answer of `url` within timeout_s. Asked again after 20 ms, doubling up to
    poll_s: a restarted daemon is usually up within a few tens of ms (a fixed 0.5 s was most of an
    upgrade's restart), and a refused connection costs next to nothing."""
    deadline = time.monotonic() + timeout_s
    delay = first_poll_s
    while True:
        status, what = http_status(url, timeout_s=5)
        if status is not None and 200 <= status < 300:
            return what
        if time.monotonic() >= deadline:
            raise BootstrapError(f"{url} not healthy after {timeout_s:g}s (last answer: {what})")
        time.sleep(min(delay, poll_s))
        delay *= 2


def tcp_reachable(url: str, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to the URL's host and port succeeds, else why not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port}: {e.strerror or e}"


# ============================================================================
# layout: Where things live on the host, and the files rendered from the config.
# ============================================================================

# -- where things go ---------------------------------------------------------------

BOOTSTRAP_SUBDIRS = ("bin", "bootstrap", "bundles", "config", "logs")
ARCHIVE_SUFFIX_RE = re.compile(r"(\.tar\.(?:xz|gz|zst|zstd|bz2)|\.t[gx]z|\.tzst|\.tar)$")


DONE_FILE_NAME = ".bootstrap_done"


def done_marker(config: Config) -> Path:
    """Written by the final step once the host is bootstrapped; read by `status`."""
    return Path(config.bootstrap_dir) / DONE_FILE_NAME


def read_token(path: Path) -> str | None:
    """The bootstrap token (its own 0600 file); None when it is not there."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if token:
        REDACTOR.add(token)
    return token or None


def bundles_dir(config: Config) -> Path:
    return Path(config.bootstrap_root) / "bundles"


def downloads_dir(config: Config) -> Path:
    return bundles_dir(config) / ".downloads"


def secrets_dir(config: Config) -> Path:
    """Where upstream's daemon reads its secrets (conat-password): /btrfs/data/secrets, 0700."""
    return Path(config.btrfs.mount_point) / "data" / "secrets"


def secrets_staging_dir(config: Config) -> Path:
    """Where the secrets step puts what it fetched (0700, files 0600) until
    /btrfs is mounted and install_secrets moves them to secrets_dir()."""
    return Path(config.bootstrap_dir) / "secrets-staging"


def btrfs_image_part(config: Config) -> Path:
    """Where the loop image is made (truncate + mkfs.btrfs) before it is renamed
    to btrfs.image_path: a killed mkfs leaves only this, which the next run removes."""
    image = Path(config.btrfs.image_path)
    return image.with_name(image.name + ".part")


def nvm_dir(config: Config) -> Path:
    return Path(config.home) / ".nvm"


def node_dir(config: Config) -> Path:
    return nvm_dir(config) / "versions" / "node" / f"v{config.node.version}"


def artifact_archive(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    m = ARCHIVE_SUFFIX_RE.search(url_basename(spec.url))
    return downloads_dir(config) / f"{artifact}-{spec.version}{m.group(1) if m else '.archive'}"


def bundle_version_dir(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    return bundles_dir(config) / artifact / spec.version


def bundle_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    """This version is completely installed (and is the artifact the config names)."""
    version_dir = bundle_version_dir(config, artifact, spec)
    marker = read_marker(version_dir)
    return (
        marker is not None
        and (spec.sha256 is None or marker.get("sha256") == spec.sha256)
        and not bundle_problems(version_dir, spec.expected_files, spec.executables)
    )


# -- rendered files ------------------------------------------------------------------


# Where upstream (the daemon, the self-host connector, the hub) looks for things.
GROW_HELPER = Path("/usr/local/sbin/cocalc-grow-btrfs")
GROW_UNIT = "cocalc-grow-btrfs"
SYSTEM_DONE_MARKER = Path("/var/lib/cocalc") / DONE_FILE_NAME
SSH_PORT = 2222


def data_dir(config: Config) -> Path:
    """/btrfs/data: the daemon's DATA (a subvolume owned by the user)."""
    return Path(config.btrfs.mount_point) / "data"


def data_tmp_dir(config: Config) -> Path:
    return data_dir(config) / "tmp"


def image_size_gb(config: Config) -> int:
    """The loop image's size as recorded: the configured size, or more once
    cocalc-grow-btrfs grew the image (it never shrinks)."""
    try:
        actual = Path(config.btrfs.image_path).stat().st_size // 2**30
    except OSError:
        actual = 0
    return max(config.btrfs.image_size_gb, actual)


def daemon_urls(config: Config) -> tuple[str | None, str | None, str | None]:
    """(public URL, internal URL, ssh server) as upstream derives them:
    the host record's values, else from the public IP."""
    d = config.daemon
    ip = d.public_ip
    host = None if ip is None else (f"[{ip}]" if ":" in ip else ip)
    tunnel = f"https://{config.cloudflared.hostname}" if config.cloudflared else None
    public = tunnel or d.public_url or (f"https://{host}" if host else None)
    internal = d.internal_url or public
    ssh = d.ssh_server or (f"{host}:{SSH_PORT}" if host else None)
    return public, internal, ssh


def daemon_env(config: Config) -> dict[str, str]:
    """The keys the real daemon reads (UPSTREAM 13), from this project's layout;
    then config.env (the hub's extra entries), which wins."""
    mp = config.btrfs.mount_point
    d = config.daemon
    public, internal, ssh = daemon_urls(config)
    # behind a tunnel: cloudflared's port, and no TLS (cloudflared terminates it)
    port, https = (config.cloudflared.port, False) if config.cloudflared else (d.port, d.https)
    tools = str(bundles_dir(config) / "tools" / "current")
    values = {
        "MASTER_CONAT_SERVER": config.conat_urls[0],
        "PROJECT_HOST_ID": config.host.id,
        "PROJECT_HOST_NAME": config.host.name,
        "PROJECT_HOST_REGION": d.region,
        "PROJECT_HOST_PUBLIC_URL": public,
        "PROJECT_HOST_INTERNAL_URL": internal,
        "PROJECT_HOST_SSH_SERVER": ssh,
        "COCALC_SSH_SERVER": f"0.0.0.0:{SSH_PORT}",
        "PROJECT_RUNNER_NAME": "0",
        "COCALC_FILE_SERVER_MOUNTPOINT": mp,
        "DATA": str(data_dir(config)),
        "COCALC_DATA": str(data_dir(config)),
        "COCALC_LITE_SQLITE_FILENAME": str(data_dir(config) / "sqlite.db"),
        "COCALC_PROJECT_BUNDLES": str(bundles_dir(config) / "project"),
        "COCALC_PROJECT_TOOLS": tools,
        "COCALC_BIN_PATH": tools,
        "COCALC_SYNC_PROJECTS": f"{mp}/project-[project_id]/.local/share/cocalc/persist",
        "COCALC_BTRFS_IMAGE_GB": None if config.btrfs.data_disk else str(image_size_gb(config)),
        "COCALC_PROJECT_HOST_SOFTWARE_BASE_URL": d.software_base_url,
        "TMPDIR": str(data_tmp_dir(config)),
        "TMP": str(data_tmp_dir(config)),
        "TEMP": str(data_tmp_dir(config)),
        "HOST": "0.0.0.0",  # noqa: S104 (the daemon serves the world, as upstream)
        "PORT": str(port),
        "COCALC_PROJECT_HOST_HTTPS": "1" if https else "0",
        "COCALC_PROJECT_HOST_HTTPS_HOSTNAME": d.https_hostname if https else None,
        "DEBUG": "cocalc:*",
        "DEBUG_CONSOLE": "yes",
        # ours: where the bootstrap keeps things, and node on PATH
        "COCALC_BOOTSTRAP_ROOT": config.bootstrap_root,
        "HOME": config.home,
        "NVM_DIR": str(nvm_dir(config)),
        "PATH": f"{node_dir(config) / 'bin'}:{BASE_PATH}",
    }
    out = {key: value for key, value in values.items() if value is not None}
    out |= dict(config.env)
    return out


def render_env_file(config: Config) -> str:
    """/etc/cocalc/project-host.env: the daemon's environment (no secrets:
    those are files in /btrfs/data/secrets). Read the same by systemd's
    EnvironmentFile= and by the daemon's own parser (see env_line)."""
    header = "# Written by bootstrap.py from the host's config; edits are overwritten.\n"
    return header + "".join(env_line(key, value) + "\n" for key, value in daemon_env(config).items())


def render_unit(config: Config, group: str) -> str:
    """The project-host daemon's systemd unit: in the foreground, as the user,
    after /btrfs is mounted and cocalc-grow-btrfs has run."""
    service = config.service
    exec_path = f"{bundles_dir(config)}/project_host/current/{service.exec}"
    argv = " ".join(systemd_quote(a) for a in (exec_path, *service.args))
    port = config.cloudflared.port if config.cloudflared else config.daemon.port
    caps = ["AmbientCapabilities=CAP_NET_BIND_SERVICE"] if port < 1024 else []
    return "\n".join(
        [
            "# Written by bootstrap.py from the host's config; edits are overwritten.",
            "[Unit]",
            "Description=CoCalc project host",
            f"Wants=network-online.target {GROW_UNIT}.service",
            f"After=network-online.target {GROW_UNIT}.service",
            f"RequiresMountsFor={systemd_quote(config.btrfs.mount_point)}",
            "",
            "[Service]",
            "Type=simple",
            f"User={config.bootstrap_user}",
            f"Group={group}",
            f"WorkingDirectory={systemd_quote(config.bootstrap_root)}",
            f"EnvironmentFile={ENV_FILE}",
            f"ExecStart={argv}",
            *caps,
            "Restart=on-failure",
            "RestartSec=2",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


CLOUDFLARED_DIR = Path("/etc/cloudflared")
CLOUDFLARED_TOKEN_ENV = CLOUDFLARED_DIR / "token.env"
CLOUDFLARED_CONFIG = CLOUDFLARED_DIR / "config.yml"
CLOUDFLARED_UNIT = "cocalc-cloudflared"
TUNNEL_TOKEN_RE = re.compile(r"[A-Za-z0-9+/=_.-]{16,4096}")


def render_cloudflared_config(hostname: str, port: int) -> str:
    """Ingress to the daemon's port, everything else 404 (upstream's config.yml)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "ingress:",
            f"  - hostname: {hostname}",
            f"    service: http://localhost:{port}",
            "  - service: http_status:404",
            "",
        ]
    )


def render_cloudflared_unit() -> str:
    """cloudflared reads the token from TUNNEL_TOKEN (the 0600 env file): never on
    its command line, where `ps` would show it (the old unit's mistake)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Cloudflare tunnel to the CoCalc project host",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"EnvironmentFile={CLOUDFLARED_TOKEN_ENV}",
            f"ExecStart=/usr/bin/cloudflared --no-autoupdate --config {CLOUDFLARED_CONFIG} tunnel run",
            "Restart=always",
            "RestartSec=5",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def render_grow_unit(config: Config) -> str:
    """Runs cocalc-grow-btrfs at every boot, before the daemon (as the old start script did)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            f"Description=Grow the btrfs filesystem at {config.btrfs.mount_point} to fill its disk or image",
            f"RequiresMountsFor={systemd_quote(config.btrfs.mount_point)}",
            f"Before={config.service.unit}.service",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            f"ExecStart={GROW_HELPER}",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def render_readme(config: Config) -> str:
    return textwrap.dedent(
        f"""\
        This directory belongs to CoCalc's project-host bootstrap (bootstrap.py).

          bin/        helpers: env.sh (source it for node on PATH)
          bootstrap/  the bootstrap itself: stub, config, token, state.json, logs of past runs
          bundles/    <artifact>/<version>, and <artifact>/current -> the version in use
          config/     bootstrap.json (the config as applied); secrets are in /btrfs/data/secrets
          logs/       bootstrap.log (JSON lines)

        The daemon runs as the systemd unit {config.service.unit}.service with
        /etc/cocalc/project-host.env; sudo {GROW_HELPER} [GB] grows /btrfs; `python3 bootstrap/bootstrap.py --config
        bootstrap/bootstrap-config.json status` says how the last run went.
        Re-running the bootstrap is safe: it only changes what differs.
        """
    )


def render_env_helper(config: Config) -> str:
    q = shlex.quote
    return textwrap.dedent(
        f"""\
        # Source this (". {q(str(Path(config.bootstrap_root) / "bin" / "env.sh"))}") for the bootstrap's environment.
        export COCALC_BOOTSTRAP_ROOT={q(config.bootstrap_root)}
        export NVM_DIR={q(str(nvm_dir(config)))}
        export PATH={q(str(Path(config.bootstrap_root) / "bin"))}:{q(str(node_dir(config) / "bin"))}:"$PATH"
        """
    )


# ============================================================================
# credentials: The host credential: what this host shows the hub, and its rotation.
# ============================================================================


CREDENTIAL_FILE_NAME = "host-credential"
CREDENTIAL_RE = re.compile(r"cchc_[A-Za-z0-9_-]{43}")
ROTATE_TIMEOUT_S = 10.0


def credential_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / CREDENTIAL_FILE_NAME


def rotate_after_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / f"{CREDENTIAL_FILE_NAME}.rotate-after"


def read_credential(config: Config) -> str | None:
    """The host credential, or None when there is none (or the file holds something else)."""
    try:
        text = credential_path(config).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not CREDENTIAL_RE.fullmatch(text):
        return None
    REDACTOR.add(text)
    return text


def host_auth(config: Config) -> str | None:
    """What this host sends as `Authorization: Bearer`: its credential, else
    (a host set up by an older stub) its bootstrap token, else None."""
    return read_credential(config) or read_token(config.token_file)


def parse_time(text: str) -> datetime.datetime | None:
    """An ISO 8601 UTC time as the hub writes it (2026-01-01T00:00:00.000Z); None when it is not one."""
    text = text.strip()
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", text):
        return None
    try:
        return datetime.datetime.fromisoformat(text[:-1]).replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def rotation_due(config: Config, now: datetime.datetime) -> bool:
    """Due when the hub's time has passed, or when this host does not know it."""
    try:
        when = parse_time(rotate_after_path(config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        when = None
    return when is None or when <= now


def rotate_if_due(
    config: Config,
    log: Log,
    *,
    now: datetime.datetime | None = None,
    timeout_s: float = ROTATE_TIMEOUT_S,
) -> str | None:
    """The credential to use from now on: a successor when the rotation was
    due and the hub gave one, else the current one (or the token fallback).
    Never raises for the hub's reasons; says what happened in the log."""
    current = read_credential(config)
    if current is None:
        return host_auth(config)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not rotation_due(config, now):
        return current
    url = f"{config.hub.url.rstrip('/')}/credential"
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Authorization": f"Bearer {current}"})
    try:
        with open_request(request, timeout_s) as response:
            answer = json.loads(response.read(4096).decode("utf-8"))
    except urllib.error.HTTPError as e:
        code = ""
        with contextlib.suppress(Exception):
            code = str(json.loads(e.read(1024).decode("utf-8")).get("code", ""))
        log.warn(
            f"the hub refused to rotate this host's credential (HTTP {e.code}{', ' + code if code else ''}); "
            "keeping the current one",
            event="credential",
        )
        return current
    except (RedirectRefused, OSError, http.client.HTTPException, ValueError) as e:
        log.warn(f"cannot rotate this host's credential now ({e}); trying again on the next run", event="credential")
        return current
    if not isinstance(answer, dict):
        log.warn("the hub's answer to the rotation is not a JSON object; keeping the current credential")
        return current
    successor = answer.get("credential")
    rotate_after = answer.get("rotate_after")
    if successor is not None and not (isinstance(successor, str) and CREDENTIAL_RE.fullmatch(successor)):
        log.warn("the hub's answer to the rotation holds no valid credential; keeping the current one")
        return current
    if successor is not None:
        REDACTOR.add(successor)
        atomic_write_text(credential_path(config), successor + "\n", 0o600)
        log.info(f"rotated this host's credential ({credential_path(config)}, 0600)", event="credential")
    if isinstance(rotate_after, str) and parse_time(rotate_after) is not None:
        atomic_write_text(rotate_after_path(config), rotate_after.strip() + "\n", 0o600)
    return successor or current


# ============================================================================
# debris: What a killed run of ours leaves behind, removed by the next run (and only that).
# ============================================================================

# A run killed (SIGKILL, power cut) between creating a temporary and renaming
# it leaves the temporary. The names are ours alone, so they are recognised
# exactly and removed at the start of the next run, under the run lock (no
# other run of ours is writing them):
# - atomic_write_text: `.<name>.<8 mkstemp chars>.tmp` beside the file, in our
#   own directories;
# - write_root_file: `.<name>.<8 hex>.tmp` beside a root file we replace
#   (fstab, the env file, the unit), and its source `cocalc-bootstrap-<8>` in
#   the temp directory;
# - point_symlink: `.<link>-<8 hex>` beside the link;
# - install_archive: `.staging-*` directories beside the version directories
#   (also removed before every install; here too, so a run whose install is
#   already done cleans them as well).
# - BtrfsStep.make_image: `<btrfs.image_path>.part`, root's (made with sudo):
#   a loop image whose truncate or mkfs.btrfs was cut short;
# - the secrets step: its staging directory's temporaries (atomic_write_text).
# Partial downloads (`.part`) are not debris: the next download resumes them.

ATOMIC_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
ROOT_TMP_RE = r"^\.{name}\.[0-9a-f]{{8}}\.tmp$"
ROOT_SOURCE_RE = re.compile(r"^cocalc-bootstrap-[a-z0-9_]{8}$")
LINK_TMP_RE = re.compile(r"^\..+-[0-9a-f]{8}$")
EVENTS_SUBDIR = "events"
# Also searched for write_root_file's sources (the run's TMPDIR may differ from the last one's).
SYSTEM_TMP = Path("/tmp")  # noqa: S108 - only our own are removed, by name and owner


def our_dirs(config: Config) -> list[Path]:
    """Every directory of ours that atomic_write_text writes into."""
    root = Path(config.bootstrap_root)
    dirs = [root, *(root / d for d in BOOTSTRAP_SUBDIRS)]
    dirs += [Path(config.bootstrap_dir), Path(config.bootstrap_dir) / EVENTS_SUBDIR]
    dirs += [secrets_dir(config), secrets_staging_dir(config)]
    dirs += [downloads_dir(config), nvm_dir(config), nvm_dir(config) / "alias"]
    return dirs


def bundle_dirs(config: Config) -> list[Path]:
    """bundles/<artifact> and Node's versions directory: where staging and link temporaries appear."""
    found: list[Path] = [nvm_dir(config) / "versions" / "node"]
    with contextlib.suppress(OSError):
        found += [p for p in bundles_dir(config).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def _entries(directory: Path) -> Iterable[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            yield from list(it)
    except OSError:
        return


def remove_debris(config: Config, log: Log) -> list[str]:
    """Remove what a killed run of ours left; returns the paths removed (logged)."""
    removed: list[str] = []
    uid = os.getuid()

    def gone(path: str) -> None:
        removed.append(path)

    for directory in our_dirs(config):
        for entry in _entries(directory):
            if ATOMIC_TMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    gone(entry.path)
    for directory in bundle_dirs(config):
        for entry in _entries(directory):
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                gone(entry.path)
            elif LINK_TMP_RE.match(entry.name) and entry.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    gone(entry.path)
    # write_root_file's sources: ours (our uid), in the temp directory
    for directory in {Path(tempfile.gettempdir()), SYSTEM_TMP}:
        for entry in _entries(directory):
            if ROOT_SOURCE_RE.match(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        gone(entry.path)
    # write_root_file's staged copies beside the root files we replace (root-owned: removed with sudo)
    root_debris: list[str] = []
    for target in (FSTAB, ENV_FILE, SYSTEMD_UNIT_DIR / f"{config.service.unit}.service"):
        pattern = re.compile(ROOT_TMP_RE.format(name=re.escape(target.name)))
        root_debris += [e.path for e in _entries(target.parent) if pattern.match(e.name)]
    # a loop image made at <image>.part whose mkfs a kill cut short (a regular file of root's)
    part = btrfs_image_part(config)
    with contextlib.suppress(OSError):
        st = part.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
            root_debris.append(str(part))
    if root_debris:
        run_command(["rm", "-f", "--", *root_debris], sudo=True, check=False, timeout_s=30)
        removed += root_debris
    if removed:
        log.info(f"removed {len(removed)} leftover(s) of an earlier killed run: {' '.join(sorted(removed))[:1000]}")
    return removed


# ============================================================================
# images: Bundle images: a read-only squashfs (zstd) mounted instead of an extracted archive.
# ============================================================================


IMAGES_DIR = Path("/var/lib/cocalc/bundle-images")
IMAGE_SUFFIX = ".sqfs"
IMAGE_MOUNT_OPTIONS = "ro,nosuid,nodev,loop,nofail"
IMAGE_HINT = (
    "The bundle image is corrupt or not what the config expects (see the message); nothing was mounted. "
    "Run again to download it anew, or publish a good image (pnpm bundle-image)."
)

# A 4 KiB squashfs (zstd) holding one file `ok` = "zstd\n", built by
# `mksquashfs p probe.sqfs -comp zstd -all-root -all-time 0 -mkfs-time 0 -no-xattrs -no-exports`.
PROBE_IMAGE_Z = (
    "eNrLKC4sZmKAASYGRiDJxiDI4MDEyMACZCtAZa5C6bNQ+j8UpEL5U6H0fjT5quKSFC49Bo2t+n8VHHQZGU4wMSxhBNrCClTDyPCWkYFJEshiBmIWhvWC"
    "CtYOSeIZjGINMAcxIjksP1ugIQHKZ4VKrYXyWcA6jjOMglEwCkbBKBgFo2AUjIJRMApGwSgYBaMACwAAqgsjRw=="
)
PROBE_CONTENT = b"zstd\n"

_support_lock = threading.Lock()
_support: list[str | None] = []  # [reason images cannot be used, or None]: probed once per process


def probe_image_bytes() -> bytes:
    return zlib.decompress(base64.b64decode(PROBE_IMAGE_Z))


def kernel_has_squashfs() -> bool:
    return any(line.split()[-1:] == ["squashfs"] for line in read_text_or("/proc/filesystems").splitlines())


def probe_squashfs_zstd() -> str | None:
    """None when this kernel mounts a zstd squashfs through a loop device; else why not."""
    if not kernel_has_squashfs():
        run_command(["modprobe", "squashfs"], sudo=True, check=False, timeout_s=60)
        if not kernel_has_squashfs():
            return "the kernel has no squashfs (not in /proc/filesystems, modprobe squashfs failed)"
    with tempfile.TemporaryDirectory(prefix="cocalc-image-probe-") as tmp:
        image, mount_point = Path(tmp) / "probe.sqfs", Path(tmp) / "mnt"
        image.write_bytes(probe_image_bytes())
        mount_point.mkdir()
        done = run_command(
            ["mount", "-t", "squashfs", "-o", "ro,nosuid,nodev,noexec,loop", str(image), str(mount_point)],
            sudo=True,
            check=False,
            timeout_s=60,
        )
        if done.returncode != 0:
            return f"mounting a zstd squashfs failed: {done.output.strip()[-300:]}"
        try:
            content = (mount_point / "ok").read_bytes()
        except OSError as e:
            content = f"unreadable: {e}".encode()
        finally:
            run_command(["umount", str(mount_point)], sudo=True, check=False, timeout_s=60)
        if content != PROBE_CONTENT:
            return f"a mounted zstd squashfs reads wrong ({content[:40]!r})"
    return None


def images_unsupported(log: Log) -> str | None:
    """Why this host cannot mount bundle images (None: it can); probed once, said once."""
    with _support_lock:
        if not _support:
            reason = probe_squashfs_zstd()
            _support.append(reason)
            if reason:
                log.warn(f"bundle images cannot be mounted here ({reason}); installing the archives instead")
            else:
                log.info("the kernel mounts zstd squashfs: bundle images are mounted, not extracted")
        return _support[0]


# -- where things are --------------------------------------------------------------


def stored_image(artifact: str, version: str) -> Path:
    return IMAGES_DIR / artifact / f"{version}{IMAGE_SUFFIX}"


def image_record(artifact: str, version: str) -> Path:
    """Root-owned: the sha256 the stored image had when it was moved in and verified."""
    return IMAGES_DIR / artifact / f"{version}{IMAGE_SUFFIX}.sha256"


def image_download(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    return downloads_dir(config) / f"{artifact}-{spec.version}{IMAGE_SUFFIX}"


def version_dir(config: Config, artifact: str, version: str) -> Path:
    return bundles_dir(config) / artifact / version


def mount_unit_name(where: Path) -> str:
    """systemd's name for the mount unit of `where`, as `systemd-escape --path --suffix=mount`
    gives it (computed here: check() runs no command for an installed image)."""
    path = str(where).strip("/")
    if not path:
        return "-.mount"
    out = []
    for i, byte in enumerate(path.encode()):
        c = chr(byte)
        if c == "/":
            out.append("-")
        elif (c.isascii() and (c.isalnum() or c in ":_.")) and not (c == "." and i == 0):
            out.append(c)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) + ".mount"


def unit_enabled(config: Config, unit: str) -> bool:
    """`systemctl enable` made its links for every WantedBy= of our mount units."""
    wanted_by = ("multi-user.target", f"{config.service.unit}.service")
    return all((SYSTEMD_UNIT_DIR / f"{t}.wants" / unit).is_symlink() for t in wanted_by)


def render_mount_unit(config: Config, artifact: str, version: str) -> str:
    service = f"{config.service.unit}.service"
    return "\n".join(
        [
            "# Written by bootstrap.py: a bundle image, mounted read-only at every boot; removed when pruned.",
            "[Unit]",
            f"Description=CoCalc bundle {artifact} {version} (read-only image)",
            f"RequiresMountsFor={systemd_quote(str(IMAGES_DIR / artifact))}",
            f"Before={service}",
            "",
            "[Mount]",
            f"What={systemd_quote(str(stored_image(artifact, version)))}",
            f"Where={systemd_quote(str(version_dir(config, artifact, version)))}",
            "Type=squashfs",
            f"Options={IMAGE_MOUNT_OPTIONS}",
            "",
            "[Install]",
            f"WantedBy=multi-user.target {service}",
            "",
        ]
    )


def loop_backing_file(source: str) -> str | None:
    """The file behind /dev/loopN (as this mount namespace names it), or None."""
    name = os.path.basename(source)
    if not name.startswith("loop"):
        return None
    text = read_text_or(f"/sys/block/{name}/loop/backing_file").strip()
    return text or None


def mounted_image(where: Path) -> str | None:
    """The image file mounted at `where` as squashfs, or None."""
    found = mount_at(str(where))
    if found is None or found[1] != "squashfs":
        return None
    return loop_backing_file(found[0]) or found[0]


def image_problems(config: Config, artifact: str, spec: ArtifactSpec) -> list[str]:
    """What is missing for this version to be installed as a mounted image ([] = installed)."""
    assert spec.image is not None
    version, where = spec.version, version_dir(config, artifact, spec.version)
    problems = []
    if read_text_or(image_record(artifact, version)).strip() != spec.image.sha256:
        return [f"no verified image of {artifact} {version} in {IMAGES_DIR}"]
    unit = mount_unit_name(where)
    if not file_matches(SYSTEMD_UNIT_DIR / unit, render_mount_unit(config, artifact, version), mode=0o644):
        problems.append(f"{SYSTEMD_UNIT_DIR / unit} is missing or differs")
    elif not unit_enabled(config, unit):
        problems.append(f"{unit} is not enabled")
    if mounted_image(where) != str(stored_image(artifact, version)):
        problems.append(f"{stored_image(artifact, version)} is not mounted at {where}")
    else:
        problems += bundle_problems(where, spec.expected_files, spec.executables)
    return problems


def image_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    return spec.image is not None and not image_problems(config, artifact, spec)


def archive_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    """An extracted (archive) install of this version: kept, never replaced by an image."""
    where = version_dir(config, artifact, spec.version)
    marker = read_marker(where) if mounted_image(where) is None else None
    return marker is not None and (spec.sha256 is None or marker.get("sha256") == spec.sha256)


def chosen_format(config: Config, artifact: str, spec: ArtifactSpec) -> bool | None:
    """Image (True) or archive (False) when the host's state already says; None: only the probe can.
    A verified download counts: it was chosen by an earlier run's probe (so check() never probes)."""
    if spec.image is None or archive_installed(config, artifact, spec):
        return False
    if image_installed(config, artifact, spec) or verified_download(
        image_download(config, artifact, spec), spec.image.sha256
    ):
        return True
    if verified_download(artifact_archive(config, artifact, spec), spec.sha256):
        return False
    return None


def wants_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> bool:
    """Install this artifact from its image (else from its archive)? Probes the kernel when undecided."""
    chosen = chosen_format(config, artifact, spec)
    return chosen if chosen is not None else images_unsupported(log) is None


# -- install -----------------------------------------------------------------------


def store_verified_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> Path:
    """Move the download into the root-owned store and verify it there; return it."""
    assert spec.image is not None
    stored, record = stored_image(artifact, spec.version), image_record(artifact, spec.version)
    if read_text_or(record).strip() == spec.image.sha256 and stored.is_file():
        return stored
    download = image_download(config, artifact, spec)
    if not download.is_file():
        raise BootstrapError(f"{download} is missing", hint="Run the bootstrap again: the download step fetches it.")
    make_root_dirs(stored.parent)
    part = stored.with_name(stored.name + ".part")
    run_command(["mv", "-f", "-T", str(download), str(part)], sudo=True, timeout_s=600)
    run_command(["chown", "root:root", str(part)], sudo=True, timeout_s=30)
    run_command(["chmod", "0444", str(part)], sudo=True, timeout_s=30)
    actual = file_sha256(part)  # root's file in root's directory now: this is what gets mounted
    if actual != spec.image.sha256:
        run_command(["rm", "-f", str(part)], sudo=True, check=False, timeout_s=30)
        with contextlib.suppress(FileNotFoundError):
            download.with_name(download.name + ".sha256").unlink()
        raise BootstrapError(
            f"{artifact} {spec.version}: the image's sha256 is {actual}, not {spec.image.sha256}; "
            "refused before mounting",
            hint=IMAGE_HINT,
        )
    run_command(["mv", "-f", "-T", str(part), str(stored)], sudo=True, timeout_s=30)
    write_root_file(record, spec.image.sha256 + "\n", mode=0o644)
    with contextlib.suppress(FileNotFoundError):
        download.with_name(download.name + ".sha256").unlink()
    log.info(f"verified {stored.name} ({stored.stat().st_size} bytes) in {stored.parent}")
    return stored


def clear_mount_point(where: Path, log: Log) -> None:
    """An empty directory to mount on: a foreign mount is unmounted, leftovers set aside and removed."""
    if mount_at(str(where)) is not None:
        run_command(["umount", str(where)], sudo=True, timeout_s=120, hint=IMAGE_HINT)
        log.warn(f"unmounted a stale mount at {where}")
    if where.is_symlink() or (where.exists() and (not where.is_dir() or any(where.iterdir()))):
        aside = where.with_name(f".staging-{where.name}-old-{os.getpid()}")
        where.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        log.warn(f"removed a leftover {where} to mount the image there")
    where.mkdir(parents=True, exist_ok=True, mode=0o755)


def install_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> None:
    """Verified image -> root's store -> mount unit written, enabled, started; checked."""
    assert spec.image is not None
    stored = store_verified_image(config, artifact, spec, log)
    where = version_dir(config, artifact, spec.version)
    unit = mount_unit_name(where)
    unit_text = render_mount_unit(config, artifact, spec.version)
    if mounted_image(where) != str(stored):
        clear_mount_point(where, log)
    if not file_matches(SYSTEMD_UNIT_DIR / unit, unit_text, mode=0o644):
        write_root_file(SYSTEMD_UNIT_DIR / unit, unit_text, mode=0o644)
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    if not unit_enabled(config, unit):
        run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
    if mounted_image(where) != str(stored):
        run_command(["systemctl", "start", unit], sudo=True, timeout_s=120, hint=IMAGE_HINT)
    problems = image_problems(config, artifact, spec)
    if problems:
        run_command(["systemctl", "stop", unit], sudo=True, check=False, timeout_s=120)
        raise BootstrapError(
            f"{artifact} {spec.version}: the mounted image is not what the config expects: {'; '.join(problems)}",
            hint=IMAGE_HINT,
        )
    log.info(f"mounted {artifact} {spec.version} read-only at {where} ({unit})")


def remove_image(config: Config, artifact: str, version: str, log: Log) -> bool:
    where = version_dir(config, artifact, version)
    unit = mount_unit_name(where)
    if mount_at(str(where)) is not None:
        # umount itself, not `systemctl stop`: that would first stop every unit that
        # requires the mount (a project started there), where umount refuses while busy.
        done = run_command(["umount", str(where)], sudo=True, check=False, timeout_s=120)
        if mount_at(str(where)) is not None:
            log.warn(
                f"{artifact} {version} is in use (umount: {done.output.strip()[-200:] or 'busy'}); "
                "kept, a later upgrade prunes it"
            )
            return False
    run_command(["systemctl", "disable", unit], sudo=True, check=False, timeout_s=120)
    files = (SYSTEMD_UNIT_DIR / unit, stored_image(artifact, version), image_record(artifact, version))
    run_command(["rm", "-f", *map(str, files)], sudo=True, timeout_s=30)
    run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    with contextlib.suppress(OSError):
        where.rmdir()
    log.info(f"pruned {artifact} {version}: unmounted, unit and image removed")
    return True


# ============================================================================
# steps_host: Steps that prepare the host: preflight, directories, files, secrets (and their installation on /btrfs).
# ============================================================================

# -- the steps ------------------------------------------------------------------------


class PreflightStep(Step):
    """Is this a host we can bootstrap? Changes nothing unless everything passes."""

    name = "preflight"
    weight_s = 2.0
    phase = "checking the host"
    hint = "Fix what preflight lists (each problem says what to do); nothing was changed on the host."

    def inputs(self) -> Mapping[str, Any]:
        c = self.config
        return {
            "os": [c.os.id, c.os.min_version],
            "arch": c.arch,
            "user": c.bootstrap_user,
            "home": c.home,
            "root": c.bootstrap_root,
        }

    def check(self) -> StepState:
        problems = preflight_problems(self.config)
        if problems:
            return StepState(False, "; ".join(what for what, _ in problems))
        if not Path(self.config.bootstrap_root).is_dir():
            return StepState(False, f"{self.config.bootstrap_root} does not exist yet")
        return StepState(True, "OS, systemd, arch, user, home, sudo and python are as expected")

    def apply(self) -> None:
        problems = preflight_problems(self.config)
        if problems:
            raise BootstrapError(
                "preflight: this host cannot be bootstrapped as configured:\n"
                + "\n".join(f"  - {what}" for what, _ in problems),
                hint="\n".join(f"{what}: {fix}" for what, fix in problems),
            )
        Path(self.config.bootstrap_root).mkdir(mode=0o755, parents=True, exist_ok=True)


def preflight_problems(config: Config) -> list[tuple[str, str]]:
    """Every reason this host does not fit the config: (what is wrong, what to do)."""
    problems: list[tuple[str, str]] = []
    release = read_os_release()
    os_id, os_version = release.get("ID", "unknown"), release.get("VERSION_ID", "")
    wanted = f"{config.os.id} {config.os.min_version} or newer"
    if os_id != config.os.id or version_tuple(os_version) < version_tuple(config.os.min_version):
        problems.append(
            (
                f"this is {release.get('PRETTY_NAME', os_id)} ({os_id} {os_version or '?'}); "
                f"the config expects {wanted}",
                "Use a host made from the expected image, or fix os in the host's config.",
            )
        )
    if not systemd_is_pid1():
        problems.append(
            ("systemd is not PID 1 here", "Boot the host with systemd as init: the daemon runs as a systemd service.")
        )
    arch = machine_arch()
    if arch != config.arch:
        problems.append(
            (
                f"this machine is {arch}; the config is for {config.arch}",
                "Use the config (and bundles) for this machine's architecture.",
            )
        )
    problems += user_problems(config)
    problems += decompressor_problems(config)
    if sys.version_info < MIN_PYTHON:
        found = ".".join(map(str, sys.version_info[:3]))
        problems.append(
            (
                f"python3 is {found}; bootstrap.py needs {'.'.join(map(str, MIN_PYTHON))} or newer",
                "Use a newer OS image (Ubuntu 24.04 has 3.12).",
            )
        )
    return problems


def user_problems(config: Config) -> list[tuple[str, str]]:
    user = config.bootstrap_user
    problems: list[tuple[str, str]] = []
    if os.geteuid() == 0:
        problems.append(
            ("bootstrap.py is running as root", f"Run it as {user} (the stub drops to that user by itself).")
        )
    else:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if me != user:
            problems.append(
                (f"bootstrap.py runs as {me}, the config says {user}", f"Run it as {user}, or fix bootstrap_user.")
            )
    entry = passwd_entry(user)
    if entry is None:
        problems.append((f"user {user} does not exist", "Create it (cloud-init users:) or fix bootstrap_user."))
    elif entry.pw_dir != config.home:
        problems.append(
            (
                f"getent passwd says {user}'s home is {entry.pw_dir}; the config says {config.home}",
                "Fix home (and the paths under it) in the config.",
            )
        )
    if shutil.which("sudo") is None:
        problems.append(("sudo is not installed", "Install sudo and give the user passwordless sudo."))
    elif run_command(["true"], sudo=True, check=False, timeout_s=30).returncode != 0:
        problems.append(
            (
                f"`sudo -n true` fails for {user}",
                f"Give {user} passwordless sudo, e.g. /etc/sudoers.d/90-cocalc: `{user} ALL=(ALL) NOPASSWD:ALL`.",
            )
        )
    root = Path(config.bootstrap_root)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append((f"{existing} is not writable by {user}", f"chown -R {user}: {root} (or fix bootstrap_root)."))
    return problems


class DirectoriesStep(Step):
    """The bootstrap root's layout, owned by the user, with a README and env.sh."""

    name = "directories"
    deps = ("preflight",)
    weight_s = 0.2
    phase = "preparing"
    hint = "The bootstrap root must be writable by the bootstrap user (see preflight)."

    def dirs(self) -> list[Path]:
        root = Path(self.config.bootstrap_root)
        dirs = [root, *(root / d for d in BOOTSTRAP_SUBDIRS), Path(self.config.bootstrap_dir)]
        return list(dict.fromkeys(dirs))  # bootstrap_dir is usually root/bootstrap

    def files(self) -> dict[Path, tuple[str, int]]:
        root = Path(self.config.bootstrap_root)
        return {
            root / "README.md": (render_readme(self.config), 0o644),
            root / "bin" / "env.sh": (render_env_helper(self.config), 0o644),
        }

    def inputs(self) -> Mapping[str, Any]:
        return {"dirs": [str(d) for d in self.dirs()], "files": {str(p): c for p, (c, _) in self.files().items()}}

    def check(self) -> StepState:
        uid = user_ids(self.config.bootstrap_user)[0]
        problems = [
            f"{d} is missing or not owned by {self.config.bootstrap_user}" for d in self.dirs() if not owned_dir(d, uid)
        ]
        problems += [
            f"{p} is missing or differs" for p, (c, mode) in self.files().items() if not file_matches(p, c, mode=mode)
        ]
        return StepState(not problems, "; ".join(problems) or "all directories and files in place")

    def apply(self) -> None:
        uid, _, group = user_ids(self.config.bootstrap_user)
        for d in self.dirs():
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not owned_dir(d, uid):  # e.g. made by root by hand
                run_command(["chown", f"{self.config.bootstrap_user}:{group}", str(d)], sudo=True, timeout_s=30)
        for path, (content, mode) in self.files().items():
            if write_user_file(path, content, mode):
                self.log.info(f"wrote {path}")


def owned_dir(path: Path, uid: int) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


class FilesStep(Step):
    """/etc/cocalc/project-host.env and config/bootstrap.json, rewritten only when they differ."""

    name = "files"
    deps = ("directories",)
    weight_s = 0.5
    phase = "preparing"
    hint = "Writing /etc/cocalc needs sudo; see the failing command above."

    def config_json(self) -> str:
        return json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"

    def config_path(self) -> Path:
        return Path(self.config.bootstrap_root) / "config" / "bootstrap.json"

    def inputs(self) -> Mapping[str, Any]:
        return {"env": render_env_file(self.config), "config": self.config_json()}

    def env_ok(self) -> bool:
        gid = user_ids(self.config.bootstrap_user)[1]
        return file_matches(ENV_FILE, render_env_file(self.config), mode=0o640, uid=0, gid=gid)

    def check(self) -> StepState:
        problems = [] if self.env_ok() else [f"{ENV_FILE} is missing or differs (content, mode 0640 or owner)"]
        if not file_matches(self.config_path(), self.config_json(), mode=0o644):
            problems.append(f"{self.config_path()} is missing or differs")
        return StepState(not problems, "; ".join(problems) or "both files are up to date")

    def apply(self) -> None:
        if not self.env_ok():
            group = user_ids(self.config.bootstrap_user)[2]
            # root-owned, readable by the user's group (the daemon), by nobody else
            write_root_file(ENV_FILE, render_env_file(self.config), mode=0o640, owner="root", group=group)
            self.log.info(f"wrote {ENV_FILE}")
        if write_user_file(self.config_path(), self.config_json(), 0o644):
            self.log.info(f"wrote {self.config_path()}")


class SecretsStep(Step):
    """The secrets the config names (upstream: conat-password), fetched once with
    the host credential early in the run (right after the directories: the hub
    is needed only at the start) into 0600 files in a staging directory of ours
    (bootstrap_dir/secrets-staging, 0700); install_secrets moves them onto
    /btrfs/data/secrets once it is mounted. A secret already there is not fetched."""

    name = "secrets"
    deps = ("directories",)
    weight_s = 1.0
    phase = "preparing"
    hint = (
        "Check hub.secrets_url and that the host credential (host-credential) is still valid "
        "(GET <hub>/hosts/<id>/credentials shows it); the hub can re-provision the host."
    )

    def path(self, name: str) -> Path:
        """Where a fetched secret waits for /btrfs."""
        return secrets_staging_dir(self.config) / name

    def inputs(self) -> Mapping[str, Any]:
        return {"names": list(self.config.secrets), "url": self.config.hub.secrets_url}

    def missing(self) -> list[str]:
        """The configured secrets neither installed on /btrfs nor staged."""
        return [
            name
            for name in self.config.secrets
            if not secret_file_ok(secrets_dir(self.config) / name) and not secret_file_ok(self.path(name))
        ]

    def check(self) -> StepState:
        if not self.config.secrets:
            return StepState(True, "no secrets configured")
        missing = self.missing()
        return StepState(
            not missing,
            f"missing: {', '.join(missing)}" if missing else f"{len(self.config.secrets)} secret(s) present",
        )

    def apply(self) -> None:
        missing = self.missing()
        if not missing:
            return
        token = host_auth(self.config)
        if token is None:
            raise BootstrapError(
                f"no host credential ({credential_path(self.config)}) nor bootstrap token ({self.config.token_file})",
                hint="The stub gets the credential for the bootstrap token; re-run the stub from the hub.",
            )
        staging = secrets_staging_dir(self.config)
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(staging, 0o700)
        for name in missing:
            value = fetch_secret(f"{self.config.hub.secrets_url.rstrip('/')}/{name}", token)
            add_secret(value)
            atomic_write_text(self.path(name), value, 0o600)
            self.log.info(f"fetched secret {name} into {self.path(name)} (0600) until /btrfs is ready")


class InstallSecretsStep(Step):
    """The fetched secrets moved from the staging directory onto
    /btrfs/data/secrets (0700; files 0600, written atomically and synced before
    the staged copy is removed): one copy of each, where upstream's daemon reads it."""

    name = "install_secrets"
    deps = ("secrets", "btrfs")
    weight_s = 0.2
    phase = "preparing"
    hint = "Re-run bootstrap.py: the secrets step fetches what is missing."

    def path(self, name: str) -> Path:
        return secrets_dir(self.config) / name

    def staged(self) -> list[Path]:
        try:
            return sorted(p for p in secrets_staging_dir(self.config).iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def inputs(self) -> Mapping[str, Any]:
        return {"names": list(self.config.secrets), "dir": str(secrets_dir(self.config))}

    def check(self) -> StepState:
        problems = [f"{self.path(n)} is missing" for n in self.config.secrets if not secret_file_ok(self.path(n))]
        staged = self.staged()
        if staged:
            problems.append(f"{len(staged)} staged secret(s) in {secrets_staging_dir(self.config)}")
        if not self.config.secrets and not staged:
            return StepState(True, "no secrets configured")
        return StepState(not problems, "; ".join(problems) or f"{len(self.config.secrets)} secret(s) in place")

    def apply(self) -> None:
        target = secrets_dir(self.config)
        if not target.is_dir():
            raise BootstrapError(f"{target} does not exist", hint="The btrfs step makes it; re-run bootstrap.py.")
        for staged in self.staged():
            if staged.name in self.config.secrets and secret_file_ok(staged):
                value = staged.read_text(encoding="utf-8")
                add_secret(value)
                atomic_write_text(self.path(staged.name), value, 0o600)  # synced before the staged copy goes
                self.log.info(f"installed secret {staged.name} into {self.path(staged.name)} (0600)")
            staged.unlink()
        staging = secrets_staging_dir(self.config)
        with contextlib.suppress(OSError):  # gone already, or not empty (a temporary of ours: debris)
            staging.rmdir()
            fsync_dir(staging.parent)
        missing = [n for n in self.config.secrets if not secret_file_ok(self.path(n))]
        if missing:
            raise BootstrapError(f"secret(s) neither installed nor fetched: {', '.join(missing)}", hint=self.hint)


def secret_file_ok(path: Path) -> bool:
    """A secret file as we write it: a regular 0600 file, not empty (its value then redacted)."""
    try:
        st = path.lstat()
        value = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    add_secret(value)  # so that nothing logs it, even when the step is skipped
    return stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and bool(value.strip())


SECRET_ATTEMPTS = 10  # backoff 1, 2, 4, 8, then 15 s (with jitter): about a minute and a half at most
SECRET_DEADLINE_S = 120.0
HUB_SECRETS_HINT = (
    "bootstrap.py fetches the secrets from hub.secrets_url at the start of a run: check that the hub is up "
    "and answers from this host. Nothing of the secret was written; the next run fetches it"
)


def fetch_secret(url: str, token: str) -> str:
    """GET one secret with the host credential (or the bootstrap token before its
    exchange); a failure's hint is about the hub and its secrets (not a
    download's: nothing partial is kept)."""

    def attempt() -> str:
        with http_open(
            url, timeout_s=DOWNLOAD_ATTEMPT_TIMEOUT_S, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            try:
                return response.read(64 * 1024).decode("utf-8")
            except (OSError, http.client.HTTPException, UnicodeDecodeError) as e:
                raise TransientError(f"GET {url}: {e}") from None

    try:
        # a hub restarting (a minute or so) must not fail a run: the secrets are
        # needed only by install_secrets, late; other steps go on meanwhile
        value = retry(
            attempt,
            what=f"GET {url}",
            attempts=SECRET_ATTEMPTS,
            deadline_s=SECRET_DEADLINE_S,
            max_s=15.0,
            retry_if=lambda e: isinstance(e, TransientError),
        )
    except RedirectRefused:
        raise
    except HttpStatusError as e:
        if e.status in (401, 403):
            hint = (
                "The hub refused the host credential (host-credential) or bootstrap token: revoked or expired; "
                "re-provision the host on the hub."
            )
        elif e.status == 404:
            hint = "The hub has no such secret for this host: check the host's secret names on the hub."
        else:
            hint = HUB_SECRETS_HINT
        raise BootstrapError(e.message, hint=hint) from None
    except BootstrapError as e:
        raise BootstrapError(e.message, hint=f"{HUB_SECRETS_HINT} (curl -sI {url})") from None
    if not value.strip():
        raise BootstrapError(f"GET {url}: the hub answered with an empty secret")
    return value


# ============================================================================
# steps_install: Steps that install software: apt, bundle downloads and installs, Node.js.
# ============================================================================


class AptStep(Step):
    """The configured Debian packages: waits for the locks, never kills their holder."""

    name = "apt"
    deps = ("preflight",)
    weight_s = 60.0
    phase = "installing packages"
    hint = APT_HINT

    def quiesce_record(self) -> Path:
        return Path(self.config.bootstrap_dir) / "apt-quiesced.json"

    def update_stamp(self) -> Path:
        return Path(self.config.bootstrap_dir) / "apt-update.stamp"

    def inputs(self) -> Mapping[str, Any]:
        return {"packages": sorted(set(self.config.apt.packages))}

    def check(self) -> StepState:
        if self.quiesce_record().exists():
            return StepState(False, "a killed run left apt's timers stopped or man-db's trigger off")
        if dpkg_interrupted():
            return StepState(False, "dpkg was interrupted (needs dpkg --configure -a)")
        missing = missing_packages(self.config.apt.packages)
        if missing:
            return StepState(False, f"not installed: {' '.join(missing)}")
        return StepState(True, f"all {len(self.config.apt.packages)} packages installed")

    def apply(self) -> None:
        spec = self.config.apt
        with apt_quiesced(self.quiesce_record(), self.log):
            if dpkg_interrupted():
                wait_for_locks(DPKG_LOCKS, time.monotonic() + spec.lock_timeout_s, self.log)
                self.log.warn("dpkg was interrupted earlier; running dpkg --configure -a")
                run_command(
                    ["dpkg", "--force-confold", "--configure", "-a"],
                    sudo=True,
                    env=APT_ENV,
                    timeout_s=1800,
                    hint=APT_HINT,
                )
            missing = missing_packages(spec.packages)
            if not missing:
                self.log.info("every package is installed; skipping apt-get update and install")
                return
            age = apt_lists_age_s(self.update_stamp())
            if age is None or age > spec.lists_max_age_s:
                self.update_lists()
            else:
                self.log.info(f"skipping apt-get update: the lists are {age:.0f}s old (limit {spec.lists_max_age_s}s)")
            self.fetch_first(missing)
            self.install(missing)

    @classmethod
    def link_first(cls, ctx: Context) -> bool:
        """apt has the link first when it is the longest chain: when every bundle is installed from an
        image (a mount). Where a bundle is extracted, its download → extraction chain is the longer
        one (measured at 50 MB/s: holding the link for apt made an archive run 31.9 s → 43.9 s, an
        image run 29.9 s → 21.9 s), so its download must not wait."""
        return all(wants_image(ctx.config, name, spec, ctx.log) for name, spec in ctx.config.artifacts.items())

    def fetch_first(self, packages: list[str]) -> None:
        """When apt has the link first (slots.LinkFirst): fetch the packages, then let the other
        downloads go while dpkg works. A failed fetch only gives the link up: install() retries."""
        link = self.ctx.link
        if link is None or link.holder != self.name or not link.held:
            return
        try:
            apt_download(packages, self.config.apt.lock_timeout_s, self.log)
            self.log.info("apt's packages are fetched; the other downloads may use the link now")
        except CommandError as e:
            self.log.warn(f"apt-get install --download-only failed ({e.message}); installing as usual")
        finally:
            link.release()

    def update_lists(self) -> None:
        apt_update(self.config.apt.lock_timeout_s, self.log)
        # synced: a stamp lost to a power cut would cost the next run another apt-get update
        atomic_write_text(self.update_stamp(), f"{time.time():.0f}\n", 0o644)

    def install(self, packages: list[str]) -> None:
        self.log.info(f"installing {len(packages)} package(s): {' '.join(packages)}")
        for attempt in range(1, 4):
            try:
                apt_install(packages, self.config.apt.lock_timeout_s, self.log)
                return
            except CommandError as e:
                if attempt == 3:
                    raise
                delay = backoff_delay(attempt, 5.0, 60.0)
                self.log.warn(
                    f"apt-get install failed (attempt {attempt}/3): {e.message}; "
                    f"refreshing the lists and retrying in {delay:.0f}s"
                )
                time.sleep(delay)
                self.update_lists()  # stale lists (404, unknown package) are the usual cause


class DownloadBundleStep(Step):
    """One bundle, downloaded and verified (not when that version is installed)."""

    artifact: ClassVar[str]
    deps = ("directories",)
    weight_s = 15.0
    phase = "downloading bundles"
    uses_link = True
    hint = DOWNLOAD_HINT

    @property
    def spec(self) -> ArtifactSpec:
        spec: ArtifactSpec = getattr(self.config.artifacts, self.artifact)
        return spec

    def inputs(self) -> Mapping[str, Any]:
        s = self.spec
        image = dataclasses.asdict(s.image) if s.image else None
        return {"url": s.url, "sha256": s.sha256, "version": s.version, "size_bytes": s.size_bytes, "image": image}

    def check(self) -> StepState:
        s = self.spec
        if bundle_installed(self.config, self.artifact, s) or image_installed(self.config, self.artifact, s):
            return StepState(True, f"{self.artifact} {s.version} is installed; nothing to download")
        if s.image is not None and verified_download(image_download(self.config, self.artifact, s), s.image.sha256):
            return StepState(True, f"{self.artifact} {s.version}'s image is downloaded and verified")
        if verified_download(artifact_archive(self.config, self.artifact, s), s.sha256):
            return StepState(True, f"{self.artifact} {s.version} is downloaded and verified")
        return StepState(False, f"{self.artifact} {s.version} is not downloaded")

    def apply(self) -> None:
        if self.check().satisfied:
            return
        s = self.spec
        self.link_turn()
        if s.image is not None and wants_image(self.config, self.artifact, s, self.log):
            target = image_download(self.config, self.artifact, s)
            download_verified(s.image.url, target, s.image.sha256, log=self.log, size_bytes=s.image.size_bytes)
            return
        download_verified(
            s.url, artifact_archive(self.config, self.artifact, s), s.sha256, log=self.log, size_bytes=s.size_bytes
        )


class DownloadProjectHostStep(DownloadBundleStep):
    name = "download_project_host"
    artifact = "project_host"


class DownloadProjectStep(DownloadBundleStep):
    name = "download_project"
    artifact = "project"


class DownloadToolsStep(DownloadBundleStep):
    name = "download_tools"
    artifact = "tools"


class InstallBundleStep(Step):
    """A verified bundle extracted safely to bundles/<artifact>/<version>; `current` swapped to it."""

    artifact: ClassVar[str]
    weight_s = 5.0
    phase = "installing bundles"
    hint = "The bundle is broken or not what the config expects (see the message); fix the artifact and run again."

    @property
    def spec(self) -> ArtifactSpec:
        spec: ArtifactSpec = getattr(self.config.artifacts, self.artifact)
        return spec

    def current_link(self) -> Path:
        return bundles_dir(self.config) / self.artifact / "current"

    def previous_link(self) -> Path:
        return bundles_dir(self.config) / self.artifact / "previous"

    def inputs(self) -> Mapping[str, Any]:
        s = self.spec
        return {
            "version": s.version,
            "sha256": s.sha256,
            "url": s.url,
            "strip_components": s.strip_components,
            "expected_files": list(s.expected_files),
            "executables": list(s.executables),
            "image": dataclasses.asdict(s.image) if s.image else None,
        }

    def check(self) -> StepState:
        s = self.spec
        how = (
            "a mounted image"
            if image_installed(self.config, self.artifact, s)
            else "an extracted archive"
            if bundle_installed(self.config, self.artifact, s)
            else None
        )
        if how is None:
            return StepState(False, f"{self.artifact} {s.version} is not installed")
        current = read_link(self.current_link())
        if current != s.version:
            return StepState(False, f"current points to {current or 'nothing'}, not {s.version}")
        # the step's message (the hub shows it) says which of the two the host chose
        return StepState(True, f"{self.artifact} {s.version} is installed ({how}) and current")

    def apply(self) -> None:
        s = self.spec
        archive = artifact_archive(self.config, self.artifact, s)
        if s.image is not None and wants_image(self.config, self.artifact, s, self.log):
            if not image_installed(self.config, self.artifact, s):
                install_image(self.config, self.artifact, s, self.log)
        elif not bundle_installed(self.config, self.artifact, s):
            self.install(archive)
        before = read_link(self.current_link())
        if point_symlink(self.current_link(), s.version):
            self.log.info(f"{self.artifact}/current -> {s.version}")
            if before is not None and before != s.version:
                point_symlink(self.previous_link(), before)
            # older versions are pruned by the prune step, once the daemon is healthy on this one
        remove_download(archive)  # installed: the archive is no longer needed

    def install(self, archive: Path) -> None:
        s = self.spec
        if not verified_download(archive, s.sha256):
            raise BootstrapError(
                f"{archive} is missing or unverified", hint="Run the bootstrap again: the download step fetches it."
            )
        recorded = parse_sha256_file(checksum_path(archive).read_text(encoding="utf-8"), archive.name)
        # CPU-heavy from here (hashing, decompressing, writing files): one CPU slot, the biggest archive first
        with cpu_slot(self.ctx.cpu, self.name, archive.stat().st_size):
            actual = file_sha256(archive)  # again: verified before use, not just when downloaded
            if actual != recorded:
                remove_download(archive)
                raise BootstrapError(
                    f"{archive} changed on disk since it was verified",
                    hint="Run the bootstrap again: it downloads it anew.",
                )
            start = time.monotonic()
            install_archive(
                archive,
                bundle_version_dir(self.config, self.artifact, s),
                strip=s.strip_components,
                expected_files=s.expected_files,
                executables=s.executables,
                marker={"artifact": self.artifact, "version": s.version, "url": s.url, "sha256": actual},
            )
        self.log.info(f"installed {self.artifact} {s.version} in {time.monotonic() - start:.1f}s")


def read_link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class InstallProjectHostStep(InstallBundleStep):
    name = "install_project_host"
    deps = ("download_project_host",)
    artifact = "project_host"


class InstallProjectStep(InstallBundleStep):
    name = "install_project"
    deps = ("download_project",)
    artifact = "project"


class InstallToolsStep(InstallBundleStep):
    name = "install_tools"
    deps = ("download_tools",)
    artifact = "tools"


class NodeStep(Step):
    """Node.js in nvm's layout, from the configured dist mirror, checked against SHASUMS256.txt."""

    name = "node"
    deps = ("directories",)
    weight_s = 15.0
    uses_link = True
    phase = "installing Node.js"
    hint = (
        "<node.dist_url>/v<version>/SHASUMS256.txt must list node-v<version>-linux-<x64|arm64>.tar.xz; "
        "check the mirror."
    )

    def alias_path(self) -> Path:
        return nvm_dir(self.config) / "alias" / "default"

    def inputs(self) -> Mapping[str, Any]:
        nvm = self.config.node.nvm
        return {
            "version": self.config.node.version,
            "dist_url": self.config.node.dist_url,
            "nvm": dataclasses.asdict(nvm) if nvm else None,
        }

    def installed_version(self) -> str | None:
        node = node_dir(self.config) / "bin" / "node"
        if not os.access(node, os.X_OK):
            return None
        return run_command([str(node), "--version"], check=False, timeout_s=60).output.strip() or None

    def nvm_ok(self) -> bool:
        nvm = self.config.node.nvm
        path = nvm_dir(self.config) / "nvm.sh"
        return nvm is None or (path.is_file() and file_sha256(path) == nvm.sha256)

    def check(self) -> StepState:
        want = f"v{self.config.node.version}"
        problems = []
        found = self.installed_version()
        if found != want:
            problems.append(f"node {want} is not installed (found {found or 'nothing'})")
        if read_text_or(self.alias_path()).strip() != want:
            problems.append(f"nvm's default alias is not {want}")
        if not self.nvm_ok():
            problems.append("nvm.sh is missing or not the pinned one")
        return StepState(not problems, "; ".join(problems) or f"node {want} installed and nvm's default")

    def apply(self) -> None:
        want = f"v{self.config.node.version}"
        if self.installed_version() != want:
            self.install_node()
        if not self.nvm_ok():
            self.install_nvm()
        write_user_file(self.alias_path(), want, 0o644)  # as `nvm alias default` writes it: no newline

    def install_node(self) -> None:
        version = self.config.node.version
        base = f"{self.config.node.dist_url.rstrip('/')}/v{version}"
        name = f"node-v{version}-linux-{NODE_ARCH_BY_DPKG.get(self.config.arch, self.config.arch)}.tar.xz"
        try:
            sha256 = parse_sha256_file(http_get_text(f"{base}/SHASUMS256.txt"), name)
        except ValueError as e:
            raise BootstrapError(f"{base}/SHASUMS256.txt: {e}", hint=self.hint) from None
        archive = downloads_dir(self.config) / name
        if not verified_download(archive, sha256):
            self.link_turn()
            download_verified(f"{base}/{name}", archive, sha256, log=self.log)

        def answers_version(staging: Path) -> None:
            found = run_command([str(staging / "bin" / "node"), "--version"], check=False, timeout_s=60)
            if found.output.strip() != f"v{version}":
                raise BootstrapError(
                    f"{name}: bin/node --version says {found.output.strip()[:100]!r}, not v{version}", hint=self.hint
                )

        with cpu_slot(self.ctx.cpu, self.name, archive.stat().st_size):
            install_archive(
                archive,
                node_dir(self.config),
                strip=1,
                executables=("bin/node",),
                marker={"artifact": "node", "version": version, "sha256": sha256},
                verify=answers_version,
            )
        remove_download(archive)
        self.log.info(f"installed node v{version} into {node_dir(self.config)}")

    def install_nvm(self) -> None:
        nvm = self.config.node.nvm
        assert nvm is not None
        archive = downloads_dir(self.config) / f"nvm-{nvm.version}.sh"
        if not verified_download(archive, nvm.sha256):
            download_verified(nvm.url, archive, nvm.sha256, log=self.log)
        atomic_write_text(nvm_dir(self.config) / "nvm.sh", archive.read_text(encoding="utf-8"), 0o644)
        remove_download(archive)
        self.log.info(f"installed nvm {nvm.version} (sha256 pinned)")


# ============================================================================
# lifecycle: Upgrades in place: the daemon's last healthy generation (for a rollback), and keep-N pruning.
# ============================================================================


GOOD_FILE_NAME = "daemon-good.json"
FAILED_FILE_NAME = "daemon-failed.json"
PRUNE_BUSY_FILE_NAME = "prune-busy.json"
PRUNING_PREFIX = ".pruning-"
HEALTH_BODY_LIMIT = 2000


# -- the daemon's generations ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DaemonGeneration:
    """What the daemon runs with: its bundle version, its unit and its env file."""

    version: str
    unit: str
    env: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def good_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / GOOD_FILE_NAME


def failed_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / FAILED_FILE_NAME


def read_json_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_good(config: Config) -> DaemonGeneration | None:
    data = read_json_record(good_path(config))
    if data is None or not all(isinstance(data.get(k), str) for k in ("version", "unit", "env")):
        return None
    return DaemonGeneration(version=data["version"], unit=data["unit"], env=data["env"])


def record_good(config: Config, generation: DaemonGeneration) -> None:
    record = {**dataclasses.asdict(generation), "healthy_at": utc_timestamp()}
    atomic_write_text(good_path(config), json.dumps(record, indent=1) + "\n", 0o600)
    failed_path(config).unlink(missing_ok=True)


def record_failed(config: Config, generation: DaemonGeneration, report: str, rolled_back_to: str) -> None:
    record = {
        "digest": generation.digest(),
        "version": generation.version,
        "rolled_back_to": rolled_back_to,
        "failed_at": utc_timestamp(),
        "report": report,
    }
    atomic_write_text(failed_path(config), json.dumps(record, indent=1) + "\n", 0o600)


def failed_before(config: Config, generation: DaemonGeneration) -> dict[str, Any] | None:
    """The record of this very generation's earlier failed health check, or None."""
    data = read_json_record(failed_path(config))
    return data if data is not None and data.get("digest") == generation.digest() else None


def health_answer(url: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what it answered: status and the start of the body) of one GET."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(HEALTH_BODY_LIMIT)
            status = int(response.status)
    except urllib.error.HTTPError as e:
        body, status = e.read(HEALTH_BODY_LIMIT), e.code
        e.close()
    except OSError as e:
        return False, f"no answer ({getattr(e, 'reason', None) or e})"
    text = body.decode("utf-8", "replace").strip()
    return 200 <= status < 300, f"HTTP {status}" + (f": {text}" if text else "")


def restore_generation(config: Config, good: DaemonGeneration, unit_path: Path, log: Log) -> None:
    """Put the recorded generation back: project_host's `current`, the unit, the env file."""
    current = bundles_dir(config) / "project_host" / "current"
    if point_symlink(current, good.version):
        log.warn(f"project_host/current -> {good.version} (rolled back)")
    if read_text_or(unit_path) != good.unit:
        write_root_file(unit_path, good.unit, mode=0o644)
        log.warn(f"restored {unit_path}")
    if read_text_or(ENV_FILE) != good.env:
        group = user_ids(config.bootstrap_user)[2]
        write_root_file(ENV_FILE, good.env, mode=0o640, owner="root", group=group)
        log.warn(f"restored {ENV_FILE}")
    run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)


def journal_tail(unit: str) -> str:
    journal = run_command(["journalctl", "-u", unit, "-n", "40", "--no-pager"], sudo=True, check=False, timeout_s=60)
    return output_tail(REDACTOR(journal.output))


# -- pruning -----------------------------------------------------------------------


def installed_versions(config: Config, artifact: str) -> dict[str, float]:
    """Every installed version of `artifact` (extracted or a stored image) and when it was installed."""
    found: dict[str, float] = {}
    root = bundles_dir(config) / artifact
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_symlink() or not VERSION_RE.fullmatch(entry.name):
                continue
            for witness in (entry / INSTALLED_MARKER, image_record(artifact, entry.name)):
                try:
                    found[entry.name] = max(found.get(entry.name, 0.0), witness.stat().st_mtime)
                except OSError:
                    continue
    store = IMAGES_DIR / artifact
    if store.is_dir():
        for image in store.glob(f"*{IMAGE_SUFFIX}"):
            version = image.name[: -len(IMAGE_SUFFIX)]
            if VERSION_RE.fullmatch(version) and version not in found:
                try:
                    found[version] = image.stat().st_mtime
                except OSError:
                    continue
    return found


def versions_to_keep(installed: Mapping[str, float], current: str | None, previous: str | None, keep: int) -> set[str]:
    """`keep` versions: `current`, then `previous` (the one it replaced: the last healthy one,
    where a rollback goes), then the most recently installed others."""
    kept: set[str] = set()
    for version in (current, previous):
        if version is not None and version in installed and len(kept) < keep:
            kept.add(version)
    for version in sorted(installed, key=lambda v: (installed[v], v), reverse=True):
        if len(kept) >= keep:
            break
        kept.add(version)
    return kept


def processes_using(dirs: Sequence[Path]) -> dict[Path, str]:
    """Which of `dirs` a process uses (its cwd, executable, an open or a mapped file inside),
    as root sees it: dir -> 'PID n'. The scan is one `find` over /proc."""
    if not dirs:
        return {}
    found = run_command(
        [
            "find",
            "/proc",
            "-mindepth",
            "2",
            "-maxdepth",
            "3",
            "(",
            "-path",
            "/proc/[0-9]*/cwd",
            "-o",
            "-path",
            "/proc/[0-9]*/exe",
            "-o",
            "-path",
            "/proc/[0-9]*/fd/*",
            "-o",
            "-path",
            "/proc/[0-9]*/map_files/*",
            ")",
            "-printf",
            r"%p\t%l\n",
        ],
        sudo=True,
        check=False,
        timeout_s=120,
    )
    ours = {str(os.getpid())}
    using: dict[Path, str] = {}
    for line in found.output.splitlines():
        where, _, target = line.partition("\t")
        pid = where.split("/")[2] if where.count("/") >= 2 else ""
        if pid in ours or not target.startswith("/"):
            continue
        target = target.removesuffix(" (deleted)")
        for d in dirs:
            if d not in using and (target == str(d) or target.startswith(f"{d}/")):
                using[d] = f"PID {pid}"
    return using


def remove_extracted(where: Path, log: Log) -> None:
    """An extracted version: renamed aside first (never half a version under its name), then removed."""
    aside = where.with_name(f"{PRUNING_PREFIX}{where.name}-{os.getpid()}")
    os.rename(where, aside)
    run_command(["chmod", "-R", "u+rwX", str(aside)], check=False, timeout_s=300)
    run_command(["rm", "-rf", "--one-file-system", str(aside)], timeout_s=600)
    log.info(f"pruned {where}")


class PruneStep(Step):
    """Installed versions beyond keep_versions per artifact, removed once the daemon is healthy."""

    name = "prune"
    deps = ("service",)
    weight_s = 0.5
    phase = "finishing"
    hint = "A version could not be removed (see the message); the host runs fine, a later run tries again."

    def busy_path(self) -> Path:
        return Path(self.config.bootstrap_dir) / PRUNE_BUSY_FILE_NAME

    def inputs(self) -> Mapping[str, Any]:
        return {
            "keep_versions": self.config.keep_versions,
            "versions": {name: spec.version for name, spec in self.config.artifacts.items()},
        }

    def prunable(self) -> dict[str, list[str]]:
        """artifact -> versions beyond the keep set (oldest first)."""
        out: dict[str, list[str]] = {}
        for artifact, _ in self.config.artifacts.items():
            installed = installed_versions(self.config, artifact)
            current = read_link(bundles_dir(self.config) / artifact / "current")
            previous = read_link(bundles_dir(self.config) / artifact / "previous")
            keep = versions_to_keep(installed, current, previous, self.config.keep_versions)
            extra = sorted((v for v in installed if v not in keep), key=lambda v: installed[v])
            if extra:
                out[artifact] = extra
        return out

    def busy(self) -> dict[str, list[str]]:
        data = read_json_record(self.busy_path()) or {}
        return {a: [v for v in vs if isinstance(v, str)] for a, vs in data.items() if isinstance(vs, list)}

    def check(self) -> StepState:
        busy = self.busy()
        waiting = {a: [v for v in vs if v not in busy.get(a, [])] for a, vs in self.prunable().items()}
        waiting = {a: vs for a, vs in waiting.items() if vs}
        if waiting:
            listed = "; ".join(f"{a}: {', '.join(vs)}" for a, vs in waiting.items())
            return StepState(False, f"versions beyond keep_versions={self.config.keep_versions}: {listed}")
        held = sum(len(vs) for vs in busy.values())
        kept = f" ({held} in use, kept until the versions change)" if held else ""
        return StepState(True, f"at most {self.config.keep_versions} version(s) per artifact{kept}")

    def apply(self) -> None:
        self.remove_leftovers()
        prunable = self.prunable()
        dirs = {(a, v): bundles_dir(self.config) / a / v for a, vs in prunable.items() for v in vs}
        using = processes_using(list(dirs.values()))
        busy: dict[str, list[str]] = {}
        for (artifact, version), where in dirs.items():
            if where in using:
                self.log.warn(f"{artifact} {version} is in use ({using[where]}); kept, a later upgrade prunes it")
                busy.setdefault(artifact, []).append(version)
            elif mounted_image(where) is not None or image_record(artifact, version).exists():
                if not remove_image(self.config, artifact, version, self.log):
                    busy.setdefault(artifact, []).append(version)
            elif where.exists():
                remove_extracted(where, self.log)
            previous = bundles_dir(self.config) / artifact / "previous"
            if read_link(previous) == version and not where.exists():
                previous.unlink()
        atomic_write_text(self.busy_path(), json.dumps(busy, indent=1, sort_keys=True) + "\n", 0o644)

    def remove_leftovers(self) -> None:
        """Versions a killed prune had set aside (renamed, so never used again)."""
        for artifact, _ in self.config.artifacts.items():
            root = bundles_dir(self.config) / artifact
            for leftover in root.glob(f"{PRUNING_PREFIX}*") if root.is_dir() else ():
                run_command(["chmod", "-R", "u+rwX", str(leftover)], check=False, timeout_s=300)
                run_command(["rm", "-rf", "--one-file-system", str(leftover)], timeout_s=600)
                self.log.info(f"removed {leftover} (left by a killed prune)")


# ============================================================================
# steps_system: Steps that bring the host up: btrfs, the service, finalize.
# ============================================================================


def foreign_image_problem(image: Path) -> str | None:
    """Why an existing file at btrfs.image_path is not ours to format, or None when it may be
    used: absent (we create it), holding no data at all (every block a hole: ours from an
    interrupted run), or holding the btrfs filesystem bootstrap.py makes (labelled BTRFS_LABEL).
    The config keeps the path inside bootstrap_root; this keeps it from naming a file there
    (or a link out of there) that is someone else's."""
    try:
        st = image.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{image} exists and is not a regular file (a link, a directory or a device)"
    if st.st_blocks == 0:
        return None
    found = block_device_probe(str(image))
    if found.get("TYPE") == "btrfs" and found.get("LABEL") == BTRFS_LABEL:
        return None
    what = f"a {found['TYPE']} filesystem" if found.get("TYPE") else "data"
    return f"{image} exists and holds {what}, not the btrfs filesystem bootstrap.py makes ({BTRFS_LABEL})"


class BtrfsStep(Step):
    """The btrfs filesystem for projects: data disk or sparse loop image, mounted
    from a tagged fstab line, with the data subvolume (tmp, secrets), quota,
    /usr/local/sbin/cocalc-grow-btrfs and its boot-time unit."""

    name = "btrfs"
    deps = ("apt",)  # btrfs-progs
    weight_s = 5.0
    phase = "setting up btrfs"
    hint = "Check the disk or image, and that btrfs-progs is in apt.packages; `dmesg | tail` shows mount errors."

    @property
    def mount_point(self) -> Path:
        return Path(self.config.btrfs.mount_point)

    def helper_path(self) -> Path:
        return GROW_HELPER

    def helper_text(self) -> str:
        b = self.config.btrfs
        return render_grow_helper(b.mount_point, None if b.data_disk else b.image_path, str(ENV_FILE))

    def grow_unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{GROW_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        return {"btrfs": dataclasses.asdict(self.config.btrfs), "user": self.config.bootstrap_user}

    def entry_for(self, source: str) -> str | None:
        """The fstab line for the filesystem mounted from `source`."""
        b = self.config.btrfs
        if b.data_disk is None:
            return fstab_entry(b.image_path, b.mount_point, loop=True)
        fsid = btrfs_fsid(b.mount_point)
        return fstab_entry(f"UUID={fsid}", b.mount_point, loop=False) if fsid else None

    def check(self) -> StepState:
        problems = []
        mounted = mount_at(str(self.mount_point))
        if mounted is None or mounted[1] != "btrfs":
            problems.append(f"no btrfs filesystem mounted at {self.mount_point}")
        else:
            problems += self.mounted_problems(mounted[0])
        if not file_matches(self.helper_path(), self.helper_text(), mode=0o755, uid=0):
            problems.append(f"{self.helper_path()} is missing or differs")
        if not file_matches(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644):
            problems.append(f"{self.grow_unit_path()} is missing or differs")
        elif systemctl_state("is-enabled", f"{GROW_UNIT}.service") != "enabled":
            problems.append(f"{GROW_UNIT}.service is not enabled")
        return StepState(
            not problems,
            "; ".join(problems) or f"btrfs at {self.mount_point} with data (tmp, secrets), quota, grow helper",
        )

    def mounted_problems(self, source: str) -> list[str]:
        uid = user_ids(self.config.bootstrap_user)[0]
        problems = []
        entry = self.entry_for(source)
        fstab = read_text_or(FSTAB)
        if entry is None or fstab_with_entry(fstab, entry) != fstab:
            problems.append("the tagged fstab line is missing or differs")
        if not btrfs_quota_enabled(str(self.mount_point)):
            problems.append("quota is not enabled")
        if not is_btrfs_subvolume(self.mount_point / "data"):
            problems.append(f"{self.mount_point / 'data'} is not a subvolume")
        for name, mode in BTRFS_DIR_MODES.items():
            path = self.mount_point / name
            if not owned_dir(path, uid) or stat.S_IMODE(path.stat().st_mode) != mode:
                problems.append(f"{path} is not mode {mode:o} and owned by {self.config.bootstrap_user}")
        return problems

    def apply(self) -> None:
        mp = str(self.mount_point)
        mounted = mount_at(mp)
        if mounted is not None and mounted[1] != "btrfs":
            raise BootstrapError(
                f"{mp} has a {mounted[1]} filesystem mounted from {mounted[0]}",
                hint="Unmount it or choose another btrfs.mount_point; bootstrap.py will not mount over it.",
            )
        entry = self.entry_for(mounted[0]) if mounted else self.prepare_filesystem()
        if entry is None:
            raise BootstrapError(f"cannot tell which filesystem is mounted at {mp}", hint=self.hint)
        self.write_fstab(entry)
        if mounted is None:
            make_root_dirs(self.mount_point)
            run_command(
                ["mount", mp], sudo=True, timeout_s=120, hint=self.hint
            )  # through the fstab line: proves it works
            self.log.info(f"mounted {mp}")
        self.prepare_tree()
        self.install_grow_helper()

    def install_grow_helper(self) -> None:
        if not file_matches(self.helper_path(), self.helper_text(), mode=0o755, uid=0):
            write_root_file(self.helper_path(), self.helper_text(), mode=0o755)
            self.log.info(f"wrote {self.helper_path()}")
        unit = f"{GROW_UNIT}.service"
        if not file_matches(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644):
            write_root_file(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
            self.log.info(f"wrote {self.grow_unit_path()}")
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)

    def prepare_filesystem(self) -> str:
        """Make (or find) the filesystem; returns its fstab line."""
        b = self.config.btrfs
        if b.data_disk is not None:
            device = wait_for_block_device(
                b.data_disk.candidates, b.data_disk.wait_s, b.data_disk.min_size_gb * MIN_DATA_DISK_UNIT, self.log
            )
            self.make_btrfs(device)
            uuid = block_device_probe(device).get("UUID")
            if not uuid:
                raise BootstrapError(f"blkid shows no UUID on {device} after mkfs.btrfs", hint=self.hint)
            return fstab_entry(f"UUID={uuid}", b.mount_point, loop=False)
        image = Path(b.image_path)
        problem = foreign_image_problem(image)
        if problem:
            raise BootstrapError(
                f"{problem}; refusing to format it",
                hint="btrfs.image_path must name a file bootstrap.py creates. Move that file away, "
                "or choose another path inside bootstrap_root.",
            )
        if image.exists():
            self.make_btrfs(str(image))  # ours: reused, or (holes only: an older interrupted run) formatted
        else:
            self.make_image(image)
        return fstab_entry(b.image_path, b.mount_point, loop=True)

    def make_image(self, image: Path) -> None:
        """A new sparse loop image with our btrfs on it, made at `<image>.part` and renamed
        into place only when complete (synced): a run killed in truncate or mkfs.btrfs leaves
        the .part (removed by the next run), never a half-made image at btrfs.image_path."""
        b = self.config.btrfs
        part = btrfs_image_part(self.config)
        make_root_dirs(image.parent)
        if os.path.lexists(part):  # normally removed by remove_debris already
            if not stat.S_ISREG(part.lstat().st_mode):
                raise BootstrapError(
                    f"{part} exists and is not a regular file",
                    hint="bootstrap.py makes the loop image there first; move that away.",
                )
            run_command(["rm", "-f", "--", str(part)], sudo=True, timeout_s=30)
        run_command(["truncate", "-s", f"{b.image_size_gb}G", str(part)], sudo=True, timeout_s=60)
        run_command(["chmod", "0600", str(part)], sudo=True, timeout_s=30)
        # no -f: mkfs.btrfs itself refuses to overwrite a filesystem (there is none: a new file)
        run_command(["mkfs.btrfs", "-q", "-L", BTRFS_LABEL, str(part)], sudo=True, timeout_s=300, hint=self.hint)
        run_command(["sync", "--", str(part)], sudo=True, timeout_s=300)  # its blocks before its name
        run_command(["mv", "-T", "--", str(part), str(image)], sudo=True, timeout_s=30)
        run_command(["sync", "--", str(image.parent)], sudo=True, timeout_s=60)  # the rename
        self.log.info(f"created sparse image {image} ({b.image_size_gb} GB) with a btrfs filesystem")

    def make_btrfs(self, device: str) -> None:
        """mkfs.btrfs on an empty device; reuse btrfs; refuse anything else."""
        found = block_device_probe(device)
        if found.get("TYPE") == "btrfs":
            self.log.info(f"{device} already holds btrfs; reusing it")
            return
        if found.get("TYPE") or found.get("PTTYPE"):
            what = found.get("TYPE") or f"a {found.get('PTTYPE')} partition table"
            raise BootstrapError(
                f"{device} holds {what}; refusing to format it",
                hint="bootstrap.py never reformats a disk that holds data. Wipe it yourself (wipefs -a) "
                "if it is really unused, or use another disk.",
            )
        # no -f: mkfs.btrfs itself refuses to overwrite a filesystem blkid might have missed
        run_command(["mkfs.btrfs", "-q", "-L", BTRFS_LABEL, device], sudo=True, timeout_s=300, hint=self.hint)
        self.log.info(f"made a btrfs filesystem on {device}")

    def write_fstab(self, entry: str) -> None:
        current = read_text_or(FSTAB)
        wanted = fstab_with_entry(current, entry)
        if wanted != current:
            write_root_file(FSTAB, wanted, mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, check=False, timeout_s=120)  # fstab generator
            self.log.info(f"fstab: {entry}")

    def prepare_tree(self) -> None:
        mp = self.mount_point
        user, (uid, _, group) = self.config.bootstrap_user, user_ids(self.config.bootstrap_user)
        data = mp / "data"
        if not is_btrfs_subvolume(data):
            if os.path.lexists(data):
                raise BootstrapError(
                    f"{data} exists but is not a btrfs subvolume",
                    hint=f"Move it away; bootstrap.py creates {data} as a subvolume.",
                )
            run_command(["btrfs", "subvolume", "create", str(data)], sudo=True, timeout_s=60)
        if not btrfs_quota_enabled(str(mp)):
            run_command(["btrfs", "quota", "enable", str(mp)], sudo=True, timeout_s=600)
        for name, mode in BTRFS_DIR_MODES.items():  # parents first: each is the user's before we look inside
            path = mp / name
            if not path.exists():
                make_root_dirs(path)
            if not owned_dir(path, uid):
                run_command(["chown", f"{user}:{group}", str(path)], sudo=True, timeout_s=30)
            if stat.S_IMODE(path.stat().st_mode) != mode:  # explicit: the umask is the stub's 077
                run_command(["chmod", f"{mode:o}", str(path)], sudo=True, timeout_s=30)


class ServiceStep(Step):
    """The daemon's systemd unit: enabled, running, healthy; restarted only
    when its unit, env file or bundle changed since the last (re)start."""

    name = "service"
    deps = (
        "install_project_host",
        "install_project",
        "install_tools",
        "node",
        "btrfs",
        "containers",
        "metadata",  # projects never start before the metadata service is closed to them
        "files",
        "secrets",
        "install_secrets",
    )
    weight_s = 10.0
    phase = "starting services"
    hint = "See the daemon's log: sudo journalctl -u <unit> -n 100 --no-pager (the unit is service.unit in the config)."

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{self.config.service.unit}.service"

    def unit_text(self) -> str:
        return render_unit(self.config, user_ids(self.config.bootstrap_user)[2])

    def stamp_path(self) -> Path:
        return Path(self.config.bootstrap_dir) / "service.generation"

    def generation(self) -> str:
        """What the running daemon was started with: unit, env file, bundle."""
        digest = hashlib.sha256(self.unit_text().encode())
        digest.update(read_text_or(ENV_FILE).encode())
        digest.update(os.path.realpath(bundles_dir(self.config) / "project_host" / "current").encode())
        return digest.hexdigest()

    def inputs(self) -> Mapping[str, Any]:
        return {
            "unit": self.unit_text(),
            "env": render_env_file(self.config),
            "bundle": self.config.artifacts.project_host.version,
        }

    def check(self) -> StepState:
        unit = f"{self.config.service.unit}.service"
        problems = []
        if not file_matches(self.unit_path(), self.unit_text(), mode=0o644):
            problems.append(f"{self.unit_path()} is missing or differs")
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        if systemctl_state("is-active", unit) != "active":
            problems.append(f"{unit} is not active")
        elif read_text_or(self.stamp_path()).strip() != self.generation():
            problems.append("its unit, env file or bundle changed since it started")
        else:
            status, what = http_status(self.config.service.health_url, timeout_s=5)
            if status is None or not 200 <= status < 300:
                problems.append(f"{self.config.service.health_url} answers {what}")
        return StepState(not problems, "; ".join(problems) or f"{unit} is active, current and healthy")

    def apply(self) -> None:
        service = self.config.service
        unit = f"{service.unit}.service"
        if not file_matches(self.unit_path(), self.unit_text(), mode=0o644):
            write_root_file(self.unit_path(), self.unit_text(), mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
            self.log.info(f"wrote {self.unit_path()}")
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        generation = self.generation()
        wanted = self.daemon_generation()
        good = read_good(self.config)
        upgrade = good is not None and good != wanted
        failed = failed_before(self.config, wanted) if upgrade else None
        if good is not None and failed is not None:
            self.roll_back(unit, good, wanted, failed.get("report") or "", again=True)
        if read_text_or(self.stamp_path()).strip() != generation:
            run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
            self.log.info(f"(re)started {unit}: its unit, env file or bundle changed")
        elif systemctl_state("is-active", unit) != "active":
            run_command(["systemctl", "start", unit], sudo=True, timeout_s=120, hint=self.hint)
            self.log.info(f"started {unit}")
        else:
            self.log.info(f"{unit} already runs this unit, env file and bundle; not restarted")
        try:
            self.wait_healthy(unit)
        except BootstrapError as e:
            if good is None or not upgrade:
                raise
            self.roll_back(unit, good, wanted, f"{e.message}\n{e.log_tail or ''}".strip(), again=False)
        atomic_write_text(self.stamp_path(), generation + "\n", 0o644)
        record_good(self.config, wanted)
        self.report_conat()

    def daemon_generation(self) -> DaemonGeneration:
        """The generation the config asks for (what a rollback would restore, once healthy)."""
        return DaemonGeneration(
            version=self.config.artifacts.project_host.version, unit=self.unit_text(), env=render_env_file(self.config)
        )

    def roll_back(
        self, unit: str, good: DaemonGeneration, wanted: DaemonGeneration, report: str, *, again: bool
    ) -> None:
        """Back to the last healthy generation, restarted and healthy; then fail the run with the report."""
        old, new = good.version, wanted.version
        what = f"project_host {new}" if new != old else "the new unit or env file"
        self.log.warn(f"{what}: {'failed its health check before' if again else 'not healthy'}; rolling back to {old}")
        restore_generation(self.config, good, self.unit_path(), self.log)
        still_running = read_text_or(self.stamp_path()).strip() == self.generation()
        if not (again and still_running and systemctl_state("is-active", unit) == "active"):
            run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
        healthy, answer = False, ""
        deadline = time.monotonic() + self.config.service.health_timeout_s
        while not healthy and time.monotonic() < deadline:
            healthy, answer = health_answer(self.config.service.health_url, timeout_s=5)
            if not healthy:
                time.sleep(0.5)
        if not healthy:
            raise BootstrapError(
                f"{what} was not healthy, and neither is {old} after the rollback ({answer})",
                hint=f"Both versions fail here: see sudo journalctl -u {unit} -n 100 --no-pager.",
                log_tail=f"{report}\n--- after the rollback ---\n{journal_tail(unit)}",
            )
        atomic_write_text(self.stamp_path(), self.generation() + "\n", 0o644)
        if not again:
            record_failed(self.config, wanted, report, old)
        self.log.warn(f"rolled back: {unit} runs project_host {old} and is healthy ({answer})")
        raise BootstrapError(
            f"{what} was not healthy within {self.config.service.health_timeout_s}s; rolled back to {old}, "
            f"which is healthy and serving"
            + (" (this generation failed before: not restarted into it again)" if again else ""),
            hint=(
                "Publish a fixed version (a new config tries again); the health check's answer and the daemon's "
                f"journal are below. {failed_path(self.config)} records the failure (remove it to retry this config)."
            ),
            log_tail=report,
        )

    def wait_healthy(self, unit: str) -> None:
        service = self.config.service
        start = time.monotonic()
        try:
            what = wait_until_healthy(service.health_url, service.health_timeout_s)
        except BootstrapError as e:
            _, answer = health_answer(service.health_url, timeout_s=5)
            raise BootstrapError(
                e.message,
                hint=f"The daemon started but is not healthy; see sudo journalctl -u {unit} -n 100 --no-pager.",
                log_tail=f"health check: {REDACTOR(answer)}\n{journal_tail(unit)}",
            ) from None
        self.log.info(f"{service.health_url} answered {what} after {time.monotonic() - start:.1f}s")

    def report_conat(self) -> None:
        for url in self.config.conat_urls:
            why = tcp_reachable(url)
            if why is None:
                self.log.info(f"conat {url} is reachable")
            else:
                self.log.warn(f"conat {url} is not reachable from this host ({why}); the daemon will keep trying")


class FinalizeStep(Step):
    """`.bootstrap_done` with a summary of what this host runs: ours, and where
    upstream looks (/btrfs/data/.bootstrap_done, /var/lib/cocalc/.bootstrap_done)."""

    name = "finalize"
    deps = ("service", "chrony", "tunnel", "gpu")
    weight_s = 0.2
    phase = "finishing"
    hint = "The bootstrap directory must be writable."

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "host_id": c.host.id,
            "host_name": c.host.name,
            "bootstrap_version": __version__,
            "bundles": {name: spec.version for name, spec in c.artifacts.items()},
            "node": c.node.version,
            "btrfs": c.btrfs.mount_point,
            "service": c.service.unit,
        }

    def inputs(self) -> Mapping[str, Any]:
        return self.summary()

    def upstream_markers(self) -> tuple[Path, Path]:
        return data_dir(self.config) / done_marker(self.config).name, SYSTEM_DONE_MARKER

    def check(self) -> StepState:
        try:
            done = json.loads(done_marker(self.config).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return StepState(False, f"{done_marker(self.config)} is missing")
        summary = self.summary()
        same = isinstance(done, dict) and {k: done.get(k) for k in summary} == summary
        if not same:
            return StepState(False, "the host changed since the last bootstrap")
        ours = done_marker(self.config).read_text(encoding="utf-8")
        missing = [str(p) for p in self.upstream_markers() if read_text_or(p) != ours]
        if missing:
            return StepState(False, f"{', '.join(missing)} missing or stale")
        return StepState(True, f"done since {done.get('finished_at')}")

    def apply(self) -> None:
        record = {**self.summary(), "finished_at": utc_timestamp()}
        text = json.dumps(record, indent=2) + "\n"
        atomic_write_text(done_marker(self.config), text, 0o644)
        in_data, system = self.upstream_markers()
        atomic_write_text(in_data, text, 0o644)  # /btrfs/data is the user's
        write_root_file(system, text, mode=0o644)


# ============================================================================
# steps_platform: Steps for what upstream's daemon needs from the OS: rootless containers
# ============================================================================

# -- removing what a step installed ------------------------------------------------------


def remove_installed(units: Sequence[str], paths: Sequence[Path], log: Log) -> list[str]:
    """Stop and disable the units that are there, delete the files that are
    there, reload systemd: what a step installed, when the config no longer
    asks for it (and for deprovisioning). Returns what was removed."""
    removed = []
    for unit in units:
        if (SYSTEMD_UNIT_DIR / unit).exists() or systemctl_state("is-active", unit) in ("active", "activating"):
            run_command(["systemctl", "disable", "--now", unit], sudo=True, check=False, timeout_s=120)
            log.info(f"stopped and disabled {unit}")
            removed.append(unit)
    for path in paths:
        if path.exists() or path.is_symlink():
            run_command(["rm", "-f", "--", str(path)], sudo=True, timeout_s=30)
            log.info(f"removed {path}")
            removed.append(str(path))
    if removed:
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    return removed


def purge_packages(packages: Sequence[str], lock_timeout_s: int, log: Log) -> list[str]:
    """`apt-get purge` the packages that are installed; which ones it purged."""
    installed = [p for p in packages if p not in missing_packages([p])]
    if installed:
        wait_for_locks(DPKG_LOCKS, time.monotonic() + lock_timeout_s, log)
        run_command(
            apt_get_argv(["purge", *installed], lock_timeout_s),
            sudo=True,
            env=APT_ENV,
            timeout_s=lock_timeout_s + 600,
        )
        log.info(f"purged {' '.join(installed)}")
    return installed


# -- rootless podman ------------------------------------------------------------------

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
SUBID_START = 100000  # the old bootstrap's range: 100000-165535
SUBID_COUNT = 65536
USERNS_SYSCTL_FILE = Path("/etc/sysctl.d/60-cocalc-userns.conf")
USERNS_SYSCTL = "kernel.unprivileged_userns_clone"
USERNS_PROC = Path("/proc/sys/kernel/unprivileged_userns_clone")  # Debian and Ubuntu kernels only
ROOT_STORAGE_CONF = Path("/etc/containers/storage.conf")


def subid_ranges(text: str) -> list[tuple[str, int, int]]:
    """(owner, first id, count) of every well-formed line of /etc/subuid or /etc/subgid."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit() and not line.lstrip().startswith("#"):
            ranges.append((fields[0], int(fields[1]), int(fields[2])))
    return ranges


def subid_entry(text: str, user: str, uid: int) -> str | None:
    """The line to add for `user`: the old range (100000, 65536 ids), moved up
    past every range it would overlap; None when the user already has one."""
    ranges = subid_ranges(text)
    if any(owner in (user, str(uid)) for owner, _, _ in ranges):
        return None
    start = SUBID_START
    while True:
        clash = [s + c for _, s, c in ranges if s < start + SUBID_COUNT and start < s + c]
        if not clash:
            return f"{user}:{start}:{SUBID_COUNT}"
        start = -(-max(clash) // SUBID_COUNT) * SUBID_COUNT  # the next multiple of 65536 past them


def with_subid_entry(text: str, entry: str) -> str:
    return text + ("" if text == "" or text.endswith("\n") else "\n") + entry + "\n"


def containers_dir(config: Config) -> Path:
    return Path(config.btrfs.mount_point) / "data" / "containers"


def storage_roots(config: Config, rootless_user: str | None) -> tuple[Path, Path]:
    """(runroot, graphroot): /btrfs/data/containers/root/{run,storage}, or
    /btrfs/data/containers/rootless/<user>/{run,storage}."""
    base = containers_dir(config) / ("root" if rootless_user is None else f"rootless/{rootless_user}")
    return base / "run", base / "storage"


def render_storage_conf(runroot: Path, graphroot: Path) -> str:
    return (
        "# Written by bootstrap.py; edits are overwritten. Container storage lives on /btrfs,\n"
        "# not on the root disk (the root disk filled up once).\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'runroot = "{runroot}"\n'
        f'graphroot = "{graphroot}"\n'
    )


def user_storage_conf(config: Config) -> Path:
    return Path(config.home) / ".config" / "containers" / "storage.conf"


class ContainersStep(Step):
    """Rootless podman for the user: subordinate ids, the user-namespace
    sysctl, and storage.conf (root's and the user's) with storage on /btrfs."""

    name = "containers"
    deps = ("apt", "btrfs")  # podman, uidmap; /btrfs/data
    weight_s = 1.0
    phase = "setting up containers"
    hint = "Check /etc/subuid, /etc/subgid and the storage.conf files; `podman info` as the user says what podman sees."

    def root_files(self) -> dict[Path, str]:
        run, graph = storage_roots(self.config, None)
        return {ROOT_STORAGE_CONF: render_storage_conf(run, graph), USERNS_SYSCTL_FILE: f"{USERNS_SYSCTL} = 1\n"}

    def user_conf(self) -> str:
        return render_storage_conf(*storage_roots(self.config, self.config.bootstrap_user))

    def dirs(self) -> dict[Path, tuple[str, int]]:
        """Storage directories: owner ("root" or the user) and mode."""
        user = self.config.bootstrap_user
        out: dict[Path, tuple[str, int]] = {containers_dir(self.config): ("root", 0o755)}
        out |= {p: ("root", 0o700) for p in storage_roots(self.config, None)}
        rootless = storage_roots(self.config, user)
        out[rootless[0].parent.parent] = ("root", 0o755)  # .../rootless
        out[rootless[0].parent] = (user, 0o700)
        out |= {p: (user, 0o700) for p in rootless}
        return out

    def inputs(self) -> Mapping[str, Any]:
        return {
            "user": self.config.bootstrap_user,
            "files": {str(p): c for p, c in self.root_files().items()},
            "user_conf": self.user_conf(),
        }

    def problems(self) -> list[str]:
        user = self.config.bootstrap_user
        uid = user_ids(user)[0]
        problems = [
            f"{p} is missing or differs" for p, c in self.root_files().items() if not file_matches(p, c, mode=0o644)
        ]
        if not file_matches(user_storage_conf(self.config), self.user_conf(), mode=0o644):
            problems.append(f"{user_storage_conf(self.config)} is missing or differs")
        problems += [f"{f} has no range for {user}" for f in SUBID_FILES if subid_entry(read_text_or(f), user, uid)]
        owners = {"root": 0, user: uid}
        for path, (owner, mode) in self.dirs().items():
            try:
                st = path.stat()
            except OSError:
                problems.append(f"{path} is missing")
                continue
            if st.st_uid != owners[owner] or stat.S_IMODE(st.st_mode) != mode:
                problems.append(f"{path} is not {owner}'s with mode {mode:o}")
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or "subordinate ids, sysctl and storage on /btrfs in place")

    def apply(self) -> None:
        user = self.config.bootstrap_user
        uid, _, group = user_ids(user)
        for path in SUBID_FILES:
            text = read_text_or(path)
            entry = subid_entry(text, user, uid)
            if entry is not None:
                write_root_file(path, with_subid_entry(text, entry), mode=0o644)
                self.log.info(f"{path}: {entry}")
        for path, content in self.root_files().items():
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
        self.apply_sysctl()
        owners = {"root": 0, user: uid}
        for path, (owner, mode) in self.dirs().items():
            if not path.exists():
                make_root_dirs(path)
            st = path.stat()
            if st.st_uid != owners[owner]:
                run_command(
                    ["chown", f"{owner}:{group if owner == user else 'root'}", str(path)], sudo=True, timeout_s=30
                )
            if stat.S_IMODE(st.st_mode) != mode:
                run_command(["chmod", f"{mode:o}", str(path)], sudo=True, timeout_s=30)
        if write_user_file(user_storage_conf(self.config), self.user_conf(), 0o644):
            self.log.info(f"wrote {user_storage_conf(self.config)}")

    def apply_sysctl(self) -> None:
        """Best effort, as upstream: only Debian/Ubuntu kernels have the knob, and
        inside a container /proc/sys may be read-only."""
        if not USERNS_PROC.exists():
            self.log.info(f"{USERNS_SYSCTL} does not exist on this kernel; user namespaces need no switch")
            return
        if read_text_or(USERNS_PROC).strip() == "1":
            return
        done = run_command(["sysctl", "-w", f"{USERNS_SYSCTL}=1"], sudo=True, check=False, timeout_s=30)
        if done.returncode != 0:
            self.log.warn(
                f"could not set {USERNS_SYSCTL}=1 now ({done.output.strip()}); {USERNS_SYSCTL_FILE} sets it at boot"
            )


# -- time -------------------------------------------------------------------------------

CHRONY_CONF = Path("/etc/chrony/chrony.conf")
CHRONY_UNIT = "chrony.service"
TIMESYNCD_UNIT = "systemd-timesyncd.service"


def render_chrony_conf() -> str:
    """Upstream's chrony.conf (pool, makestep 1.0 -1, rtcsync) plus the
    distribution's file locations. Clock skew broke hosts once."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "pool pool.ntp.org iburst maxsources 4",
            "keyfile /etc/chrony/chrony.keys",
            "driftfile /var/lib/chrony/chrony.drift",
            "logdir /var/log/chrony",
            "maxupdateskew 100.0",
            "makestep 1.0 -1",
            "rtcsync",
            "",
        ]
    )


class ChronyStep(Step):
    """chrony keeps the clock; systemd-timesyncd is off."""

    name = "chrony"
    deps = ("apt",)  # chrony
    weight_s = 0.5
    phase = "setting up time sync"
    hint = "Check that chrony is in apt.packages; `systemctl status chrony` says why it does not run."

    def problems(self) -> list[str]:
        problems = []
        if not file_matches(CHRONY_CONF, render_chrony_conf(), mode=0o644):
            problems.append(f"{CHRONY_CONF} is missing or differs")
        if systemctl_state("is-enabled", CHRONY_UNIT) != "enabled":
            problems.append(f"{CHRONY_UNIT} is not enabled")
        if systemctl_state("is-enabled", TIMESYNCD_UNIT) == "enabled":
            problems.append(f"{TIMESYNCD_UNIT} is enabled")
        if systemctl_state("is-active", TIMESYNCD_UNIT) == "active":
            problems.append(f"{TIMESYNCD_UNIT} is running")
        return problems

    def inputs(self) -> Mapping[str, Any]:
        return {"conf": render_chrony_conf()}

    def check(self) -> StepState:
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or f"{CHRONY_UNIT} enabled with our config, timesyncd off")

    def apply(self) -> None:
        if systemctl_state("is-enabled", TIMESYNCD_UNIT) in ("enabled", "enabled-runtime") or (
            systemctl_state("is-active", TIMESYNCD_UNIT) == "active"
        ):
            run_command(["systemctl", "disable", "--now", TIMESYNCD_UNIT], sudo=True, timeout_s=120)
            self.log.info(f"disabled {TIMESYNCD_UNIT}")
        changed = not file_matches(CHRONY_CONF, render_chrony_conf(), mode=0o644)
        if changed:
            write_root_file(CHRONY_CONF, render_chrony_conf(), mode=0o644)
            self.log.info(f"wrote {CHRONY_CONF}")
        if systemctl_state("is-enabled", CHRONY_UNIT) != "enabled":
            run_command(["systemctl", "enable", CHRONY_UNIT], sudo=True, timeout_s=120, hint=self.hint)
        # restart to read the new file; a unit whose conditions fail (no CAP_SYS_TIME
        # in a container) stays inactive, which is what the distribution wants there
        verb = "restart" if changed else "start"
        done = run_command(["systemctl", verb, CHRONY_UNIT], sudo=True, check=False, timeout_s=120)
        state = systemctl_state("is-active", CHRONY_UNIT)
        if done.returncode != 0 or state != "active":
            self.log.warn(f"{CHRONY_UNIT} is {state} ({done.output.strip() or 'its conditions are not met here'})")


# -- the tunnel -------------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    found = run_command(["dpkg-query", "-W", "-f", "${Version}", package], check=False, timeout_s=30)
    return found.output.strip() if found.returncode == 0 and found.output.strip() else None


def tunnel_leftovers() -> list[Path]:
    """What a tunnel left behind (our unit, the token, our config.yml)."""
    ours = [SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service", CLOUDFLARED_TOKEN_ENV]
    if read_text_or(CLOUDFLARED_CONFIG).startswith("# Written by bootstrap.py"):
        ours.append(CLOUDFLARED_CONFIG)
    return [p for p in ours if p.exists()]


def remove_tunnel(lock_timeout_s: int, log: Log) -> list[str]:
    """Take a tunnel away: the unit (stopped, disabled, removed), the token env
    file, our config.yml, and the cloudflared package we installed."""
    left = tunnel_leftovers()
    if not left:
        return []
    had_unit = (SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service").exists()
    removed = remove_installed([f"{CLOUDFLARED_UNIT}.service"], left, log)
    if had_unit:  # we installed cloudflared for our unit
        removed += purge_packages(["cloudflared"], lock_timeout_s, log)
    return removed


class TunnelStep(Step):
    """cloudflared for a host reached through a Cloudflare tunnel: the pinned .deb
    (sha256 verified), the token in a root 0600 env file (TUNNEL_TOKEN, never an
    argument), config.yml ingress to the daemon, and cocalc-cloudflared.service.
    Taken away again (unit, token, package) when the config no longer has one."""

    name = "tunnel"
    deps = ("apt",)  # dpkg: one at a time
    weight_s = 3.0
    phase = "setting up the tunnel"
    hint = "See sudo journalctl -u cocalc-cloudflared -n 100 --no-pager; the token comes from the hub's secrets."

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        cf = self.config.cloudflared
        return {"cloudflared": None if cf is None else cf.to_dict()}

    def problems(self) -> list[str]:
        cf = self.config.cloudflared
        if cf is None:
            left = tunnel_leftovers()
            return [f"left over from an earlier tunnel: {', '.join(map(str, left))}"] if left else []
        unit = f"{CLOUDFLARED_UNIT}.service"
        problems = []
        if installed_version("cloudflared") != cf.deb.version:
            problems.append(f"cloudflared {cf.deb.version} is not installed")
        try:
            st = CLOUDFLARED_TOKEN_ENV.stat()
            if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
                problems.append(f"{CLOUDFLARED_TOKEN_ENV} is not root's 0600")
        except OSError:
            problems.append(f"{CLOUDFLARED_TOKEN_ENV} is missing")
        if not file_matches(CLOUDFLARED_CONFIG, render_cloudflared_config(cf.hostname, cf.port), mode=0o644):
            problems.append(f"{CLOUDFLARED_CONFIG} is missing or differs")
        if not file_matches(self.unit_path(), render_cloudflared_unit(), mode=0o644):
            problems.append(f"{self.unit_path()} is missing or differs")
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        if systemctl_state("is-active", unit) != "active":
            problems.append(f"{unit} is not active")
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        if self.config.cloudflared is None and not problems:
            return StepState(True, "no tunnel configured")
        return StepState(not problems, "; ".join(problems) or "cloudflared runs the tunnel")

    def apply(self) -> None:
        cf = self.config.cloudflared
        if cf is None:
            removed = remove_tunnel(self.config.apt.lock_timeout_s, self.log)
            self.log.info(f"removed the tunnel: {', '.join(removed)}" if removed else "no tunnel configured")
            return
        changed = False
        if installed_version("cloudflared") != cf.deb.version:
            deb = downloads_dir(self.config) / f"cloudflared_{cf.deb.version}.deb"
            download_verified(cf.deb.url, deb, cf.deb.sha256, log=self.log, size_bytes=cf.deb.size_bytes)
            spec = self.config.apt
            wait_for_locks(DPKG_LOCKS, time.monotonic() + spec.lock_timeout_s, self.log)
            run_command(
                apt_get_argv(["install", "--no-install-recommends", str(deb)], spec.lock_timeout_s),
                sudo=True,
                env=APT_ENV,
                timeout_s=spec.lock_timeout_s + 600,
                hint=self.hint,
            )
            self.log.info(f"installed cloudflared {cf.deb.version} (sha256 verified)")
            changed = True
        if not CLOUDFLARED_TOKEN_ENV.exists():
            changed |= self.fetch_token(cf.token_secret)
        for path, content in (
            (CLOUDFLARED_CONFIG, render_cloudflared_config(cf.hostname, cf.port)),
            (self.unit_path(), render_cloudflared_unit()),
        ):
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
                changed = True
        unit = f"{CLOUDFLARED_UNIT}.service"
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        verb = "restart" if changed else "start"
        run_command(["systemctl", verb, unit], sudo=True, timeout_s=120, hint=self.hint)
        self.log.info(f"{verb}ed {unit}")

    def fetch_token(self, name: str) -> bool:
        token = host_auth(self.config)  # the host credential (creds helper: was the bootstrap token)
        if token is None:
            raise BootstrapError(
                f"no host credential nor bootstrap token in {self.config.bootstrap_dir}",
                hint="Re-run the stub from the hub.",
            )
        value = fetch_secret(f"{self.config.hub.secrets_url.rstrip('/')}/{name}", token).strip()
        add_secret(value)
        if not TUNNEL_TOKEN_RE.fullmatch(value):
            raise BootstrapError(
                f"the hub's secret {name} does not look like a tunnel token",
                hint="Store the tunnel token (base64) as that secret on the hub.",
            )
        write_root_file(CLOUDFLARED_TOKEN_ENV, f"TUNNEL_TOKEN={value}\n", mode=0o600)
        self.log.info(f"wrote {CLOUDFLARED_TOKEN_ENV} (0600, root)")
        return True


# -- GPU hosts -------------------------------------------------------------------------

NVIDIA_KEYRING = Path("/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg")
NVIDIA_SOURCES = Path("/etc/apt/sources.list.d/nvidia-container-toolkit.list")
NVIDIA_DEVICE = Path("/dev/nvidiactl")  # there when an NVIDIA driver is loaded
CDI_HELPER = Path("/usr/local/sbin/cocalc-nvidia-cdi")
CDI_SPEC = "/etc/cdi/nvidia.yaml"
CDI_UNIT = "cocalc-nvidia-cdi"
GPU_GROUPS = ("video", "render")


def render_nvidia_sources(repo_url: str) -> str:
    return f"# Written by bootstrap.py; edits are overwritten.\ndeb [signed-by={NVIDIA_KEYRING}] {repo_url} /\n"


def render_cdi_helper(output: str = CDI_SPEC) -> str:
    """Regenerates the CDI spec (it goes stale after driver changes)."""
    return "\n".join(
        [
            "#!/bin/sh",
            "# Written by bootstrap.py; edits are overwritten. Run by cocalc-nvidia-cdi.timer.",
            "set -eu",
            f'mkdir -p "$(dirname {shlex.quote(output)})"',
            f"exec nvidia-ctk cdi generate --output={shlex.quote(output)}",
            "",
        ]
    )


def render_cdi_units(interval_s: int) -> dict[str, str]:
    """The oneshot service and its timer (upstream used cron every 5 minutes)."""
    service = "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Regenerate the NVIDIA CDI spec for containers",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={CDI_HELPER}",
            "",
        ]
    )
    timer = "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Regenerate the NVIDIA CDI spec regularly",
            "",
            "[Timer]",
            "OnBootSec=30s",
            f"OnUnitActiveSec={interval_s}s",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )
    return {f"{CDI_UNIT}.service": service, f"{CDI_UNIT}.timer": timer}


def gpu_leftovers() -> list[Path]:
    """What a GPU config left behind: our units, helper, apt source, keyring, CDI spec."""
    ours = [SYSTEMD_UNIT_DIR / n for n in render_cdi_units(300)] + [CDI_HELPER, NVIDIA_SOURCES]
    if not any(p.exists() for p in ours):
        return []  # not ours: the keyring and spec may be an operator's
    return [p for p in (*ours, NVIDIA_KEYRING, Path(CDI_SPEC)) if p.exists()]


def remove_gpu(lock_timeout_s: int, log: Log) -> list[str]:
    """Take GPU support away: the timer and its service (stopped, disabled,
    removed), the helper, the repository and its keyring, the CDI spec (stale
    without the toolkit), and the toolkit package. The user stays in video
    and render (harmless without a GPU; groups may be shared)."""
    left = gpu_leftovers()
    if not left:
        return []
    removed = remove_installed([f"{CDI_UNIT}.timer", f"{CDI_UNIT}.service"], left, log)
    return removed + purge_packages(["nvidia-container-toolkit"], lock_timeout_s, log)


def user_groups(user: str) -> set[str]:
    found = run_command(["id", "-nG", user], check=False, timeout_s=30)
    return set(found.output.split()) if found.returncode == 0 else set()


class GpuStep(Step):
    """NVIDIA's container toolkit on GPU hosts: its apt repository with a pinned
    keyring, the packages, the user in video and render, and the CDI spec kept
    fresh by a systemd timer. A host without an NVIDIA GPU skips it, and says so."""

    name = "gpu"
    deps = ("apt",)  # apt/dpkg one at a time
    weight_s = 20.0
    phase = "setting up the GPU"
    hint = "Check the NVIDIA driver (nvidia-smi) and gpu.repo_url / gpu.keyring_sha256 in the config."

    def inputs(self) -> Mapping[str, Any]:
        gpu = self.config.gpu
        return {"gpu": None if gpu is None else gpu.to_dict(), "gpu_present": NVIDIA_DEVICE.exists()}

    def skip_reason(self) -> str | None:
        if self.config.gpu is None:
            return "no GPU configured"
        if not NVIDIA_DEVICE.exists():
            return f"no NVIDIA GPU on this host ({NVIDIA_DEVICE} is missing): the container toolkit is not installed"
        return None

    def files(self) -> dict[Path, tuple[str, int]]:
        gpu = self.config.gpu
        assert gpu is not None
        out = {NVIDIA_SOURCES: (render_nvidia_sources(gpu.repo_url), 0o644), CDI_HELPER: (render_cdi_helper(), 0o755)}
        out |= {SYSTEMD_UNIT_DIR / n: (t, 0o644) for n, t in render_cdi_units(gpu.cdi_interval_s).items()}
        return out

    def problems(self) -> list[str]:
        gpu = self.config.gpu
        assert gpu is not None
        problems = []
        try:
            if file_sha256(NVIDIA_KEYRING) != gpu.keyring_sha256:
                problems.append(f"{NVIDIA_KEYRING} differs from the pinned keyring")
        except OSError:
            problems.append(f"{NVIDIA_KEYRING} is missing")
        problems += [
            f"{p} is missing or differs" for p, (c, m) in self.files().items() if not file_matches(p, c, mode=m)
        ]
        missing = missing_packages(gpu.packages)
        if missing:
            problems.append(f"not installed: {' '.join(missing)}")
        absent = [g for g in GPU_GROUPS if g not in user_groups(self.config.bootstrap_user)]
        if absent:
            problems.append(f"{self.config.bootstrap_user} is not in {', '.join(absent)}")
        if systemctl_state("is-enabled", f"{CDI_UNIT}.timer") != "enabled":
            problems.append(f"{CDI_UNIT}.timer is not enabled")
        if not Path(CDI_SPEC).exists():
            problems.append(f"{CDI_SPEC} is missing")
        return problems

    def check(self) -> StepState:
        why = self.skip_reason()
        if self.config.gpu is None and gpu_leftovers():
            return StepState(False, f"left over from an earlier GPU config: {', '.join(map(str, gpu_leftovers()))}")
        if why is not None:
            return StepState(True, why)
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or "NVIDIA container toolkit, CDI spec and timer in place")

    def apply(self) -> None:
        why = self.skip_reason()
        gpu = self.config.gpu
        if gpu is None:
            removed = remove_gpu(self.config.apt.lock_timeout_s, self.log)
            self.log.info(f"removed GPU support: {', '.join(removed)}" if removed else "no GPU configured")
            return
        if why is not None:
            self.log.info(why)
            return
        keyring = downloads_dir(self.config) / "nvidia-container-toolkit-keyring.gpg"
        download_verified(gpu.keyring_url, keyring, gpu.keyring_sha256, log=self.log)
        make_root_dirs(NVIDIA_KEYRING.parent)
        run_command(
            ["install", "-m", "0644", "-o", "root", "-g", "root", str(keyring), str(NVIDIA_KEYRING)],
            sudo=True,
            timeout_s=30,
        )
        for path, (content, mode) in self.files().items():
            if not file_matches(path, content, mode=mode):
                write_root_file(path, content, mode=mode)
                self.log.info(f"wrote {path}")
        spec = self.config.apt
        apt_update(spec.lock_timeout_s, self.log)  # the new repository's lists
        apt_install(gpu.packages, spec.lock_timeout_s, self.log)
        for group in GPU_GROUPS:
            if run_command(["getent", "group", group], check=False, timeout_s=30).returncode != 0:
                run_command(["groupadd", "--system", group], sudo=True, timeout_s=30)
        run_command(["usermod", "-aG", ",".join(GPU_GROUPS), self.config.bootstrap_user], sudo=True, timeout_s=30)
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        run_command(["systemctl", "enable", "--now", f"{CDI_UNIT}.timer"], sudo=True, timeout_s=120)
        run_command(["systemctl", "start", f"{CDI_UNIT}.service"], sudo=True, timeout_s=300, hint=self.hint)
        self.log.info(f"generated {CDI_SPEC}; {CDI_UNIT}.timer regenerates it every {gpu.cdi_interval_s}s")


# ============================================================================
# steps_network: The host's network rules: cloud metadata services serve user-data (the stub
# ============================================================================


NFT = "/usr/sbin/nft"
NFT_PACKAGE = "nftables"
METADATA_TABLE = "cocalc_metadata"
METADATA_NFT_FILE = Path("/etc/nftables.d/cocalc-metadata.nft")
METADATA_UNIT = "cocalc-metadata-block"


def render_metadata_nft(addresses: Sequence[str]) -> str:
    """Only root may reach `addresses`: locally, by socket owner (a rootless
    container's traffic leaves through slirp4netns or pasta, which run as the
    user; root inside a user namespace is still the user here); forwarded
    traffic (rootful containers on a bridge) not at all. Refused with
    admin-prohibited, so a client fails at once with "No route to host"."""
    targets = ", ".join(addresses)
    return "\n".join(
        [
            f"#!{NFT} -f",
            "# Written by bootstrap.py; edits are overwritten. Cloud metadata services serve",
            "# user-data (with the bootstrap token) to any process that asks: only root may reach them.",
            "# Replaces only its own table (declare, delete, define: one atomic transaction).",
            f"table inet {METADATA_TABLE}",
            f"delete table inet {METADATA_TABLE}",
            f"table inet {METADATA_TABLE} {{",
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            f"    ip daddr {{ {targets} }} meta skuid != 0 counter reject with icmpx type admin-prohibited",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    ip daddr {{ {targets} }} counter reject with icmpx type admin-prohibited",
            "  }",
            "}",
            "",
        ]
    )


def render_metadata_unit() -> str:
    """Loads the table at boot, before the network and the daemon; again when
    nftables.service reloads (its stock file flushes everything). No ExecStop:
    stopping the unit must not open the way (removing the rule is explicit)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Keep the cloud metadata service from everything but root (CoCalc)",
            "DefaultDependencies=no",
            "Wants=network-pre.target",
            "Before=network-pre.target shutdown.target",
            "After=local-fs.target nftables.service",
            "ReloadPropagatedFrom=nftables.service",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            f"ExecStart={NFT} -f {METADATA_NFT_FILE}",
            f"ExecReload={NFT} -f {METADATA_NFT_FILE}",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def metadata_table_listing() -> str | None:
    """`nft list table inet cocalc_metadata`, or None when there is no such table (or no nft)."""
    if not Path(NFT).exists():
        return None
    found = run_command([NFT, "list", "table", "inet", METADATA_TABLE], sudo=True, check=False, timeout_s=30)
    return found.output if found.returncode == 0 else None


def remove_metadata_block(log: Log) -> list[str]:
    """Take the rule away (a config without it, or deprovision): the unit, the
    file and the live table. Only on a host that has our unit or file, so a
    host that never had the rule never touches the table. What was removed."""
    unit_file = SYSTEMD_UNIT_DIR / f"{METADATA_UNIT}.service"
    if not (unit_file.exists() or METADATA_NFT_FILE.exists()):
        return []
    removed = remove_installed([f"{METADATA_UNIT}.service"], [unit_file, METADATA_NFT_FILE], log)
    if metadata_table_listing() is not None:
        run_command([NFT, "delete", "table", "inet", METADATA_TABLE], sudo=True, timeout_s=30)
        log.info(f"deleted the nftables table inet {METADATA_TABLE}")
        removed.append(f"table inet {METADATA_TABLE}")
    return removed


class MetadataBlockStep(Step):
    """The nftables rule that keeps the cloud metadata service from everything
    but root, persisted (file + enabled unit) and live; removed again when the
    config no longer asks for it."""

    name = "metadata"
    deps = ("apt",)  # nftables
    weight_s = 0.5
    phase = "setting up containers"
    hint = (
        f"See sudo journalctl -u {METADATA_UNIT} -n 50 --no-pager and `sudo nft list table inet {METADATA_TABLE}`; "
        "nft needs the nf_tables kernel module and CAP_NET_ADMIN."
    )

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{METADATA_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        block = self.config.metadata_block
        return {"addresses": None if block is None else list(block.addresses)}

    def files(self) -> dict[Path, str]:
        block = self.config.metadata_block
        assert block is not None
        return {METADATA_NFT_FILE: render_metadata_nft(block.addresses), self.unit_path(): render_metadata_unit()}

    def problems(self) -> list[str]:
        block = self.config.metadata_block
        if block is None:
            left = [str(p) for p in (self.unit_path(), METADATA_NFT_FILE) if p.exists()]
            return [f"left over from an earlier config: {', '.join(left)}"] if left else []
        if not Path(NFT).exists():
            return [f"{NFT} is missing (package {NFT_PACKAGE})"]
        problems = [f"{p} is missing or differs" for p, c in self.files().items() if not file_matches(p, c, mode=0o644)]
        unit = f"{METADATA_UNIT}.service"
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        listing = metadata_table_listing()
        if listing is None:
            problems.append(f"the nftables table inet {METADATA_TABLE} is not loaded")
        else:
            live = set(re.findall(r"(?<![0-9.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9.])", listing))
            problems += [f"{a} is not in the live table" for a in block.addresses if a not in live]
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        if not problems:
            block = self.config.metadata_block
            what = "no metadata rule configured" if block is None else f"only root reaches {', '.join(block.addresses)}"
            return StepState(True, what)
        return StepState(False, "; ".join(problems))

    def apply(self) -> None:
        if self.config.metadata_block is None:
            removed = remove_metadata_block(self.log)
            self.log.info(f"removed the metadata rule: {', '.join(removed)}" if removed else "no metadata rule")
            return
        if missing_packages([NFT_PACKAGE]):
            self.log.info(f"installing {NFT_PACKAGE} (not in apt.packages)")
            apt_install([NFT_PACKAGE], self.config.apt.lock_timeout_s, self.log)
        for path, content in self.files().items():
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
        unit = f"{METADATA_UNIT}.service"
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        # restart: a oneshot that already ran only loads the (new) file again this way
        run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
        self.log.info(f"{unit} loaded inet {METADATA_TABLE}: only root reaches the metadata service")


# ============================================================================
# engine: The plan (steps as a dependency graph), state, the lock and the runner.
# ============================================================================


STEPS: tuple[type[Step], ...] = (
    PreflightStep,
    DirectoriesStep,
    FilesStep,
    SecretsStep,
    AptStep,
    DownloadProjectHostStep,
    DownloadProjectStep,
    DownloadToolsStep,
    NodeStep,
    InstallProjectHostStep,
    InstallProjectStep,
    InstallToolsStep,
    BtrfsStep,
    InstallSecretsStep,
    ContainersStep,
    MetadataBlockStep,
    ChronyStep,
    TunnelStep,
    GpuStep,
    ServiceStep,
    PruneStep,
    FinalizeStep,
)


# ============================================================================
# plan
# ============================================================================

# The steps as a dependency graph (graphlib), run by a thread pool. Serial
# mode (`parallel: false`, `--jobs 1`) walks the same graph, always taking
# the ready step that comes first in the step list. A failed step blocks its
# dependents, running steps finish, nothing new starts, and the run fails with
# that step's error.
#
# Idempotency: after a step applies successfully its record (fingerprint of
# inputs() and version, duration) goes to state.json. A step is skipped when
# its record's fingerprint matches AND check() says satisfied; otherwise it
# applies. Applying a step first erases the records of all its dependents
# (transitively), so they re-apply too, in this run, or in the next one if
# this one is killed in between: "a step whose dependency changed re-runs".
#
# The engine does not take apply()'s word for it: check() runs again after
# apply(), and a step that is still unsatisfied fails ("applied, but ..."
# with the check's finding). A step is "changed" only when the first check
# found work and the second finds none; applied with nothing to do (no
# record, e.g. state.json was lost, or new inputs the check already meets)
# it is "unchanged".
#
# The record of what happened is the event stream (the spool, reporting.py):
# state.json holds only what the next run needs.

STATE_FILE_NAME = "state.json"
LOCK_FILE_NAME = "bootstrap.lock"
EVENTS_DIR_NAME = "events"
MAX_JOBS = 16


class PlanError(BootstrapError):
    """The step graph is broken (cycle, unknown dependency, bad name)."""


class LockedError(BootstrapError):
    exit_code = EXIT_LOCKED


class StepNotConverged(BootstrapError):
    """apply() returned, but check() still finds work: the step failed."""


class StepFailed(BootstrapError):
    """The run failed because this step did; carries the step's message and hint."""

    def __init__(self, step: str, message: str, *, hint: str | None, log_tail: str | None) -> None:
        super().__init__(f"step {step} failed: {message}", hint=hint, log_tail=log_tail)
        self.step = step


def state_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / STATE_FILE_NAME


def lock_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / LOCK_FILE_NAME


def log_path(config: Config) -> Path:
    return Path(config.bootstrap_root) / "logs" / "bootstrap.log"


class Plan:
    """A validated step graph in stable order, built from a list of step
    classes (STEPS by default; tests pass their own)."""

    def __init__(self, step_classes: Sequence[type[Step]] | None = None) -> None:
        self.classes: dict[str, type[Step]] = {}
        for cls in STEPS if step_classes is None else step_classes:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not STEP_NAME_RE.fullmatch(name):
                raise PlanError(f"step {cls.__name__} has an invalid name {name!r}", hint=PLAN_HINT)
            if name in self.classes:
                raise PlanError(f"two steps are named {name!r}", hint=PLAN_HINT)
            if cls.check is Step.check:
                raise PlanError(f"step {name} has no check(): the engine verifies every apply()", hint=PLAN_HINT)
            self.classes[name] = cls
        for name, cls in self.classes.items():
            unknown = [d for d in cls.deps if d not in self.classes]
            if unknown:
                raise PlanError(f"step {name} depends on unknown step(s) {', '.join(unknown)}", hint=PLAN_HINT)
        self.index = {name: i for i, name in enumerate(self.classes)}
        self.order = self._stable_order()
        self.selected = frozenset(self.classes)

    def _stable_order(self) -> tuple[str, ...]:
        sorter = graphlib.TopologicalSorter({n: c.deps for n, c in self.classes.items()})
        try:
            sorter.prepare()
        except graphlib.CycleError as e:
            raise PlanError(f"the steps form a cycle: {' -> '.join(e.args[1])}", hint=PLAN_HINT) from None
        order: list[str] = []
        ready: list[str] = []
        while sorter.is_active():
            ready = sorted([*ready, *sorter.get_ready()], key=self.index.__getitem__)
            order.append(ready.pop(0))
            sorter.done(order[-1])
        return tuple(order)

    def select(self, only: Sequence[str] = (), skip: Sequence[str] = ()) -> Plan:
        """--only runs exactly the named steps (their dependencies are NOT
        added: they are assumed done by an earlier run); --skip leaves the
        named steps out and their dependents run anyway."""
        unknown = sorted({*only, *skip} - set(self.classes))
        if unknown:
            raise UsageError(
                f"unknown step name(s): {', '.join(unknown)}",
                hint=f"Known steps: {', '.join(self.order)} (`bootstrap.py plan` lists them).",
            )
        chosen = set(only) if only else set(self.classes)
        selected = copy.copy(self)
        selected.selected = frozenset(chosen - set(skip))
        return selected

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if n in self.selected)

    def deps(self, name: str) -> tuple[str, ...]:
        """Dependencies inside the selection (the graph that is executed)."""
        return tuple(d for d in self.classes[name].deps if d in self.selected)

    def dependents(self, name: str) -> set[str]:
        """Every step that depends on `name`, directly or not (whole plan)."""
        found: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for other, cls in self.classes.items():
                if current in cls.deps and other not in found:
                    found.add(other)
                    frontier.append(other)
        return found


PLAN_HINT = "This is a bug in the step definitions of bootstrap.py; nothing was changed."


def fingerprint(step: Step) -> str:
    """sha256 of the canonical JSON of the step's inputs and version."""
    doc = {"step": step.name, "version": step.version, "inputs": step.inputs()}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"step inputs must be JSON-like, got {type(value).__name__}")


class StateStore:
    """state.json: what the next run needs and nothing more: for each step
    that last applied successfully, the fingerprint of its inputs, when, and
    how long apply() took (it weights the next run's percent). What a run
    did is in its events (reporting.py). Read-only unless writable (the
    `plan` command writes nothing)."""

    VERSION = 2

    def __init__(self, path: Path, *, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        self._lock = threading.RLock()
        self.data: dict[str, Any] = {"version": self.VERSION, "steps": {}}
        self.problem: str | None = None
        self._unsynced = False  # saved without fsync since the last durable save
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # A broken state file only costs a full re-run; never a failure.
            self.problem = f"ignoring unreadable {path}: {e}"
            return
        if isinstance(loaded, dict) and isinstance(loaded.get("steps"), dict):
            self.data["steps"] = loaded["steps"]  # version 1 also had last_run: dropped
        else:
            self.problem = f"ignoring {path}: not a state file"

    def step_record(self, name: str) -> dict[str, Any] | None:
        record = self.data["steps"].get(name)
        return record if isinstance(record, dict) else None

    def record_step(self, name: str, fp: str, duration_s: float) -> None:
        """Saved at once but not fsync'd: a record lost to a crash only costs a re-apply."""
        with self._lock:
            self.data["steps"][name] = {
                "fingerprint": fp,
                "finished_at": utc_timestamp(),
                "duration_s": round(duration_s, 3),
            }
            self.save()

    def forget(self, names: Iterable[str]) -> None:
        with self._lock:
            gone = [n for n in names if self.data["steps"].pop(n, None) is not None]
            if gone:
                self.save(durable=True)  # before apply() changes anything

    def save(self, *, durable: bool = False) -> None:
        """Always atomic (a kill never leaves half a file); fsync'd only when
        durable, since every other write only saves work after a power loss."""
        if not self.writable:
            return
        with self._lock:
            text = json.dumps(self.data, indent=1, sort_keys=True) + "\n"
            atomic_write_text(self.path, text, durable=durable)
            self._unsynced = not durable

    def sync(self) -> None:
        """At the end of a run: make the records durable, if any changed (a warm run writes nothing)."""
        with self._lock:
            if self._unsynced:
                self.save(durable=True)


class RunLock:
    """flock on bootstrap.lock, with the holder (PID, run id, start time)
    written inside for the message a second run prints. The kernel drops
    the lock when the holder dies, so a killed run never blocks the next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, run_id: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A few tries: `status` probes the lock with a shared flock for an instant.
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_lock_holder(self.path)
                if attempt == 4 or holder:
                    os.close(fd)
                    raise LockedError(
                        f"another bootstrap run holds {self.path}: {describe_holder(holder)}",
                        hint="Wait for it to finish (`bootstrap.py status --wait`); "
                        "the lock is released as soon as that process exits.",
                    ) from None
                time.sleep(0.05)
        holder_info = {"pid": os.getpid(), "run_id": run_id, "started_at": utc_timestamp()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def read_lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"PID {holder.get('pid')}, run {holder.get('run_id')}, started {holder.get('started_at')}"


def lock_is_held(path: Path) -> bool:
    """Read-only probe used by `status`: is some run holding the lock now?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our shared lock at once
    return False


def new_run_id() -> str:
    """Sortable by start time (the sender replays older runs first)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(4)}"


@dataclass
class StepRun:
    """One step's fate in this run; times are seconds since the run started."""

    name: str
    outcome: Outcome | None = None  # None: pending
    start_s: float | None = None
    end_s: float | None = None
    message: str = ""
    hint: str | None = None
    log_tail: str | None = None
    error: BaseException | None = None


class Progress:
    """Percent done, weighted by each step's expected duration: its weight_s,
    or the duration it took when it last applied (from state.json)."""

    def __init__(self, plan: Plan, state: StateStore) -> None:
        self.weights: dict[str, float] = {}
        for name in plan.names():
            record = state.step_record(name)
            last = record.get("duration_s") if record else None
            weight = last if isinstance(last, (int, float)) and last > 0 else plan.classes[name].weight_s
            self.weights[name] = max(float(weight), 0.001)
        self.total = sum(self.weights.values()) or 1.0
        self.done = 0.0
        self._lock = threading.Lock()

    def finish(self, name: str) -> None:
        with self._lock:
            self.done += self.weights.get(name, 0.0)

    def percent(self) -> float:
        return round(min(100.0, 100.0 * self.done / self.total), 1)


class EventSink:
    """Where progress events go; the base class drops them (tests, `plan`)."""

    def emit(self, event: Event) -> None:
        pass


class Runner:
    """Runs a plan once: the executor loop, per-step convergence, state,
    events and console."""

    def __init__(
        self, plan: Plan, ctx: Context, *, state: StateStore, events: EventSink | None = None, jobs: int | None = None
    ) -> None:
        self.plan = plan
        self.log = ctx.log
        self.events = events or EventSink()
        if ctx.cpu is None:
            slots = CpuSlots(cpu_slots(ctx.config), on_wait=self._cpu_wait, on_granted=self._cpu_granted)
            ctx = dataclasses.replace(ctx, cpu=slots)
        self.state = state
        self.jobs = max(1, jobs if jobs is not None else default_jobs(plan, ctx.config))
        if ctx.link is None:
            # apt has the link first only when there are more threads than steps that may wait for it:
            # then apt always gets a thread and never queues behind them (serial runs: nobody first)
            waiters = sum(1 for cls in plan.classes.values() if cls.uses_link)
            first = [n for n in plan.names() if plan.classes[n].link_first(ctx)] if self.jobs > waiters else []
            holder = first[0] if first else None
            ctx = dataclasses.replace(
                ctx, link=LinkFirst(holder, on_wait=self._link_wait, on_granted=self._link_granted)
            )
        self.ctx = ctx
        self.progress = Progress(plan, state)
        self.steps = {name: StepRun(name) for name in plan.names()}
        self.t0 = time.monotonic()
        self._running: set[str] = set()
        self._lock = threading.Lock()

    # -- CPU slots (slots.py) ----------------------------------------------

    def _cpu_wait(self, who: str, holders: list[str]) -> None:
        assert self.ctx.cpu is not None
        self.log.info(
            f"waiting for a CPU slot ({len(holders)} of {self.ctx.cpu.slots} busy: {', '.join(holders)})",
            event="cpu_wait",
            holders=holders,
        )
        self.events.emit(ProgressEvent(phase=f"{who}: waiting for a CPU slot", percent=self.progress.percent()))

    def _cpu_granted(self, who: str, waited_s: float) -> None:
        self.log.info(f"got a CPU slot after waiting {waited_s:.1f}s", event="cpu_slot", waited_s=round(waited_s, 3))
        phase = self.plan.classes[who].phase if who in self.plan.classes else "bootstrapping"
        self.events.emit(ProgressEvent(phase=phase, percent=self.progress.percent()))

    # -- the link first to apt (slots.py) ----------------------------------

    def _link_wait(self, who: str, holder: str) -> None:
        self.log.info(
            f"waiting for {holder}'s downloads to finish first ({holder} goes first on the shared link)",
            event="link_wait",
            holder=holder,
        )
        self.events.emit(
            ProgressEvent(phase=f"{who}: waiting for {holder}'s downloads", percent=self.progress.percent())
        )

    def _link_granted(self, who: str, waited_s: float, timed_out: bool) -> None:
        why = f"gave up waiting after {waited_s:.1f}s" if timed_out else f"after waiting {waited_s:.1f}s"
        self.log.info(f"downloading now ({why})", event="link_granted", waited_s=round(waited_s, 3))
        phase = self.plan.classes[who].phase if who in self.plan.classes else "bootstrapping"
        self.events.emit(ProgressEvent(phase=phase, percent=self.progress.percent()))

    # -- the executor ------------------------------------------------------

    def run(self) -> dict[str, StepRun]:
        """Run every selected step; raise StepFailed for the first failure."""
        self.t0 = time.monotonic()
        names = self.plan.names()
        self.events.emit(
            RunStartEvent(
                version=__version__,
                parallel=self.jobs > 1,
                steps=tuple(StepInfo(n, self.plan.deps(n), round(self.progress.weights[n], 3)) for n in names),
            )
        )
        self.events.emit(ProgressEvent(phase="starting", percent=0.0))
        failed = self._execute()
        self._mark_blocked(failed)
        if failed is not None:
            step = self.steps[failed]
            raise StepFailed(failed, step.message, hint=step.hint, log_tail=step.log_tail) from step.error
        return self.steps

    def _execute(self) -> str | None:
        """Every step in its own thread, at most `jobs` at once, in dependency order.
        (Plain threads: concurrent.futures would import logging, ~10 % of a warm run's start.)"""
        sorter = graphlib.TopologicalSorter({n: self.plan.deps(n) for n in self.plan.names()})
        sorter.prepare()
        ready: list[str] = []
        running: dict[str, threading.Thread] = {}
        finished: list[tuple[str, bool | BaseException]] = []
        done = threading.Condition()
        failed: str | None = None

        def work(name: str, ctx: contextvars.Context) -> None:
            outcome: bool | BaseException
            try:
                outcome = ctx.run(self._run_step, name)
            except BaseException as e:  # re-raised in the main thread, as a future's result() would
                outcome = e
            with done:
                finished.append((name, outcome))
                done.notify()

        try:
            while True:
                if failed is None:
                    ready = sorted([*ready, *sorter.get_ready()], key=self.plan.index.__getitem__)
                    while ready and len(running) < self.jobs:
                        name = ready.pop(0)
                        # each worker gets its own copy of the context: its CURRENT_STEP
                        thread = threading.Thread(
                            target=work, args=(name, contextvars.copy_context()), name=f"step {name}"
                        )
                        running[name] = thread
                        thread.start()
                if not running:
                    return failed
                with done:
                    while not finished:
                        done.wait()
                    batch = sorted(finished, key=lambda f: self.plan.index[f[0]])
                    finished.clear()
                for name, outcome in batch:
                    running.pop(name).join()
                    if isinstance(outcome, BaseException):
                        raise outcome
                    if outcome:
                        sorter.done(name)
                    elif failed is None:
                        failed = name
                        if self.ctx.link is not None:
                            self.ctx.link.release()  # the holder may never start now: nobody waits for it
        except BaseException:
            # Interrupted: stop the commands of running steps so they end quickly.
            terminate_running_commands()
            raise
        finally:
            if self.ctx.link is not None:
                self.ctx.link.release()  # interrupted: a waiting download must not hold up the join
            for thread in running.values():  # as the pool did: no step outlives the run
                thread.join()

    def _mark_blocked(self, failed: str | None) -> None:
        for name in self.plan.names():
            step = self.steps[name]
            if step.outcome is not None:
                continue
            blockers = [d for d in self._ancestors(name) if self.steps[d].outcome is Outcome.FAILED]
            step.outcome = Outcome.BLOCKED
            step.message = (
                f"blocked: {', '.join(sorted(blockers))} failed"
                if blockers
                else f"not started: the run stopped after {failed} failed"
            )
            step.start_s = step.end_s = self._now()
            self.events.emit(StepEndEvent(step=name, outcome=Outcome.BLOCKED, duration_s=0.0, message=step.message))
            self.log.step_finished(name, Outcome.BLOCKED, 0.0, self.progress.percent(), step.message)

    def _ancestors(self, name: str) -> set[str]:
        found: set[str] = set()
        frontier = list(self.plan.deps(name))
        while frontier:
            dep = frontier.pop()
            if dep not in found:
                found.add(dep)
                frontier.extend(self.plan.deps(dep))
        return found

    def _now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- one step (in a worker thread) ------------------------------------

    def _run_step(self, name: str) -> bool:
        CURRENT_STEP.set(name)
        meter = StepCpu()
        STEP_CPU.set(meter)
        record = self.steps[name]
        record.start_s = self._now()
        cls = self.plan.classes[name]
        with self._lock:
            self._running.add(name)
        self.events.emit(StepStartEvent(step=name))
        self.events.emit(ProgressEvent(phase=cls.phase, percent=self.progress.percent()))
        self.log.step_started(name, self.progress.percent())
        self.log.progress(self.progress.percent(), sorted(self._running))
        try:
            record.outcome, record.message = self._converge(cls(self.ctx))
        except Exception as e:
            record.outcome = Outcome.FAILED
            record.error = e
            text = str(e) if isinstance(e, BootstrapError) else f"{type(e).__name__}: {e}"
            record.message = REDACTOR(text)
            record.hint = e.hint if isinstance(e, BootstrapError) and e.hint else cls.hint
            record.log_tail = e.log_tail if isinstance(e, BootstrapError) else None
            self.log.debug("step failed", event="traceback", traceback=traceback.format_exc())
        record.end_s = self._now()
        if self.ctx.link is not None and name == self.ctx.link.holder:
            self.ctx.link.release()  # done, failed or had nothing to fetch: the link is everyone's
        cpu = StepCpuSeconds(**meter.stop())
        duration = record.end_s - record.start_s
        if record.outcome is not Outcome.FAILED:
            self.progress.finish(name)
        with self._lock:
            self._running.discard(name)
        assert record.outcome is not None
        self.events.emit(
            StepEndEvent(
                step=name,
                outcome=record.outcome,
                duration_s=round(duration, 3),
                message=record.message,
                hint=record.hint,
                log_tail=record.log_tail,
                cpu=cpu,
            )
        )
        self.events.emit(ProgressEvent(phase=cls.phase, percent=self.progress.percent()))
        percent = self.progress.percent()
        self.log.step_finished(
            name, record.outcome, duration, percent, record.message, hint=record.hint, tail=record.log_tail
        )
        self.log.progress(self.progress.percent(), sorted(self._running))
        return record.outcome is not Outcome.FAILED

    def _converge(self, step: Step) -> tuple[Outcome, str]:
        """Skip, or apply and check again; returns (outcome, why)."""
        fp = fingerprint(step)
        record = self.state.step_record(step.name)
        found = step.check()
        if record is not None and record.get("fingerprint") == fp and found.satisfied:
            why = f"satisfied ({found.detail}); inputs unchanged since {record.get('finished_at')}"
            self.log.info(f"skipped: {why}", event="skip")
            return Outcome.UNCHANGED, why
        if not found.satisfied:
            why = f"needs work: {found.detail}"
        elif record is None:
            why = f"no record of a successful run ({found.detail})"
        else:
            why = "its inputs or a dependency changed"
        self.log.info(f"applying: {why}", event="apply")
        # Dependents must re-apply after this step changes, even if we are killed now.
        self.state.forget([step.name, *self.plan.dependents(step.name)])
        start = time.monotonic()
        step.apply()
        took = time.monotonic() - start
        after = step.check()
        if not after.satisfied:
            raise StepNotConverged(f"applied, but {after.detail}", hint=type(step).hint)
        self.state.record_step(step.name, fp, took)
        if found.satisfied:
            self.log.info(f"applied; nothing needed changing ({after.detail})", event="verified")
            return Outcome.UNCHANGED, why
        self.log.info(f"applied and verified: {after.detail}", event="verified")
        return Outcome.CHANGED, why


def cpu_slots(config: Config) -> int:
    """How many CPU-heavy jobs (extractions) run at once: the config's cpu_slots, else one per core."""
    return config.cpu_slots or os.cpu_count() or 1


def default_jobs(plan: Plan, config: Config) -> int:
    """The steps mostly wait (network, apt, disks), so one thread per step."""
    return min(MAX_JOBS, max(1, len(plan.names()))) if config.parallel else 1


def preview(plan: Plan, ctx: Context, state: StateStore) -> list[tuple[str, str, str]]:
    """The `plan` command: (step, verdict, why) from the real state, read-only.
    A step whose dependency will change will change too; a step whose check()
    fails, or whose dependency is blocked, is blocked."""
    verdicts: dict[str, str] = {}
    rows: list[tuple[str, str, str]] = []
    for name in plan.names():
        deps = plan.deps(name)
        blocked = [d for d in deps if verdicts[d] == "blocked"]
        changing = [d for d in deps if verdicts[d] == "will change"]
        if blocked:
            verdict, why = "blocked", f"{', '.join(blocked)} blocked"
        else:
            verdict, why = _preview_step(plan.classes[name](ctx), state, changing)
        verdicts[name] = verdict
        rows.append((name, verdict, why))
    return rows


def _preview_step(step: Step, state: StateStore, changing: Sequence[str]) -> tuple[str, str]:
    if changing:
        return "will change", f"after {', '.join(changing)}"
    try:
        found = step.check()
        fp = fingerprint(step)
    except Exception as e:
        return "blocked", f"check failed: {REDACTOR(str(e))}"
    record = state.step_record(step.name)
    if not found.satisfied:
        return "will change", found.detail
    if record is None:
        return "will change", f"no record of a successful run ({found.detail})"
    if record.get("fingerprint") != fp:
        return "will change", "inputs changed"
    return "satisfied", found.detail


# ============================================================================
# reporting: Progress events for the hub: the spool, the sender, status and timings.
# ============================================================================

# Progress events for the hub (src/events.ts): every event is appended to
# <bootstrap_dir>/events/<run_id>.jsonl first; a background thread posts
# them in order, in batches, and records the last acknowledged seq in
# <run_id>.acked. It retries with backoff, so a hub outage (or a restart of
# bootstrap.py: older runs' spools are replayed first) loses nothing and
# reorders nothing. It never fails or slows the run: at the end it gets a
# bounded time to flush, then gives up quietly (the spool stays for the next
# run). 2xx = acknowledged; 4xx other than 408/429 = refused for good (the
# batch is dropped and logged); anything else is retried.

FLUSH_TIMEOUT_S = 10.0
EVENT_BATCH_MAX = 200  # MAX_EVENTS_PER_BATCH in src/events.ts
EVENT_BATCH_BYTES = 512 * 1024  # well under the hub's MAX_BATCH_BYTES
SENDER_BASE_S = 0.5
SENDER_MAX_S = 30.0
HTTP_TIMEOUT_S = 15.0
# Spools of earlier runs that the hub acknowledged in full are pruned when a
# run starts (and by the sender once it delivers them), keeping the newest
# SPOOL_KEEP_ACKED for `status` and `timings`. A spool with any event the hub
# has not acknowledged is never pruned: the bound on those is the hub's
# availability (each run's spool is bounded by its plan: a few events per step).
SPOOL_KEEP_ACKED = 1


class EventSpool(EventSink):
    """Appends events, numbered from 0 without gaps, to this run's spool file."""

    def __init__(self, directory: Path, run_id: str) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.run_id = run_id
        self.path = directory / f"{run_id}.jsonl"
        # O_EXCL: a run's spool is always new, so no (run, seq) is ever written twice
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        fsync_dir(directory)  # the spool file itself survives a power cut
        self.pruned = prune_acknowledged(directory, current=self.path)
        self._seq = 0
        self._synced = -1  # the last seq known to be on disk
        self.changed = threading.Condition()  # the sender waits on it

    def emit(self, event: Event) -> None:
        with self.changed:
            line: dict[str, Any] = {"run_id": self.run_id, "seq": self._seq, "ts": time.time(), "type": str(event.type)}
            for key, value in event_fields(event).items():
                line[key] = clip(REDACTOR(value)) if isinstance(value, str) else REDACTOR.deep(value)
            # One line per event, flushed: a killed run leaves at most a torn last line.
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._file.flush()
            self._seq += 1
            self.changed.notify_all()

    def sync(self) -> None:
        """fsync every event emitted so far. The sender calls it before it
        posts any of them: the hub never holds an event that a power cut
        could take from the host (whose next run would then not know it)."""
        with self.changed:
            if self._file.closed or self._synced >= self._seq - 1:
                return
            self._file.flush()
            os.fsync(self._file.fileno())
            self._synced = self._seq - 1

    def close(self) -> None:
        self.sync()  # the run's last events (run_end) survive a power cut right after the run
        with self.changed:
            self._file.close()


def fsync_file(path: Path) -> None:
    """fsync a file we only read (an earlier run's spool, maybe never synced)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventSender:
    """Posts spooled events to the hub's events URL, oldest run first."""

    def __init__(self, spool: EventSpool, *, url: str, host_id: str, token: str | None, log: Log) -> None:
        self.spool = spool
        self.url = url
        self.host_id = host_id
        self.token = token
        self.log = log
        self.deadline: float | None = None  # set by close(): flush until then
        self.failures = 0
        self.sent = 0
        self._synced_files: set[Path] = set()  # earlier runs' spools, fsync'd once before sending
        self._thread = threading.Thread(target=self._loop, name="event-sender", daemon=True)

    def start(self) -> bool:
        """Start sending; False (nothing is sent) when there is no token."""
        if self.token is None:
            return False
        self._thread.start()
        return True

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Flush within timeout_s; True when every event was delivered."""
        if not self._thread.is_alive():
            return self.token is not None and not self._pending()
        with self.spool.changed:
            self.deadline = time.monotonic() + timeout_s
            self.spool.changed.notify_all()
        self._thread.join(timeout_s + 1.0)
        if self._thread.is_alive() or self._pending():
            self.log.debug(
                "the hub did not take every progress event in time; they stay spooled for the next run",
                event="events",
            )
            return False
        return True

    # -- the sender thread -------------------------------------------------

    def _loop(self) -> None:
        try:
            while self.deadline is None or time.monotonic() < self.deadline:
                batch = self._next_batch()
                if batch is None:
                    if self.deadline is not None:
                        return
                    with self.spool.changed:
                        # close() sets the deadline under this lock: checked here, its wake-up is never missed
                        if self.deadline is None:
                            self.spool.changed.wait(1.0)
                    continue
                path, events = batch
                self._make_durable(path)
                verdict = self._post(events)
                if verdict == "retry":
                    self.failures += 1
                    if not self._sleep(backoff_delay(self.failures, SENDER_BASE_S, SENDER_MAX_S)):
                        return
                    continue
                if self.failures:
                    self.log.info(f"the hub takes progress events again after {self.failures} failed tries")
                self.failures = 0
                self.sent += len(events)
                # not fsync'd: a lost ack after a power cut only replays events the hub de-duplicates
                atomic_write_text(acked_path(path), f"{events[-1]['seq']}\n", durable=False)
        except Exception as e:  # the sender must never take the run down
            self.log.debug(f"event sender stopped: {e}", event="events", traceback=traceback.format_exc())

    def _make_durable(self, path: Path) -> None:
        """Events go to the hub only once they are on the host's disk."""
        if path == self.spool.path:
            self.spool.sync()
        elif path not in self._synced_files:
            fsync_file(path)
            self._synced_files.add(path)

    def _sleep(self, delay: float) -> bool:
        """Back off; False when the flush deadline has passed."""
        if self.deadline is not None:
            delay = min(delay, self.deadline - time.monotonic())
            if delay <= 0:
                return False
        time.sleep(delay)
        return self.deadline is None or time.monotonic() < self.deadline

    def _pending(self) -> bool:
        return self._next_batch() is not None

    def _next_batch(self) -> tuple[Path, list[dict[str, Any]]] | None:
        for path in sorted(self.spool.directory.glob("*.jsonl")):
            events = unacked_events(path)
            if events:
                return path, batch_prefix(events)
            if path != self.spool.path:  # an earlier run, fully delivered
                with contextlib.suppress(OSError):
                    acked_path(path).unlink()
                    path.unlink()
        return None

    def _post(self, events: list[dict[str, Any]]) -> str:
        """'ok', 'drop' (refused for good) or 'retry'."""
        assert self.token is not None
        body = json.dumps({"host_id": self.host_id, "events": sendable(events)}, separators=(",", ":")).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        timeout = HTTP_TIMEOUT_S
        if self.deadline is not None:
            timeout = max(0.1, min(timeout, self.deadline - time.monotonic()))
        try:
            with open_request(request, timeout) as response:
                response.read()
            return "ok"
        except RedirectRefused as e:  # not delivered: a POST is never re-sent elsewhere or as a GET
            problem = e.message
            if self.failures == 0:
                self.log.warn(f"cannot send progress events: {problem}; spooled, retrying", event="events")
                return "retry"
        except urllib.error.HTTPError as e:
            if e.code == 409:
                run_ids = sorted({str(ev.get("run_id")) for ev in events})
                self.log.warn(
                    f"the hub refused {len(events)} progress events of run {', '.join(run_ids)} "
                    f"(HTTP 409: {read_error_body(e)}): it already holds other content for the same run and "
                    "sequence numbers; this host's events were dropped, the hub keeps its own. "
                    "Compare the spool in <bootstrap_dir>/events with the hub's progress page.",
                    event="events",
                )
                return "drop"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                self.log.warn(
                    f"the hub refused {len(events)} progress events (HTTP {e.code}: {read_error_body(e)}); dropped",
                    event="events",
                )
                return "drop"
            problem = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            problem = str(e)
        if self.failures == 0:
            self.log.debug(f"cannot send progress events ({problem}); spooled, retrying", event="events")
        return "retry"


def sendable(value: Any) -> Any:
    """value with every string (keys too) made storable as PostgreSQL text:
    NUL and unpaired surrogates (from undecodable command output, or a spool
    written by an older version) become U+FFFD; surrogate pairs are joined."""
    if isinstance(value, str):
        if value.isascii() and "\x00" not in value:
            return value
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {sendable(k): sendable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [sendable(v) for v in value]
    return value


def acked_path(spool_file: Path) -> Path:
    return spool_file.with_suffix(".acked")


def fully_acknowledged(path: Path) -> bool:
    """The hub acknowledged every event this spool holds."""
    try:
        acked = int(acked_path(path).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return False
    return acked >= 0 and not unacked_events(path)


def prune_acknowledged(directory: Path, *, current: Path | None = None, keep: int = SPOOL_KEEP_ACKED) -> list[Path]:
    """Delete the spools of earlier runs that the hub acknowledged in full,
    but the newest `keep` of them; never `current`, never one with an event
    the hub has not acknowledged. Returns the spools deleted."""
    spools = sorted((p for p in directory.glob("*.jsonl") if p != current), reverse=True)  # newest first
    acknowledged = [p for p in spools if fully_acknowledged(p)]
    pruned: list[Path] = []
    for path in acknowledged[keep:]:
        with contextlib.suppress(OSError):
            path.unlink()
            acked_path(path).unlink(missing_ok=True)
            pruned.append(path)
    return pruned


def read_error_body(error: urllib.error.HTTPError) -> str:
    try:
        return error.read(300).decode("utf-8", "replace").strip() or error.reason
    except OSError:
        return str(error.reason)


def unacked_events(path: Path) -> list[dict[str, Any]]:
    try:
        acked = int(acked_path(path).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        acked = -1
    events: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            break  # the torn last line of a killed run: everything after it is unknown
        if isinstance(event, dict) and isinstance(event.get("seq"), int) and event["seq"] > acked:
            events.append(event)
    return events


def batch_prefix(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first events, within the hub's count and size limits."""
    size = 0
    for count, event in enumerate(events[:EVENT_BATCH_MAX]):
        size += len(json.dumps(event)) + 1
        if size > EVENT_BATCH_BYTES and count > 0:
            return events[:count]
    return events[:EVENT_BATCH_MAX]


# -- status and timings: read back from the newest run's spool ----------------

STATUS_EXIT = {"done": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_FAILED, "running": 2, "not started": 2}


def events_dir(config: Config) -> Path:
    return Path(config.bootstrap_dir) / EVENTS_DIR_NAME


def last_run_events(config: Config) -> list[dict[str, Any]]:
    """The events of the newest run (run ids sort by start time). The sender
    deletes a run's spool only once it is delivered and a newer run exists."""
    try:
        newest = max(events_dir(config).glob("*.jsonl"), default=None)
        if newest is None:
            return []
        return parse_events(newest.read_text(encoding="utf-8").splitlines())
    except OSError:
        return []


@dataclass
class RunRecord:
    """One run folded from its events; times are seconds since run_start."""

    run_id: str
    parallel: bool
    started_ts: float
    last_ts: float
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan order
    end: dict[str, Any] | None = None  # the run_end event

    @property
    def running(self) -> list[str]:
        return sorted(n for n, s in self.steps.items() if s["start_s"] is not None and s["outcome"] is None)

    @property
    def wall_s(self) -> float:
        return float(self.end["wall_s"]) if self.end else round(self.last_ts - self.started_ts, 3)

    def failed(self) -> tuple[str, dict[str, Any]] | None:
        return next(((n, s) for n, s in self.steps.items() if s["outcome"] == Outcome.FAILED), None)


def fold_run(events: list[dict[str, Any]]) -> RunRecord | None:
    """The run of these events (one run's, from run_start on); None without a run_start."""
    if not events or events[0]["type"] != EventType.RUN_START:
        return None
    first = events[0]
    run = RunRecord(first["run_id"], first["parallel"], started_ts=first["ts"], last_ts=first["ts"])
    for info in first["steps"]:
        run.steps[info["name"]] = {"deps": info["deps"], "start_s": None, "end_s": None, "duration_s": None,
                                   "outcome": None, "message": "", "hint": None, "log_tail": None,
                                   "cpu": None}  # fmt: skip
    for event in events[1:]:
        run.last_ts = max(run.last_ts, event["ts"])
        at = round(event["ts"] - run.started_ts, 3)
        step = run.steps.get(event.get("step", ""))
        if event["type"] == EventType.STEP_START and step is not None:
            step["start_s"] = at
        elif event["type"] == EventType.STEP_END and step is not None:
            step.update(
                {k: event.get(k) for k in ("outcome", "duration_s", "message", "hint", "log_tail", "cpu")}, end_s=at
            )
            if step["start_s"] is None:  # blocked: never started
                step["start_s"] = round(at - event["duration_s"], 3)
        elif event["type"] == EventType.RUN_END:
            run.end = event
    return run


def run_status(config: Config) -> dict[str, Any]:
    """The last or current run, from its events, the lock and .bootstrap_done."""
    run = fold_run(last_run_events(config))
    done = done_marker(config).exists()
    if lock_is_held(lock_path(config)):
        status = "running"
    elif run is None:
        status = "done" if done else "not started"
    elif run.end is None or (not run.end["ok"] and run.end["failed_step"] is None):
        status = "interrupted"  # killed (no run_end, nobody holds the lock) or stopped
    elif not run.end["ok"]:
        status = "failed"
    else:
        status = "done" if done else "not started"
    failed = run.failed() if run else None
    end = (run.end if run else None) or {}
    report: dict[str, Any] = {
        "status": status,
        "exit_code": STATUS_EXIT[status],
        "done_marker": done,
        "run_id": run.run_id if run else None,
        "started_at": utc_timestamp(run.started_ts) if run else None,
        "finished_at": utc_timestamp(end["ts"]) if end else None,
        "wall_s": end.get("wall_s"),
        "running": run.running if run and status == "running" else [],
        "failed_step": end.get("failed_step"),
        "message": failed[1]["message"] if failed else None,
        "hint": end.get("hint") or (failed[1]["hint"] if failed else None),
        "log_tail": end.get("log_tail") or (failed[1]["log_tail"] if failed else None),
    }
    if status == "interrupted":
        report["hint"] = "The last run was killed or crashed; run bootstrap.py again, it resumes."
    elif status == "not started" and run is not None and run.end is not None:
        report["hint"] = "The last run was partial (--only/--skip); run the whole plan to finish."
    return report


def format_status(report: Mapping[str, Any]) -> str:
    lines = [f"status: {report['status']}"]
    if report.get("run_id"):
        lines.append(f"run: {report['run_id']} started {report.get('started_at')}")
    if report["running"]:
        lines.append(f"running: {', '.join(report['running'])}")
    if report.get("wall_s") is not None and report["status"] != "running":
        lines.append(f"wall time: {report['wall_s']:.1f}s")
    if report["status"] in ("failed", "interrupted"):
        if report.get("failed_step"):
            lines.append(f"failed step: {report['failed_step']}: {report.get('message')}")
        if report.get("log_tail"):
            lines.append("output tail:\n" + textwrap.indent(str(report["log_tail"]), "  "))
    if report.get("hint"):
        lines.append(f"hint: {report['hint']}")
    return "\n".join(lines)


def critical_path(steps: Sequence[Mapping[str, Any]]) -> tuple[list[str], float]:
    """The chain of dependent steps with the largest total duration_s: the
    shortest wall time any scheduler could reach. Dependencies not among
    `steps` are ignored; ties go to the step (and dependency) listed first.
    The one definition: fixtures/critical-path/ holds the vectors that this
    and criticalPath() in src/timings.ts must both pass."""
    by_name = {str(s["name"]): s for s in steps}
    best: dict[str, tuple[float, list[str]]] = {}
    visiting: set[str] = set()

    def longest(name: str) -> tuple[float, list[str]]:
        if name in best:
            return best[name]
        if name in visiting:
            raise ValueError(f"dependency cycle through {name}")
        visiting.add(name)
        chains = [longest(d) for d in by_name[name].get("deps", []) if d in by_name]
        base = max(chains, key=lambda c: c[0], default=(0.0, []))
        visiting.discard(name)
        best[name] = (base[0] + float(by_name[name].get("duration_s") or 0.0), [*base[1], name])
        return best[name]

    total, path = max((longest(n) for n in by_name), key=lambda c: c[0], default=(0.0, []))
    return path, total


def step_cpu_seconds(cpu: Mapping[str, Any] | None) -> float | None:
    """A step_end event's CPU-seconds (its thread and the children it reaped); None when not measured."""
    if not cpu:
        return None
    return float(cpu["user_s"]) + float(cpu["sys_s"]) + float(cpu["children_user_s"]) + float(cpu["children_sys_s"])


def format_timings(config: Config) -> str:
    run = fold_run(last_run_events(config))
    if run is None or not any(s["outcome"] for s in run.steps.values()):
        raise BootstrapError("no timings yet", hint="Run the bootstrap first; timings come from its last run.")
    steps = {n: s for n, s in run.steps.items() if s["outcome"] is not None}
    status = "running" if run.end is None else ("done" if run.end["ok"] else "failed")
    lines = [f"run {run.run_id} ({status}), wall time {run.wall_s:.2f}s", ""]
    ranked = sorted(steps.items(), key=lambda kv: -float(kv[1]["duration_s"]))
    width = max(len(name) for name in steps)
    cpus = {name: step_cpu_seconds(info["cpu"]) for name, info in steps.items()}
    for name, info in ranked:
        cpu = cpus[name]
        lines.append(
            f"  {float(info['duration_s']):8.2f}s  {name:<{width}}  {info['outcome']:<9}"
            f"  start +{float(info['start_s']):.2f}s  cpu {'-' if cpu is None else f'{cpu:.2f}s'}"
        )
    measured = [c for c in cpus.values() if c is not None]
    if measured:
        lines += ["", f"CPU-seconds the steps report: {sum(measured):.2f}s (threads and the children they reaped)"]
    path, total = critical_path([{"name": n, **s} for n, s in steps.items()])
    share = 100.0 * total / run.wall_s if run.wall_s > 0 else 0.0
    lines += ["", f"critical path ({total:.2f}s, {share:.0f}% of the wall time): {' -> '.join(path)}"]
    return "\n".join(lines)


# ============================================================================
# reconcile: Every boot after the first: reconcile mode, and delivering events later.
# ============================================================================


RECONCILE_FLUSH_S = 3.0
SEND_EVENTS_TIMEOUT_S = 6 * 3600.0


class SpoolReader(EventSpool):
    """The spool directory without a run of its own: for sending what earlier
    runs left. Its `path` is the newest run's file, so the sender keeps that
    one (status reads it) and deletes older ones once they are delivered."""

    def __init__(self, directory: Path) -> None:  # no new spool file: nothing is emitted
        self.directory = directory
        self.run_id = ""
        self.path = max(directory.glob("*.jsonl"), default=directory / ".none.jsonl")
        self.changed = threading.Condition()
        self._synced_once = False

    def sync(self) -> None:
        if not self._synced_once and self.path.exists():
            fsync_file(self.path)
        self._synced_once = True

    def close(self) -> None:
        return


def send_spooled_events(config: Config, log: Log, timeout_s: float = SEND_EVENTS_TIMEOUT_S) -> bool:
    """Deliver every spooled event of earlier runs; True when the hub has them all."""
    directory = events_dir(config)
    if not directory.is_dir():
        return True
    auth = host_auth(config)
    if auth is None:
        log.warn("no host credential: spooled progress events cannot be sent")
        return False
    sender = EventSender(SpoolReader(directory), url=config.hub.events_url, host_id=config.host.id, token=auth, log=log)
    sender.start()
    delivered = sender.close(timeout_s)
    log.info(
        "the hub has every spooled progress event" if delivered else "spooled progress events are still not delivered",
        event="events",
    )
    return delivered


def spawn_event_sender(config_path: str, log: Log) -> int | None:
    """Start `bootstrap.py --config PATH send-events` in its own session, with
    no terminal and no inherited output (the stub's log pipe must close when
    the stub ends). Returns its pid, or None when this is not the shipped
    bootstrap.py (then the next run sends them)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.name != "bootstrap.py" or not script.is_file():
        log.debug("not started as bootstrap.py: the next run sends the spooled events", event="events")
        return None
    child = subprocess.Popen(
        [sys.executable, str(script), "--config", os.path.abspath(config_path), "send-events"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )
    log.info(f"the hub is not taking progress events now; send-events (pid {child.pid}) delivers them when it is back")
    return child.pid


# ============================================================================
# deprovision: `bootstrap.py deprovision`: take off the host what the bootstrap put there.
# ============================================================================


OUR_HEADER = "# Written by bootstrap.py"
MOUNT_UNIT_HEADER = "# Written by bootstrap.py: a bundle image"
BUSY_HINT = (
    "Something still uses {mp} (see `sudo fuser -vm {mp}`, e.g. a project container); stop it and run "
    "deprovision again: it carries on where it stopped."
)


@dataclass
class DeprovisionReport:
    """What deprovision did: each line says what was removed, or what was kept and why."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"removed: {what}" for what in self.removed] or ["removed: nothing (nothing of ours was left)"]
        lines += [f"kept:    {what}" for what in self.kept]
        lines.append(f"deprovision: {len(self.removed)} removed, {len(self.kept)} kept")
        return "\n".join(lines)


def ours(path: Path, header: str = OUR_HEADER) -> bool:
    return read_text_or(path).startswith(header)


def root_rm(paths: list[Path], report: DeprovisionReport) -> None:
    present = [p for p in paths if os.path.lexists(p)]
    if present:
        run_command(["rm", "-f", *map(str, present)], sudo=True, timeout_s=60)
        report.removed += [str(p) for p in present]


def remove_unit(unit: str, report: DeprovisionReport) -> bool:
    """Stop, disable and remove one of our units; True when it was there."""
    path = SYSTEMD_UNIT_DIR / unit
    if not path.exists():
        return False
    run_command(["systemctl", "disable", "--now", unit], sudo=True, check=False, timeout_s=300)
    root_rm([path], report)
    return True


def image_mount_units() -> Iterator[Path]:
    for path in sorted(SYSTEMD_UNIT_DIR.glob("*.mount")):
        if ours(path, MOUNT_UNIT_HEADER):
            yield path


def remove_units(config: Config, report: DeprovisionReport) -> None:
    units = [
        f"{config.service.unit}.service",
        f"{CLOUDFLARED_UNIT}.service",
        f"{CDI_UNIT}.timer",
        f"{CDI_UNIT}.service",
    ]
    changed = [unit for unit in units if remove_unit(unit, report)]
    for path in image_mount_units():
        run_command(["systemctl", "disable", "--now", path.name], sudo=True, check=False, timeout_s=300)
        where = read_mount_where(path)
        if where and mount_at(where) is not None:
            run_command(["umount", where], sudo=True, timeout_s=120, hint=BUSY_HINT.format(mp=where))
        root_rm([path], report)
        changed.append(path.name)
    if IMAGES_DIR.exists():
        run_command(["rm", "-rf", "--one-file-system", str(IMAGES_DIR)], sudo=True, timeout_s=300)
        report.removed.append(f"{IMAGES_DIR} (the bundle images)")
    if remove_unit(f"{GROW_UNIT}.service", report):
        changed.append(GROW_UNIT)
    if changed:
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)


def read_mount_where(unit: Path) -> str | None:
    for line in read_text_or(unit).splitlines():
        if line.startswith("Where="):
            return line.partition("=")[2].strip().strip('"') or None
    return None


def unmount_btrfs(config: Config, destroy: bool, report: DeprovisionReport) -> None:
    mp = config.btrfs.mount_point
    mounted = mount_at(mp)
    if mounted is not None and mounted[1] == "btrfs":
        secrets = [secrets_dir(config) / name for name in config.secrets]
        done = [data_dir(config) / DONE_FILE_NAME]
        root_rm([p for p in (*secrets, *done) if os.path.lexists(p)], report)
        run_command(["umount", mp], sudo=True, timeout_s=300, hint=BUSY_HINT.format(mp=mp))
        report.removed.append(f"the mount of {mp} ({mounted[0]})")
    fstab = read_text_or(FSTAB)
    without = fstab_without_ours(fstab)
    if without != fstab:
        write_root_file(FSTAB, without, mode=0o644)
        run_command(["systemctl", "daemon-reload"], sudo=True, check=False, timeout_s=120)
        report.removed.append(f"the tagged {mp} line in {FSTAB}")
    data_disk = config.btrfs.data_disk
    if data_disk is None:
        image = Path(config.btrfs.image_path)
        if not image.exists():
            return
        if destroy:
            root_rm([image], report)
        else:
            report.kept.append(f"{image} (the btrfs loop image: the data; --destroy-data {mp} removes it)")
        return
    device = mounted[0] if mounted is not None else None
    if destroy and device:
        run_command(["wipefs", "-a", device], sudo=True, timeout_s=120)
        report.removed.append(f"the filesystem signature on the data disk {device} (wipefs -a)")
    else:
        report.kept.append(f"the data disk {device or 'of ' + mp} (untouched; --destroy-data {mp} wipes it)")


def remove_root_files(config: Config, report: DeprovisionReport) -> None:
    always = [GROW_HELPER, ENV_FILE, SYSTEM_DONE_MARKER]
    if config.cloudflared is not None or ours(CLOUDFLARED_CONFIG):
        always += [CLOUDFLARED_TOKEN_ENV, CLOUDFLARED_CONFIG]
    written = [p for p in (CDI_HELPER, NVIDIA_SOURCES, ROOT_STORAGE_CONF) if ours(p)]
    if ours(NVIDIA_SOURCES):  # the keyring came with our apt source
        written.append(NVIDIA_KEYRING)
    sysctl = [USERNS_SYSCTL_FILE] if USERNS_SYSCTL_FILE.exists() else []  # ours alone (60-cocalc-userns.conf)
    root_rm([*always, *written, *sysctl], report)
    for directory in (ENV_FILE.parent, CLOUDFLARED_CONFIG.parent, SYSTEM_DONE_MARKER.parent):
        if directory.is_dir() and not any(directory.iterdir()):
            run_command(["rmdir", str(directory)], sudo=True, check=False, timeout_s=30)


def remove_user_files(config: Config, destroy: bool, report: DeprovisionReport) -> None:
    conf = user_storage_conf(config)
    if ours(conf):
        conf.unlink()
        report.removed.append(str(conf))
    node = node_dir(config)
    marker = read_marker(node)
    if marker is not None and marker.get("artifact") == "node":
        remove_tree(node)
        report.removed.append(f"{node} (Node.js {config.node.version})")
        alias = nvm_dir(config) / "alias" / "default"
        if read_text_or(alias).strip() == f"v{config.node.version}":
            alias.unlink()
            report.removed.append(str(alias))
    nvm = config.node.nvm
    nvm_sh = nvm_dir(config) / "nvm.sh"
    if nvm is not None and nvm_sh.is_file() and file_sha256(nvm_sh) == nvm.sha256:
        nvm_sh.unlink()
        report.removed.append(str(nvm_sh))
    remove_empty_dirs(nvm_dir(config))
    root = Path(config.bootstrap_root)
    image = None if destroy or config.btrfs.data_disk else Path(config.btrfs.image_path)
    if root.is_dir():
        removed = remove_except(root, image)
        if removed:
            report.removed.append(f"{root}: {', '.join(sorted(removed))}")


def remove_tree(path: Path) -> None:
    """A tree of ours; root's files in it too (mount points the image units made), never across a mount."""
    run_command(["rm", "-rf", "--one-file-system", str(path)], sudo=True, timeout_s=600)


def remove_except(root: Path, keep: Path | None) -> list[str]:
    """Remove everything under root but `keep` (and the directories leading to it)."""
    removed = []
    for entry in sorted(root.iterdir()):
        if keep is not None and entry == keep:
            continue
        if keep is not None and keep.is_relative_to(entry) and entry.is_dir() and not entry.is_symlink():
            inner = remove_except(entry, keep)
            removed += [f"{entry.name}/{name}" for name in inner]
            continue
        if mount_at(str(entry)) is not None:
            raise BootstrapError(f"{entry} is a mount point; not removing it", hint=BUSY_HINT.format(mp=entry))
        is_dir = stat.S_ISDIR(entry.lstat().st_mode)
        remove_tree(entry)
        removed.append(entry.name + ("/" if is_dir else ""))
    if keep is None:
        root.rmdir()
    return removed


def remove_empty_dirs(top: Path) -> None:
    if not top.is_dir() or top.is_symlink():
        return
    for directory in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    if not any(top.iterdir()):
        top.rmdir()


def deprovision(config: Config, *, destroy_data: str | None) -> DeprovisionReport:
    """Remove what the bootstrap installed (see the module's docstring); idempotent."""
    mp = config.btrfs.mount_point
    if destroy_data is not None and destroy_data != mp:
        raise UsageError(
            f"--destroy-data {destroy_data!r} does not name this host's btrfs mount point",
            hint=f"To destroy the data on {mp}, pass --destroy-data {mp}; nothing was changed.",
        )
    destroy = destroy_data is not None
    report = DeprovisionReport()
    bootstrap_dir = Path(config.bootstrap_dir)
    lock = RunLock(lock_path(config)) if bootstrap_dir.is_dir() else None
    if lock is not None:
        lock.acquire(new_run_id())
    try:
        remove_units(config, report)
        unmount_btrfs(config, destroy, report)
        remove_root_files(config, report)
        remove_user_files(config, destroy, report)
    finally:
        if lock is not None:
            lock.release()
    report.kept.append(
        "apt packages, /etc/subuid and /etc/subgid entries, chrony's config, sudoers (bootstrap.py writes none)"
    )
    return report


# ============================================================================
# cli: The command line: check-config, plan, run, reconcile, send-events, status, timings.
# ============================================================================


COMMANDS = ("run", "plan", "status", "timings", "check-config", "reconcile", "send-events", "deprovision")

HELP_EPILOG = f"""\
commands:
  run            run the plan (the default)
  reconcile      every boot when the hub cannot be used (the stub decides): run the
                 plan against the local config, converge what drifted, start what
                 should run; events the hub does not take within a few seconds are
                 left to a detached send-events. Exit codes as run.
  send-events    deliver the progress events earlier runs spooled (retrying until
                 the hub takes them or --timeout, default 6 h); 0 when all delivered
  plan           for every step: satisfied / will change / blocked, from the
                 real state of this machine; changes nothing, writes nothing
  status         the last or current run: state, running steps, failure and hint
                 (--json for machines, --wait to block until it is finished)
  timings        the last run's step durations, the critical path and the share
                 of the wall time it explains
  check-config   validate the config and exit (0 valid, 2 invalid)
  deprovision    stop and remove what the bootstrap installed (units, mounts,
                 the fstab line, helpers, env file, credentials, bundles);
                 the data stays (data disk untouched, loop image kept) unless
                 --destroy-data <the btrfs mount point> says otherwise

--only/--skip take step names (comma-separated or repeated). --only runs
exactly those steps: their dependencies are not added (they are assumed done
by an earlier run). --skip leaves steps out; their dependents still run.

exit codes of run, plan, timings and check-config:
  {EXIT_OK}    success
  {EXIT_FAILED}    a step failed (the last lines say which, and what to do)
  {EXIT_CONFIG}    invalid config or usage; nothing was changed
  {EXIT_LOCKED}    another run holds the lock (nothing was changed)
  {EXIT_INTERRUPTED}  interrupted (run again: it resumes)

exit codes of status (like cloud-init's):
  0    done: the last run succeeded and .bootstrap_done exists
  1    failed: the last run failed or was killed (see the hint)
  2    running, or not started (or only partly run with --only/--skip)

files: <bootstrap_root>/logs/bootstrap.log (JSON lines), <bootstrap_dir>/state.json
(fingerprints for the next run), <bootstrap_dir>/bootstrap.lock,
<bootstrap_dir>/events/ (the runs' progress events: what status and timings
read, and what the hub is sent; a run's file goes once delivered and newer).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootstrap.py",
        description="Turn this machine into a CoCalc project host, as described by one JSON config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HELP_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="PATH", help="the bootstrap config JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("command", nargs="?", default="run", choices=COMMANDS, help="what to do (default: run)")
    parser.add_argument("--only", action="append", default=[], metavar="STEPS", help="run only these steps (run, plan)")
    parser.add_argument("--skip", action="append", default=[], metavar="STEPS", help="leave these steps out")
    parser.add_argument(
        "--jobs", type=positive_int, metavar="N", help="steps at once (default: one per step; 1 if parallel is false)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='status: print the report as JSON; check-config: print the verdict as one JSON object ({"ok": true, '
        '"config": ...} or {"ok": false, "errors": [{"path", "message", "value"}]})',
    )
    parser.add_argument("--wait", action="store_true", help="status: wait until the run is finished")
    parser.add_argument(
        "--destroy-data",
        metavar="MOUNT_POINT",
        help="deprovision: also destroy the data (the loop image, or the data disk's filesystem); "
        "type the configured btrfs mount point (e.g. /btrfs) to confirm",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="status --wait: give up after S seconds (0: never); send-events: (0: 6 h)",
    )
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def step_names(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def cmd_check_config(args: argparse.Namespace) -> int:
    path = require_config_path(args)
    if not args.json:
        config = load_config(path)
        print(f"{path}: valid (schema_version {config.schema_version}, host {config.host.name})")
        return EXIT_OK
    try:
        verdict: dict[str, Any] = {"ok": True, "config": load_config(path).to_dict()}
    except ConfigError as e:
        verdict = {"ok": False, "errors": [issue_json(issue) for issue in e.issues]}
    print(json.dumps(verdict, indent=2, allow_nan=False))
    return EXIT_OK if verdict["ok"] else EXIT_CONFIG


def issue_json(issue: ConfigIssue) -> dict[str, Any]:
    """One issue for machines: the JSON path as bootstrap.py prints it, and the value unless it is absent."""
    out: dict[str, Any] = {"path": issue.json_path(), "message": issue.message}
    if not isinstance(issue.value, _Missing):
        out["value"] = json_safe(issue.value)
    return out


def json_safe(value: Any) -> Any:
    """A config value as strict JSON: 1e400 in the config (Infinity once parsed, at any depth)
    becomes the string "Infinity"; JSON has no such number. (Depth is bounded by MAX_JSON_DEPTH.)"""
    if isinstance(value, float) and not math.isfinite(value):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def require_config_path(args: argparse.Namespace) -> str:
    if not args.config:
        raise UsageError(
            "--config PATH is required",
            hint="Pass the config the hub generated, e.g. --config bootstrap/bootstrap-config.json",
        )
    return str(args.config)


def cmd_plan(args: argparse.Namespace, steps: Sequence[type[Step]] | None) -> int:
    config = load_config(require_config_path(args))
    plan = Plan(steps).select(step_names(args.only), step_names(args.skip))
    ctx = Context(config, Log(echo=False))  # read-only: no log file, no console noise
    rows = preview(plan, ctx, StateStore(state_path(config), writable=False))
    width = max((len(name) for name, _, _ in rows), default=0)
    for name, verdict, why in rows:
        print(f"{verdict:<12} {name:<{width}}  {why}")
    counts = {v: sum(1 for _, verdict, _ in rows if verdict == v) for v in ("satisfied", "will change", "blocked")}
    print(", ".join(f"{n} {v}" for v, n in counts.items()))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    give_up = time.monotonic() + args.timeout if args.timeout > 0 else None
    report = run_status(config)
    while args.wait and report["status"] in ("running", "not started"):
        if give_up is not None and time.monotonic() >= give_up:
            break
        time.sleep(0.5)
        report = run_status(config)
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return int(report["exit_code"])


def cmd_deprovision(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    report = deprovision(config, destroy_data=args.destroy_data)
    print(report.text())
    return EXIT_OK


def cmd_timings(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    print(format_timings(config))
    return EXIT_OK


def cmd_send_events(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    log = Log(log_path(config), echo=False)
    try:
        return (
            EXIT_OK if send_spooled_events(config, log, *([args.timeout] if args.timeout > 0 else [])) else EXIT_FAILED
        )
    finally:
        log.close()


def cmd_run(
    args: argparse.Namespace, steps: Sequence[type[Step]] | None, flush_s: float, *, reconcile: bool = False
) -> int:
    config = load_config(require_config_path(args))
    plan = Plan(steps).select(step_names(args.only), step_names(args.skip))
    bootstrap_dir = Path(config.bootstrap_dir)
    bootstrap_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_id = new_run_id()
    lock = RunLock(lock_path(config))
    lock.acquire(run_id)
    try:
        log = Log(log_path(config), run_id=run_id)
        set_active_log(log)
        try:
            if reconcile:
                log.info("reconcile mode: the hub cannot be used now; converging with the local config")
            token = rotate_if_due(config, log)  # the host credential (rotated when the hub's time has come)
            remove_debris(config, log)  # under the lock: no other run of ours is writing them
            undelivered = (lambda: spawn_event_sender(require_config_path(args), log)) if reconcile else None
            return run_with_reporting(
                plan,
                config,
                log,
                run_id=run_id,
                token=token,
                jobs=args.jobs,
                flush_s=min(flush_s, RECONCILE_FLUSH_S) if reconcile else flush_s,
                on_undelivered=undelivered,
            )
        finally:
            set_active_log(Log())
            log.close()
    finally:
        lock.release()


def run_with_reporting(
    plan: Plan,
    config: Config,
    log: Log,
    *,
    run_id: str,
    token: str | None,
    jobs: int | None,
    flush_s: float,
    on_undelivered: Callable[[], object] | None = None,
) -> int:
    """One run: state, events and their sender around the Runner.
    `on_undelivered` runs when the hub did not take every event in flush_s."""
    state = StateStore(state_path(config))
    if state.problem:
        log.warn(state.problem)
    spool = EventSpool(Path(config.bootstrap_dir) / EVENTS_DIR_NAME, run_id)
    sender = EventSender(spool, url=config.hub.events_url, host_id=config.host.id, token=token, log=log)
    if not sender.start():
        log.warn(
            f"no host credential (nor bootstrap token) in {config.bootstrap_dir}: progress events are spooled, not sent"
        )
    runner = Runner(plan, Context(config, log), state=state, events=spool, jobs=jobs)
    log.info(f"bootstrap {__version__} run {run_id}: {len(plan.names())} steps, {runner.jobs} at a time")
    failure: BootstrapError | None = None
    try:
        runner.run()
    except StepFailed as e:
        failure = e
    except BaseException as e:
        finish_run(state, spool, runner, ok=False, failed_step=None, error=e)
        sender.close(min(flush_s, 2.0))
        raise
    failed_step = failure.step if isinstance(failure, StepFailed) else None
    finish_run(state, spool, runner, ok=failure is None, failed_step=failed_step, error=failure)
    delivered = sender.close(flush_s)
    spool.close()
    if not delivered and on_undelivered is not None:
        on_undelivered()
    if failure is not None:
        raise failure
    log.info(f"done in {time.monotonic() - runner.t0:.1f}s")
    return EXIT_OK


def finish_run(
    state: StateStore,
    spool: EventSpool,
    runner: Runner,
    *,
    ok: bool,
    failed_step: str | None,
    error: BaseException | None,
) -> None:
    """The run's last events (ok, or failed at failed_step, or interrupted:
    failed_step None); the state's fingerprints made durable."""
    wall = round(time.monotonic() - runner.t0, 3)
    hint = error.hint if isinstance(error, BootstrapError) else None
    tail = error.log_tail if isinstance(error, BootstrapError) else None
    state.sync()
    spool.emit(ProgressEvent(phase="done" if ok else "failed", percent=100.0 if ok else runner.progress.percent()))
    spool.emit(RunEndEvent(ok=ok, wall_s=wall, failed_step=failed_step, hint=hint, log_tail=tail))


def report_error(error: BootstrapError, *, debug: bool) -> None:
    if debug:  # with the chain: a failed step's own traceback comes first
        traceback.print_exception(type(error), error, error.__traceback__)
    if error.log_tail:
        print("output tail:\n" + textwrap.indent(REDACTOR(error.log_tail), "  "), file=sys.stderr)
    print(f"error: {REDACTOR(error.message)}", file=sys.stderr)
    if error.hint:
        print(f"hint: {REDACTOR(error.hint)}", file=sys.stderr)


def main(
    argv: Sequence[str] | None = None,
    *,
    steps: Sequence[type[Step]] | None = None,
    flush_s: float = FLUSH_TIMEOUT_S,
) -> int:
    """`steps` replaces STEPS and `flush_s` the events flush bound (for tests)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "plan":
            return cmd_plan(args, steps)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "timings":
            return cmd_timings(args)
        if args.command == "send-events":
            return cmd_send_events(args)
        if args.command == "deprovision":
            return cmd_deprovision(args)
        reconcile = args.command == "reconcile"
        return with_sigterm_as_interrupt(lambda: cmd_run(args, steps, flush_s, reconcile=reconcile))
    except BootstrapError as e:
        report_error(e, debug=args.debug)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run bootstrap.py again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # the engine's own files: bootstrap dir, state, lock, log
        if args.debug:
            traceback.print_exc()
        where = e.filename or "a bootstrap file"
        print(f"error: cannot use {where}: {e.strerror or e}", file=sys.stderr)
        print(
            f"hint: check that {where} and its directory belong to the bootstrap user (run bootstrap.py as that "
            "user, not root) and that the disk is not full.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: internal error: {REDACTOR(repr(e))}", file=sys.stderr)
        print("hint: re-run with --debug for the traceback, and report it with the log.", file=sys.stderr)
        return EXIT_FAILED


def with_sigterm_as_interrupt(fn: Callable[[], int]) -> int:
    """SIGTERM (systemd, cloud-init timeouts) ends the run like Ctrl-C does:
    commands are stopped, the state and events say `interrupted`."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
