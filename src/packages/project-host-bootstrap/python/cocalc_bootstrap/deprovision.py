"""`bootstrap.py deprovision`: take off the host what the bootstrap put there.

What goes, in this order (each only when present, so a second run finds
nothing and says so):
- the daemon's unit (stopped, disabled, removed), cloudflared's unit, the
  GPU's CDI units, the bundle images' mount units (unmounted) and the image
  store, the grow unit;
- the secrets the daemon read (/btrfs/data/secrets/<name>) and the done
  markers, then /btrfs unmounted and our tagged fstab line (and its marker
  comment) removed;
- root's files: the grow helper, the env file, cloudflared's token and
  config, the CDI helper, NVIDIA's apt source and keyring, root's storage.conf and the
  user-namespace sysctl file (each only when it is the one bootstrap.py wrote);
- the user's: storage.conf, the Node.js version we installed (and nvm's
  default alias when it names it), and bootstrap_root: bundles, config,
  logs, and bootstrap_dir with the config, the token, the host's credentials,
  state and events.

Kept: the data. A data disk is not touched; a loop image (bootstrap_root's
btrfs image) is kept in place, so a fresh bootstrap mounts the same data
again. `--destroy-data <mount point>` (the configured mount point, typed out as
a confirmation) removes the loop image, or wipes the data disk's signature.
Also kept, and said so: apt packages, /etc/subuid and /etc/subgid entries,
chrony's config, sudoers (bootstrap.py writes none), the podman storage on
/btrfs (it is data).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .archive import read_marker
from .commands import run_command
from .config import Config
from .engine import RunLock, lock_path, new_run_id
from .errors import BootstrapError, UsageError
from .facts import ENV_FILE, FSTAB, SYSTEMD_UNIT_DIR, file_sha256, mount_at, read_text_or
from .images import IMAGES_DIR
from .layout import (
    CLOUDFLARED_CONFIG,
    CLOUDFLARED_TOKEN_ENV,
    CLOUDFLARED_UNIT,
    DONE_FILE_NAME,
    GROW_HELPER,
    GROW_UNIT,
    SYSTEM_DONE_MARKER,
    data_dir,
    node_dir,
    nvm_dir,
    secrets_dir,
)
from .step import write_root_file
from .steps_platform import (
    CDI_HELPER,
    CDI_UNIT,
    NVIDIA_KEYRING,
    NVIDIA_SOURCES,
    ROOT_STORAGE_CONF,
    USERNS_SYSCTL_FILE,
    user_storage_conf,
)
from .system import fstab_without_ours

OUR_HEADER = "# Written by bootstrap.py"
MOUNT_UNIT_HEADER = "# Written by bootstrap.py: a bundle image"
BUSY_HINT = (
    "Something still uses {mp} (see `sudo fuser -vm {mp}`, e.g. a project container); stop it and run "
    "deprovision again: it carries on where it stopped."
)


@dataclass
class DeprovisionReport:
    """What deprovision did: each line says what was removed, or what was kept and why."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"removed: {what}" for what in self.removed] or ["removed: nothing (nothing of ours was left)"]
        lines += [f"kept:    {what}" for what in self.kept]
        lines.append(f"deprovision: {len(self.removed)} removed, {len(self.kept)} kept")
        return "\n".join(lines)


def ours(path: Path, header: str = OUR_HEADER) -> bool:
    return read_text_or(path).startswith(header)


def root_rm(paths: list[Path], report: DeprovisionReport) -> None:
    present = [p for p in paths if os.path.lexists(p)]
    if present:
        run_command(["rm", "-f", *map(str, present)], sudo=True, timeout_s=60)
        report.removed += [str(p) for p in present]


def remove_unit(unit: str, report: DeprovisionReport) -> bool:
    """Stop, disable and remove one of our units; True when it was there."""
    path = SYSTEMD_UNIT_DIR / unit
    if not path.exists():
        return False
    run_command(["systemctl", "disable", "--now", unit], sudo=True, check=False, timeout_s=300)
    root_rm([path], report)
    return True


