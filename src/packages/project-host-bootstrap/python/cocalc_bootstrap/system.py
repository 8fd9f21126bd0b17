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
BTRFS_DIR_MODES = {"data": 0o755, "tmp": 0o1777}  # under the mount point, owned by the user


def fstab_escape(field: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in field)


def fstab_entry(source: str, mount_point: str, *, loop: bool) -> str:
    options = ["defaults", "nofail", "noatime", *(["loop"] if loop else []), FSTAB_TAG]
    return f"{fstab_escape(source)} {fstab_escape(mount_point)} btrfs {','.join(options)} 0 0"


def fstab_with_entry(text: str, entry: str) -> str:
    """fstab text with our tagged line (and its marker comment) replaced by
    `entry`, or appended; every other line kept as it was."""

    def ours(line: str) -> bool:
        fields = line.split()
        is_tagged = len(fields) >= 4 and not line.lstrip().startswith("#") and FSTAB_TAG in fields[3].split(",")
        return is_tagged or line.strip() == FSTAB_MARKER

    kept = [line for line in text.splitlines() if not ours(line)]
    return "\n".join([*kept, FSTAB_MARKER, entry]) + "\n"


def block_device_probe(device: str) -> dict[str, str]:
    """What is on a block device or image (blkid's TYPE, PTTYPE, UUID...); {} when nothing."""
    found = run_command(["blkid", "-p", "-o", "export", device], sudo=True, check=False, timeout_s=60)
    if found.returncode == 2:  # blkid: nothing found
        return {}
    if found.returncode != 0:
        raise CommandError(f"blkid {device} exited with {found.returncode}", found)
    pairs = (line.partition("=") for line in found.output.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def wait_for_block_device(candidates: Sequence[str], wait_s: int, log: Log) -> str:
    deadline = time.monotonic() + wait_s
    said = 0.0
    while True:
        for candidate in candidates:
            with contextlib.suppress(OSError):
                if stat.S_ISBLK(os.stat(candidate).st_mode):
                    return candidate
        if time.monotonic() >= deadline:
            raise BootstrapError(
                f"no data disk appeared within {wait_s}s (looked for {', '.join(candidates)})",
                hint="Attach the data disk, or fix btrfs.data_disk.candidates. With a data disk configured the "
                "bootstrap never falls back to a loop image.",
            )
        if time.monotonic() - said >= 15:
            log.info(f"waiting for a data disk: {', '.join(candidates)}", event="disk_wait")
            said = time.monotonic()
        time.sleep(1)


def render_grow_helper(mount_point: str, image_path: str | None) -> str:
    """`btrfs-grow`: grow the filesystem after its disk (or loop image) grew."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Written by bootstrap.py. Grows the btrfs filesystem at " + mount_point + " to fill its device.",
        "set -eu",
    ]
    if image_path is not None:
        lines += [
            '[ $# -eq 1 ] || { echo "usage: btrfs-grow SIZE_GB   (grows the loop image; never shrinks)" >&2; exit 2; }',
            'case $1 in ""|*[!0-9]*) echo "btrfs-grow: SIZE_GB must be a whole number" >&2; exit 2;; esac',
            f'sudo -n truncate -s ">${{1}}G" {q(image_path)}',
            f"dev=$(losetup -n -O NAME -j {q(image_path)} | head -n 1)",
            '[ -n "$dev" ] || { echo "btrfs-grow: the image is not attached to a loop device" >&2; exit 1; }',
            'sudo -n losetup -c "$dev"',
        ]
    lines += [f"sudo -n btrfs filesystem resize max {q(mount_point)}", f"df -h {q(mount_point)}"]
    return "\n".join(lines) + "\n"


# -- the service ----------------------------------------------------------------------


def systemd_quote(value: str) -> str:
    """A unit-file value: specifiers (%) escaped, quoted when it has spaces."""
    value = value.replace("%", "%%")
    if re.search(r"[\s\"'\\]", value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def env_quote(value: str) -> str:
    """A value for an EnvironmentFile (and for sh): double quotes, escaped."""
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


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


def wait_until_healthy(url: str, timeout_s: float, *, poll_s: float = 0.5) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status, what = http_status(url, timeout_s=5)
        if status is not None and 200 <= status < 300:
            return what
        if time.monotonic() >= deadline:
            raise BootstrapError(f"{url} not healthy after {timeout_s:g}s (last answer: {what})")
        time.sleep(poll_s)


def tcp_reachable(url: str, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to the URL's host and port succeeds, else why not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port}: {e.strerror or e}"
