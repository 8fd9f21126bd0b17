"""The config: typed specs mirroring src/config.ts and their validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import MISSING, SCHEMA_VERSION, TOKEN_FILE_NAME, ConfigError, ConfigIssue, _Missing

#
# Frozen dataclasses mirroring src/config.ts field for field. `from_dict`
# collects every issue with its JSON path; `to_dict` round-trips.
#
# The validators below re-implement zod 4's semantics for exactly the schema
# constructs config.ts uses, because the shared vectors in fixtures/configs/
# require the same verdict and the same error paths from both sides:
#
# - An issue is either fatal (wrong type, wrong literal or enum value, bad
#   record key, array longer than its maximum) or continuable (regex, range,
#   length, refinement). After a fatal issue zod runs no further checks on that
#   value, and the superRefine of BootstrapConfigSchema (bootstrap_dir inside
#   bootstrap_root inside home) runs only when no fatal issue occurred anywhere.
# - Unknown keys of a strict object are one continuable issue at the object's
#   own path.
# - A JSON number is an integer when it has no fraction (1.0 is 1); booleans
#   are never numbers; integers must be within +-(2**53 - 1).
# - String lengths count code points, as zod 4 does.

JsonPath = tuple[str | int, ...]
S = TypeVar("S", bound="ConfigSpec")

MAX_PATH = 4096
MAX_SAFE_INTEGER = 2**53 - 1

# Twins of the *_RE constants in config.ts; fullmatch() is JS's ^...$ (no m flag).
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
NODE_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
DEB_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]+")
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
OS_ID_RE = re.compile(r"[a-z0-9._-]+")
OS_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
SYSTEMD_UNIT_RE = re.compile(r"[A-Za-z0-9_.@-]+")
TUNNEL_HOST_RE = re.compile(r"[A-Za-z0-9.-]+")
ARCHES = ("amd64", "arm64")


class ConfigSpec:
    """Base of the config dataclasses: validated in with from_dict, JSON out with to_dict."""

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "config") -> S:
        """Validate `data` exactly as the zod schema does; raise ConfigError with every issue."""
        log = _IssueLog()
        parsed = _SCHEMAS[cls](data, (), log)
        if log.issues:
            raise ConfigError(source, log.issues)
        assert isinstance(parsed, cls)
        return parsed

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


@dataclass(frozen=True)
class HostSpec(ConfigSpec):
    id: str
    name: str


@dataclass(frozen=True)
class OsSpec(ConfigSpec):
    id: str
    min_version: str


@dataclass(frozen=True)
class HubSpec(ConfigSpec):
    url: str
    events_url: str
    secrets_url: str


@dataclass(frozen=True)
class ArtifactSpec(ConfigSpec):
    url: str
    sha256: str | None
    version: str
    size_bytes: int | None
    strip_components: int
    expected_files: tuple[str, ...]
    executables: tuple[str, ...]


@dataclass(frozen=True)
class ArtifactsSpec(ConfigSpec):
    project_host: ArtifactSpec
    project: ArtifactSpec
    tools: ArtifactSpec

    def items(self) -> tuple[tuple[str, ArtifactSpec], ...]:
        return (("project_host", self.project_host), ("project", self.project), ("tools", self.tools))


@dataclass(frozen=True)
class NvmSpec(ConfigSpec):
    version: str
    url: str
    sha256: str


@dataclass(frozen=True)
class NodeSpec(ConfigSpec):
    version: str
    dist_url: str
    nvm: NvmSpec | None


@dataclass(frozen=True)
class AptSpec(ConfigSpec):
    packages: tuple[str, ...]
    lists_max_age_s: int
    lock_timeout_s: int


@dataclass(frozen=True)
class DataDiskSpec(ConfigSpec):
    candidates: tuple[str, ...]
    min_size_gb: int
    wait_s: int


@dataclass(frozen=True)
class BtrfsSpec(ConfigSpec):
    mount_point: str
    image_path: str
    image_size_gb: int
    data_disk: DataDiskSpec | None


@dataclass(frozen=True)
class ServiceSpec(ConfigSpec):
    unit: str
    exec: str
    health_url: str
    health_timeout_s: int


@dataclass(frozen=True)
class TunnelSpec(ConfigSpec):
    host: str
    port: int
    user: str
    remote_port: int
    local_port: int


@dataclass(frozen=True)
class Config(ConfigSpec):
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


# --- path and URL rules (twins of AbsPath, RelPath and isHttpUrl) -------------


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/") if segment)


def is_abs_path(path: str) -> bool:
    """Absolute and normalised: starts with /, no . or .. segments, no //, no trailing /."""
    return (
        path.startswith("/")
        and "\0" not in path
        and "//" not in path
        and (path == "/" or not path.endswith("/"))
        and not _has_dot_segment(path)
    )


