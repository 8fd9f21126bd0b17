"""Config rules: the checks a field declares, and the validator derived from its declaration."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, Union

from .errors import MISSING, ConfigIssue, _Missing

#
# Each config field is declared once, in its dataclass (config.py): its type
# annotation carries the checks (typing.Annotated, e.g. `Annotated[str,
# Matches(USER_RE)]`), its dataclass default is the schema's default, and no
# default means required. `validator_for` derives the validator from that one
# declaration, re-implementing zod 4's semantics for exactly the schema
# constructs src/config.ts uses, because the shared vectors in fixtures/configs/
# require the same verdict and the same error paths from both sides:
#
# - An issue is either fatal (wrong type, wrong literal or enum value, bad
#   record key, array longer than its maximum) or continuable (regex, range,
#   length, refinement). After a fatal issue zod runs no further checks on that
#   value, and an object's cross-field rules (zod's superRefine; the spec's
#   `cross_field_issues`) run only when no fatal issue occurred inside it.
# - Unknown keys of a strict object are one continuable issue at the object's
#   own path.
# - A JSON number is an integer when it has no fraction (1.0 is 1); booleans
#   are never numbers; integers must be within +-(2**53 - 1).
# - String lengths count code points, as zod 4 does.
#
# What a type means:   str -> z.string()      int -> z.int() (needs a Range)
#   bool -> z.boolean()    Literal[1] -> z.literal(1)    Literal["a", "b"] -> z.enum
#   X | None -> .nullable()   tuple[X, ...] -> z.array (needs Items)
#   Mapping[K, V] -> z.record (K carries Matches)   a dataclass -> z.strictObject

JsonPath = tuple[str | int, ...]

MAX_SAFE_INTEGER = 2**53 - 1


class _IssueLog:
    """Issues in the order zod reports them, each marked fatal or continuable."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self._fatal: list[bool] = []

    def add(self, path: JsonPath, message: str, value: Any, *, fatal: bool = False) -> None:
        self.issues.append(ConfigIssue(path, message, value))
        self._fatal.append(fatal)

    def mark(self) -> int:
        return len(self.issues)

    def fatal_since(self, mark: int = 0) -> bool:
        return any(self._fatal[mark:])


Validator = Callable[[Any, JsonPath, _IssueLog], Any]


# --- the checks a declaration carries (typing.Annotated metadata) -------------


class StringRule:
    """A continuable check on a string: a problem, or None when it passes."""

    def problem(self, value: str) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Matches(StringRule):
    """.regex(pattern): fullmatch() is JS's ^...$ (no m flag)."""

    pattern: re.Pattern[str]
    message: str | None = None

    def problem(self, value: str) -> str | None:
        if self.pattern.fullmatch(value):
            return None
        return self.message or f"must match /^{self.pattern.pattern}$/"


@dataclass(frozen=True)
class MinLen(StringRule):
    n: int

    def problem(self, value: str) -> str | None:
        return None if len(value) >= self.n else f"must be at least {self.n} character(s) long"


@dataclass(frozen=True)
class MaxLen(StringRule):
    n: int

    def problem(self, value: str) -> str | None:
        return None if len(value) <= self.n else f"must be at most {self.n} characters long"


@dataclass(frozen=True)
class Holds(StringRule):
    """.refine(predicate, {message})."""

    predicate: Callable[[str], bool]
    message: str

    def problem(self, value: str) -> str | None:
        return None if self.predicate(value) else self.message


@dataclass(frozen=True)
class Range:
    """z.int().min(low).max(high): every int field declares one."""

    low: int
    high: int


@dataclass(frozen=True)
class Items:
    """z.array(...).min(low).max(high): every array field declares one."""

    high: int
    low: int = 0


# --- validators (each mirrors one zod construct) ------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, _Missing):
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a number too large for a double"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _type_error(log: _IssueLog, path: JsonPath, expected: str, value: Any) -> None:
    message = "is required" if isinstance(value, _Missing) else f"expected {expected}, got {_json_type(value)}"
    log.add(path, message, value, fatal=True)


def _string(rules: tuple[StringRule, ...]) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str):
            _type_error(log, path, "a string", value)
            return value
        for rule in rules:
            problem = rule.problem(value)
            if problem:
                log.add(path, problem, value)
        return value

    return validate


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)  # a huge JSON integer is Infinity to JavaScript
    except OverflowError:
        return False


