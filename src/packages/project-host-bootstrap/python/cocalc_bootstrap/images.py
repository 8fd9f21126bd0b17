"""Bundle images: a read-only squashfs (zstd) mounted instead of an extracted archive.

An artifact whose config names an `image` is installed by mounting when this
host's kernel mounts squashfs with zstd (probed once per run by mounting a
tiny embedded image); otherwise its archive is extracted as before. The hub
sends both because only the host knows its kernel.

- The verified download is moved into IMAGES_DIR/<artifact>/<version>.sqfs
  (root-owned directory, file 0444) and hashed again *there*, where the
  bootstrap user can no longer change it, so what is mounted is what was
  verified; a mismatch is removed and refused before anything is mounted.
- It is mounted read-only with nosuid,nodev at bundles/<artifact>/<version>
  through a loop device, by a systemd mount unit of ours (one file per mount,
  enabled for multi-user.target and the daemon, ordered before the daemon), so
  every boot mounts it again; a failing mount does not fail the boot.
- `current` is swapped to it atomically (by the install step, as for archives).
- Versions beyond keep_versions are pruned by the prune step (lifecycle.py),
  once the daemon is healthy on the new `current`: unmounted with umount (not
  `systemctl stop`, which would stop the units that use it first), which fails
  while anything uses the mount (then the version is kept and a later upgrade
  prunes it); then the unit is disabled and removed, then the image.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import threading
import zlib
from pathlib import Path

from .archive import bundle_problems, read_marker
from .commands import run_command
from .config import ArtifactSpec, Config
from .errors import BootstrapError
from .facts import SYSTEMD_UNIT_DIR, file_sha256, mount_at, read_text_or
from .fetch import verified_download
from .layout import artifact_archive, bundles_dir, downloads_dir
from .log import Log
from .step import file_matches, make_root_dirs, write_root_file
from .system import systemd_quote

IMAGES_DIR = Path("/var/lib/cocalc/bundle-images")
IMAGE_SUFFIX = ".sqfs"
IMAGE_MOUNT_OPTIONS = "ro,nosuid,nodev,loop,nofail"
IMAGE_HINT = (
    "The bundle image is corrupt or not what the config expects (see the message); nothing was mounted. "
    "Run again to download it anew, or publish a good image (pnpm bundle-image)."
)

# A 4 KiB squashfs (zstd) holding one file `ok` = "zstd\n", built by
# `mksquashfs p probe.sqfs -comp zstd -all-root -all-time 0 -mkfs-time 0 -no-xattrs -no-exports`.
PROBE_IMAGE_Z = (
    "eNrLKC4sZmKAASYGRiDJxiDI4MDEyMACZCtAZa5C6bNQ+j8UpEL5U6H0fjT5quKSFC49Bo2t+n8VHHQZGU4wMSxhBNrCClTDyPCWkYFJEshiBmIWhvWC"
    "CtYOSeIZjGINMAcxIjksP1ugIQHKZ4VKrYXyWcA6jjOMglEwCkbBKBgFo2AUjIJRMApGwSgYBaMACwAAqgsjRw=="
)
PROBE_CONTENT = b"zstd\n"

_support_lock = threading.Lock()
_support: list[str | None] = []  # [reason images cannot be used, or None]: probed once per process


def probe_image_bytes() -> bytes:
    return zlib.decompress(base64.b64decode(PROBE_IMAGE_Z))


def kernel_has_squashfs() -> bool:
    return any(line.split()[-1:] == ["squashfs"] for line in read_text_or("/proc/filesystems").splitlines())


def probe_squashfs_zstd() -> str | None:
    """None when this kernel mounts a zstd squashfs through a loop device; else why not."""
    if not kernel_has_squashfs():
        run_command(["modprobe", "squashfs"], sudo=True, check=False, timeout_s=60)
        if not kernel_has_squashfs():
            return "the kernel has no squashfs (not in /proc/filesystems, modprobe squashfs failed)"
    with tempfile.TemporaryDirectory(prefix="cocalc-image-probe-") as tmp:
        image, mount_point = Path(tmp) / "probe.sqfs", Path(tmp) / "mnt"
        image.write_bytes(probe_image_bytes())
        mount_point.mkdir()
        done = run_command(
            ["mount", "-t", "squashfs", "-o", "ro,nosuid,nodev,noexec,loop", str(image), str(mount_point)],
            sudo=True,
            check=False,
            timeout_s=60,
        )
        if done.returncode != 0:
            return f"mounting a zstd squashfs failed: {done.output.strip()[-300:]}"
        try:
            content = (mount_point / "ok").read_bytes()
        except OSError as e:
            content = f"unreadable: {e}".encode()
        finally:
            run_command(["umount", str(mount_point)], sudo=True, check=False, timeout_s=60)
        if content != PROBE_CONTENT:
            return f"a mounted zstd squashfs reads wrong ({content[:40]!r})"
    return None


def images_unsupported(log: Log) -> str | None:
    """Why this host cannot mount bundle images (None: it can); probed once, said once."""
    with _support_lock:
        if not _support:
            reason = probe_squashfs_zstd()
            _support.append(reason)
            if reason:
                log.warn(f"bundle images cannot be mounted here ({reason}); installing the archives instead")
            else:
                log.info("the kernel mounts zstd squashfs: bundle images are mounted, not extracted")
        return _support[0]


# -- where things are --------------------------------------------------------------


def stored_image(artifact: str, version: str) -> Path:
    return IMAGES_DIR / artifact / f"{version}{IMAGE_SUFFIX}"


def image_record(artifact: str, version: str) -> Path:
    """Root-owned: the sha256 the stored image had when it was moved in and verified."""
    return IMAGES_DIR / artifact / f"{version}{IMAGE_SUFFIX}.sha256"


def image_download(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    return downloads_dir(config) / f"{artifact}-{spec.version}{IMAGE_SUFFIX}"


def version_dir(config: Config, artifact: str, version: str) -> Path:
    return bundles_dir(config) / artifact / version


def mount_unit_name(where: Path) -> str:
    """systemd's name for the mount unit of `where`, as `systemd-escape --path --suffix=mount`
    gives it (computed here: check() runs no command for an installed image)."""
    path = str(where).strip("/")
    if not path:
        return "-.mount"
    out = []
    for i, byte in enumerate(path.encode()):
        c = chr(byte)
        if c == "/":
            out.append("-")
        elif (c.isascii() and (c.isalnum() or c in ":_.")) and not (c == "." and i == 0):
            out.append(c)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) + ".mount"


def unit_enabled(config: Config, unit: str) -> bool:
    """`systemctl enable` made its links for every WantedBy= of our mount units."""
    wanted_by = ("multi-user.target", f"{config.service.unit}.service")
    return all((SYSTEMD_UNIT_DIR / f"{t}.wants" / unit).is_symlink() for t in wanted_by)


def render_mount_unit(config: Config, artifact: str, version: str) -> str:
    service = f"{config.service.unit}.service"
    return "\n".join(
        [
            "# Written by bootstrap.py: a bundle image, mounted read-only at every boot; removed when pruned.",
            "[Unit]",
            f"Description=CoCalc bundle {artifact} {version} (read-only image)",
            f"RequiresMountsFor={systemd_quote(str(IMAGES_DIR / artifact))}",
            f"Before={service}",
            "",
            "[Mount]",
            f"What={systemd_quote(str(stored_image(artifact, version)))}",
            f"Where={systemd_quote(str(version_dir(config, artifact, version)))}",
            "Type=squashfs",
            f"Options={IMAGE_MOUNT_OPTIONS}",
            "",
            "[Install]",
            f"WantedBy=multi-user.target {service}",
            "",
        ]
    )


def loop_backing_file(source: str) -> str | None:
    """The file behind /dev/loopN (as this mount namespace names it), or None."""
    name = os.path.basename(source)
    if not name.startswith("loop"):
        return None
    text = read_text_or(f"/sys/block/{name}/loop/backing_file").strip()
    return text or None


def mounted_image(where: Path) -> str | None:
    """The image file mounted at `where` as squashfs, or None."""
    found = mount_at(str(where))
    if found is None or found[1] != "squashfs":
        return None
    return loop_backing_file(found[0]) or found[0]


def image_problems(config: Config, artifact: str, spec: ArtifactSpec) -> list[str]:
    """What is missing for this version to be installed as a mounted image ([] = installed)."""
    assert spec.image is not None
    version, where = spec.version, version_dir(config, artifact, spec.version)
    problems = []
    if read_text_or(image_record(artifact, version)).strip() != spec.image.sha256:
        return [f"no verified image of {artifact} {version} in {IMAGES_DIR}"]
    unit = mount_unit_name(where)
    if not file_matches(SYSTEMD_UNIT_DIR / unit, render_mount_unit(config, artifact, version), mode=0o644):
        problems.append(f"{SYSTEMD_UNIT_DIR / unit} is missing or differs")
    elif not unit_enabled(config, unit):
        problems.append(f"{unit} is not enabled")
    if mounted_image(where) != str(stored_image(artifact, version)):
        problems.append(f"{stored_image(artifact, version)} is not mounted at {where}")
    else:
        problems += bundle_problems(where, spec.expected_files, spec.executables)
    return problems


def image_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    return spec.image is not None and not image_problems(config, artifact, spec)


def archive_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    """An extracted (archive) install of this version: kept, never replaced by an image."""
    where = version_dir(config, artifact, spec.version)
    marker = read_marker(where) if mounted_image(where) is None else None
    return marker is not None and (spec.sha256 is None or marker.get("sha256") == spec.sha256)


def chosen_format(config: Config, artifact: str, spec: ArtifactSpec) -> bool | None:
    """Image (True) or archive (False) when the host's state already says; None: only the probe can.
    A verified download counts: it was chosen by an earlier run's probe (so check() never probes)."""
    if spec.image is None or archive_installed(config, artifact, spec):
        return False
    if image_installed(config, artifact, spec) or verified_download(
        image_download(config, artifact, spec), spec.image.sha256
    ):
        return True
    if verified_download(artifact_archive(config, artifact, spec), spec.sha256):
        return False
    return None


