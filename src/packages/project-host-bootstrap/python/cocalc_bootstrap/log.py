"""The run's log: JSON lines plus a console, with secrets redacted."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

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
