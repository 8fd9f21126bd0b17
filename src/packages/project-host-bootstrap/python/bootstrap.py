#!/usr/bin/env python3
"""bootstrap.py - turn a fresh VM into a CoCalc project host.

Reads one JSON config (see @cocalc/project-host-bootstrap's schema), validates
all of it before touching the machine, then runs the bootstrap steps as a
dependency graph, in parallel unless the config says `"parallel": false`.

Stdlib only; runs on the distribution's python3 (3.10 or newer). Importing
this file does nothing, so tests import it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import fcntl
import graphlib
import hashlib
import http.client
import json
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TextIO, TypeVar

__version__ = "0.1.0"

T = TypeVar("T")

SCHEMA_VERSION = 1
MIN_PYTHON = (3, 10)
TOKEN_FILE_NAME = "bootstrap-token"
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
            lines.append(f"  {issue.json_path()}: {issue.message} (got {short_repr(issue.value)})")
        super().__init__(
            "\n".join(lines),
            hint="Fix the fields listed above (or rebuild the config with the hub's builder); nothing was changed.",
        )
        self.issues = tuple(issues)


def format_json_path(path: Sequence[str | int]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def short_repr(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, _Missing) else "nothing"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Missing:
    """Marker for a field that is absent from the JSON document."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


# ============================================================================
# logging
# ============================================================================

# JSON lines at $BOOTSTRAP_ROOT/logs/bootstrap.log plus a console. Steps call
# log.info/warn/error(message, **fields); every record carries the current
# step from a contextvar that the plan sets in each worker thread, so parallel
# steps stay readable. Known secrets are redacted from every record.

CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("bootstrap_step", default=None)
TAIL_LINES = 20
TAIL_CHARS = 4000
MAX_TEXT = 8192  # the hub's limit on an event's text fields (src/events.ts)


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
    ) -> None:
        self.path = path
        self.run_id = run_id
        self.echo = echo
        self._console = console
        self._tty = tty
        self.redact = redactor
        self._lock = threading.RLock()
        self._file: TextIO | None = None
        self._status = ""  # the progress line currently shown on a terminal
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")

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
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
            if self.echo and level != "debug":
                prefix = "" if level == "info" else f"{level}: "
                where = f"{step}: " if step else ""
                self._print(f"    {prefix}{where}{entry['message']}")

    def step_started(self, step: str, percent: float) -> None:
        self.record("debug", "started", event="step_start", step=step)
        self._console_line(f"==> {step}", percent)

    def step_finished(self, step: str, outcome: str, duration_s: float, percent: float, detail: str = "") -> None:
        self.record(
            "error" if outcome == "failed" else "debug",
            detail or outcome,
            event="step_end",
            step=step,
            outcome=outcome,
            duration_s=round(duration_s, 3),
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
# running commands
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
        proc = subprocess.Popen(
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
# config
# ============================================================================
#
# Frozen dataclasses mirroring src/config.ts field for field. `from_dict`
# collects every issue with its JSON path; `to_dict` round-trips.
#
# The validators below re-implement zod 4's semantics for exactly the schema
# constructs config.ts uses, because the shared vectors in fixtures/configs/
# require the same verdict and the same error paths from both sides:
#
# - An issue is either fatal (wrong type, wrong literal or enum value, bad
#   record key, array longer than its maximum) or continuable (regex, range,
#   length, refinement). After a fatal issue zod runs no further checks on that
#   value, and the superRefine of BootstrapConfigSchema (bootstrap_dir inside
#   bootstrap_root inside home) runs only when no fatal issue occurred anywhere.
# - Unknown keys of a strict object are one continuable issue at the object's
#   own path.
# - A JSON number is an integer when it has no fraction (1.0 is 1); booleans
#   are never numbers; integers must be within +-(2**53 - 1).
# - String lengths count code points, as zod 4 does.

JsonPath = tuple[str | int, ...]
S = TypeVar("S", bound="ConfigSpec")

MAX_PATH = 4096
MAX_SAFE_INTEGER = 2**53 - 1

# Twins of the *_RE constants in config.ts; fullmatch() is JS's ^...$ (no m flag).
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
NODE_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
DEB_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]+")
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
OS_ID_RE = re.compile(r"[a-z0-9._-]+")
OS_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
SYSTEMD_UNIT_RE = re.compile(r"[A-Za-z0-9_.@-]+")
TUNNEL_HOST_RE = re.compile(r"[A-Za-z0-9.-]+")
ARCHES = ("amd64", "arm64")


class ConfigSpec:
    """Base of the config dataclasses: validated in with from_dict, JSON out with to_dict."""

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "config") -> S:
        """Validate `data` exactly as the zod schema does; raise ConfigError with every issue."""
        log = _IssueLog()
        parsed = _SCHEMAS[cls](data, (), log)
        if log.issues:
            raise ConfigError(source, log.issues)
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


@dataclass(frozen=True)
class HostSpec(ConfigSpec):
    id: str
    name: str


@dataclass(frozen=True)
class OsSpec(ConfigSpec):
    id: str
    min_version: str


@dataclass(frozen=True)
class HubSpec(ConfigSpec):
    url: str
    events_url: str
    secrets_url: str


