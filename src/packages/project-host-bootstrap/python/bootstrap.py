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
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

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

# (engine) JSON-lines log at $BOOTSTRAP_ROOT/logs/bootstrap.log plus console.
# Contract used by the steps: log.info/warn/error(message, **fields); every
# record carries the current step automatically (a contextvar set by the plan).


class Log:
    """Minimal stand-in until the engine's logger lands; same interface."""

    def info(self, message: str, **fields: Any) -> None:
        print(message, file=sys.stderr)

    def warn(self, message: str, **fields: Any) -> None:
        print(f"warning: {message}", file=sys.stderr)

    def error(self, message: str, **fields: Any) -> None:
        print(f"error: {message}", file=sys.stderr)


# ============================================================================
# running commands
# ============================================================================

# (engine) run_command(), sudo, redaction, retry().
# Contract used by the steps (signatures are stable; the engine owns bodies).


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    duration_s: float
    output: str  # stdout and stderr, interleaved
    tail: str  # last lines of output, for error messages


class CommandError(BootstrapError):
    def __init__(self, message: str, result: CommandResult, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, log_tail=result.tail)
        self.result = result


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
    with sudo=True the command runs as `sudo -n env K=V ... argv`.
    Raises CommandError on a non-zero exit when check=True, and on timeout
    (after killing the whole process group).
    """
    import subprocess
    import time

    full_env = {
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    full_env["HOME"] = os.environ.get("HOME", "/")
    full_env.update(env or {})
    cmd = list(argv)
    if sudo:
        cmd = ["sudo", "-n", "env", *[f"{k}={v}" for k, v in sorted(full_env.items())], *cmd]
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=cwd,
        timeout=timeout_s,
        check=False,
    )
    output = proc.stdout.decode("utf-8", "replace")
    result = CommandResult(
        tuple(argv), proc.returncode, time.monotonic() - start, output, "\n".join(output.splitlines()[-20:])
    )
    if check and proc.returncode != 0:
        raise CommandError(f"{argv[0]} exited with {proc.returncode}", result, hint=hint)
    return result


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
    import random
    import time

    deadline = time.monotonic() + deadline_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except BaseException as e:
            delay = min(max_s, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if attempt == attempts or not retry_if(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


# ============================================================================
# config
# ============================================================================
#
# Frozen dataclasses mirroring src/config.ts field for field. `from_dict`
# collects every issue with its JSON path; `to_dict` round-trips.


@dataclass(frozen=True)
class HostSpec:
    id: str
    name: str


@dataclass(frozen=True)
class OsSpec:
    id: str
    min_version: str


@dataclass(frozen=True)
class HubSpec:
    url: str
    events_url: str
    secrets_url: str


@dataclass(frozen=True)
class ArtifactSpec:
    url: str
    sha256: str | None
    version: str
    size_bytes: int | None
    strip_components: int
    expected_files: tuple[str, ...]
    executables: tuple[str, ...]


@dataclass(frozen=True)
class ArtifactsSpec:
    project_host: ArtifactSpec
    project: ArtifactSpec
    tools: ArtifactSpec

    def items(self) -> tuple[tuple[str, ArtifactSpec], ...]:
        return (("project_host", self.project_host), ("project", self.project), ("tools", self.tools))


@dataclass(frozen=True)
class NvmSpec:
    version: str
    url: str
    sha256: str


@dataclass(frozen=True)
class NodeSpec:
    version: str
    dist_url: str
    nvm: NvmSpec | None


@dataclass(frozen=True)
class AptSpec:
    packages: tuple[str, ...]
    lists_max_age_s: int
    lock_timeout_s: int


@dataclass(frozen=True)
class DataDiskSpec:
    candidates: tuple[str, ...]
    min_size_gb: int
    wait_s: int


@dataclass(frozen=True)
class BtrfsSpec:
    mount_point: str
    image_path: str
    image_size_gb: int
    data_disk: DataDiskSpec | None


@dataclass(frozen=True)
class ServiceSpec:
    unit: str
    exec: str
    health_url: str
    health_timeout_s: int


@dataclass(frozen=True)
class TunnelSpec:
    host: str
    port: int
    user: str
    remote_port: int
    local_port: int


@dataclass(frozen=True)
class Config:
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

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Config:
        """Validate `data` exactly as the zod schema does; raise ConfigError with every issue."""
        raise ConfigError(source, [ConfigIssue((), "config validation is not wired in yet", data)])

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

# (engine) the step graph and its executor.


# ============================================================================
# reporting
# ============================================================================

# (engine) progress events to the hub, status and timings.


# ============================================================================
# CLI
# ============================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootstrap.py",
        description="Turn this machine into a CoCalc project host, as described by one JSON config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "commands:\n"
            "  check-config   validate the config and exit (0 valid, 2 invalid)\n"
            "\n"
            "exit codes:\n"
            f"  {EXIT_OK}    success\n"
            f"  {EXIT_FAILED}    a step failed (the last lines say which, and what to do)\n"
            f"  {EXIT_CONFIG}    invalid config or usage; nothing was changed\n"
            f"  {EXIT_LOCKED}    another run holds the lock\n"
            f"  {EXIT_INTERRUPTED}  interrupted\n"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="PATH", help="the bootstrap config JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("command", nargs="?", default="run", choices=["check-config", "run"], help="what to do")
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(require_config_path(args))
    print(f"{args.config}: valid (schema_version {config.schema_version}, host {config.host.name})")
    return EXIT_OK


def require_config_path(args: argparse.Namespace) -> str:
    if not args.config:
        raise UsageError(
            "--config PATH is required",
            hint="Pass the config the hub generated, e.g. --config bootstrap/bootstrap-config.json",
        )
    return str(args.config)


class UsageError(BootstrapError):
    exit_code = EXIT_CONFIG


def fail(message: str, *, hint: str | None = None) -> NoReturn:
    raise BootstrapError(message, hint=hint)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return cmd_check_config(args)
        load_config(require_config_path(args))
        fail("the run command is not wired in yet")
    except BootstrapError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


_ = re  # used by the config section's validators

if __name__ == "__main__":
    sys.exit(main())