def image_mount_units() -> Iterator[Path]:
    for path in sorted(SYSTEMD_UNIT_DIR.glob("*.mount")):
        if ours(path, MOUNT_UNIT_HEADER):
            yield path


def remove_units(config: Config, report: DeprovisionReport) -> None:
    units = [
        f"{config.service.unit}.service",
        f"{CLOUDFLARED_UNIT}.service",
        f"{CDI_UNIT}.timer",
        f"{CDI_UNIT}.service",
    ]
    changed = [unit for unit in units if remove_unit(unit, report)]
    for path in image_mount_units():
        run_command(["systemctl", "disable", "--now", path.name], sudo=True, check=False, timeout_s=300)
        where = read_mount_where(path)
        if where and mount_at(where) is not None:
            run_command(["umount", where], sudo=True, timeout_s=120, hint=BUSY_HINT.format(mp=where))
        root_rm([path], report)
        changed.append(path.name)
    if IMAGES_DIR.exists():
        run_command(["rm", "-rf", "--one-file-system", str(IMAGES_DIR)], sudo=True, timeout_s=300)
        report.removed.append(f"{IMAGES_DIR} (the bundle images)")
    if remove_unit(f"{GROW_UNIT}.service", report):
        changed.append(GROW_UNIT)
    if changed:
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)


def read_mount_where(unit: Path) -> str | None:
    for line in read_text_or(unit).splitlines():
        if line.startswith("Where="):
            return line.partition("=")[2].strip().strip('"') or None
    return None


def unmount_btrfs(config: Config, destroy: bool, report: DeprovisionReport) -> None:
    mp = config.btrfs.mount_point
    mounted = mount_at(mp)
    if mounted is not None and mounted[1] == "btrfs":
        secrets = [secrets_dir(config) / name for name in config.secrets]
        done = [data_dir(config) / DONE_FILE_NAME]
        root_rm([p for p in (*secrets, *done) if os.path.lexists(p)], report)
        run_command(["umount", mp], sudo=True, timeout_s=300, hint=BUSY_HINT.format(mp=mp))
        report.removed.append(f"the mount of {mp} ({mounted[0]})")
    fstab = read_text_or(FSTAB)
    without = fstab_without_ours(fstab)
    if without != fstab:
        write_root_file(FSTAB, without, mode=0o644)
        run_command(["systemctl", "daemon-reload"], sudo=True, check=False, timeout_s=120)
        report.removed.append(f"the tagged {mp} line in {FSTAB}")
    data_disk = config.btrfs.data_disk
    if data_disk is None:
        image = Path(config.btrfs.image_path)
        if not image.exists():
            return
        if destroy:
            root_rm([image], report)
        else:
            report.kept.append(f"{image} (the btrfs loop image: the data; --destroy-data {mp} removes it)")
        return
    device = mounted[0] if mounted is not None else None
    if destroy and device:
        run_command(["wipefs", "-a", device], sudo=True, timeout_s=120)
        report.removed.append(f"the filesystem signature on the data disk {device} (wipefs -a)")
    else:
        report.kept.append(f"the data disk {device or 'of ' + mp} (untouched; --destroy-data {mp} wipes it)")


def remove_root_files(config: Config, report: DeprovisionReport) -> None:
    always = [GROW_HELPER, ENV_FILE, SYSTEM_DONE_MARKER]
    if config.cloudflared is not None or ours(CLOUDFLARED_CONFIG):
        always += [CLOUDFLARED_TOKEN_ENV, CLOUDFLARED_CONFIG]
    written = [p for p in (CDI_HELPER, NVIDIA_SOURCES, ROOT_STORAGE_CONF) if ours(p)]
    if ours(NVIDIA_SOURCES):  # the keyring came with our apt source
        written.append(NVIDIA_KEYRING)
    sysctl = [USERNS_SYSCTL_FILE] if USERNS_SYSCTL_FILE.exists() else []  # ours alone (60-cocalc-userns.conf)
    root_rm([*always, *written, *sysctl], report)
    for directory in (ENV_FILE.parent, CLOUDFLARED_CONFIG.parent, SYSTEM_DONE_MARKER.parent):
        if directory.is_dir() and not any(directory.iterdir()):
            run_command(["rmdir", str(directory)], sudo=True, check=False, timeout_s=30)


