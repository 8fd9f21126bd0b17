"""The config: one declaration per field (type, default, checks), twins of src/config.ts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, get_args

from .config_rules import (
    DEPTH_MESSAGE,
    MAX_JSON_DEPTH,
    MAX_SAFE_INTEGER,
    Holds,
    Items,
    JsonPath,
    Matches,
    MaxLen,
    MinLen,
    Range,
    validate_spec,
)
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
DEB_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*[a-z0-9.+]")  # no trailing -: apt-get reads `name-` as "remove"
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
SECRET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
OS_ID_RE = re.compile(r"[a-z0-9._-]+")
OS_VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
SYSTEMD_UNIT_RE = re.compile(r"cocalc-[A-Za-z0-9_.-]{1,200}")  # our own namespace
IP_RE = re.compile(r"([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*)")
HOST_PORT_RE = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")
REGION_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")

# --- path, text and URL rules (twins of config.ts's) ------------------------------

# C0 and C1 controls, DEL, U+2028/U+2029 and (json.loads joins escaped pairs) unpaired surrogates.
UNSAFE_CHAR_RE = re.compile(r"[\u0000-\u001f\u007f-\u009f\u2028\u2029\ud800-\udfff]")
SAFE_TEXT_MESSAGE = (
    "must not contain control characters (U+0000-U+001F, U+007F-U+009F, U+2028, U+2029) or unpaired surrogates"
)

# Names to refuse, not temporary files (hence the noqa).
SYSTEM_DIRS = (
    *("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt"),
    *("/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var"),  # noqa: S108
    *("/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt", "/var/spool"),
    "/var/tmp",  # noqa: S108
)
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
)


def is_safe_text(text: str) -> bool:
    return UNSAFE_CHAR_RE.search(text) is None


def _has_dot_segment(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/") if segment)


def is_abs_path(path: str) -> bool:
    """Absolute and normalised: starts with /, no . or .. segments, no //, no trailing /."""
    return (
        path.startswith("/")
        and "//" not in path
        and (path == "/" or not path.endswith("/"))
        and not _has_dot_segment(path)
    )


def is_rel_path(path: str) -> bool:
    """Relative and inside its base: no leading /, no . or .. segments."""
    return not path.startswith("/") and "//" not in path and not path.endswith("/") and not _has_dot_segment(path)


def is_inside(child: str, parent: str) -> bool:
    return child != "/" if parent == "/" else child.startswith(parent + "/")


def is_system_path(path: str) -> bool:
    return path in SYSTEM_DIRS or any(is_inside(path, tree) for tree in SYSTEM_TREES)


def is_not_system_path(path: str) -> bool:
    # A named function, not a lambda: get_type_hints evaluates annotations with the class
    # namespace as globals, so a lambda written in one could not see this module's names.
    return not is_system_path(path)


# isHttpUrl's plain form, the same regexes and steps as config.ts (fullmatch() is JS's ^...$).
_HOST_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME_RE = re.compile(rf"(?:{_HOST_LABEL}\.)*{_TOP_LABEL}\.?")
IPV4_RE = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)
URL_PARTS_RE = re.compile(r"https?:\/\/([^/?#]*)([/?#].*)?", re.DOTALL)
URL_REST_RE = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*")
_HOST_PORT_RE = re.compile(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?")
_IPV6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+")
_IPV6_GROUP_RE = re.compile(r"[0-9A-Fa-f]{1,4}")


def is_host_name(host: str) -> bool:
    """An ASCII host name (at most 253 characters) or a dotted-quad IPv4 address."""
    return (len(host) <= 253 and DNS_NAME_RE.fullmatch(host) is not None) or IPV4_RE.fullmatch(host) is not None


def is_ipv6(text: str) -> bool:
    """An IPv6 address as RFC 4291 writes it (hex groups, one ::, an IPv4 tail at the very end); no zone."""
    if not _IPV6_CHARS_RE.fullmatch(text):
        return False
    halves = text.split("::")
    if len(halves) > 2:
        return False
    groups = [g for half in halves if half != "" for g in half.split(":")]
    count = 0
    for i, group in enumerate(groups):
        if i == len(groups) - 1 and "." in group and not text.endswith(":"):
            if not IPV4_RE.fullmatch(group):
                return False
            count += 2
        elif _IPV6_GROUP_RE.fullmatch(group):
            count += 1
        else:
            return False
    return count <= 7 if len(halves) == 2 else count == 8


def is_http_url(text: str) -> bool:
    """isHttpUrl of config.ts: lower-case http(s)://, a host name, IPv4 or [IPv6]
    host, an optional port, then only URL characters (see config.ts)."""
    parts = URL_PARTS_RE.fullmatch(text)
    if not parts:
        return False
    host_port = _HOST_PORT_RE.fullmatch(parts.group(1))
    if not host_port or (host_port.group(2) is not None and int(host_port.group(2)) > 65535):
        return False
    host = host_port.group(1)
    host_ok = is_ipv6(host[1:-1]) if host.startswith("[") else is_host_name(host)
    return host_ok and URL_REST_RE.fullmatch(parts.group(2) or "") is not None


# --- field types: the twins of config.ts's primitives ---------------------------

Arch = Literal["amd64", "arm64"]
ARCHES: tuple[str, ...] = get_args(Arch)

Url = Annotated[
    str,
    MaxLen(2048),
    Holds(
        is_http_url,
        "must be an http:// or https:// URL in plain ASCII "
        "(a host name, IPv4 or [IPv6] host; internationalized names as punycode, xn--)",
    ),
]
Sha256 = Annotated[str, Matches(SHA256_RE, "must be 64 lowercase hex digits (a sha256)")]
Version = Annotated[str, Matches(VERSION_RE)]
AbsPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(is_safe_text, SAFE_TEXT_MESSAGE),
    Holds(
        is_abs_path,
        "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
    ),
]
RelPath = Annotated[
    str,
    MinLen(1),
    MaxLen(MAX_PATH),
    Holds(is_safe_text, SAFE_TEXT_MESSAGE),
    Holds(is_rel_path, "must be a relative path inside the bundle (no leading /, no . or .. segments)"),
]
UserName = Annotated[str, Matches(USER_RE)]
Port = Annotated[int, Range(1, 65535)]
SizeGb = Annotated[int, Range(1, 1 << 20)]
EnvName = Annotated[str, Matches(ENV_NAME_RE)]
DebPackage = Annotated[
    str,
    Matches(
        DEB_PACKAGE_RE,
        "must be a Debian package name (a-z 0-9 . + -, 2 or more, starting with a letter or digit) "
        "not ending in - (apt-get would remove the package)",
    ),
]
EnvValue = Annotated[str, MaxLen(4096), Holds(is_safe_text, SAFE_TEXT_MESSAGE)]


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
class ImageSpec(ConfigSpec):
    url: Url
    sha256: Sha256
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None