def wants_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> bool:
    """Install this artifact from its image (else from its archive)? Probes the kernel when undecided."""
    chosen = chosen_format(config, artifact, spec)
    return chosen if chosen is not None else images_unsupported(log) is None


# -- install -----------------------------------------------------------------------


def store_verified_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> Path:
    """Move the download into the root-owned store and verify it there; return it."""
    assert spec.image is not None
    stored, record = stored_image(artifact, spec.version), image_record(artifact, spec.version)
    if read_text_or(record).strip() == spec.image.sha256 and stored.is_file():
        return stored
    download = image_download(config, artifact, spec)
    if not download.is_file():
        raise BootstrapError(f"{download} is missing", hint="Run the bootstrap again: the download step fetches it.")
    make_root_dirs(stored.parent)
    part = stored.with_name(stored.name + ".part")
    run_command(["mv", "-f", "-T", str(download), str(part)], sudo=True, timeout_s=600)
    run_command(["chown", "root:root", str(part)], sudo=True, timeout_s=30)
    run_command(["chmod", "0444", str(part)], sudo=True, timeout_s=30)
    actual = file_sha256(part)  # root's file in root's directory now: this is what gets mounted
    if actual != spec.image.sha256:
        run_command(["rm", "-f", str(part)], sudo=True, check=False, timeout_s=30)
        with contextlib.suppress(FileNotFoundError):
            download.with_name(download.name + ".sha256").unlink()
        raise BootstrapError(
            f"{artifact} {spec.version}: the image's sha256 is {actual}, not {spec.image.sha256}; "
            "refused before mounting",
            hint=IMAGE_HINT,
        )
    run_command(["mv", "-f", "-T", str(part), str(stored)], sudo=True, timeout_s=30)
    write_root_file(record, spec.image.sha256 + "\n", mode=0o644)
    with contextlib.suppress(FileNotFoundError):
        download.with_name(download.name + ".sha256").unlink()
    log.info(f"verified {stored.name} ({stored.stat().st_size} bytes) in {stored.parent}")
    return stored