def remove_user_files(config: Config, destroy: bool, report: DeprovisionReport) -> None:
    conf = user_storage_conf(config)
    if ours(conf):
        conf.unlink()
        report.removed.append(str(conf))
    node = node_dir(config)
    marker = read_marker(node)
    if marker is not None and marker.get("artifact") == "node":
        remove_tree(node)
        report.removed.append(f"{node} (Node.js {config.node.version})")
        alias = nvm_dir(config) / "alias" / "default"
        if read_text_or(alias).strip() == f"v{config.node.version}":
            alias.unlink()
            report.removed.append(str(alias))
    nvm = config.node.nvm
    nvm_sh = nvm_dir(config) / "nvm.sh"
    if nvm is not None and nvm_sh.is_file() and file_sha256(nvm_sh) == nvm.sha256:
        nvm_sh.unlink()
        report.removed.append(str(nvm_sh))
    remove_empty_dirs(nvm_dir(config))
    root = Path(config.bootstrap_root)
    image = None if destroy or config.btrfs.data_disk else Path(config.btrfs.image_path)
    if root.is_dir():
        removed = remove_except(root, image)
        if removed:
            report.removed.append(f"{root}: {', '.join(sorted(removed))}")


def remove_tree(path: Path) -> None:
    """A tree of ours; root's files in it too (mount points the image units made), never across a mount."""
    run_command(["rm", "-rf", "--one-file-system", str(path)], sudo=True, timeout_s=600)


def remove_except(root: Path, keep: Path | None) -> list[str]:
    """Remove everything under root but `keep` (and the directories leading to it)."""
    removed = []
    for entry in sorted(root.iterdir()):
        if keep is not None and entry == keep:
            continue
        if keep is not None and keep.is_relative_to(entry) and entry.is_dir() and not entry.is_symlink():
            inner = remove_except(entry, keep)
            removed += [f"{entry.name}/{name}" for name in inner]
            continue
        if mount_at(str(entry)) is not None:
            raise BootstrapError(f"{entry} is a mount point; not removing it", hint=BUSY_HINT.format(mp=entry))
        is_dir = stat.S_ISDIR(entry.lstat().st_mode)
        remove_tree(entry)
        removed.append(entry.name + ("/" if is_dir else ""))
    if keep is None:
        root.rmdir()
    return removed


def remove_empty_dirs(top: Path) -> None:
    if not top.is_dir() or top.is_symlink():
        return
    for directory in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    if not any(top.iterdir()):
        top.rmdir()


def deprovision(config: Config, *, destroy_data: str | None) -> DeprovisionReport:
    """Remove what the bootstrap installed (see the module's docstring); idempotent."""
    mp = config.btrfs.mount_point
    if destroy_data is not None and destroy_data != mp:
        raise UsageError(
            f"--destroy-data {destroy_data!r} does not name this host's btrfs mount point",
            hint=f"To destroy the data on {mp}, pass --destroy-data {mp}; nothing was changed.",
        )
    destroy = destroy_data is not None
    report = DeprovisionReport()
    bootstrap_dir = Path(config.bootstrap_dir)
    lock = RunLock(lock_path(config)) if bootstrap_dir.is_dir() else None
    if lock is not None:
        lock.acquire(new_run_id())
    try:
        remove_units(config, report)
        unmount_btrfs(config, destroy, report)
        remove_root_files(config, report)
        remove_user_files(config, destroy, report)
    finally:
        if lock is not None:
            lock.release()
    report.kept.append(
        "apt packages, /etc/subuid and /etc/subgid entries, chrony's config, sudoers (bootstrap.py writes none)"
    )
    return report
