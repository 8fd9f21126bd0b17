"""The loop image is made at `<image>.part` and renamed into place only when
complete (issue 14): a run killed during truncate or mkfs.btrfs leaves the
.part, which the next run removes (its own only), never a half-made image
that the foreign-image check would then refuse. Real truncate, mkfs.btrfs,
blkid, sudo (skipped, with the reason, without them)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_steps_support import context, make_config


def needs_tools() -> None:
    if shutil.which("mkfs.btrfs") is None or shutil.which("blkid") is None:
        pytest.skip("mkfs.btrfs or blkid is not installed")
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], check=False).returncode != 0:
        pytest.skip("the step runs truncate, mkfs.btrfs and blkid through sudo -n, which needs a password here")


def setup(tmp_path: Path) -> tuple[bootstrap.Config, Path, Path]:
    config = make_config(tmp_path)
    image = Path(config.btrfs.image_path)
    image.parent.mkdir(parents=True)
    return config, image, bootstrap.btrfs_image_part(config)


def test_a_new_image_is_made_at_part_and_renamed_only_when_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_tools()
    config, image, part = setup(tmp_path)
    assert part == image.with_name("btrfs.img.part")
    real = bootstrap.run_command
    seen: list[tuple[str, bool, bool]] = []  # (command, image there?, part there?) before each

    def watch(argv: Sequence[str], **kwargs: Any) -> Any:
        seen.append((argv[0], image.exists(), part.exists()))
        if argv[0] == "mkfs.btrfs":
            assert argv[-1] == str(part)  # formats the .part, never the final path
        return real(argv, **kwargs)

    monkeypatch.setattr(bootstrap, "run_command", watch)
    entry = bootstrap.BtrfsStep(context(config)).prepare_filesystem()
    assert entry.startswith(f"{image} ")
    assert ("mkfs.btrfs", False, True) in seen  # the final path does not exist while mkfs runs
    mv = [i for i, s in enumerate(seen) if s[0] == "mv"]
    assert mv and mv[0] > [s[0] for s in seen].index("mkfs.btrfs")
    assert not os.path.lexists(part)
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    found = bootstrap.block_device_probe(str(image))
    assert (found.get("TYPE"), found.get("LABEL")) == ("btrfs", bootstrap.BTRFS_LABEL)
    assert bootstrap.foreign_image_problem(image) is None
    # a second call reuses it (no mkfs, no .part)
    seen.clear()
    bootstrap.BtrfsStep(context(config)).prepare_filesystem()
    assert "mkfs.btrfs" not in [s[0] for s in seen] and not os.path.lexists(part)


def test_a_mkfs_killed_midway_leaves_only_the_part_and_the_next_run_removes_it_and_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_tools()
    config, image, part = setup(tmp_path)
    real = bootstrap.run_command

    class Killed(BaseException):
        pass

    def killed_in_mkfs(argv: Sequence[str], **kwargs: Any) -> Any:
        if argv[0] == "mkfs.btrfs":
            # what a SIGKILL midway leaves: some blocks written, no complete filesystem
            with open(argv[-1], "r+b") as f:
                f.seek(64 * 1024)
                f.write(os.urandom(256 * 1024))
            raise Killed
        return real(argv, **kwargs)

    monkeypatch.setattr(bootstrap, "run_command", killed_in_mkfs)
    with pytest.raises(Killed):
        bootstrap.BtrfsStep(context(config)).prepare_filesystem()
    monkeypatch.setattr(bootstrap, "run_command", real)
    assert not os.path.lexists(image)  # nothing half-made at the final path...
    assert part.stat().st_blocks > 0  # ...only the .part, holding data
    assert bootstrap.foreign_image_problem(image) is None  # so the next run is not refused

    removed = bootstrap.remove_debris(config, bootstrap.Log(echo=False))
    assert str(part) in removed and not os.path.lexists(part)
    bootstrap.BtrfsStep(context(config)).prepare_filesystem()
    assert bootstrap.block_device_probe(str(image)).get("LABEL") == bootstrap.BTRFS_LABEL


def test_the_step_itself_replaces_a_stale_part_when_debris_was_not_cleaned(tmp_path: Path) -> None:
    needs_tools()
    config, image, part = setup(tmp_path)
    part.write_bytes(b"half a filesystem" * 1000)
    bootstrap.BtrfsStep(context(config)).prepare_filesystem()
    assert not os.path.lexists(part)
    assert bootstrap.block_device_probe(str(image)).get("TYPE") == "btrfs"


def test_debris_removes_a_part_of_roots_only_and_never_follows_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the .part is root's (made with sudo) and the other one is chowned away")
    config, _image, part = setup(tmp_path)
    ran: list[list[str]] = []
    real = bootstrap.run_command

    def record(argv: Sequence[str], **kwargs: Any) -> Any:
        ran.append(list(argv))
        return real(argv, **kwargs)

    monkeypatch.setattr(bootstrap, "run_command", record)
    # someone else's file at that name: left alone
    part.write_bytes(b"not ours")
    os.chown(part, 65534, 65534)
    assert bootstrap.remove_debris(config, bootstrap.Log(echo=False)) == []
    assert part.read_bytes() == b"not ours"
    # a link there (to a file of root's): neither the link nor its target removed
    part.unlink()
    target = tmp_path / "precious"
    target.write_bytes(b"precious")
    part.symlink_to(target)
    assert bootstrap.remove_debris(config, bootstrap.Log(echo=False)) == []
    assert part.is_symlink() and target.read_bytes() == b"precious"
    # ours: root's regular file, removed with one sudo rm
    part.unlink()
    part.write_bytes(b"half a filesystem")
    assert bootstrap.remove_debris(config, bootstrap.Log(echo=False)) == [str(part)]
    assert not os.path.lexists(part)
    assert ran[-1][:3] == ["rm", "-f", "--"]
