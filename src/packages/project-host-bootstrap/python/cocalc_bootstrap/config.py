"""The config: one declaration per field (type, default, checks), twins of src/config.ts."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, get_args

from .config_rules import MAX_SAFE_INTEGER, Holds, Items, Matches, MaxLen, MinLen, Range, validate_spec
from .errors import TOKEN_FILE_NAME, ConfigError, ConfigIssue

#
# Frozen dataclasses mirroring src/config.ts field for field. Each field is
# declared once: its annotation is its type with its checks (`Annotated[...]`,
# the zod chain's twin), its default is the schema's default (none: required).
# config_rules.validator_for derives the validator from that declaration;
# `from_dict` collects every issue with its JSON path; `to_dict` round-trips.

S = TypeVar("S", bound="ConfigSpec")

MAX_PATH = 4096

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


# --- field types: the twins of config.ts's primitives ---------------------------

Arch = Literal["amd64", "arm64"]
ARCHES: tuple[str, ...] = get_args(Arch)

Url = Annotated[str, MaxLen(2048), Holds(is_http_url, "must be an absolute http:// or https:// URL")]
Sha256 = Annotated[str, Matches(SHA256_RE, "must be 64 lowercase hex digits (a sha256)")]
Version = Annotated[str, Matches(VERSION_RE)]
AbsPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(
        is_abs_path,
        "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
    ),
]
RelPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(is_rel_path, "must be a relative path inside the bundle (no leading /, no . or .. segments)"),
]
UserName = Annotated[str, Matches(USER_RE)]
Port = Annotated[int, Range(1, 65535)]
SizeGb = Annotated[int, Range(1, 1 << 20)]
EnvName = Annotated[str, Matches(ENV_NAME_RE)]
EnvValue = Annotated[
    str, MaxLen(4096), Holds(lambda v: "\n" not in v and "\0" not in v, "must not contain newlines or NUL")
]


class ConfigSpec:
    """Base of the config dataclasses: validated in with from_dict, JSON out with to_dict."""

    @classmethod
    def from_dict(cls: type[S], data: Any, source: str = "config") -> S:
        """Validate `data` exactly as the zod schema does; raise ConfigError with every issue."""
        parsed, issues = validate_spec(cls, data)
        if issues:
            raise ConfigError(source, issues)
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


# --- the schema, field for field as in config.ts (declaration order is zod's) ----


@dataclass(frozen=True, kw_only=True)
class HostSpec(ConfigSpec):
    id: Annotated[str, Matches(UUID_RE, "must be a lowercase UUID")]
    name: Annotated[str, Matches(HOST_NAME_RE, "must be a lowercase RFC 1123 host label")]


@dataclass(frozen=True, kw_only=True)
class OsSpec(ConfigSpec):
    id: Annotated[str, Matches(OS_ID_RE)]
    min_version: Annotated[str, Matches(OS_VERSION_RE)]


@dataclass(frozen=True, kw_only=True)
class HubSpec(ConfigSpec):
    url: Url
    events_url: Url
    secrets_url: Url


@dataclass(frozen=True, kw_only=True)
class ArtifactSpec(ConfigSpec):
    url: Url
    sha256: Sha256 | None = None
    version: Version
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None
    strip_components: Annotated[int, Range(0, 8)] = 0
    expected_files: Annotated[tuple[RelPath, ...], Items(64)] = ()
    executables: Annotated[tuple[RelPath, ...], Items(64)] = ()


@dataclass(frozen=True, kw_only=True)
class ArtifactsSpec(ConfigSpec):
    project_host: ArtifactSpec
    project: ArtifactSpec
    tools: ArtifactSpec

    def items(self) -> tuple[tuple[str, ArtifactSpec], ...]:
        return (("project_host", self.project_host), ("project", self.project), ("tools", self.tools))


@dataclass(frozen=True, kw_only=True)
class NvmSpec(ConfigSpec):
    version: Version
    url: Url
    sha256: Sha256


@dataclass(frozen=True, kw_only=True)
class NodeSpec(ConfigSpec):
    version: Annotated[str, Matches(NODE_VERSION_RE, "must be x.y.z")]
    dist_url: Url
    nvm: NvmSpec | None = None


@dataclass(frozen=True, kw_only=True)
class AptSpec(ConfigSpec):
    packages: Annotated[tuple[Annotated[str, Matches(DEB_PACKAGE_RE)], ...], Items(200)] = ()
    lists_max_age_s: Annotated[int, Range(0, 7 * 86400)] = 3600
    lock_timeout_s: Annotated[int, Range(1, 3600)] = 600


@dataclass(frozen=True, kw_only=True)
class DataDiskSpec(ConfigSpec):
    candidates: Annotated[tuple[AbsPath, ...], Items(16, low=1)]
    min_size_gb: SizeGb
    wait_s: Annotated[int, Range(0, 3600)] = 300


@dataclass(frozen=True, kw_only=True)
class BtrfsSpec(ConfigSpec):
    mount_point: AbsPath = "/btrfs"
    image_path: AbsPath
    image_size_gb: SizeGb
    data_disk: DataDiskSpec | None = None


@dataclass(frozen=True, kw_only=True)
class ServiceSpec(ConfigSpec):
    unit: Annotated[str, Matches(SYSTEMD_UNIT_RE)] = "cocalc-project-host"
    exec: RelPath
    health_url: Url
    health_timeout_s: Annotated[int, Range(1, 3600)] = 120


@dataclass(frozen=True, kw_only=True)
class TunnelSpec(ConfigSpec):
    host: Annotated[str, MinLen(1), MaxLen(253), Matches(TUNNEL_HOST_RE)]
    port: Port = 22
    user: UserName
    remote_port: Port
    local_port: Port


@dataclass(frozen=True, kw_only=True)
class Config(ConfigSpec):
    schema_version: Literal[1]
    host: HostSpec
    bootstrap_user: Annotated[
        str,
        Matches(USER_RE, "must be a POSIX user name"),
        Holds(lambda u: u != "root", "must not be root: the bootstrap runs as a non-root user with sudo"),
    ]
    home: AbsPath
    bootstrap_root: AbsPath
    bootstrap_dir: AbsPath
    arch: Arch
    os: OsSpec
    parallel: bool = True
    hub: HubSpec
    conat_urls: Annotated[tuple[Url, ...], Items(8, low=1)]
    secrets: Annotated[tuple[Annotated[str, Matches(SECRET_NAME_RE)], ...], Items(16)] = ()
    artifacts: ArtifactsSpec
    node: NodeSpec
    apt: AptSpec
    btrfs: BtrfsSpec
    service: ServiceSpec
    tunnel: TunnelSpec | None = None
    env: Mapping[EnvName, EnvValue] = field(default_factory=lambda: MappingProxyType({}))

    def cross_field_issues(self) -> Iterator[tuple[str, str]]:
        """BootstrapConfigSchema's superRefine: (field, problem) for each rule broken."""
        if not is_inside(self.bootstrap_dir, self.bootstrap_root):
            yield "bootstrap_dir", "must be inside bootstrap_root"
        if not is_inside(self.bootstrap_root, self.home):
            yield "bootstrap_root", "must be inside home"

    @property
    def token_file(self) -> Path:
        return Path(self.bootstrap_dir) / TOKEN_FILE_NAME

    @property
    def logs_dir(self) -> Path:
        return Path(self.bootstrap_root) / "logs"


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