@dataclass(frozen=True)
class ArtifactSpec(ConfigSpec):
    url: str
    sha256: str | None
    version: str
    size_bytes: int | None
    strip_components: int
    expected_files: tuple[str, ...]
    executables: tuple[str, ...]


@dataclass(frozen=True)
class ArtifactsSpec(ConfigSpec):
    project_host: ArtifactSpec
    project: ArtifactSpec
    tools: ArtifactSpec

    def items(self) -> tuple[tuple[str, ArtifactSpec], ...]:
        return (("project_host", self.project_host), ("project", self.project), ("tools", self.tools))


@dataclass(frozen=True)
class NvmSpec(ConfigSpec):
    version: str
    url: str
    sha256: str


@dataclass(frozen=True)
class NodeSpec(ConfigSpec):
    version: str
    dist_url: str
    nvm: NvmSpec | None


@dataclass(frozen=True)
class AptSpec(ConfigSpec):
    packages: tuple[str, ...]
    lists_max_age_s: int
    lock_timeout_s: int


@dataclass(frozen=True)
class DataDiskSpec(ConfigSpec):
    candidates: tuple[str, ...]
    min_size_gb: int
    wait_s: int


@dataclass(frozen=True)
class BtrfsSpec(ConfigSpec):
    mount_point: str
    image_path: str
    image_size_gb: int
    data_disk: DataDiskSpec | None


@dataclass(frozen=True)
class ServiceSpec(ConfigSpec):
    unit: str
    exec: str
    health_url: str
    health_timeout_s: int


@dataclass(frozen=True)
class TunnelSpec(ConfigSpec):
    host: str
    port: int
    user: str
    remote_port: int
    local_port: int


@dataclass(frozen=True)
class Config(ConfigSpec):
    schema_version: int
    host: HostSpec
    bootstrap_user: str
    home: str
    bootstrap_root: str
    bootstrap_dir: str
    arch: str
    os: OsSpec
    parallel: bool
    hub: HubSpec
    conat_urls: tuple[str, ...]
    secrets: tuple[str, ...]
    artifacts: ArtifactsSpec
    node: NodeSpec
    apt: AptSpec
    btrfs: BtrfsSpec
    service: ServiceSpec
    tunnel: TunnelSpec | None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def token_file(self) -> Path:
        return Path(self.bootstrap_dir) / TOKEN_FILE_NAME

    @property
    def logs_dir(self) -> Path:
        return Path(self.bootstrap_root) / "logs"


# --- path and URL rules (twins of AbsPath, RelPath and isHttpUrl) -------------


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/") if segment)


def is_abs_path(path: str) -> bool:
    """Absolute and normalised: starts with /, no . or .. segments, no //, no trailing /."""
    return (
        path.startswith("/")
        and "\0" not in path
        and "//" not in path
        and (path == "/" or not path.endswith("/"))
        and not _has_dot_segment(path)
    )


def is_rel_path(path: str) -> bool:
    """Relative and inside its base: no leading /, no . or .. segments."""
    return (
        not path.startswith("/")
        and "\0" not in path
        and "//" not in path
        and not path.endswith("/")
        and not _has_dot_segment(path)
    )


def is_inside(child: str, parent: str) -> bool:
    return child != "/" if parent == "/" else child.startswith(parent + "/")


