"""fstab, block devices, the grow helper, systemd quoting, health checks."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from .commands import CommandError, run_command
from .errors import BootstrapError
from .fetch import USER_AGENT
from .log import Log

# -- btrfs -------------------------------------------------------------------------

FSTAB_TAG = "x-cocalc-bootstrap"  # a userspace mount option (ignored by mount): the tag lives in the line
FSTAB_MARKER = "# cocalc-bootstrap: the next line is managed by bootstrap.py"
BTRFS_LABEL = "cocalc-btrfs"
# under the mount point, owned by the user: what upstream's daemon expects
BTRFS_DIR_MODES = {"data": 0o755, "data/tmp": 0o1777, "data/secrets": 0o700}
MIN_DATA_DISK_UNIT = 2**30  # min_size_gb counts GiB: upstream's 10 GiB is 10737418240 bytes


def fstab_escape(field: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def fstab_entry(source: str, mount_point: str, *, loop: bool) -> str:
    options = ["defaults", "nofail", "noatime", *(["loop"] if loop else []), FSTAB_TAG]
    return f"{fstab_escape(source)} {fstab_escape(mount_point)} btrfs {','.join(options)} 0 0"


def fstab_with_entry(text: str, entry: str) -> str:
    """fstab text with our tagged line (and its marker comment) replaced by
    `entry`, or appended; every other line kept as it was."""
    kept = fstab_lines_not_ours(text)
    return "\n".join([*kept, FSTAB_MARKER, entry]) + "\n"


def fstab_lines_not_ours(text: str) -> list[str]:
    """fstab's lines but our tagged ones and their marker comments."""

    def ours(line: str) -> bool:
        fields = line.split()
        is_tagged = len(fields) >= 4 and not line.lstrip().startswith("#") and FSTAB_TAG in fields[3].split(",")
        return is_tagged or line.strip() == FSTAB_MARKER

    return [line for line in text.splitlines() if not ours(line)]


def fstab_without_ours(text: str) -> str:
    """fstab text without our tagged lines (deprovision); unchanged when there are none."""
    kept = fstab_lines_not_ours(text)
    return text if len(kept) == len(text.splitlines()) else "\n".join(kept) + ("\n" if kept else "")


def block_device_probe(device: str) -> dict[str, str]:
    """What is on a block device or image (blkid's TYPE, PTTYPE, UUID...); {} when nothing."""
    found = run_command(["blkid", "-p", "-o", "export", device], sudo=True, check=False, timeout_s=60)
    if found.returncode == 2:  # blkid: nothing found
        return {}
    if found.returncode != 0:
        raise CommandError(f"blkid {device} exited with {found.returncode}", found)
    pairs = (line.partition("=") for line in found.output.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def block_device_size(device: str) -> int | None:
    """Size in bytes from sysfs (no root needed); None when unknown."""
    name = os.path.basename(os.path.realpath(device))
    try:
        with open(f"/sys/class/block/{name}/size", encoding="ascii") as f:
            return int(f.read().strip()) * 512
    except (OSError, ValueError):
        return None


def mounted_sources() -> dict[str, str]:
    """Real path of every mounted block device -> where it is mounted."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith("/dev/"):
                out.setdefault(os.path.realpath(fields[0]), fields[1])
    return out


def data_disk_verdict(candidate: str, min_bytes: int) -> str | None:
    """None when `candidate` is a usable data disk, else why not."""
    try:
        if not stat.S_ISBLK(os.stat(candidate).st_mode):
            return "not a block device"
    except OSError:
        return "not there"
    where = mounted_sources().get(os.path.realpath(candidate))
    if where is not None:
        return f"mounted at {where}"
    size = block_device_size(candidate)
    if size is None:
        return "size unknown"
    if size < min_bytes:
        return f"{size / 2**30:.1f} GiB, less than the minimum {min_bytes / 2**30:g} GiB"
    return None


def wait_for_block_device(candidates: Sequence[str], wait_s: int, min_bytes: int, log: Log) -> str:
    """The first candidate that is a block device, not mounted and at least
    min_bytes big (the boot disk was once taken for the data disk), waiting up
    to wait_s for one to appear."""
    deadline = time.monotonic() + wait_s
    said = 0.0
    while True:
        why = {candidate: data_disk_verdict(candidate, min_bytes) for candidate in candidates}
        for candidate, verdict in why.items():
            if verdict is None:
                return candidate
        if time.monotonic() >= deadline:
            raise BootstrapError(
                f"no usable data disk within {wait_s}s: " + "; ".join(f"{c}: {w}" for c, w in why.items()),
                hint="Attach the data disk (unmounted, at least btrfs.data_disk.min_size_gb GiB), or fix "
                "btrfs.data_disk.candidates. With a data disk configured the bootstrap never falls back "
                "to a loop image.",
            )
        if time.monotonic() - said >= 15:
            log.info(f"waiting for a data disk: {', '.join(candidates)}", event="disk_wait")
            said = time.monotonic()
        time.sleep(1)


def render_grow_helper(mount_point: str, image_path: str | None, env_file: str) -> str:
    """/usr/local/sbin/cocalc-grow-btrfs [GB], root only, the command line upstream's
    self-host connector and project-host call through sudo: for a loop image,
    grow the file to GB (never shrinks), `losetup -c`, resize, record the size
    (COCALC_BTRFS_IMAGE_GB in the env file); for a device, only the resize.
    Without GB it just fills the device (what the boot-time unit runs)."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Written by bootstrap.py; edits are overwritten.",
        "# cocalc-grow-btrfs [GB]: grow the btrfs filesystem at " + mount_point + ".",
        "set -eu",
        f"MP={q(mount_point)}",
        f"ENV_FILE={q(env_file)}",
        "usage() {",
        '  echo "usage: cocalc-grow-btrfs [GB]   (as root; GB: new size of the loop image, never shrinks)" >&2',
        "  exit 2",
        "}",
        "[ $# -le 1 ] || usage",
        "GB=${1:-}",
        'case $GB in *[!0-9]*) echo "cocalc-grow-btrfs: GB must be a whole number, got \\"$GB\\"" >&2; usage;; esac',
        '[ "$(id -u)" -eq 0 ] || { echo "cocalc-grow-btrfs: run it as root (sudo)" >&2; exit 1; }',
        'mountpoint -q "$MP" || { echo "cocalc-grow-btrfs: nothing is mounted at $MP" >&2; exit 1; }',
    ]
    if image_path is not None:
        lines += [
            f"IMAGE={q(image_path)}",
            'if [ -n "$GB" ]; then truncate -s ">${GB}G" "$IMAGE"; fi',
            'dev=$(losetup -n -O NAME -j "$IMAGE" | head -n 1)',
            '[ -n "$dev" ] || { echo "cocalc-grow-btrfs: $IMAGE is not attached to a loop device" >&2; exit 1; }',
            'losetup -c "$dev"',
            'btrfs filesystem resize max "$MP" >/dev/null',
            'size=$(( $(stat -c %s "$IMAGE") / 1073741824 ))',
            'if [ -f "$ENV_FILE" ] && ! grep -qx "COCALC_BTRFS_IMAGE_GB=$size" "$ENV_FILE"; then',
            '  sed -i "s/^COCALC_BTRFS_IMAGE_GB=.*/COCALC_BTRFS_IMAGE_GB=$size/" "$ENV_FILE"',
            "fi",
        ]
    else:
        lines += [
            '[ -z "$GB" ] || echo "cocalc-grow-btrfs: $MP is on a disk: grow the disk itself; resizing to fill it" >&2',
            'btrfs filesystem resize max "$MP" >/dev/null',
        ]
    lines += ['df -h "$MP"']
    return "\n".join(lines) + "\n"


