"""Safe extraction of bundle archives and atomic installs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import BootstrapError
from .fetch import DOWNLOAD_CHUNK
from .step import atomic_write_text

# -- safe extraction and atomic installs -------------------------------------------

INSTALLED_MARKER = ".bootstrap-installed.json"  # written last into staging: its presence means complete
STAGING_PREFIX = ".staging-"


class UnsafeArchiveError(BootstrapError):
    def __init__(self, archive: Path, member: str, why: str) -> None:
        super().__init__(
            f"{archive.name}: refusing member {member!r}: {why}",
            hint="The archive tries to write outside its directory or contains special files; "
            "rebuild the bundle with plain files, directories and links that stay inside it.",
        )


ARCHIVE_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gz"), (b"\x28\xb5\x2f\xfd", "zst"))


def archive_compression(path: Path) -> str:
    """'xz', 'gz', 'zst' or '' (plain tar), from the file's magic bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in ARCHIVE_MAGIC if head.startswith(magic)), "")


@contextlib.contextmanager
def open_tar_stream(archive: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a tar stream. xz and zstd go through their command-line
    tools when present (`xz -T0` is much faster than Python's lzma); zstd has
    no Python fallback before 3.14."""
    kind = archive_compression(archive)
    tool = {"xz": ["xz", "-T0", "-dc"], "zst": ["zstd", "-dc"]}.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        if kind == "zst":
            raise BootstrapError(
                f"{archive.name} is zstd-compressed and zstd is not installed",
                hint="Add zstd to apt.packages, or publish .tar.xz bundles.",
            )
        with tarfile.open(archive, "r:*") as tar:  # Python's lzma/gzip
            yield tar
        return
    with tempfile.TemporaryFile() as errors:
        # Streaming, so not run_command: the tar reader consumes stdout as it comes.
        proc = subprocess.Popen(
            [*tool, "--", str(archive)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield tar
            while proc.stdout.read(DOWNLOAD_CHUNK):  # the padding after the tar's end marker
                pass
            returncode = proc.wait(timeout=60)
        except BaseException:
            proc.kill()  # we stopped reading early (a refused member, an interrupt)
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if returncode != 0:
            errors.seek(0)
            message = errors.read().decode("utf-8", "replace").strip()
            raise BootstrapError(
                f"{tool[0]} could not decompress {archive.name} (exit {returncode}): {message}",
                hint="The archive is damaged; delete it and run again.",
            )


def member_parts(name: str, strip: int) -> list[str] | None:
    """The path components of a member after stripping, [] for the root,
    None when stripped away. Raises ValueError for absolute paths and `..`."""
    if name.startswith("/"):
        raise ValueError("absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("'..' in the path")
    return parts[strip:] if len(parts) >= strip else None


def link_stays_inside(real_parent: str, linkname: str, real_root: str) -> bool:
    """A symlink's target is relative, climbs only at its start, and not above
    the root; later components then only descend, so the link stays inside
    however other (equally checked) links resolve."""
    if linkname.startswith("/"):
        return False
    parts = [p for p in linkname.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        return False
    top = os.path.normpath(os.path.join(real_parent, *([".."] * ups))) if ups else real_parent
    return is_inside_or_same(top, real_root)


def is_inside_or_same(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def extract_safely(archive: Path, dest: Path, *, strip: int = 0) -> int:
    """Extract into the (new, empty) directory dest: regular files, directories,
    and links that stay inside; anything else refuses the whole archive.
    Returns the number of members extracted."""
    real_root = os.path.realpath(dest)
    count = 0
    with open_tar_stream(archive) as tar:
        for member in tar:
            try:
                parts = member_parts(member.name, strip)
            except ValueError as e:
                raise UnsafeArchiveError(archive, member.name, str(e)) from None
            if parts is None or (not parts and member.isdir()):
                continue
            if not parts:
                raise UnsafeArchiveError(archive, member.name, "a non-directory at the bundle root")
            extract_member(tar, member, dest.joinpath(*parts), archive=archive, real_root=real_root, strip=strip)
            count += 1
    return count


def extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, *, archive: Path, real_root: str, strip: int
) -> None:
    if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
        raise UnsafeArchiveError(archive, member.name, "devices, fifos and other special files are not allowed")
    target.parent.mkdir(parents=True, exist_ok=True)
    real_parent = os.path.realpath(target.parent)
    if not is_inside_or_same(real_parent, real_root):
        raise UnsafeArchiveError(archive, member.name, "its directory is a link that leads outside")
    if os.path.lexists(target):
        if member.isdir() and target.is_dir() and not target.is_symlink():
            return
        if target.is_dir() and not target.is_symlink():
            raise UnsafeArchiveError(archive, member.name, "replaces a directory")
        target.unlink()  # a duplicate entry: the later one wins, as with tar(1)
    if member.isdir():
        target.mkdir(mode=(member.mode & 0o777) | 0o700)
    elif member.issym():
        if not link_stays_inside(real_parent, member.linkname, real_root):
            raise UnsafeArchiveError(archive, member.name, f"symlink to {member.linkname!r} leads outside")
        os.symlink(member.linkname, target)
    elif member.islnk():
        try:
            source_parts = member_parts(member.linkname, strip)
        except ValueError as e:
            raise UnsafeArchiveError(archive, member.name, f"hard link target: {e}") from None
        source = Path(real_root).joinpath(*(source_parts or []))
        if not source_parts or not is_inside_or_same(os.path.realpath(source), real_root) or not source.is_file():
            raise UnsafeArchiveError(archive, member.name, f"hard link to {member.linkname!r} leads outside")
        os.link(source, target, follow_symlinks=False)
    else:
        fileobj = tar.extractfile(member)
        assert fileobj is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(fileobj, out, DOWNLOAD_CHUNK)
        os.chmod(target, member.mode & 0o777)  # never setuid/setgid/sticky from a bundle
        os.utime(target, (member.mtime, member.mtime))


def bundle_problems(root: Path, expected_files: Sequence[str], executables: Sequence[str]) -> list[str]:
    problems = [f"{name} is missing" for name in expected_files if not (root / name).exists()]
    for name in executables:
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif not os.access(path, os.X_OK):
            problems.append(f"{name} is not executable")
    return problems


def read_marker(version_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((version_dir / INSTALLED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def install_archive(
    archive: Path,
    final: Path,
    *,
    strip: int,
    expected_files: Sequence[str] = (),
    executables: Sequence[str] = (),
    marker: Mapping[str, Any],
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Extract into `<parent>/.staging-<name>-<random>`, check it, mark it
    complete, and rename it to `final` in one step. A failure anywhere leaves
    `final` untouched (or absent) and no staging directory behind."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_staging_dirs(parent)
    staging = parent / f"{STAGING_PREFIX}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        extract_safely(archive, staging, strip=strip)
        problems = bundle_problems(staging, expected_files, executables)
        if problems:
            raise BootstrapError(
                f"{archive.name} is incomplete: {'; '.join(problems)}",
                hint="The bundle does not have the files the config expects; check the artifact and the "
                "config's expected_files, executables and strip_components.",
            )
        if verify is not None:
            verify(staging)
        # The extracted files reach the disk before the marker that says they are complete: after
        # a power cut a marker never vouches for files that came back empty (the daemon would not
        # start, and no check would see why). One sync(2) for the whole tree.
        os.sync()
        atomic_write_text(staging / INSTALLED_MARKER, json.dumps(dict(marker), indent=2, sort_keys=True) + "\n", 0o644)
        if os.path.lexists(final):  # an older attempt not made by us, or without a marker: set it aside
            final.rename(parent / f"{STAGING_PREFIX}{final.name}-old-{secrets.token_hex(4)}")
        staging.rename(final)
        fsync_dir(parent)  # the rename too: else a power cut brings back staging (removed) and costs a re-install
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_staging_dirs(parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_staging_dirs(parent: Path) -> None:
    """Leftovers of a killed run: never used, always removed."""
    with contextlib.suppress(FileNotFoundError):
        for entry in parent.iterdir():
            if entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


def point_symlink(link: Path, target: str) -> bool:
    """Make `link` a symlink to `target` atomically (new link + rename); True when it changed."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            return False
    temp = link.with_name(f".{link.name}-{secrets.token_hex(4)}")
    os.symlink(target, temp)
    try:
        os.replace(temp, link)
    except BaseException:
        temp.unlink()
        raise
    return True