# JavaScript's \s, which is not Python's (Python adds \x1c-\x1f and \x85, lacks \ufeff).
_JS_WHITESPACE_RE = re.compile("[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_FORBIDDEN_DOMAIN_CHARS = frozenset(" #%/:<>?@[\\]^|\x7f") | frozenset(chr(c) for c in range(0x20))


def is_http_url(text: str) -> bool:
    """isHttpUrl of config.ts: WHATWG URL parsing as far as it decides the
    verdict for http(s) URLs, then scheme http/https, a host, no userinfo and
    no whitespace anywhere in the original text."""
    if _JS_WHITESPACE_RE.search(text):
        return False
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", text.strip(_C0_AND_SPACE))
    if not scheme or scheme.group(1).lower() not in ("http", "https"):
        return False
    # Special schemes ignore any run of / and \ before the authority, which ends at / \ ? #.
    rest = text.strip(_C0_AND_SPACE)[scheme.end() :].lstrip("/\\")
    authority = re.split(r"[/\\?#]", rest, maxsplit=1)[0]
    userinfo, _, host_port = authority.rpartition("@")
    if userinfo not in ("", ":"):  # anything else leaves a username or password
        return False
    host, port = _split_host_port(host_port)
    if host is None or not re.fullmatch(r"[0-9]*", port) or (port and int(port) > 65535):
        return False
    return _is_valid_host(host)


def _split_host_port(host_port: str) -> tuple[str | None, str]:
    if host_port.startswith("["):
        end = host_port.find("]")
        if end < 0:
            return None, ""
        host, after = host_port[: end + 1], host_port[end + 1 :]
        if after and not after.startswith(":"):
            return None, ""
        return host, after[1:]
    host, _, port = host_port.partition(":")
    return host, port


def _is_valid_host(host: str) -> bool:
    import ipaddress
    import urllib.parse

    if host.startswith("["):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return False
        return "%" not in inner  # Python accepts scope ids, WHATWG does not
    if not host:
        return False
    try:
        domain = urllib.parse.unquote_to_bytes(host).decode("utf-8")
        if not domain.isascii():
            domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    domain = domain.lower()
    if not domain or any(c in _FORBIDDEN_DOMAIN_CHARS for c in domain):
        return False
    return _ipv4_value(domain) is not None if _ends_in_number(domain) else True


def _ipv4_number(part: str) -> int | None:
    """One part of a WHATWG IPv4 address: decimal, 0x hex or 0-prefixed octal."""
    digits, base = part, 10
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    if digits == "":
        return 0
    allowed = {10: "0123456789", 16: "0123456789abcdefABCDEF", 8: "01234567"}[base]
    if any(c not in allowed for c in digits):
        return None
    return int(digits, base)


def _ipv4_parts(domain: str) -> list[str]:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    return parts


def _ends_in_number(domain: str) -> bool:
    last = _ipv4_parts(domain)[-1]
    return last != "" and ((last.isdigit() and last.isascii()) or _ipv4_number(last) is not None)


def _ipv4_value(domain: str) -> int | None:
    parts = _ipv4_parts(domain)
    if len(parts) > 4 or "" in parts:
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 1 << (8 * (5 - len(values))):
        return None
    return sum(n << (8 * (3 - i)) for i, n in enumerate(values[:-1])) + values[-1]


# --- validators (each mirrors one zod construct) ------------------------------


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
StringCheck = Callable[[str], str | None]  # a problem, or None when the string passes


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


def _matches(pattern: re.Pattern[str], message: str | None = None) -> StringCheck:
    problem = message or f"must match /^{pattern.pattern}$/"
    return lambda s: None if pattern.fullmatch(s) else problem


def _min_len(n: int) -> StringCheck:
    return lambda s: None if len(s) >= n else f"must be at least {n} character(s) long"


def _max_len(n: int) -> StringCheck:
    return lambda s: None if len(s) <= n else f"must be at most {n} characters long"


def _holds(predicate: Callable[[str], bool], message: str) -> StringCheck:
    return lambda s: None if predicate(s) else message


def _string(*checks: StringCheck) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str):
            _type_error(log, path, "a string", value)
            return value
        for check in checks:
            problem = check(value)
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


def _array(item: Validator, *, min_items: int = 0, max_items: int) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, list):
            _type_error(log, path, "an array", value)
            return value
        if len(value) > max_items:  # zod refuses before looking at any element
            log.add(path, f"must have at most {max_items} item(s), got {len(value)}", value, fatal=True)
            return value
        parsed = tuple(item(v, (*path, i), log) for i, v in enumerate(value))
        if len(value) < min_items:
            log.add(path, f"must have at least {min_items} item(s)", value)
        return parsed

    return validate


def _record(key_pattern: re.Pattern[str], item: Validator) -> Validator:
    """z.record(z.string().regex(key_pattern), item): a bad key is fatal, its value unchecked."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return value
        parsed: dict[str, Any] = {}  # wrapped read-only below: the config is frozen all the way down
        for key, entry in value.items():
            if key == "__proto__":  # zod drops it silently
                continue
            if not key_pattern.fullmatch(key):
                log.add((*path, key), f"key must match /^{key_pattern.pattern}$/", key, fatal=True)
                continue
            parsed[key] = item(entry, (*path, key), log)
        return MappingProxyType(parsed)

    return validate


def _nullable(inner: Validator) -> Validator:
    return lambda value, path, log: None if value is None else inner(value, path, log)


def _default(default: Any, inner: Validator) -> Validator:
    return lambda value, path, log: default if isinstance(value, _Missing) else inner(value, path, log)


def _object(spec: type[ConfigSpec], fields: Mapping[str, Validator]) -> Validator:
    """z.strictObject: every field, then one issue listing the unknown keys."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return None
        parsed = {name: check(value.get(name, MISSING), (*path, name), log) for name, check in fields.items()}
        unknown = [key for key in value if key not in fields]
        if unknown:
            log.add(path, "unknown key(s): " + ", ".join(unknown), unknown)
        # Built even from invalid parts (the cross-field check reads them); discarded when there are issues.
        return spec(**parsed)

    return validate


# --- the schema, field for field as in config.ts -------------------------------

_URL = _string(_max_len(2048), _holds(is_http_url, "must be an absolute http:// or https:// URL"))
_SHA256 = _string(_matches(SHA256_RE, "must be 64 lowercase hex digits (a sha256)"))
_VERSION = _string(_matches(VERSION_RE))
_ABS_PATH = _string(
    _min_len(1),
    _max_len(MAX_PATH),
    _holds(
        is_abs_path,
        "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
    ),
)
_REL_PATH = _string(
    _min_len(1),
    _max_len(MAX_PATH),
    _holds(is_rel_path, "must be a relative path inside the bundle (no leading /, no . or .. segments)"),
)

_ARTIFACT = _object(
    ArtifactSpec,
    {
        "url": _URL,
        "sha256": _default(None, _nullable(_SHA256)),
        "version": _VERSION,
        "size_bytes": _default(None, _nullable(_int(0, MAX_SAFE_INTEGER))),
        "strip_components": _default(0, _int(0, 8)),
        "expected_files": _default((), _array(_REL_PATH, max_items=64)),
        "executables": _default((), _array(_REL_PATH, max_items=64)),
    },
)

