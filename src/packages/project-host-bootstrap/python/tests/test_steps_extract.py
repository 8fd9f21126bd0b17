"""Safe extraction and atomic installs, with tarballs built here: hostile
members are refused, a failed install leaves nothing behind, `current`
moves only to a complete version."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_steps_support import Member, context, make_config, sha256, special, tar_bytes, tree

GOOD: list[Member] = [
    ("top/bin/daemon", b"#!/bin/sh\necho hi\n", 0o755),
    ("top/lib/data.txt", b"data\n", 0o644),
    special("top/bin/link", tarfile.SYMTYPE, "../lib/data.txt"),
    special("top/lib/hard", tarfile.LNKTYPE, "top/lib/data.txt"),
]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("mode", ["w:xz", "w:gz", "w"])
def test_extracts_files_links_and_modes(tmp_path: Path, mode: str) -> None:
    archive = write(tmp_path / "b.tar", tar_bytes(GOOD, mode))  # type sniffed from the bytes, not the name
    dest = tmp_path / "dest"
    dest.mkdir()
    assert bootstrap.extract_safely(archive, dest, strip=1) == 4  # directories implied, not members
    assert tree(dest) == {
        "bin": "dir",
        "lib": "dir",
        "bin/daemon": "file",
        "bin/link": "link:../lib/data.txt",
        "lib/data.txt": "file",
        "lib/hard": "file",
    }
    assert os.access(dest / "bin/daemon", os.X_OK)
    assert (dest / "bin/link").read_bytes() == b"data\n"
    assert (dest / "lib/hard").stat().st_ino == (dest / "lib/data.txt").stat().st_ino


def test_python_fallback_without_the_xz_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no xz on PATH: Python's lzma reads it
    assert shutil.which("xz") is None
    archive = write(tmp_path / "b.tar.xz", tar_bytes(GOOD))
    dest = tmp_path / "dest"
    dest.mkdir()
    bootstrap.extract_safely(archive, dest, strip=1)
    assert (dest / "bin/daemon").read_bytes().startswith(b"#!/bin/sh")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed (apt-get install zstd)")
def test_zstd_through_the_zstd_tool(tmp_path: Path) -> None:
    plain = write(tmp_path / "b.tar", tar_bytes(GOOD, "w"))
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "b.tar.zst")], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    bootstrap.extract_safely(tmp_path / "b.tar.zst", dest, strip=1)
    assert (dest / "lib/data.txt").read_text() == "data\n"


def test_damaged_xz_stream_fails(tmp_path: Path) -> None:
    data = tar_bytes([("f", os.urandom(200_000), 0o644)])
    archive = write(tmp_path / "b.tar.xz", data[: len(data) // 2])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.extract_safely(archive, dest)
    assert "b.tar.xz" in failure.value.message and "damaged" in str(failure.value.hint)


HOSTILE: dict[str, list[Member]] = {
    "absolute path": [("/tmp/evil", b"x", 0o644)],  # noqa: S108 - never written
    "dot-dot": [("top/../../evil", b"x", 0o644)],
    "symlink to an absolute path": [special("top/etc", tarfile.SYMTYPE, "/etc")],
    "symlink climbing out": [special("top/up", tarfile.SYMTYPE, "../../..")],
    "symlink climbing out later": [special("top/a", tarfile.SYMTYPE, "b/../../..")],
    "write through a symlinked directory": [
        special("top/d", tarfile.SYMTYPE, "."),
        special("top/d/up", tarfile.SYMTYPE, ".."),
    ],
    "hard link out": [special("top/h", tarfile.LNKTYPE, "../../etc/passwd")],
    "hard link absolute": [special("top/h", tarfile.LNKTYPE, "/etc/passwd")],
    "character device": [special("top/null", tarfile.CHRTYPE)],
    "block device": [special("top/sda", tarfile.BLKTYPE)],
    "fifo": [special("top/pipe", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused(tmp_path: Path, case: str) -> None:
    archive = write(tmp_path / "evil.tar.xz", tar_bytes([("top/ok.txt", b"ok", 0o644), *HOSTILE[case]]))
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=1)
    assert "refusing member" in failure.value.message and failure.value.hint
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["dest"]  # nothing written beside it
    assert not (tmp_path / "evil").exists()


def test_setuid_bits_are_refused_not_dropped(tmp_path: Path) -> None:
    archive = write(tmp_path / "b.tar.xz", tar_bytes([("x", b"#!/bin/sh\n", 0o4755)]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest)
    assert "refusing member 'x': setuid/setgid mode 4755" in failure.value.message
    assert os.listdir(dest) == []


def install(tmp_path: Path, members: list[Member], **kwargs: Any) -> Path:
    archive = write(tmp_path / "bundle.tar.xz", tar_bytes(members))
    final = tmp_path / "bundles" / "project" / "1.0.0"
    bootstrap.install_archive(archive, final, strip=1, marker={"version": "1.0.0"}, **kwargs)
    return final


def test_install_is_complete_or_absent(tmp_path: Path) -> None:
    with pytest.raises(bootstrap.BootstrapError) as failure:
        install(tmp_path, GOOD, expected_files=["bin/daemon", "share/missing"], executables=["lib/data.txt"])
    assert "share/missing is missing" in failure.value.message
    assert "lib/data.txt is not executable" in failure.value.message
    assert os.listdir(tmp_path / "bundles" / "project") == []  # no version dir, no staging dir

    final = install(tmp_path, GOOD, expected_files=["bin/daemon"], executables=["bin/daemon"])
    assert bootstrap.read_marker(final) == {"version": "1.0.0"}
    assert os.listdir(tmp_path / "bundles" / "project") == ["1.0.0"]


def test_leftover_staging_from_a_killed_run_is_removed(tmp_path: Path) -> None:
    leftover = tmp_path / "bundles" / "project" / ".staging-1.0.0-dead"
    (leftover / "bin").mkdir(parents=True)
    final = install(tmp_path, GOOD)
    assert sorted(os.listdir(final.parent)) == ["1.0.0"]


def test_point_symlink_swaps_atomically(tmp_path: Path) -> None:
    link = tmp_path / "current"
    assert bootstrap.point_symlink(link, "1.0.0")
    assert not bootstrap.point_symlink(link, "1.0.0")
    assert bootstrap.point_symlink(link, "2.0.0")
    assert os.readlink(link) == "2.0.0"
    assert sorted(os.listdir(tmp_path)) == ["current"]


def test_install_step_uses_only_a_verified_download(tmp_path: Path) -> None:
    data = tar_bytes([("pkg/bin/project-host", b"#!/bin/sh\n", 0o755)])
    artifact = {"version": "2.0.0", "sha256": sha256(data), "strip_components": 1, "executables": ["bin/project-host"]}
    config = make_config(tmp_path, artifacts={"project_host": artifact})
    ctx = context(config)
    install, download = bootstrap.InstallProjectHostStep(ctx), bootstrap.DownloadProjectHostStep(ctx)
    archive = bootstrap.artifact_archive(config, "project_host", config.artifacts.project_host)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(data)  # present but never verified: not used
    with pytest.raises(bootstrap.BootstrapError, match="missing or unverified"):
        install.apply()

    bootstrap.write_user_file(bootstrap.checksum_path(archive), f"{sha256(data)}  {archive.name}\n", 0o644)
    archive.write_bytes(data[:-1] + b"\0")  # changed on disk after verification
    with pytest.raises(bootstrap.BootstrapError, match="changed on disk"):
        install.apply()
    assert not archive.exists()

    archive.write_bytes(data)
    bootstrap.write_user_file(bootstrap.checksum_path(archive), f"{sha256(data)}  {archive.name}\n", 0o644)
    assert not install.check().satisfied
    install.apply()
    state = install.check()
    assert state.satisfied, state.detail
    bundle = Path(config.bootstrap_root) / "bundles" / "project_host"
    assert os.readlink(bundle / "current") == "2.0.0"
    assert (bundle / "current" / "bin" / "project-host").exists()
    assert not archive.exists()  # installed: the archive is gone
    # fast path: an installed, complete version needs no download
    assert download.check().satisfied and "installed" in download.check().detail
