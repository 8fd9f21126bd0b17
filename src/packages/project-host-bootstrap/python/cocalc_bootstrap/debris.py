"""What a killed run of ours leaves behind, removed by the next run (and only that)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .archive import STAGING_PREFIX
from .commands import run_command
from .config import Config
from .facts import ENV_FILE, FSTAB, SYSTEMD_UNIT_DIR
from .layout import (
    BOOTSTRAP_SUBDIRS,
    btrfs_image_part,
    bundles_dir,
    downloads_dir,
    nvm_dir,
    secrets_dir,
    secrets_staging_dir,
)
from .log import Log

# A run killed (SIGKILL, power cut) between creating a temporary and renaming
# it leaves the temporary. The names are ours alone, so they are recognised
# exactly and removed at the start of the next run, under the run lock (no
# other run of ours is writing them):
# - atomic_write_text: `.<name>.<8 mkstemp chars>.tmp` beside the file, in our
#   own directories;
# - write_root_file: `.<name>.<8 hex>.tmp` beside a root file we replace
#   (fstab, the env file, the unit), and its source `cocalc-bootstrap-<8>` in
#   the temp directory;
# - point_symlink: `.<link>-<8 hex>` beside the link;
# - install_archive: `.staging-*` directories beside the version directories
#   (also removed before every install; here too, so a run whose install is
#   already done cleans them as well).
# - BtrfsStep.make_image: `<btrfs.image_path>.part`, root's (made with sudo):
#   a loop image whose truncate or mkfs.btrfs was cut short;
# - the secrets step: its staging directory's temporaries (atomic_write_text).
# Partial downloads (`.part`) are not debris: the next download resumes them.

ATOMIC_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
ROOT_TMP_RE = r"^\.{name}\.[0-9a-f]{{8}}\.tmp$"
ROOT_SOURCE_RE = re.compile(r"^cocalc-bootstrap-[a-z0-9_]{8}$")
LINK_TMP_RE = re.compile(r"^\..+-[0-9a-f]{8}$")
EVENTS_SUBDIR = "events"
# Also searched for write_root_file's sources (the run's TMPDIR may differ from the last one's).
SYSTEM_TMP = Path("/tmp")  # noqa: S108 - only our own are removed, by name and owner


def our_dirs(config: Config) -> list[Path]:
    """Every directory of ours that atomic_write_text writes into."""
    root = Path(config.bootstrap_root)
    dirs = [root, *(root / d for d in BOOTSTRAP_SUBDIRS)]
    dirs += [Path(config.bootstrap_dir), Path(config.bootstrap_dir) / EVENTS_SUBDIR]
    dirs += [secrets_dir(config), secrets_staging_dir(config)]
    dirs += [downloads_dir(config), nvm_dir(config), nvm_dir(config) / "alias"]
    return dirs


def bundle_dirs(config: Config) -> list[Path]:
    """bundles/<artifact> and Node's versions directory: where staging and link temporaries appear."""
    found: list[Path] = [nvm_dir(config) / "versions" / "node"]
    with contextlib.suppress(OSError):
        found += [p for p in bundles_dir(config).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def _entries(directory: Path) -> Iterable[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            yield from list(it)
    except OSError:
        return


def remove_debris(config: Config, log: Log) -> list[str]:
    """Remove what a killed run of ours left; returns the paths removed (logged)."""
    removed: list[str] = []
    uid = os.getuid()

    def gone(path: str) -> None:
        removed.append(path)

    for directory in our_dirs(config):
        for entry in _entries(directory):
            if ATOMIC_TMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    gone(entry.path)
    for directory in bundle_dirs(config):
        for entry in _entries(directory):
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                gone(entry.path)
            elif LINK_TMP_RE.match(entry.name) and entry.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    gone(entry.path)
    # write_root_file's sources: ours (our uid), in the temp directory
    for directory in {Path(tempfile.gettempdir()), SYSTEM_TMP}:
        for entry in _entries(directory):
            if ROOT_SOURCE_RE.match(entry.name):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        gone(entry.path)
    # write_root_file's staged copies beside the root files we replace (root-owned: removed with sudo)
    root_debris: list[str] = []
    for target in (FSTAB, ENV_FILE, SYSTEMD_UNIT_DIR / f"{config.service.unit}.service"):
        pattern = re.compile(ROOT_TMP_RE.format(name=re.escape(target.name)))
        root_debris += [e.path for e in _entries(target.parent) if pattern.match(e.name)]
    # a loop image made at <image>.part whose mkfs a kill cut short (a regular file of root's)
    part = btrfs_image_part(config)
    with contextlib.suppress(OSError):
        st = part.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
            root_debris.append(str(part))
    if root_debris:
        run_command(["rm", "-f", "--", *root_debris], sudo=True, check=False, timeout_s=30)
        removed += root_debris
    if removed:
        log.info(f"removed {len(removed)} leftover(s) of an earlier killed run: {' '.join(sorted(removed))[:1000]}")
    return removed