_NVM = _object(NvmSpec, {"version": _VERSION, "url": _URL, "sha256": _SHA256})

_TUNNEL = _object(
    TunnelSpec,
    {
        "host": _string(_min_len(1), _max_len(253), _matches(TUNNEL_HOST_RE)),
        "port": _default(22, _int(1, 65535)),
        "user": _string(_matches(USER_RE)),
        "remote_port": _int(1, 65535),
        "local_port": _int(1, 65535),
    },
)

_SCHEMAS: dict[type[ConfigSpec], Validator] = {
    HostSpec: _object(
        HostSpec,
        {
            "id": _string(_matches(UUID_RE, "must be a lowercase UUID")),
            "name": _string(_matches(HOST_NAME_RE, "must be a lowercase RFC 1123 host label")),
        },
    ),
    OsSpec: _object(OsSpec, {"id": _string(_matches(OS_ID_RE)), "min_version": _string(_matches(OS_VERSION_RE))}),
    HubSpec: _object(HubSpec, {"url": _URL, "events_url": _URL, "secrets_url": _URL}),
    ArtifactSpec: _ARTIFACT,
    ArtifactsSpec: _object(ArtifactsSpec, {"project_host": _ARTIFACT, "project": _ARTIFACT, "tools": _ARTIFACT}),
    NvmSpec: _NVM,
    NodeSpec: _object(
        NodeSpec,
        {
            "version": _string(_matches(NODE_VERSION_RE, "must be x.y.z")),
            "dist_url": _URL,
            "nvm": _default(None, _nullable(_NVM)),
        },
    ),
    AptSpec: _object(
        AptSpec,
        {
            "packages": _default((), _array(_string(_matches(DEB_PACKAGE_RE)), max_items=200)),
            "lists_max_age_s": _default(3600, _int(0, 7 * 86400)),
            "lock_timeout_s": _default(600, _int(1, 3600)),
        },
    ),
    DataDiskSpec: _object(
        DataDiskSpec,
        {
            "candidates": _array(_ABS_PATH, min_items=1, max_items=16),
            "min_size_gb": _int(1, 1 << 20),
            "wait_s": _default(300, _int(0, 3600)),
        },
    ),
    ServiceSpec: _object(
        ServiceSpec,
        {
            "unit": _default("cocalc-project-host", _string(_matches(SYSTEMD_UNIT_RE))),
            "exec": _REL_PATH,
            "health_url": _URL,
            "health_timeout_s": _default(120, _int(1, 3600)),
        },
    ),
    TunnelSpec: _TUNNEL,
}
_SCHEMAS[BtrfsSpec] = _object(
    BtrfsSpec,
    {
        "mount_point": _default("/btrfs", _ABS_PATH),
        "image_path": _ABS_PATH,
        "image_size_gb": _int(1, 1 << 20),
        "data_disk": _default(None, _nullable(_SCHEMAS[DataDiskSpec])),
    },
)

_CONFIG_FIELDS = _object(
    Config,
    {
        "schema_version": _literal(SCHEMA_VERSION),
        "host": _SCHEMAS[HostSpec],
        "bootstrap_user": _string(
            _matches(USER_RE, "must be a POSIX user name"),
            _holds(lambda u: u != "root", "must not be root: the bootstrap runs as a non-root user with sudo"),
        ),
        "home": _ABS_PATH,
        "bootstrap_root": _ABS_PATH,
        "bootstrap_dir": _ABS_PATH,
        "arch": _enum(ARCHES),
        "os": _SCHEMAS[OsSpec],
        "parallel": _default(True, _boolean),
        "hub": _SCHEMAS[HubSpec],
        "conat_urls": _array(_URL, min_items=1, max_items=8),
        "secrets": _default((), _array(_string(_matches(SECRET_NAME_RE)), max_items=16)),
        "artifacts": _SCHEMAS[ArtifactsSpec],
        "node": _SCHEMAS[NodeSpec],
        "apt": _SCHEMAS[AptSpec],
        "btrfs": _SCHEMAS[BtrfsSpec],
        "service": _SCHEMAS[ServiceSpec],
        "tunnel": _default(None, _nullable(_TUNNEL)),
        "env": _default(
            MappingProxyType({}),
            _record(
                ENV_NAME_RE,
                _string(
                    _max_len(4096),
                    _holds(lambda v: "\n" not in v and "\0" not in v, "must not contain newlines or NUL"),
                ),
            ),
        ),
    },
)


def _validate_config(value: Any, path: JsonPath, log: _IssueLog) -> Any:
    """BootstrapConfigSchema: the fields, then (as zod's superRefine) the
    cross-field rules, only when no fatal issue stopped the checks."""
    config = _CONFIG_FIELDS(value, path, log)
    if isinstance(config, Config) and not log.fatal_since(0):
        if not is_inside(config.bootstrap_dir, config.bootstrap_root):
            log.add((*path, "bootstrap_dir"), "must be inside bootstrap_root", config.bootstrap_dir)
        if not is_inside(config.bootstrap_root, config.home):
            log.add((*path, "bootstrap_root"), "must be inside home", config.bootstrap_root)
    return config