@dataclass(frozen=True, kw_only=True)
class ArtifactSpec(ConfigSpec):
    url: Url
    sha256: Sha256 | None = None
    version: Version
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None
    strip_components: Annotated[int, Range(0, 8)] = 0
    expected_files: Annotated[tuple[RelPath, ...], Items(64)] = ()
    executables: Annotated[tuple[RelPath, ...], Items(64)] = ()
    image: ImageSpec | None = None


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
    packages: Annotated[tuple[DebPackage, ...], Items(200)] = ()
    lists_max_age_s: Annotated[int, Range(0, 7 * 86400)] = 3600
    lock_timeout_s: Annotated[int, Range(1, 3600)] = 600


@dataclass(frozen=True, kw_only=True)
class DataDiskSpec(ConfigSpec):
    candidates: Annotated[tuple[AbsPath, ...], Items(16, low=1)]
    min_size_gb: SizeGb
    wait_s: Annotated[int, Range(0, 3600)] = 600


@dataclass(frozen=True, kw_only=True)
class BtrfsSpec(ConfigSpec):
    mount_point: Annotated[AbsPath, Holds(is_not_system_path, "must not be / or a system directory (e.g. /btrfs)")] = (
        "/btrfs"
    )
    image_path: AbsPath
    image_size_gb: SizeGb
    data_disk: DataDiskSpec | None = None


@dataclass(frozen=True, kw_only=True)
class ServiceSpec(ConfigSpec):
    unit: Annotated[
        str,
        Matches(SYSTEMD_UNIT_RE, "must be cocalc- and a plain name (letters, digits, _ . -): our own unit namespace"),
    ] = "cocalc-project-host"
    exec: RelPath
    health_url: Url
    health_timeout_s: Annotated[int, Range(1, 3600)] = 120
    args: Annotated[
        tuple[
            Annotated[
                str,
                MinLen(1),
                MaxLen(4096),
                Holds(lambda v: "\n" not in v and "\0" not in v, "must not contain newlines or NUL"),
            ],
            ...,
        ],
        Items(32),
    ] = ()


@dataclass(frozen=True, kw_only=True)
class TunnelSpec(ConfigSpec):
    host: Annotated[
        str,
        Holds(is_host_name, "must be a host name or IPv4 address in ASCII (internationalized names as punycode, xn--)"),
    ]
    port: Port = 22
    user: UserName
    remote_port: Port
    local_port: Port


DnsName = Annotated[str, MinLen(1), MaxLen(253), Matches(DNS_NAME_RE)]


@dataclass(frozen=True, kw_only=True)
class DaemonSpec(ConfigSpec):
    """What the daemon's environment (UPSTREAM 13) needs beyond the rest of the config."""

    region: Annotated[str, Matches(REGION_RE)] = ""
    public_url: Url | None = None
    internal_url: Url | None = None
    public_ip: Annotated[str, Matches(IP_RE)] | None = None
    ssh_server: Annotated[str, Matches(HOST_PORT_RE)] | None = None
    https_hostname: DnsName | None = None
    software_base_url: Url | None = None
    port: Port = 443
    https: bool = True


@dataclass(frozen=True, kw_only=True)
class CloudflaredDebSpec(ConfigSpec):
    url: Url
    sha256: Sha256
    version: Version
    size_bytes: Annotated[int, Range(0, MAX_SAFE_INTEGER)] | None = None


