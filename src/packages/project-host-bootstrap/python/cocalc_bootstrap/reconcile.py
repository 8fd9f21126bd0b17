"""Every boot after the first: reconcile mode, and delivering events later.

The stub runs `bootstrap.py reconcile` when the hub cannot be used (no
answer, token expired, credential refused) on a host that was bootstrapped
before: the same plan against the local config, so whatever drifted is
converged and whatever should run is started, and the run's events are
spooled. The hub is the reason, not the host, so the run does not wait for
it: it flushes for a few seconds, and what the hub did not take is left to
`bootstrap.py send-events`, started detached, which retries with backoff
until the hub takes everything (or a deadline) and then exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from .config import Config
from .credentials import host_auth
from .log import Log
from .reporting import EventSender, EventSpool, events_dir, fsync_file

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