def clear_mount_point(where: Path, log: Log) -> None:
    """An empty directory to mount on: a foreign mount is unmounted, leftovers set aside and removed."""
    if mount_at(str(where)) is not None:
        run_command(["umount", str(where)], sudo=True, timeout_s=120, hint=IMAGE_HINT)
        log.warn(f"unmounted a stale mount at {where}")
    if where.is_symlink() or (where.exists() and (not where.is_dir() or any(where.iterdir()))):
        aside = where.with_name(f".staging-{where.name}-old-{os.getpid()}")
        where.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        log.warn(f"removed a leftover {where} to mount the image there")
    where.mkdir(parents=True, exist_ok=True, mode=0o755)


def install_image(config: Config, artifact: str, spec: ArtifactSpec, log: Log) -> None:
    """Verified image -> root's store -> mount unit written, enabled, started; checked."""
    assert spec.image is not None
    stored = store_verified_image(config, artifact, spec, log)
    where = version_dir(config, artifact, spec.version)
    unit = mount_unit_name(where)
    unit_text = render_mount_unit(config, artifact, spec.version)
    if mounted_image(where) != str(stored):
        clear_mount_point(where, log)
    if not file_matches(SYSTEMD_UNIT_DIR / unit, unit_text, mode=0o644):
        write_root_file(SYSTEMD_UNIT_DIR / unit, unit_text, mode=0o644)
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    if not unit_enabled(config, unit):
        run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
    if mounted_image(where) != str(stored):
        run_command(["systemctl", "start", unit], sudo=True, timeout_s=120, hint=IMAGE_HINT)
    problems = image_problems(config, artifact, spec)
    if problems:
        run_command(["systemctl", "stop", unit], sudo=True, check=False, timeout_s=120)
        raise BootstrapError(
            f"{artifact} {spec.version}: the mounted image is not what the config expects: {'; '.join(problems)}",
            hint=IMAGE_HINT,
        )
    log.info(f"mounted {artifact} {spec.version} read-only at {where} ({unit})")


def remove_image(config: Config, artifact: str, version: str, log: Log) -> bool:
    where = version_dir(config, artifact, version)
    unit = mount_unit_name(where)
    if mount_at(str(where)) is not None:
        # umount itself, not `systemctl stop`: that would first stop every unit that
        # requires the mount (a project started there), where umount refuses while busy.
        done = run_command(["umount", str(where)], sudo=True, check=False, timeout_s=120)
        if mount_at(str(where)) is not None:
            log.warn(
                f"{artifact} {version} is in use (umount: {done.output.strip()[-200:] or 'busy'}); "
                "kept, a later upgrade prunes it"
            )
            return False
    run_command(["systemctl", "disable", unit], sudo=True, check=False, timeout_s=120)
    files = (SYSTEMD_UNIT_DIR / unit, stored_image(artifact, version), image_record(artifact, version))
    run_command(["rm", "-f", *map(str, files)], sudo=True, timeout_s=30)
    run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    with contextlib.suppress(OSError):
        where.rmdir()
    log.info(f"pruned {artifact} {version}: unmounted, unit and image removed")
    return True
