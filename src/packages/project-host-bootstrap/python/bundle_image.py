#!/usr/bin/env python3
"""Turn a published bundle archive (.tar.xz, .tar.zst, .tar.gz, .tar) into a
read-only squashfs image (zstd) that bootstrap.py mounts instead of extracting.

Reproducible: the same archive (and options) always gives the same bytes.
- The archive is read by bootstrap.py's own safe extraction (extract_safely),
  so a hostile archive (paths or links leading outside, devices, fifos,
  setuid bits) is refused here exactly as a host refuses it.
- Every file is owned by root, every timestamp (files, root, superblock) is 0,
  there are no xattrs, and mksquashfs stores directory entries sorted by name
  (squashfs requires it) and is reproducible with any number of processors.
- Permissions are normalised the way a package manager ships software: the
  image is read by the unprivileged daemon, so directories are 0755, files
  0644, or 0755 when the archive gave them any execute bit.

Usage: bundle_image.py ARCHIVE OUTPUT.sqfs [--strip N] [--level L] [--json]
  Prints the image's sha256 and size (or, with --json, the manifest's `image`
  entry without its url). Exit 0 done, 1 refused or failed, 2 usage.
Needs mksquashfs (Debian: squashfs-tools) with zstd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cocalc_bootstrap.archive import extract_safely
from cocalc_bootstrap.errors import BootstrapError

DEFAULT_LEVEL = 19  # zstd level: release-time cost only; mounting reads it as fast as level 3


def mksquashfs_argv(source: Path, output: Path, level: int) -> list[str]:
    return [
        "mksquashfs",
        str(source),
        str(output),
        "-noappend",
        "-comp",
        "zstd",
        "-Xcompression-level",
        str(level),
        "-all-root",
        "-all-time",
        "0",
        "-mkfs-time",
        "0",
        "-root-mode",
        "0755",
        "-no-xattrs",
        "-reproducible",
        "-quiet",
        "-no-progress",
    ]


def normalise_modes(root: Path) -> None:
    """Directories 0755; files 0644, or 0755 with any execute bit. Links untouched."""
    os.chmod(root, 0o755)  # noqa: S103 - public software, read by the unprivileged daemon
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)  # noqa: S103
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_image(archive: Path, output: Path, *, strip: int = 0, level: int = DEFAULT_LEVEL) -> tuple[str, int]:
    """Build output from archive (atomically: `<output>.part`, then renamed). Returns (sha256, size)."""
    if shutil.which("mksquashfs") is None:
        raise BootstrapError("mksquashfs is not installed", hint="apt-get install squashfs-tools")
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")
    with tempfile.TemporaryDirectory(prefix="bundle-image-", dir=output.parent) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        extract_safely(archive, root, strip=strip)
        normalise_modes(root)
        env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # the flags fix every time
        done = subprocess.run(
            mksquashfs_argv(root, part, level), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if done.returncode != 0:
            part.unlink(missing_ok=True)
            raise BootstrapError(
                f"mksquashfs failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}",
                hint="mksquashfs 4.5+ built with zstd is needed (Debian: squashfs-tools).",
            )
    os.replace(part, output)
    return file_sha256(output), output.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bundle archive -> reproducible squashfs (zstd) image.")
    parser.add_argument("archive", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--strip", type=int, default=0, help="leading path components to strip (as strip_components)")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL, help=f"zstd level 1-22 (default {DEFAULT_LEVEL})")
    parser.add_argument("--json", action="store_true", help="print {sha256, size_bytes} as JSON")
    args = parser.parse_args(argv)
    if not 0 <= args.strip <= 8 or not 1 <= args.level <= 22:
        parser.error("--strip must be 0-8 and --level 1-22")
    if not args.archive.is_file():
        print(f"bundle_image: {args.archive}: no such file", file=sys.stderr)
        return 1
    try:
        sha256, size = build_image(args.archive, args.output, strip=args.strip, level=args.level)
    except BootstrapError as e:
        print(f"bundle_image: {e.message}\n  hint: {e.hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"sha256": sha256, "size_bytes": size}))
    else:
        print(f"{sha256}  {args.output.name}  ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
