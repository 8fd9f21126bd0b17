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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .archive import fsync_dir
from .commands import backoff_delay
from .config import Config
from .engine import EVENTS_DIR_NAME, EventSink, lock_is_held, lock_path
from .errors import EXIT_FAILED, EXIT_OK, BootstrapError
from .events import Event, EventType, Outcome, event_fields, parse_events
from .fetch import RedirectRefused, open_request
from .layout import done_marker
from .log import REDACTOR, Log, clip, utc_timestamp
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