_SCHEMAS[Config] = _validate_config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; ConfigError (exit 2) on any problem."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(source, [ConfigIssue((), "config file not found", source)]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [ConfigIssue((), f"cannot read config: {e}", source)]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(source, [ConfigIssue((), f"not valid JSON: {e}", None)]) from None
    return Config.from_dict(data, source)


# ============================================================================
# facts
# ============================================================================

# (steps) small read-only probes of the real system.


# ============================================================================
# steps
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
    """What every step gets: the validated config and the logger."""

    config: Config
    log: Log


class Step:
    """A unit of the bootstrap: check() reads the real state (read-only);
    apply() runs only when check() found work. inputs() is fingerprinted
    into state.json so a changed input re-runs the step."""

    name: ClassVar[str]
    deps: ClassVar[tuple[str, ...]] = ()
    weight_s: ClassVar[float] = 1.0  # expected seconds, weights progress percent
    phase: ClassVar[str] = "bootstrapping"
    hint: ClassVar[str] = "See the log for the failing command's output."
    version: ClassVar[int] = 1  # bump when apply() changes meaning: part of the fingerprint

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = ctx.log

    def inputs(self) -> Mapping[str, Any]:
        return {}

    def check(self) -> StepState:
        return StepState(False, "no check; always applies")

    def apply(self) -> None:
        pass


STEPS: tuple[type[Step], ...] = ()


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

STATE_FILE_NAME = "state.json"
LOCK_FILE_NAME = "bootstrap.lock"
DONE_FILE_NAME = ".bootstrap_done"
EVENTS_DIR_NAME = "events"
STEP_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")  # as src/events.ts
MAX_JOBS = 16


class PlanError(BootstrapError):
    """The step graph is broken (cycle, unknown dependency, bad name)."""


class LockedError(BootstrapError):
    exit_code = EXIT_LOCKED


class StepFailed(BootstrapError):
    """The run failed because this step did; carries the step's message and hint."""

    def __init__(self, step: str, message: str, *, hint: str | None, log_tail: str | None) -> None:
        super().__init__(f"step {step} failed: {message}", hint=hint, log_tail=log_tail)
        self.step = step


def done_marker(config: Config) -> Path:
    """Written by the final step once the host is bootstrapped; read by `status`."""
    return Path(config.bootstrap_dir) / DONE_FILE_NAME


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


def atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """temp file in the same directory + fsync + rename + fsync the directory:
    a reader (or a crash) sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """state.json: one record per step that last applied successfully, and
    a summary of the last run (for status and timings). Read-only unless
    writable (the `plan` command writes nothing)."""

    VERSION = 1

    def __init__(self, path: Path, *, writable: bool = True) -> None:
        self.path = path
        self.writable = writable
        self._lock = threading.RLock()
        self.data: dict[str, Any] = {"version": self.VERSION, "steps": {}, "last_run": None}
        self.problem: str | None = None
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # A broken state file only costs a full re-run; never a failure.
            self.problem = f"ignoring unreadable {path}: {e}"
            return
        if isinstance(loaded, dict) and isinstance(loaded.get("steps"), dict):
            self.data.update(loaded)
        else:
            self.problem = f"ignoring {path}: not a state file"

    @property
    def last_run(self) -> dict[str, Any] | None:
        run = self.data.get("last_run")
        return run if isinstance(run, dict) else None

    def step_record(self, name: str) -> dict[str, Any] | None:
        record = self.data["steps"].get(name)
        return record if isinstance(record, dict) else None

    def record_step(self, name: str, fp: str, duration_s: float, outcome: str) -> None:
        with self._lock:
            self.data["steps"][name] = {
                "fingerprint": fp,
                "finished_at": utc_timestamp(),
                "duration_s": round(duration_s, 3),
                "outcome": outcome,
            }
            self.save()

    def forget(self, names: Iterable[str]) -> None:
        with self._lock:
            gone = [n for n in names if self.data["steps"].pop(n, None) is not None]
            if gone:
                self.save()

    def update_run(self, **fields: Any) -> None:
        with self._lock:
            run = self.data["last_run"] = self.last_run or {}
            run.update(fields)
            self.save()

    def update_run_step(self, name: str, **fields: Any) -> None:
        with self._lock:
            run = self.data["last_run"] = self.last_run or {}
            run.setdefault("steps", {}).setdefault(name, {}).update(fields)
            self.save()

    def save(self) -> None:
        if not self.writable:
            return
        with self._lock:
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


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
    outcome: str = "pending"  # then changed | unchanged | failed | blocked
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

    def emit(self, type_: str, **fields: Any) -> None:
        pass


class Runner:
    """Runs a plan once: the executor loop, per-step convergence, state,
    events and console."""

    def __init__(
        self, plan: Plan, ctx: Context, *, state: StateStore, events: EventSink | None = None, jobs: int | None = None
    ) -> None:
        self.plan = plan
        self.ctx = ctx
        self.log = ctx.log
        self.state = state
        self.events = events or EventSink()
        self.jobs = max(1, jobs if jobs is not None else default_jobs(plan, ctx.config))
        self.progress = Progress(plan, state)
        self.steps = {name: StepRun(name) for name in plan.names()}
        self.t0 = time.monotonic()
        self._running: set[str] = set()
        self._lock = threading.Lock()

    # -- the executor ------------------------------------------------------

    def run(self) -> dict[str, StepRun]:
        """Run every selected step; raise StepFailed for the first failure."""
        self.t0 = time.monotonic()
        names = self.plan.names()
        self.events.emit(
            "run_start",
            version=__version__,
            parallel=self.jobs > 1,
            steps=[
                {"name": n, "deps": list(self.plan.deps(n)), "weight": round(self.progress.weights[n], 3)}
                for n in names
            ],
        )
        self.events.emit("progress", phase="starting", percent=0.0)
        failed = self._execute()
        self._mark_blocked(failed)
        if failed is not None:
            step = self.steps[failed]
            raise StepFailed(failed, step.message, hint=step.hint, log_tail=step.log_tail)
        return self.steps

    def _execute(self) -> str | None:
        sorter = graphlib.TopologicalSorter({n: self.plan.deps(n) for n in self.plan.names()})
        sorter.prepare()
        ready: list[str] = []
        running: dict[concurrent.futures.Future[bool], str] = {}
        failed: str | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="step") as pool:
            try:
                while True:
                    if failed is None:
                        ready = sorted([*ready, *sorter.get_ready()], key=self.plan.index.__getitem__)
                        while ready and len(running) < self.jobs:
                            name = ready.pop(0)
                            # each worker gets its own copy of the context: its CURRENT_STEP
                            worker_ctx = contextvars.copy_context()
                            running[pool.submit(worker_ctx.run, self._run_step, name)] = name
                    if not running:
                        return failed
                    finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in sorted(finished, key=lambda f: self.plan.index[running[f]]):
                        name = running.pop(future)
                        if future.result():
                            sorter.done(name)
                        elif failed is None:
                            failed = name
            except BaseException:
                # Interrupted: stop the commands of running steps so they end quickly.
                terminate_running_commands()
                raise

    def _mark_blocked(self, failed: str | None) -> None:
        for name in self.plan.names():
            step = self.steps[name]
            if step.outcome != "pending":
                continue
            blockers = [d for d in self._ancestors(name) if self.steps[d].outcome == "failed"]
            step.outcome = "blocked"
            step.message = (
                f"blocked: {', '.join(sorted(blockers))} failed"
                if blockers
                else f"not started: the run stopped after {failed} failed"
            )
            step.start_s = step.end_s = self._now()
            self.events.emit("step_end", step=name, outcome="blocked", duration_s=0.0, message=step.message)
            self.log.step_finished(name, "blocked", 0.0, self.progress.percent(), step.message)

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
        record = self.steps[name]
        record.start_s = self._now()
        cls = self.plan.classes[name]
        with self._lock:
            self._running.add(name)
        self.state.update_run(running=sorted(self._running))
        self.events.emit("step_start", step=name)
        self.events.emit("progress", phase=cls.phase, percent=self.progress.percent())
        self.log.step_started(name, self.progress.percent())
        self.log.progress(self.progress.percent(), sorted(self._running))
        try:
            record.outcome, record.message = self._converge(cls(self.ctx))
        except Exception as e:
            record.outcome = "failed"
            record.error = e
            record.message = REDACTOR(str(e) or type(e).__name__)
            record.hint = e.hint if isinstance(e, BootstrapError) and e.hint else cls.hint
            record.log_tail = e.log_tail if isinstance(e, BootstrapError) else None
            self.log.debug("step failed", event="traceback", traceback=traceback.format_exc())
        record.end_s = self._now()
        duration = record.end_s - record.start_s
        if record.outcome != "failed":
            self.progress.finish(name)
        with self._lock:
            self._running.discard(name)
        self.state.update_run(running=sorted(self._running))
        self.state.update_run_step(
            name,
            deps=list(self.plan.deps(name)),
            start_s=record.start_s,
            end_s=record.end_s,
            duration_s=round(duration, 3),
            outcome=record.outcome,
        )
        self.events.emit(
            "step_end",
            step=name,
            outcome=record.outcome,
            duration_s=round(duration, 3),
            message=record.message,
            hint=record.hint,
            log_tail=record.log_tail,
        )
        self.events.emit("progress", phase=cls.phase, percent=self.progress.percent())
        self.log.step_finished(name, record.outcome, duration, self.progress.percent(), record.message)
        if record.outcome == "failed" and record.hint:
            self.log.error(f"hint: {record.hint}")
        self.log.progress(self.progress.percent(), sorted(self._running))
        return record.outcome != "failed"

    def _converge(self, step: Step) -> tuple[str, str]:
        """Skip, or apply; returns (outcome, why)."""
        fp = fingerprint(step)
        record = self.state.step_record(step.name)
        found = step.check()
        if record is not None and record.get("fingerprint") == fp and found.satisfied:
            why = f"satisfied ({found.detail}); inputs unchanged since {record.get('finished_at')}"
            self.log.info(f"skipped: {why}", event="skip")
            return "unchanged", why
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
        self.state.record_step(step.name, fp, time.monotonic() - start, "changed")
        return "changed", why


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
# reporting
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


class EventSpool(EventSink):
    """Appends events, numbered from 0 without gaps, to this run's spool file."""

    def __init__(self, directory: Path, run_id: str) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self.run_id = run_id
        self.path = directory / f"{run_id}.jsonl"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._seq = 0
        self.changed = threading.Condition()  # the sender waits on it

    def emit(self, type_: str, **fields: Any) -> None:
        with self.changed:
            event: dict[str, Any] = {"run_id": self.run_id, "seq": self._seq, "ts": time.time(), "type": type_}
            for key, value in fields.items():
                event[key] = clip(REDACTOR(value)) if isinstance(value, str) else REDACTOR.deep(value)
            # One line per event, flushed: a killed run leaves at most a torn last line.
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._file.flush()
            self._seq += 1
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self._file.close()