def is_rel_path(path: str) -> bool:
    """Relative and inside its base: no leading /, no . or .. segments."""
    return (
        not path.startswith("/")
        and "\0" not in path
        and "//" not in path
        and not path.endswith("/")
        and not _has_dot_segment(path)
    )


def is_inside(child: str, parent: str) -> bool:
    return child != "/" if parent == "/" else child.startswith(parent + "/")


# JavaScript's \s, which is not Python's (Python adds \x1c-\x1f and \x85, lacks \ufeff).
_JS_WHITESPACE_RE = re.compile("[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")
# PLAIN_HTTP_URL_RE of config.ts; whitespace is refused before it is tried, so the class needs no \s.
_PLAIN_HTTP_URL_RE = re.compile(r"https?://([^/\\?#@%]+)(?:[/?#]|\Z)")
_FORBIDDEN_DOMAIN_CHARS = frozenset(" #%/:<>?@[\\]^|\x7f") | frozenset(chr(c) for c in range(0x20))


def is_http_url(text: str) -> bool:
    """isHttpUrl of config.ts: the plain form (lower-case http or https, //,
    no userinfo, no whitespace anywhere), and an authority that WHATWG URL
    parsing accepts: a valid host (domain, IPv4 or [IPv6]) and port."""
    plain = _PLAIN_HTTP_URL_RE.match(text)
    if _JS_WHITESPACE_RE.search(text) or not plain:
        return False
    host, port = _split_host_port(plain.group(1))
    if host is None or not re.fullmatch(r"[0-9]*", port) or (port and int(port) > 65535):
        return False
    return _is_valid_host(host)


def _split_host_port(host_port: str) -> tuple[str | None, str]:
    if host_port.startswith("["):
        end = host_port.find("]")
        if end < 0:
            return None, ""
        host, after = host_port[: end + 1], host_port[end + 1 :]
        if after and not after.startswith(":"):
            return None, ""
        return host, after[1:]
    host, _, port = host_port.partition(":")
    return host, port


def _is_valid_host(host: str) -> bool:
    """WHATWG host parsing for an authority in plain form (no % escapes, so no scope ids either)."""
    import ipaddress

    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    try:
        domain = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    domain = domain.lower()
    if not domain or any(c in _FORBIDDEN_DOMAIN_CHARS for c in domain):
        return False
    return _ipv4_value(domain) is not None if _ends_in_number(domain) else True


def _ipv4_number(part: str) -> int | None:
    """One part of a WHATWG IPv4 address: decimal, 0x hex or 0-prefixed octal."""
    digits, base = part, 10
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    if digits == "":
        return 0
    allowed = {10: "0123456789", 16: "0123456789abcdefABCDEF", 8: "01234567"}[base]
    if any(c not in allowed for c in digits):
        return None
    return int(digits, base)


def _ipv4_parts(domain: str) -> list[str]:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    return parts


def _ends_in_number(domain: str) -> bool:
    last = _ipv4_parts(domain)[-1]
    return last != "" and ((last.isdigit() and last.isascii()) or _ipv4_number(last) is not None)


def _ipv4_value(domain: str) -> int | None:
    parts = _ipv4_parts(domain)
    if len(parts) > 4 or "" in parts:
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 1 << (8 * (5 - len(values))):
        return None
    return sum(n << (8 * (3 - i)) for i, n in enumerate(values[:-1])) + values[-1]


# --- validators (each mirrors one zod construct) ------------------------------


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
StringCheck = Callable[[str], str | None]  # a problem, or None when the string passes


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


def _matches(pattern: re.Pattern[str], message: str | None = None) -> StringCheck:
    problem = message or f"must match /^{pattern.pattern}$/"
    return lambda s: None if pattern.fullmatch(s) else problem


def _min_len(n: int) -> StringCheck:
    return lambda s: None if len(s) >= n else f"must be at least {n} character(s) long"


def _max_len(n: int) -> StringCheck:
    return lambda s: None if len(s) <= n else f"must be at most {n} characters long"


