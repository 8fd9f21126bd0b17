"""The plan (steps as a dependency graph), state, the lock and the runner."""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import fcntl
import graphlib
import hashlib
import json
import os
import secrets
import threading
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import STEP_CPU, StepCpu, terminate_running_commands
from .config import Config
from .errors import EXIT_LOCKED, BootstrapError, UsageError, __version__
from .events import (
    STEP_NAME_RE,
    Event,
    Outcome,
    ProgressEvent,
    RunStartEvent,
    StepCpuSeconds,
    StepEndEvent,
    StepInfo,
    StepStartEvent,
)
from .lifecycle import PruneStep
from .log import CURRENT_STEP, REDACTOR, utc_timestamp
from .slots import CpuSlots, LinkFirst
from .step import Context, Step, atomic_write_text
from .steps_host import DirectoriesStep, FilesStep, InstallSecretsStep, PreflightStep, SecretsStep
from .steps_install import (
    AptStep,
    DownloadProjectHostStep,
    DownloadProjectStep,
    DownloadToolsStep,
    InstallProjectHostStep,
    InstallProjectStep,
    InstallToolsStep,
    NodeStep,
)
from .steps_network import MetadataBlockStep
from .steps_platform import ChronyStep, ContainersStep, GpuStep, TunnelStep
from .steps_system import BtrfsStep, FinalizeStep, ServiceStep

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
