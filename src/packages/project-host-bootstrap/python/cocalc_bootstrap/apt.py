"""apt and dpkg: locks, quiescing the timers, update and install."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .commands import CommandError, retry, run_command
from .errors import BootstrapError
from .facts import APT_LISTS_LOCK, DPKG_LOCKS, describe_lock_holders, systemctl_state
from .log import Log
from .step import atomic_write_text

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
