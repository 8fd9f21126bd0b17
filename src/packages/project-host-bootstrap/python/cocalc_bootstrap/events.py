"""The progress event contract (src/events.ts's twin): typed events to emit,
and the validator that reads them back (the spool, the shared vectors)."""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from .log import MAX_TEXT

# Every event bootstrap.py sends is one of the dataclasses below, emitted
# through an EventSink (engine.py); the spool adds the envelope (run_id,
# seq, ts, type). check_event() is the zod schema's twin: the same verdict,
# the same error paths and the same output (defaults filled in) for every
# vector in fixtures/events/ (python/tests and test/events-conformance.test.ts).

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{7,63}")
STEP_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
MAX_SEQ = 1_000_000
MAX_PLAN_STEPS = 128
MAX_STEP_DEPS = 64


class StrEnum(str, enum.Enum):
    """enum.StrEnum for Python 3.10: members are their values as strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Outcome(StrEnum):
    """How a step ended (STEP_OUTCOMES in src/events.ts)."""

    CHANGED = "changed"  # check() found work, apply() ran, check() is now satisfied
    UNCHANGED = "unchanged"  # nothing to do (skipped, or applied with nothing to change)
    FAILED = "failed"
    BLOCKED = "blocked"  # a dependency failed, or the run stopped first


class EventType(StrEnum):
    RUN_START = "run_start"
    STEP_START = "step_start"
    STEP_END = "step_end"
    PROGRESS = "progress"
    RUN_END = "run_end"


@dataclass(frozen=True)
class StepInfo:
    name: str
    deps: tuple[str, ...]
    weight: float  # expected seconds, weights percent


@dataclass(frozen=True)
class RunStartEvent:
    type: ClassVar[EventType] = EventType.RUN_START
    version: str
    parallel: bool
    steps: tuple[StepInfo, ...]


@dataclass(frozen=True)
class StepStartEvent:
    type: ClassVar[EventType] = EventType.STEP_START
    step: str


@dataclass(frozen=True)
class StepCpuSeconds:
    """CPU-seconds of one step: its thread and the child processes it reaped."""

    user_s: float
    sys_s: float
    children_user_s: float
    children_sys_s: float


@dataclass(frozen=True)
class StepEndEvent:
    type: ClassVar[EventType] = EventType.STEP_END
    step: str
    outcome: Outcome
    duration_s: float
    message: str = ""
    hint: str | None = None
    log_tail: str | None = None
    cpu: StepCpuSeconds | None = None  # null: not measured (a blocked step, an older bootstrap.py)


@dataclass(frozen=True)
class ProgressEvent:
    type: ClassVar[EventType] = EventType.PROGRESS
    phase: str
    percent: float


@dataclass(frozen=True)
class RunEndEvent:
    type: ClassVar[EventType] = EventType.RUN_END
    ok: bool
    wall_s: float
    failed_step: str | None = None
    hint: str | None = None
    log_tail: str | None = None


Event = Union[RunStartEvent, StepStartEvent, StepEndEvent, ProgressEvent, RunEndEvent]  # noqa: UP007 - 3.10 runtime


# -- the validator: zod's rules, paths and defaults -------------------------------------

EventIssues = list[tuple[str, str]]  # (JSON path as in formatPath: $.steps[0].name, message)
EventCheck = Callable[[Any, str, EventIssues], Any]  # returns the parsed value (valid only if no issue was added)
_EV_ABSENT = object()


def _ev_string(*, max_len: int | None = None, pattern: re.Pattern[str] | None = None) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, str):
            issues.append((path, "expected a string"))
        elif pattern is not None and not pattern.fullmatch(value):
            issues.append((path, f"must match {pattern.pattern}"))
        elif max_len is not None and len(value) > max_len:  # code points, as zod counts
            issues.append((path, f"at most {max_len} characters"))
        return value

    return check


def _ev_number(*, minimum: float | None = None, maximum: float | None = None, integer: bool = False) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            issues.append((path, "expected a finite number"))
        elif integer and value != int(value):
            issues.append((path, "expected an integer"))
        elif minimum is not None and value < minimum:
            issues.append((path, f"must be >= {minimum}"))
        elif maximum is not None and value > maximum:
            issues.append((path, f"must be <= {maximum}"))
        else:
            return int(value) if integer else value
        return value

    return check


def _ev_boolean(value: Any, path: str, issues: EventIssues) -> Any:
    if not isinstance(value, bool):
        issues.append((path, "expected true or false"))
    return value


def _ev_choice(enum_type: type[StrEnum]) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, str) or value not in {m.value for m in enum_type}:
            issues.append((path, f"one of {', '.join(m.value for m in enum_type)}"))
        return value

    return check


def _ev_nullable(inner: EventCheck) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        return None if value is None else inner(value, path, issues)

    return check


def _ev_array(item: EventCheck, *, max_len: int) -> EventCheck:
    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, list):
            issues.append((path, "expected an array"))
            return value
        if len(value) > max_len:
            issues.append((path, f"at most {max_len} items"))
        return [item(v, f"{path}[{i}]", issues) for i, v in enumerate(value)]

    return check


EventField = tuple[EventCheck, Any]  # (check, default; _EV_ABSENT = required)


def _ev_object(fields: Mapping[str, EventField]) -> EventCheck:
    """z.strictObject: every field in order, then one issue for unknown keys."""

    def check(value: Any, path: str, issues: EventIssues) -> Any:
        if not isinstance(value, dict):
            issues.append((path, "expected an object"))
            return value
        out: dict[str, Any] = {}
        for key, (field_check, default) in fields.items():
            if key in value:
                out[key] = field_check(value[key], f"{path}.{key}", issues)
            elif default is _EV_ABSENT:
                issues.append((f"{path}.{key}", "required"))
            else:
                out[key] = default
        unknown = [k for k in value if k not in fields]
        if unknown:
            issues.append((path, "unknown key(s): " + ", ".join(map(str, unknown))))
        return out

    return check


_EV_TEXT = _ev_string(max_len=MAX_TEXT)
_EV_STEP = _ev_string(pattern=STEP_NAME_RE)
_EV_REQUIRED: Any = _EV_ABSENT
_EV_ENVELOPE: dict[str, EventField] = {
    "run_id": (_ev_string(pattern=RUN_ID_RE), _EV_REQUIRED),
    "seq": (_ev_number(minimum=0, maximum=MAX_SEQ, integer=True), _EV_REQUIRED),
    "ts": (_ev_number(minimum=0), _EV_REQUIRED),
}
_EV_STEP_INFO = _ev_object(
    {
        "name": (_EV_STEP, _EV_REQUIRED),
        "deps": (_ev_array(_EV_STEP, max_len=MAX_STEP_DEPS), _EV_REQUIRED),
        "weight": (_ev_number(minimum=0), _EV_REQUIRED),
    }
)
_EV_SECONDS = _ev_number(minimum=0)
_EV_STEP_CPU = _ev_object(
    {
        "user_s": (_EV_SECONDS, _EV_REQUIRED),
        "sys_s": (_EV_SECONDS, _EV_REQUIRED),
        "children_user_s": (_EV_SECONDS, _EV_REQUIRED),
        "children_sys_s": (_EV_SECONDS, _EV_REQUIRED),
    }
)
_EV_FIELDS: dict[EventType, dict[str, EventField]] = {
    EventType.RUN_START: {
        "version": (_ev_string(max_len=64), _EV_REQUIRED),
        "parallel": (_ev_boolean, _EV_REQUIRED),
        "steps": (_ev_array(_EV_STEP_INFO, max_len=MAX_PLAN_STEPS), _EV_REQUIRED),
    },
    EventType.STEP_START: {"step": (_EV_STEP, _EV_REQUIRED)},
    EventType.STEP_END: {
        "step": (_EV_STEP, _EV_REQUIRED),
        "outcome": (_ev_choice(Outcome), _EV_REQUIRED),
        "duration_s": (_ev_number(minimum=0), _EV_REQUIRED),
        "message": (_EV_TEXT, ""),
        "hint": (_ev_nullable(_EV_TEXT), None),
        "log_tail": (_ev_nullable(_EV_TEXT), None),
        "cpu": (_ev_nullable(_EV_STEP_CPU), None),
    },
    EventType.PROGRESS: {
        "phase": (_ev_string(max_len=128), _EV_REQUIRED),
        "percent": (_ev_number(minimum=0, maximum=100), _EV_REQUIRED),
    },
    EventType.RUN_END: {
        "ok": (_ev_boolean, _EV_REQUIRED),
        "wall_s": (_ev_number(minimum=0), _EV_REQUIRED),
        "failed_step": (_ev_nullable(_EV_STEP), None),
        "hint": (_ev_nullable(_EV_TEXT), None),
        "log_tail": (_ev_nullable(_EV_TEXT), None),
    },
}
_EV_CHECKS: dict[str, EventCheck] = {
    t.value: _ev_object({**_EV_ENVELOPE, "type": (_ev_string(), _EV_REQUIRED), **fields})
    for t, fields in _EV_FIELDS.items()
}


class EventError(ValueError):
    """An event that does not fit the contract; issues are (path, message)."""

    def __init__(self, issues: EventIssues) -> None:
        super().__init__("; ".join(f"{p}: {m}" for p, m in issues))
        self.issues = issues


def check_event(data: Any) -> dict[str, Any]:
    """One event as the hub's zod schema parses it: the event with defaults
    filled in, or EventError with every issue (zod's paths)."""
    if not isinstance(data, dict):
        raise EventError([("$", "expected an object")])
    check = _EV_CHECKS.get(data["type"]) if isinstance(data.get("type"), str) else None
    if check is None:
        raise EventError([("$.type", f"one of {', '.join(t.value for t in EventType)}")])
    issues: EventIssues = []
    out = check(data, "$", issues)
    if issues:
        raise EventError(issues)
    return dict(out)


def event_fields(event: Event) -> dict[str, Any]:
    """An event's own fields as JSON (without the envelope)."""
    if isinstance(event, RunStartEvent):
        steps = [{"name": s.name, "deps": list(s.deps), "weight": s.weight} for s in event.steps]
        return {"version": event.version, "parallel": event.parallel, "steps": steps}
    if isinstance(event, StepEndEvent):
        fields = {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in vars(event).items()}
        fields["cpu"] = None if event.cpu is None else dict(vars(event.cpu))
        return fields
    return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in vars(event).items()}


def parse_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The valid events of a spool file's lines, in order; stops at the
    first line that is not JSON (the torn last line of a killed run) and
    leaves out lines that break the contract."""
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            break
        try:
            events.append(check_event(data))
        except EventError:
            continue
    return events
