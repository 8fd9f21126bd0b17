"""The loop image path never names a file that is not ours (issue 12): the
runtime half of the rule whose config half keeps it inside bootstrap_root.
Real files, real truncate, mkfs.btrfs and blkid (skipped, with the reason, without them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import bootstrap
import pytest
from test_steps_support import context, make_config


def test_absent_and_hole_only_images_may_be_used(tmp_path: Path) -> None:
    image = tmp_path / "btrfs.img"
    assert bootstrap.foreign_image_problem(image) is None
    subprocess.run(["truncate", "-s", "1G", str(image)], check=True)  # what BtrfsStep creates: holes only
    assert bootstrap.foreign_image_problem(image) is None


def test_links_directories_and_devices_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "someone-elses"
    target.write_bytes(b"precious")
    (tmp_path / "link.img").symlink_to(target)
    (tmp_path / "dir.img").mkdir()
    for name in ("link.img", "dir.img"):
        problem = bootstrap.foreign_image_problem(tmp_path / name)
        assert problem is not None and "not a regular file" in problem
    problem = bootstrap.foreign_image_problem(Path("/dev/null"))
    assert problem is not None and "not a regular file" in problem


def test_a_file_holding_data_is_refused(tmp_path: Path) -> None:
    if shutil.which("blkid") is None:
        pytest.skip("blkid is not installed")
    image = tmp_path / "notes.img"
    image.write_text("a user's file that happens to sit at the configured path\n" * 100)
    problem = bootstrap.foreign_image_problem(image)
    assert problem is not None and "holds data" in problem
    assert image.read_text().startswith("a user's file")  # untouched


@pytest.mark.parametrize(("label", "ours"), [(bootstrap.BTRFS_LABEL, True), ("someone-else", False)])
def test_a_btrfs_image_is_ours_only_with_our_label(tmp_path: Path, label: str, ours: bool) -> None:
    if shutil.which("mkfs.btrfs") is None or shutil.which("blkid") is None:
        pytest.skip("mkfs.btrfs or blkid is not installed")
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], check=False).returncode != 0:
        pytest.skip("blkid runs through sudo -n, which needs a password here")
    image = tmp_path / "btrfs.img"
    subprocess.run(["truncate", "-s", "200M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", "-L", label, str(image)], check=True)
    problem = bootstrap.foreign_image_problem(image)
    if ours:
        assert problem is None
    else:
        assert problem is not None and "a btrfs filesystem" in problem


def test_btrfs_step_refuses_to_format_a_file_that_is_not_ours(tmp_path: Path) -> None:
    """Before the fix, prepare_filesystem ran mkfs.btrfs on any existing file blkid found nothing in."""
    if shutil.which("blkid") is None:
        pytest.skip("blkid is not installed")
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], check=False).returncode != 0:
        pytest.skip("blkid runs through sudo -n, which needs a password here")
    config = make_config(tmp_path)
    image = Path(config.btrfs.image_path)
    image.parent.mkdir(parents=True)
    image.write_text("a user's file that happens to sit at the configured path\n" * 100)
    subprocess.run(["truncate", "-s", "200M", str(image)], check=True)  # big enough for mkfs.btrfs
    before = image.read_bytes()
    step = bootstrap.BtrfsStep(context(config))
    with pytest.raises(bootstrap.BootstrapError, match="refusing to format it"):
        step.prepare_filesystem()
    assert image.read_bytes() == before
