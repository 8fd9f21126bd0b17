"""The command line: check-config, plan, run, reconcile, send-events, status, timings."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .credentials import rotate_if_due
from .debris import remove_debris
from .deprovision import deprovision
from .engine import (
    EVENTS_DIR_NAME,
    Plan,
    RunLock,
    Runner,
    StateStore,
    StepFailed,
    lock_path,
    log_path,
    new_run_id,
    preview,
    state_path,
)
from .errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    BootstrapError,
    ConfigError,
    ConfigIssue,
    UsageError,
    __version__,
    _Missing,
)
from .events import ProgressEvent, RunEndEvent
from .log import REDACTOR, Log, set_active_log
from .reconcile import RECONCILE_FLUSH_S, send_spooled_events, spawn_event_sender
from .reporting import FLUSH_TIMEOUT_S, EventSender, EventSpool, format_status, format_timings, run_status
from .step import Context, Step

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
