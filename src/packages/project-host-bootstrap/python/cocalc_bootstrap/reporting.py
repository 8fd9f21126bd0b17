"""Progress events for the hub: the spool, the sender, status and timings."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .archive import fsync_dir
from .commands import backoff_delay
from .config import Config
from .engine import EventSink, StateStore, lock_is_held, lock_path, state_path
from .errors import EXIT_FAILED, EXIT_OK, BootstrapError
from .layout import done_marker
from .log import REDACTOR, Log, clip
from .step import atomic_write_text

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
        # O_EXCL: a run's spool is always new, so no (run, seq) is ever written twice
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        fsync_dir(directory)  # the spool file itself survives a power cut
        self._seq = 0
        self._synced = -1  # the last seq known to be on disk
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
    elif run.get("status") in ("running", "interrupted"):
        status = "interrupted"  # killed (state still says running, nobody holds the lock) or stopped
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