def read_token(path: Path) -> str | None:
    """The bootstrap token (its own 0600 file); None when it is not there."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if token:
        REDACTOR.add(token)
    return token or None


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
                        self.spool.changed.wait(1.0)
                    continue
                path, events = batch
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
                atomic_write_text(acked_path(path), f"{events[-1]['seq']}\n")
        except Exception as e:  # the sender must never take the run down
            self.log.debug(f"event sender stopped: {e}", event="events", traceback=traceback.format_exc())

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
        body = json.dumps({"host_id": self.host_id, "events": events}, separators=(",", ":")).encode()
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
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
            return "ok"
        except urllib.error.HTTPError as e:
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


def acked_path(spool_file: Path) -> Path:
    return spool_file.with_suffix(".acked")


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


# -- status and timings --------------------------------------------------------

STATUS_EXIT = {"done": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_FAILED, "running": 2, "not started": 2}


def run_status(config: Config) -> dict[str, Any]:
    """The last or current run, from state.json, the lock and .bootstrap_done."""
    state = StateStore(state_path(config), writable=False)
    run = state.last_run or {}
    done = done_marker(config).exists()
    if lock_is_held(lock_path(config)):
        status = "running"
    elif not run:
        status = "done" if done else "not started"
    elif run.get("status") == "running":
        status = "interrupted"  # state says running, but nobody holds the lock
    elif run.get("ok") is False:
        status = "failed"
    else:
        status = "done" if done else "not started"
    report: dict[str, Any] = {
        "status": status,
        "exit_code": STATUS_EXIT[status],
        "done_marker": done,
        "run_id": run.get("run_id"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "wall_s": run.get("wall_s"),
        "running": run.get("running", []) if status == "running" else [],
        "failed_step": run.get("failed_step"),
        "message": run.get("message"),
        "hint": run.get("hint"),
        "log_tail": run.get("log_tail"),
    }
    if status == "interrupted":
        report["hint"] = "The last run was killed or crashed; run bootstrap.py again, it resumes."
    elif status == "not started" and run.get("ok"):
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


def critical_path(steps: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], float]:
    """The chain of dependent steps with the largest total duration."""
    best: dict[str, tuple[float, list[str]]] = {}

    def longest(name: str) -> tuple[float, list[str]]:
        if name not in best:
            info = steps[name]
            chains = [longest(d) for d in info.get("deps", []) if d in steps]
            base = max(chains, key=lambda c: c[0], default=(0.0, []))
            best[name] = (base[0] + float(info.get("duration_s") or 0.0), [*base[1], name])
        return best[name]

    chains = [longest(n) for n in steps]
    total, path = max(chains, key=lambda c: c[0], default=(0.0, []))
    return path, total


def format_timings(state: StateStore) -> str:
    run = state.last_run
    if not run or not run.get("steps"):
        raise BootstrapError("no timings yet", hint="Run the bootstrap first; timings come from its last run.")
    steps: dict[str, dict[str, Any]] = run["steps"]
    wall = float(run.get("wall_s") or max((s.get("end_s") or 0.0) for s in steps.values()) or 0.0)
    lines = [f"run {run.get('run_id')} ({run.get('status')}), wall time {wall:.2f}s", ""]
    ranked = sorted(steps.items(), key=lambda kv: -float(kv[1].get("duration_s") or 0.0))
    width = max(len(name) for name in steps)
    for name, info in ranked:
        lines.append(
            f"  {float(info.get('duration_s') or 0.0):8.2f}s  {name:<{width}}  {info.get('outcome', '?'):<9}"
            f"  start +{float(info.get('start_s') or 0.0):.2f}s"
        )
    path, total = critical_path(steps)
    share = 100.0 * total / wall if wall > 0 else 0.0
    lines += ["", f"critical path ({total:.2f}s, {share:.0f}% of the wall time): {' -> '.join(path)}"]
    return "\n".join(lines)


# ============================================================================
# CLI
# ============================================================================


COMMANDS = ("run", "plan", "status", "timings", "check-config")

HELP_EPILOG = f"""\
commands:
  run            run the plan (the default)
  plan           for every step: satisfied / will change / blocked, from the
                 real state of this machine; changes nothing, writes nothing
  status         the last or current run: state, running steps, failure and hint
                 (--json for machines, --wait to block until it is finished)
  timings        the last run's step durations, the critical path and the share
                 of the wall time it explains
  check-config   validate the config and exit (0 valid, 2 invalid)

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