@dataclass(frozen=True, kw_only=True)
class CloudflaredSpec(ConfigSpec):
    """A Cloudflare tunnel to the daemon (UPSTREAM 16), pinned and verified."""

    deb: CloudflaredDebSpec
    hostname: DnsName
    port: Port = 9002
    token_secret: Annotated[str, Matches(SECRET_NAME_RE)] = "cloudflared-token"  # noqa: S105 (a name)


@dataclass(frozen=True, kw_only=True)
class GpuSpec(ConfigSpec):
    """NVIDIA's container toolkit for GPU hosts (UPSTREAM 4)."""

    repo_url: Url
    keyring_url: Url
    keyring_sha256: Sha256
    packages: Annotated[tuple[Annotated[str, Matches(DEB_PACKAGE_RE)], ...], Items(16, low=1)] = (
        "nvidia-container-toolkit",
    )
    cdi_interval_s: Annotated[int, Range(1, 86400)] = 300


@dataclass(frozen=True, kw_only=True)
class Config(ConfigSpec):
    schema_version: Literal[1]
    host: HostSpec
    bootstrap_user: Annotated[
        str,
        Matches(USER_RE, "must be a POSIX user name"),
        Holds(lambda u: u != "root", "must not be root: the bootstrap runs as a non-root user with sudo"),
    ]
    home: Annotated[
        AbsPath,
        Holds(
            is_not_system_path,
            "must be a real home directory, not / or a system directory (e.g. /home/<user>)",
        ),
    ]
    bootstrap_root: AbsPath
    bootstrap_dir: AbsPath
    arch: Arch
    os: OsSpec
    parallel: bool = True
    cpu_slots: Annotated[int, Range(1, 256)] | None = None
    hub: HubSpec
    conat_urls: Annotated[tuple[Url, ...], Items(8, low=1)]
    secrets: Annotated[tuple[Annotated[str, Matches(SECRET_NAME_RE)], ...], Items(16)] = ()
    artifacts: ArtifactsSpec
    node: NodeSpec
    apt: AptSpec
    btrfs: BtrfsSpec
    service: ServiceSpec
    tunnel: TunnelSpec | None = None
    daemon: DaemonSpec = DaemonSpec()
    cloudflared: CloudflaredSpec | None = None
    gpu: GpuSpec | None = None
    env: Mapping[EnvName, EnvValue] = field(default_factory=lambda: MappingProxyType({}))

    def cross_field_issues(self) -> Iterator[tuple[JsonPath, str, Any]]:
        """BootstrapConfigSchema's superRefine: (path, problem, value) for each rule broken."""
        if not is_inside(self.bootstrap_dir, self.bootstrap_root):
            yield ("bootstrap_dir",), "must be inside bootstrap_root", self.bootstrap_dir
        if not is_inside(self.bootstrap_root, self.home):
            yield ("bootstrap_root",), "must be inside home", self.bootstrap_root
        image, mount_point = self.btrfs.image_path, self.btrfs.mount_point
        if (
            not is_inside(image, self.bootstrap_root)
            or image == self.bootstrap_dir
            or is_inside(image, self.bootstrap_dir)
        ):
            problem = "must be inside bootstrap_root and outside bootstrap_dir (a file bootstrap.py owns)"
            yield ("btrfs", "image_path"), problem, image
        elif is_inside(image, mount_point):
            yield ("btrfs", "image_path"), "must not be inside btrfs.mount_point", image
        if mount_point == self.home or is_inside(self.home, mount_point):
            yield ("btrfs", "mount_point"), "must not be home or above it (it would hide home)", mount_point

    @property
    def token_file(self) -> Path:
        return Path(self.bootstrap_dir) / TOKEN_FILE_NAME

    @property
    def logs_dir(self) -> Path:
        return Path(self.bootstrap_root) / "logs"


# Deeper than this many [ or { at once, json.loads would recurse into the C stack's limit (RecursionError).
_JSON_TOKENS_RE = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def text_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in _JSON_TOKENS_RE.finditer(text):
        found = match.group()
        if found in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif found in ("]", "}"):
            depth -= 1
    return deepest


def _big_int(digits: str) -> int | float:
    """An integer as JSON.parse reads it: Infinity past a double's range (float() says so
    without int()'s 4300-digit limit, CPython's guard against quadratic conversion)."""
    if len(digits) <= 300:
        return int(digits)
    as_float = float(digits)
    return as_float if math.isinf(as_float) else int(digits)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_config_text(text: str, source: str) -> Any:
    """JSON as JavaScript's JSON.parse reads it (no NaN or Infinity; huge numbers are Infinity);
    ConfigError at $ when it is not JSON or nested too deeply to parse."""
    depth = text_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ConfigError(source, [ConfigIssue((), DEPTH_MESSAGE, f"<{depth} levels>")])
    try:
        return json.loads(text, parse_int=_big_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(source, [ConfigIssue((), f"not valid JSON: {e}", None)]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; ConfigError (exit 2) on any problem."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, [ConfigIssue((), "config file not found", source)]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [ConfigIssue((), f"cannot read config: {e}", source)]) from None
    return Config.from_dict(parse_config_text(text, source), source)