# -- the service ----------------------------------------------------------------------


def systemd_quote(value: str) -> str:
    """A unit-file value: specifiers (%) escaped, quoted when it has spaces."""
    value = value.replace("%", "%%")
    if re.search(r"[\s\"'\\]", value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


ENV_PLAIN_RE = re.compile(r"[A-Za-z0-9_@%+=:,./*\[\]-]*")


def env_line(key: str, value: str) -> str:
    """KEY=VALUE that systemd's EnvironmentFile= and the daemon's own parser
    (plain KEY=VALUE, one pair of surrounding quotes stripped, no escapes)
    read as the same value: plain when it is plain, else in single quotes
    (literal for systemd), else in double quotes when nothing in it is an
    escape for systemd; anything else cannot be written so both agree."""
    if "\n" in value or "\0" in value or "\r" in value:
        raise BootstrapError(f"env {key}: the value has a line break or NUL", hint="Fix env in the host's config.")
    if ENV_PLAIN_RE.fullmatch(value):
        return f"{key}={value}"
    if "'" not in value:
        return f"{key}='{value}'"
    if not re.search(r'["\\`$]', value):
        return f'{key}="{value}"'
    raise BootstrapError(
        f'env {key}: the value has a single quote and one of " \\ ` $, '
        "which systemd and the daemon would read differently",
        hint="Change the value in the host's config (env or the daemon section).",
    )


def http_status(url: str, timeout_s: float) -> tuple[int | None, str]:
    """(status, what happened) of one GET; status None when nothing answered."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": USER_AGENT}), timeout=timeout_s
        ) as response:
            return int(response.status), f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        e.close()
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        return None, str(getattr(e, "reason", None) or e)


def wait_until_healthy(url: str, timeout_s: float, *, poll_s: float = 0.5, first_poll_s: float = 0.02) -> str:
    """The first 2xx answer of `url` within timeout_s. Asked again after 20 ms, doubling up to
    poll_s: a restarted daemon is usually up within a few tens of ms (a fixed 0.5 s was most of an
    upgrade's restart), and a refused connection costs next to nothing."""
    deadline = time.monotonic() + timeout_s
    delay = first_poll_s
    while True:
        status, what = http_status(url, timeout_s=5)
        if status is not None and 200 <= status < 300:
            return what
        if time.monotonic() >= deadline:
            raise BootstrapError(f"{url} not healthy after {timeout_s:g}s (last answer: {what})")
        time.sleep(min(delay, poll_s))
        delay *= 2


def tcp_reachable(url: str, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to the URL's host and port succeeds, else why not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port}: {e.strerror or e}"