files: <bootstrap_root>/logs/bootstrap.log (JSON lines), <bootstrap_dir>/state.json,
<bootstrap_dir>/bootstrap.lock, <bootstrap_dir>/events/ (progress events not yet
delivered to the hub).
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
        "--timeout", type=float, default=0.0, metavar="S", help="status --wait: give up after S seconds (0: never)"
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
    print(json.dumps(verdict, indent=2))
    return EXIT_OK if verdict["ok"] else EXIT_CONFIG


def issue_json(issue: ConfigIssue) -> dict[str, Any]:
    """One issue for machines: the JSON path as bootstrap.py prints it, and the value unless it is absent."""
    out: dict[str, Any] = {"path": issue.json_path(), "message": issue.message}
    if isinstance(issue.value, float) and not math.isfinite(issue.value):
        out["value"] = "Infinity" if issue.value > 0 else "-Infinity"  # 1e400 in the config; JSON has none
    elif not isinstance(issue.value, _Missing):
        out["value"] = issue.value
    return out


def require_config_path(args: argparse.Namespace) -> str:
    if not args.config:
        raise UsageError(
            "--config PATH is required",
            hint="Pass the config the hub generated, e.g. --config bootstrap/bootstrap-config.json",
        )
    return str(args.config)


class UsageError(BootstrapError):
    exit_code = EXIT_CONFIG


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


def cmd_timings(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    print(format_timings(StateStore(state_path(config), writable=False)))
    return EXIT_OK


def cmd_run(args: argparse.Namespace, steps: Sequence[type[Step]] | None, flush_s: float) -> int:
    config = load_config(require_config_path(args))
    plan = Plan(steps).select(step_names(args.only), step_names(args.skip))
    bootstrap_dir = Path(config.bootstrap_dir)
    bootstrap_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_id = new_run_id()
    lock = RunLock(lock_path(config))
    lock.acquire(run_id)
    try:
        token = read_token(config.token_file)
        log = Log(log_path(config), run_id=run_id)
        set_active_log(log)
        try:
            return run_with_reporting(plan, config, log, run_id=run_id, token=token, jobs=args.jobs, flush_s=flush_s)
        finally:
            set_active_log(Log())
            log.close()
    finally:
        lock.release()


def run_with_reporting(
    plan: Plan, config: Config, log: Log, *, run_id: str, token: str | None, jobs: int | None, flush_s: float
) -> int:
    """One run: state, events and their sender around the Runner."""
    state = StateStore(state_path(config))
    if state.problem:
        log.warn(state.problem)
    spool = EventSpool(Path(config.bootstrap_dir) / EVENTS_DIR_NAME, run_id)
    sender = EventSender(spool, url=config.hub.events_url, host_id=config.host.id, token=token, log=log)
    if not sender.start():
        log.warn(f"no bootstrap token in {config.token_file}: progress events are spooled, not sent")
    runner = Runner(plan, Context(config, log), state=state, events=spool, jobs=jobs)
    state.update_run(
        run_id=run_id, pid=os.getpid(), version=__version__, status="running", ok=None, started_at=utc_timestamp(),
        finished_at=None, wall_s=None, jobs=runner.jobs, running=[], steps={}, failed_step=None, message=None,
        hint=None, log_tail=None,
    )  # fmt: skip
    log.info(f"bootstrap {__version__} run {run_id}: {len(plan.names())} steps, {runner.jobs} at a time")
    failure: BootstrapError | None = None
    try:
        runner.run()
    except StepFailed as e:
        failure = e
    except BaseException as e:
        finish_run(state, spool, runner, ok=False, failed_step=None, error=e, status="interrupted")
        sender.close(min(flush_s, 2.0))
        raise
    failed_step = failure.step if isinstance(failure, StepFailed) else None
    finish_run(state, spool, runner, ok=failure is None, failed_step=failed_step, error=failure)
    sender.close(flush_s)
    spool.close()
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
    status: str | None = None,
) -> None:
    wall = round(time.monotonic() - runner.t0, 3)
    hint = error.hint if isinstance(error, BootstrapError) else None
    tail = error.log_tail if isinstance(error, BootstrapError) else None
    message = REDACTOR(str(error)) if error is not None else None
    state.update_run(
        status=status or ("done" if ok else "failed"),
        ok=ok,
        finished_at=utc_timestamp(),
        wall_s=wall,
        running=[],
        failed_step=failed_step,
        message=message,
        hint=hint,
        log_tail=tail,
    )
    spool.emit("progress", phase="done" if ok else "failed", percent=100.0 if ok else runner.progress.percent())
    spool.emit("run_end", ok=ok, wall_s=wall, failed_step=failed_step, hint=hint, log_tail=tail)


def report_error(error: BootstrapError, *, debug: bool) -> None:
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
        cause = getattr(error, "__context__", None)
        if cause is not None and not isinstance(error, StepFailed):
            traceback.print_exception(type(cause), cause, cause.__traceback__)
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
        return with_sigterm_as_interrupt(lambda: cmd_run(args, steps, flush_s))
    except BootstrapError as e:
        report_error(e, debug=args.debug)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run bootstrap.py again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
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
