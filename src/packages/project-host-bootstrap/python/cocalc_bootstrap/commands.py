"""Running commands: argv only, minimal environment, timeouts, retries."""

from __future__ import annotations

import contextlib
import contextvars
import os
import random
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .errors import BootstrapError, T
from .log import REDACTOR, active_log, output_tail

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
