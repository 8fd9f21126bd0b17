"""The command runner and retry: real processes, real signals."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import bootstrap
import pytest

SECRET = "hunter2-very-secret-value"  # noqa: S105 - a test secret


@pytest.fixture
def file_log(tmp_path: Path) -> Iterator[None]:
    """Make the active log (what run_command writes to) a file under tmp_path."""
    log = bootstrap.Log(tmp_path / "logs" / "bootstrap.log", run_id="test-run-1", echo=False)
    bootstrap.set_active_log(log)
    yield
    bootstrap.set_active_log(bootstrap.Log())
    log.close()


def read_log(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "logs" / "bootstrap.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_whole_group_including_a_child_that_ignores_sigterm(
    tmp_path: Path, file_log: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "KILL_GRACE_S", 0.5)
    pidfile = tmp_path / "child.pid"
    # the parent starts a child that ignores SIGTERM, prints, and sleeps forever
    child_code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('child ready', flush=True); time.sleep(600)"
    )
    script = (
        "import os, signal, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "print('parent waiting', flush=True)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    with pytest.raises(bootstrap.CommandError) as failure:
        bootstrap.run_command([sys.executable, "-c", script], timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert elapsed < 1.5 + 2 * 0.5 + 1.0, elapsed
    result = failure.value.result
    assert result.timed_out
    assert "timed out after 1.5s" in failure.value.message
    assert "parent waiting" in result.output and "child ready" in result.output
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the SIGTERM-ignoring child survived"
    record = [r for r in read_log(tmp_path) if r["event"] == "command"][-1]
    assert record["timed_out"] is True and record["exit_code"] == result.returncode


def test_output_tail_exit_code_and_one_record_per_call(tmp_path: Path, file_log: object) -> None:
    script = (
        "import sys\nfor i in range(100): print(f'line {i}')\n"
        "sys.stdout.flush()\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    )
    with pytest.raises(bootstrap.CommandError) as failure:
        bootstrap.run_command([sys.executable, "-c", script], hint="try again")
    error = failure.value
    assert error.result.returncode == 3
    assert error.hint == "try again"
    assert error.log_tail == error.result.tail
    lines = error.result.tail.splitlines()
    assert len(lines) == bootstrap.TAIL_LINES and lines[-1] == "boom" and lines[0] == "line 81"
    ok = bootstrap.run_command(["true"])
    assert ok.returncode == 0
    soft = bootstrap.run_command(["false"], check=False)
    assert soft.returncode == 1
    commands = [r for r in read_log(tmp_path) if r["event"] == "command"]
    assert [r["exit_code"] for r in commands] == [3, 0, 1]
    assert all(isinstance(r["duration_s"], float) and r["argv"] for r in commands)
    assert "boom" in str(commands[0]["tail"]) and "tail" not in commands[1]


def test_environment_is_minimal_and_explicit_and_stdin_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKY_VARIABLE", "should-not-pass")
    script = "import os, sys, json; print(json.dumps(dict(os.environ))); print(repr(sys.stdin.read()))"
    result = bootstrap.run_command([sys.executable, "-c", script], env={"EXTRA": "1"})
    env_line, stdin_line = result.output.splitlines()
    env = json.loads(env_line)
    assert "LEAKY_VARIABLE" not in env
    assert env["EXTRA"] == "1" and env["LANG"] == "C.UTF-8" and env["DEBIAN_FRONTEND"] == "noninteractive"
    assert stdin_line == "''"


def test_argv_only() -> None:
    with pytest.raises(TypeError):
        bootstrap.run_command("echo hi")


def test_missing_program_is_a_command_error_with_a_hint() -> None:
    with pytest.raises(bootstrap.CommandError) as failure:
        bootstrap.run_command(["definitely-not-a-program-xyz"])
    assert failure.value.result.returncode == 127
    assert failure.value.hint and "installed" in failure.value.hint


def test_secret_is_redacted_from_argv_output_log_and_error(
    tmp_path: Path, file_log: object, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap.add_secret(SECRET)
    script = "import sys; print('the secret is', sys.argv[1]); sys.exit(2)"
    with pytest.raises(bootstrap.CommandError) as failure:
        bootstrap.run_command([sys.executable, "-c", script, SECRET])
    error = failure.value
    assert SECRET in error.result.output  # the caller still gets its real output
    assert SECRET not in error.message and SECRET not in (error.log_tail or "")
    assert "the secret is ***" in (error.log_tail or "")
    text = (tmp_path / "logs" / "bootstrap.log").read_text()
    assert SECRET not in text and "***" in text
    bootstrap.active_log().warn(f"about to use {SECRET}")
    bootstrap.report_error(error, debug=False)
    assert SECRET not in (tmp_path / "logs" / "bootstrap.log").read_text()
    assert SECRET not in capsys.readouterr().err


def test_sudo_passes_the_environment_explicitly() -> None:
    argv = bootstrap.sudo_argv(["apt-get", "update"], {"LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})
    assert argv == [
        "sudo",
        "-n",
        "--",
        "env",
        "-i",
        "DEBIAN_FRONTEND=noninteractive",
        "LANG=C.UTF-8",
        "apt-get",
        "update",
    ]


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo is not installed here")
def test_sudo_runs_with_exactly_the_given_environment() -> None:
    result = bootstrap.run_command(["env"], sudo=True, env={"MARKER": "42"}, check=False)
    if result.returncode != 0:
        pytest.skip(f"sudo -n does not work for this user here: {result.tail}")
    env = dict(line.split("=", 1) for line in result.output.splitlines())
    assert env["MARKER"] == "42" and env["LANG"] == "C.UTF-8"
    assert set(env) == set(bootstrap.base_env()) | {"MARKER"}


def test_retry_backs_off_and_gives_up_after_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise bootstrap.BootstrapError("not yet")
        return "ok"

    assert bootstrap.retry(flaky, what="flaky", attempts=3, base_s=0.05, max_s=1) == "ok"
    gaps = [b - a for a, b in pairwise(calls)]
    assert 0.025 <= gaps[0] <= 0.2 and 0.05 <= gaps[1] <= 0.3  # base, then doubled (with jitter 0.5..1)


def test_retry_gives_up_after_the_last_attempt() -> None:
    calls = 0

    def never() -> None:
        nonlocal calls
        calls += 1
        raise bootstrap.BootstrapError(f"failure {calls}")

    with pytest.raises(bootstrap.BootstrapError, match="failure 3"):
        bootstrap.retry(never, what="never", attempts=3, base_s=0.01)
    assert calls == 3


def test_retry_respects_the_deadline_and_retry_if() -> None:
    calls = 0

    def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise bootstrap.BootstrapError("down")

    start = time.monotonic()
    with pytest.raises(bootstrap.BootstrapError):
        bootstrap.retry(always_fails, what="x", attempts=100, deadline_s=0.5, base_s=0.1, max_s=0.2)
    assert time.monotonic() - start < 0.8
    assert 2 <= calls < 10

    calls = 0

    def wrong_kind() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("not retryable")

    with pytest.raises(ValueError):
        bootstrap.retry(wrong_kind, what="y", attempts=5, base_s=0.01)
    assert calls == 1