def _holds(predicate: Callable[[str], bool], message: str) -> StringCheck:
    return lambda s: None if predicate(s) else message


def _string(*checks: StringCheck) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, str):
            _type_error(log, path, "a string", value)
            return value
        for check in checks:
            problem = check(value)
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


def _array(item: Validator, *, min_items: int = 0, max_items: int) -> Validator:
    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, list):
            _type_error(log, path, "an array", value)
            return value
        if len(value) > max_items:  # zod refuses before looking at any element
            log.add(path, f"must have at most {max_items} item(s), got {len(value)}", value, fatal=True)
            return value
        parsed = tuple(item(v, (*path, i), log) for i, v in enumerate(value))
        if len(value) < min_items:
            log.add(path, f"must have at least {min_items} item(s)", value)
        return parsed

    return validate


def _record(key_pattern: re.Pattern[str], item: Validator) -> Validator:
    """z.record(z.string().regex(key_pattern), item): a bad key is fatal, its value unchecked."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return value
        parsed: dict[str, Any] = {}  # wrapped read-only below: the config is frozen all the way down
        for key, entry in value.items():
            if key == "__proto__":  # zod drops it silently
                continue
            if not key_pattern.fullmatch(key):
                log.add((*path, key), f"key must match /^{key_pattern.pattern}$/", key, fatal=True)
                continue
            parsed[key] = item(entry, (*path, key), log)
        return MappingProxyType(parsed)

    return validate


def _nullable(inner: Validator) -> Validator:
    return lambda value, path, log: None if value is None else inner(value, path, log)


def _default(default: Any, inner: Validator) -> Validator:
    return lambda value, path, log: default if isinstance(value, _Missing) else inner(value, path, log)


def _object(spec: type[ConfigSpec], fields: Mapping[str, Validator]) -> Validator:
    """z.strictObject: every field, then one issue listing the unknown keys."""

    def validate(value: Any, path: JsonPath, log: _IssueLog) -> Any:
        if not isinstance(value, dict):
            _type_error(log, path, "an object", value)
            return None
        parsed = {name: check(value.get(name, MISSING), (*path, name), log) for name, check in fields.items()}
        unknown = [key for key in value if key not in fields]
        if unknown:
            log.add(path, "unknown key(s): " + ", ".join(unknown), unknown)
        # Built even from invalid parts (the cross-field check reads them); discarded when there are issues.
        return spec(**parsed)

    return validate


# --- the schema, field for field as in config.ts -------------------------------

_URL = _string(_max_len(2048), _holds(is_http_url, "must be an absolute http:// or https:// URL"))
_SHA256 = _string(_matches(SHA256_RE, "must be 64 lowercase hex digits (a sha256)"))
_VERSION = _string(_matches(VERSION_RE))
_ABS_PATH = _string(
    _min_len(1),
    _max_len(MAX_PATH),
    _holds(
        is_abs_path,
        "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
    ),
)
_REL_PATH = _string(
    _min_len(1),
    _max_len(MAX_PATH),
    _holds(is_rel_path, "must be a relative path inside the bundle (no leading /, no . or .. segments)"),
)

_ARTIFACT = _object(
    ArtifactSpec,
    {
        "url": _URL,
        "sha256": _default(None, _nullable(_SHA256)),
        "version": _VERSION,
        "size_bytes": _default(None, _nullable(_int(0, MAX_SAFE_INTEGER))),
        "strip_components": _default(0, _int(0, 8)),
        "expected_files": _default((), _array(_REL_PATH, max_items=64)),
        "executables": _default((), _array(_REL_PATH, max_items=64)),
    },
)

_NVM = _object(NvmSpec, {"version": _VERSION, "url": _URL, "sha256": _SHA256})

_TUNNEL = _object(
    TunnelSpec,
    {
        "host": _string(_min_len(1), _max_len(253), _matches(TUNNEL_HOST_RE)),
        "port": _default(22, _int(1, 65535)),
        "user": _string(_matches(USER_RE)),
        "remote_port": _int(1, 65535),
        "local_port": _int(1, 65535),
    },
)

_SCHEMAS: dict[type[ConfigSpec], Validator] = {
    HostSpec: _object(
        HostSpec,
        {
            "id": _string(_matches(UUID_RE, "must be a lowercase UUID")),
            "name": _string(_matches(HOST_NAME_RE, "must be a lowercase RFC 1123 host label")),
        },
    ),
    OsSpec: _object(OsSpec, {"id": _string(_matches(OS_ID_RE)), "min_version": _string(_matches(OS_VERSION_RE))}),
    HubSpec: _object(HubSpec, {"url": _URL, "events_url": _URL, "secrets_url": _URL}),
    ArtifactSpec: _ARTIFACT,
    ArtifactsSpec: _object(ArtifactsSpec, {"project_host": _ARTIFACT, "project": _ARTIFACT, "tools": _ARTIFACT}),
    NvmSpec: _NVM,
    NodeSpec: _object(
        NodeSpec,
        {
            "version": _string(_matches(NODE_VERSION_RE, "must be x.y.z")),
            "dist_url": _URL,
            "nvm": _default(None, _nullable(_NVM)),
        },
    ),
    AptSpec: _object(
        AptSpec,
        {
            "packages": _default((), _array(_string(_matches(DEB_PACKAGE_RE)), max_items=200)),
            "lists_max_age_s": _default(3600, _int(0, 7 * 86400)),
            "lock_timeout_s": _default(600, _int(1, 3600)),
        },
    ),
    DataDiskSpec: _object(
        DataDiskSpec,
        {
            "candidates": _array(_ABS_PATH, min_items=1, max_items=16),
            "min_size_gb": _int(1, 1 << 20),
            "wait_s": _default(300, _int(0, 3600)),
        },
    ),
    ServiceSpec: _object(
        ServiceSpec,
        {
            "unit": _default("cocalc-project-host", _string(_matches(SYSTEMD_UNIT_RE))),
            "exec": _REL_PATH,
            "health_url": _URL,
            "health_timeout_s": _default(120, _int(1, 3600)),
        },
    ),
    TunnelSpec: _TUNNEL,
}
_SCHEMAS[BtrfsSpec] = _object(
    BtrfsSpec,
    {
        "mount_point": _default("/btrfs", _ABS_PATH),
        "image_path": _ABS_PATH,
        "image_size_gb": _int(1, 1 << 20),
        "data_disk": _default(None, _nullable(_SCHEMAS[DataDiskSpec])),
    },
)

_CONFIG_FIELDS = _object(
    Config,
    {
        "schema_version": _literal(SCHEMA_VERSION),
        "host": _SCHEMAS[HostSpec],
        "bootstrap_user": _string(
            _matches(USER_RE, "must be a POSIX user name"),
            _holds(lambda u: u != "root", "must not be root: the bootstrap runs as a non-root user with sudo"),
        ),
        "home": _ABS_PATH,
        "bootstrap_root": _ABS_PATH,
        "bootstrap_dir": _ABS_PATH,
        "arch": _enum(ARCHES),
        "os": _SCHEMAS[OsSpec],
        "parallel": _default(True, _boolean),
        "hub": _SCHEMAS[HubSpec],
        "conat_urls": _array(_URL, min_items=1, max_items=8),
        "secrets": _default((), _array(_string(_matches(SECRET_NAME_RE)), max_items=16)),
        "artifacts": _SCHEMAS[ArtifactsSpec],
        "node": _SCHEMAS[NodeSpec],
        "apt": _SCHEMAS[AptSpec],
        "btrfs": _SCHEMAS[BtrfsSpec],
        "service": _SCHEMAS[ServiceSpec],
        "tunnel": _default(None, _nullable(_TUNNEL)),
        "env": _default(
            MappingProxyType({}),
            _record(
                ENV_NAME_RE,
                _string(
                    _max_len(4096),
                    _holds(lambda v: "\n" not in v and "\0" not in v, "must not contain newlines or NUL"),
                ),
            ),
        ),
    },
)


def _validate_config(value: Any, path: JsonPath, log: _IssueLog) -> Any:
    """BootstrapConfigSchema: the fields, then (as zod's superRefine) the
    cross-field rules, only when no fatal issue stopped the checks."""
    config = _CONFIG_FIELDS(value, path, log)
    if isinstance(config, Config) and not log.fatal_since(0):
        if not is_inside(config.bootstrap_dir, config.bootstrap_root):
            log.add((*path, "bootstrap_dir"), "must be inside bootstrap_root", config.bootstrap_dir)
        if not is_inside(config.bootstrap_root, config.home):
            log.add((*path, "bootstrap_root"), "must be inside home", config.bootstrap_root)
    return config


_SCHEMAS[Config] = _validate_config


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
