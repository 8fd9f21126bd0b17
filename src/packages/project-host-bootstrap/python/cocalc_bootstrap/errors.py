"""Constants, exit codes and the error types every other module raises."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__version__ = "0.1.0"

T = TypeVar("T")

SCHEMA_VERSION = 1
MIN_PYTHON = (3, 10)
TOKEN_FILE_NAME = "bootstrap-token"  # noqa: S105 - a file name, not a secret
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


class UsageError(BootstrapError):
    exit_code = EXIT_CONFIG


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
