"""Small read-only probes of the real system."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import platform
import pwd
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .commands import run_command

# Small read-only probes of the real system, used by the steps' check() and
# apply(). None of them changes anything; the ones that need root say so.

ENV_FILE = Path("/etc/cocalc/project-host.env")
FSTAB = Path("/etc/fstab")
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock")
APT_LISTS_DIR = Path("/var/lib/apt/lists")
APT_LISTS_LOCK = "/var/lib/apt/lists/lock"
APT_UPDATE_STAMP = Path("/var/lib/apt/periodic/update-success-stamp")  # Ubuntu's, when present
DPKG_UPDATES_DIR = Path("/var/lib/dpkg/updates")
DPKG_ARCH_BY_MACHINE = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
NODE_ARCH_BY_DPKG = {"amd64": "x64", "arm64": "arm64"}
BTRFS_SUBVOLUME_INO = 256  # the root directory of every btrfs subvolume has inode 256


def read_text_or(path: str | os.PathLike[str], default: str = "") -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return default


def read_os_release(path: str = "/etc/os-release") -> dict[str, str]:
    """os-release(5) as a dict, quotes removed."""
    result: dict[str, str] = {}
    for line in read_text_or(path).splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.strip().startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key.strip()] = value
    return result


def version_tuple(text: str) -> tuple[int, ...]:
    """'24.04' -> (24, 4), compared numerically; a non-numeric part ends it."""
    parts: list[int] = []
    for part in text.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(parts)


def systemd_is_pid1() -> bool:
    # sd_booted(3)'s own test, with /proc/1/comm as a second opinion.
    return Path("/run/systemd/system").is_dir() or read_text_or("/proc/1/comm").strip() == "systemd"


def machine_arch() -> str:
    """This machine's architecture in Debian's naming (amd64, arm64)."""
    if shutil.which("dpkg"):
        found = run_command(["dpkg", "--print-architecture"], check=False, timeout_s=30)
        if found.returncode == 0 and found.output.strip():
            return found.output.strip()
    machine = platform.machine()
    return DPKG_ARCH_BY_MACHINE.get(machine, machine)


def passwd_entry(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def user_ids(user: str) -> tuple[int, int, str]:
    """(uid, gid, primary group name) of an existing user."""
    entry = pwd.getpwnam(user)
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return entry.pw_uid, entry.pw_gid, group


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages dpkg does not list as installed ('ii')."""
    if not packages:
        return []
    found = run_command(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\n", *packages], check=False, timeout_s=60
    )
    installed = set()
    for line in found.output.splitlines():  # "no packages found" lines (stderr) have no tab
        name, tab, status = line.partition("\t")
        if tab and status.strip() == "ii":
            installed.add(name)
    return [p for p in packages if p not in installed]


def dpkg_interrupted() -> bool:
    """dpkg was killed mid-run: pending records in /var/lib/dpkg/updates."""
    try:
        return any(DPKG_UPDATES_DIR.iterdir())
    except OSError:
        return False


def apt_lists_age_s(own_stamp: Path | None = None) -> float | None:
    """Seconds since the package lists were last refreshed, or None when there
    are no lists at all. apt sets a list's mtime to the server's Last-Modified,
    so a list's mtime only bounds the age; stamps written after a successful
    update are more precise."""
    newest: float | None = None
    try:
        for entry in os.scandir(APT_LISTS_DIR):
            if entry.is_file() and entry.name != "lock":
                newest = max(newest or 0.0, entry.stat().st_mtime)
    except OSError:
        return None
    if newest is None:
        return None
    for stamp in [s for s in (APT_UPDATE_STAMP, own_stamp) if s is not None]:
        with contextlib.suppress(OSError):
            newest = max(newest, stamp.stat().st_mtime)
    return max(0.0, time.time() - newest)


def lock_holders(path: str) -> list[tuple[int, str]]:
    """Processes holding a POSIX (fcntl) lock on `path`, as (PID, command line),
    from /proc/locks. apt and dpkg lock with fcntl, so this names whoever holds
    the dpkg/apt locks, and needs no root."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    exact: list[int] = []
    same_inode: list[int] = []
    for line in read_text_or("/proc/locks").splitlines():
        # "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->"
        fields = line.split()
        if len(fields) < 6 or "->" in fields or not fields[4].lstrip("-").isdigit():
            continue
        dev_ino = fields[5].rsplit(":", 1)
        if len(dev_ino) != 2 or dev_ino[1] != str(st.st_ino) or int(fields[4]) <= 0:
            continue
        # btrfs and overlayfs report a different device in stat() than in /proc/locks.
        (exact if dev_ino[0] == device else same_inode).append(int(fields[4]))
    pids = exact or same_inode
    return [(pid, process_command(pid)) for pid in sorted(set(pids))]


def process_command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")[:200] or "?"


def describe_lock_holders(paths: Sequence[str]) -> str:
    """'PID 1234 (apt-get install foo) holds /var/lib/dpkg/lock-frontend', or ''."""
    found = [f"PID {pid} ({cmd}) holds {path}" for path in paths for pid, cmd in lock_holders(path)]
    return "; ".join(found)


def unescape_mount_field(text: str) -> str:
    """/proc/self/mountinfo and fstab escape space, tab, newline, backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_at(mount_point: str) -> tuple[str, str] | None:
    """(source, fstype) of the filesystem mounted at mount_point (the topmost), or None."""
    found = None
    for line in read_text_or("/proc/self/mountinfo").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if sep and len(fields) >= 5 and len(tail) >= 2 and unescape_mount_field(fields[4]) == mount_point:
            found = (unescape_mount_field(tail[1]), tail[0])
    return found


def btrfs_sysfs_dir(source: str) -> Path | None:
    """/sys/fs/btrfs/<fsid> of the filesystem on block device `source`."""
    device = os.path.basename(os.path.realpath(source))
    with contextlib.suppress(OSError):
        for fs in Path("/sys/fs/btrfs").iterdir():
            if (fs / "devices" / device).exists():
                return fs
    return None


def is_btrfs_subvolume(path: Path) -> bool:
    try:
        return path.stat().st_ino == BTRFS_SUBVOLUME_INO and not path.is_symlink()
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def systemctl_state(verb: str, unit: str) -> str:
    """`systemctl is-active|is-enabled unit` as a word ('active', 'enabled', ...)."""
    found = run_command(["systemctl", verb, unit], check=False, timeout_s=30)
    return found.output.strip().splitlines()[-1] if found.output.strip() else "unknown"