def _int(low: int, high: int) -> Validator:
    """z.int().min(low).max(high)."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not _is_finite_number(value):
            _type_error(log, path, "an integer", value)
            return value
        if isinstance(value, float) and not value.is_integer():
            log.add(path, "expected an integer, got a fraction", value, fatal=True)
            return value
        number = int(value)
        # zod reports an unsafe integer and then the range too; say it once when the range says it already.
        if abs(number) > MAX_SAFE_INTEGER and low <= number <= high:
            log.add(path, f"must be within +-{MAX_SAFE_INTEGER}", value)
        if number < low:
            log.add(path, f"must be >= {low}", value)
        if number > high:
            log.add(path, f"must be <= {high}", value)
        return number

    return validate


def _boolean(value: Any, path: JsonPath, log: _IssueLog) -> Any:
    if not isinstance(value, bool):
        _type_error(log, path, "a boolean", value)
    return value


def _literal(expected: int) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != expected:
            log.add(path, "is required" if isinstance(value, _Missing) else f"must be {expected}", value, fatal=True)
            return value
        return expected

    return validate


def _enum(options: tuple[str, ...]) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str) or value not in options:
            problem = "is required" if isinstance(value, _Missing) else "must be one of " + ", ".join(options)
            log.add(path, problem, value, fatal=True)
        return value

    return validate


def _array(item: Validator, items: Items) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, list):
            _type_error(log, path, "an array", value)
            return value
        if len(value) > items.high:  # zod refuses before looking at any element
            log.add(path, f"must have at most {items.high} item(s), got {len(value)}", value, fatal=True)
            return value
        parsed = tuple(item(v, (*path, i), log) for i, v in enumerate(value))
        if len(value) < items.low:
            log.add(path, f"must have at least {items.low} item(s)", value)
        return parsed

    return validate


def _record(key: Matches, item: Validator) -> Validator:
    """z.record(z.string().regex(key), item): a bad key is fatal, its value unchecked."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return value
        parsed: dict[str, Any] = {}  # wrapped read-only below: the config is frozen all the way down
        for name, entry in value.items():
            if name == "__proto__":  # zod drops it silently
                continue
            if not key.pattern.fullmatch(name):
                log.add((*path, name), f"key must match /^{key.pattern.pattern}$/", name, fatal=True)
                continue
            parsed[name] = item(entry, (*path, name), log)
        return MappingProxyType(parsed)

    return validate


def _nullable(inner: Validator) -> Validator:
    return lambda value, path, log: None if value is None else inner(value, path, log)


def _default(default: Any, inner: Validator) -> Validator:
    return lambda value, path, log: default if isinstance(value, _Missing) else inner(value, path, log)


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The schema default of a declared field: its dataclass default, or MISSING when required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _object(spec: type[Any]) -> Validator:
    """z.strictObject(...).superRefine(...): every declared field, one issue listing the
    unknown keys, then the spec's cross-field rules when nothing fatal happened inside."""
    hints = typing.get_type_hints(spec, include_extras=True)
    fields: dict[str, Validator] = {}
    for f in dataclasses.fields(spec):
        check = validator_for(hints[f.name], f"{spec.__name__}.{f.name}")
        default = field_default(f)
        fields[f.name] = check if isinstance(default, _Missing) else _default(default, check)
    cross_field: Callable[[Any], Iterable[tuple[str, str]]] | None = getattr(spec, "cross_field_issues", None)

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return None
        mark = log.mark()
        parsed = {name: check(value.get(name, MISSING), (*path, name), log) for name, check in fields.items()}
        unknown = [key for key in value if key not in fields]
        if unknown:
            log.add(path, "unknown key(s): " + ", ".join(unknown), unknown)
        # Built even from invalid parts (the cross-field rules read them); discarded when there are issues.
        result = spec(**parsed)
        if cross_field is not None and not log.fatal_since(mark):
            for name, message in cross_field(result):
                log.add((*path, name), message, parsed[name])
        return result

    return validate


_VALIDATORS: dict[Any, Validator] = {}


def validator_for(tp: Any, where: str = "") -> Validator:
    """The validator a declared type means (see the table at the top of this module)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp not in _VALIDATORS:
            _VALIDATORS[tp] = _object(tp)
        return _VALIDATORS[tp]
    base: Any = tp
    rules: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        base, rules = tp.__origin__, tp.__metadata__
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _nullable(validator_for(args[0] if args[1] is type(None) else args[1], where))
    string_rules = tuple(r for r in rules if isinstance(r, StringRule))
    if base is str:
        return _string(string_rules)
    if base is bool:
        return _boolean
    if base is int:
        return _int(_one(rules, Range, where).low, _one(rules, Range, where).high)
    if origin is Literal:
        if all(isinstance(a, str) for a in args):
            return _enum(args)
        if len(args) == 1 and isinstance(args[0], int):
            return _literal(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _array(validator_for(args[0], f"{where}[]"), _one(rules, Items, where))
    if origin is Mapping and len(args) == 2:
        key_rules = typing.get_args(args[0])[1:] if typing.get_origin(args[0]) is Annotated else ()
        return _record(_one(key_rules, Matches, f"{where} key"), validator_for(args[1], f"{where}{{}}"))
    raise TypeError(f"config field {where}: no validator for the declared type {tp!r}")


_R = typing.TypeVar("_R")


def _one(rules: Iterable[Any], kind: type[_R], where: str) -> _R:
    found: list[_R] = []
    for rule in rules:
        if isinstance(rule, kind):
            found.append(rule)
    if len(found) != 1:
        raise TypeError(f"config field {where}: declare exactly one {kind.__name__}(...)")
    return found[0]


def validate_spec(spec: type[Any], data: Any) -> tuple[Any, list[ConfigIssue]]:
    """Run the derived validator of a spec class; the parsed value and every issue."""
    log = _IssueLog()
    parsed = validator_for(spec)(data, (), log)
    return parsed, log.issues
