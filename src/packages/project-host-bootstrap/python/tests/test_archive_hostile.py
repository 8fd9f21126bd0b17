"""Hostile archives (issue 12): links resolved against what is already
extracted (chains, hard links to symlinks), nothing created before a member
is accepted, special files and modes refused by name, and the per-artifact
extraction budget (bytes, entries, ratio) against a .tar.xz of zeros, GNU
sparse members and oversized headers. Each archive is built here; GNU
sparse ones with the real GNU tar."""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_steps_support import Member, special, tar_bytes, tree


def box(tmp_path: Path) -> Path:
    """tmp/box/dest, with a sentinel file beside dest that nothing may touch."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    (tmp_path / "box" / "sentinel").write_text("untouched\n")
    return dest


def assert_box_untouched(dest: Path) -> None:
    outside = dest.parent
    assert sorted(p.name for p in outside.iterdir()) == ["dest", "sentinel"]
    assert (outside / "sentinel").read_text() == "untouched\n"
    assert (outside / "sentinel").stat().st_nlink == 1
    assert sorted(p.name for p in outside.parent.iterdir()) == ["box", "evil.tar.xz"]


def refused(tmp_path: Path, members: list[Member], *, strip: int = 1, **kwargs: object) -> tuple[str, Path]:
    archive = tmp_path / "evil.tar.xz"
    archive.write_bytes(tar_bytes(members))
    dest = box(tmp_path)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=strip, **kwargs)  # type: ignore[arg-type]
    assert failure.value.hint
    assert_box_untouched(dest)
    return failure.value.message, dest


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    return (name, data, mode)


# -- links: resolved against the tree, chains followed, nothing created outside ------------------


def test_hard_link_to_a_symlink_is_checked_where_it_lands(tmp_path: Path) -> None:
    # l points at top/box (a file) from a/b; copied by a hard link to the root, the same text
    # "../../box" names the directory holding the staging directory, and h/evil/f would be
    # created there.
    message, dest = refused(
        tmp_path,
        [
            file("top/box"),
            special("top/a/b/l", tarfile.SYMTYPE, "../../box"),
            special("top/h", tarfile.LNKTYPE, "top/a/b/l"),
            file("top/h/evil/f"),
        ],
    )
    assert "'top/h'" in message and "symlink" in message and "outside" in message
    assert not (dest / "h").exists()


def test_hard_link_to_a_symlink_that_stays_inside_is_kept(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(
        tar_bytes(
            [
                file("top/a/data", b"data"),
                special("top/a/l", tarfile.SYMTYPE, "data"),
                special("top/a/h", tarfile.LNKTYPE, "top/a/l"),
            ]
        )
    )
    dest = box(tmp_path)
    bootstrap.extract_safely(archive, dest, strip=1)
    assert os.readlink(dest / "a/h") == "data" and (dest / "a/h").read_bytes() == b"data"


def test_a_chain_of_links_is_followed_to_where_it_really_is(tmp_path: Path) -> None:
    # a -> b -> d/e: a link written "through" a sits two levels down, so "../../x" stays inside
    # and "../../../x" does not.
    chain: list[Member] = [
        file("top/d/e/keep"),
        special("top/b", tarfile.SYMTYPE, "d/e"),
        special("top/a", tarfile.SYMTYPE, "b"),
    ]
    archive = tmp_path / "ok.tar.xz"
    archive.write_bytes(tar_bytes([*chain, special("top/a/l", tarfile.SYMTYPE, "../../x"), file("top/a/f", b"f")]))
    dest = box(tmp_path)
    bootstrap.extract_safely(archive, dest, strip=1)
    assert os.readlink(dest / "d/e/l") == "../../x" and (dest / "d/e/f").read_bytes() == b"f"
    shutil.rmtree(tmp_path / "box")
    archive.unlink()
    message, _ = refused(tmp_path, [*chain, special("top/a/l", tarfile.SYMTYPE, "../../../x")])
    assert "'top/a/l'" in message and "leads outside" in message


def test_a_link_loop_is_refused_by_name(tmp_path: Path) -> None:
    message, _ = refused(
        tmp_path,
        [special("top/a", tarfile.SYMTYPE, "b"), special("top/b", tarfile.SYMTYPE, "a"), file("top/a/f")],
    )
    assert "'top/a/f'" in message and "too many levels of links" in message


def test_writing_through_a_file_is_refused_by_name(tmp_path: Path) -> None:
    message, _ = refused(tmp_path, [file("top/f"), special("top/l", tarfile.SYMTYPE, "f"), file("top/l/x")])
    assert "'top/l/x'" in message and "not a directory" in message


def test_a_refused_member_creates_nothing_not_even_its_directories(tmp_path: Path) -> None:
    message, dest = refused(tmp_path, [file("top/ok"), special("top/d1/d2/h", tarfile.LNKTYPE, "top/missing")])
    assert "'top/d1/d2/h'" in message and "not extracted before it" in message
    assert tree(dest) == {"ok": "file"}


def test_hard_link_to_a_directory_is_refused(tmp_path: Path) -> None:
    message, _ = refused(tmp_path, [file("top/d/f"), special("top/h", tarfile.LNKTYPE, "top/d")])
    assert "'top/h'" in message and "not a file" in message


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_a_file_added_twice_is_a_hard_link_to_itself_and_is_kept(tmp_path: Path) -> None:
    # found by the fuzzer: GNU tar records the second copy as a hard link to the same name
    src = tmp_path / "src" / "top"
    src.mkdir(parents=True)
    (src / "f").write_text("once\n")
    archive = tmp_path / "twice.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src.parent), "top/f", "top/f"], check=True)
    with tarfile.open(archive) as tar:
        assert [m.type for m in tar] == [tarfile.REGTYPE, tarfile.LNKTYPE]
    dest = box(tmp_path)
    assert bootstrap.extract_safely(archive, dest, strip=1) == 1
    assert (dest / "f").read_text() == "once\n" and (dest / "f").stat().st_nlink == 1


# -- special files and modes, refused with the member's name ---------------------------------------


def with_mode(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = special(name, kind)
    info.mode = mode
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (file("top/bin/su", b"#!/bin/sh\n", 0o4755), "setuid/setgid mode 4755"),
        (file("top/bin/wall", b"#!/bin/sh\n", 0o2755), "setuid/setgid mode 2755"),
        (file("top/etc/open", b"x", 0o666), "world-writable mode 0666"),
        (with_mode("top/tmp", tarfile.DIRTYPE, 0o1777), "sticky mode 1777"),
        (with_mode("top/shared", tarfile.DIRTYPE, 0o777), "world-writable mode 0777"),
        (special("top/dev/null", tarfile.CHRTYPE), "devices, fifos"),
        (special("top/dev/sda", tarfile.BLKTYPE), "devices, fifos"),
        (special("top/run/pipe", tarfile.FIFOTYPE), "devices, fifos"),
    ],
    ids=["setuid", "setgid", "world-writable file", "sticky dir", "world-writable dir", "chr", "blk", "fifo"],
)
def test_special_files_and_modes_are_refused_by_name(tmp_path: Path, member: Member, why: str) -> None:
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    message, dest = refused(tmp_path, [file("top/ok"), member])
    assert f"refusing member {name!r}" in message and why in message
    assert tree(dest) == {"ok": "file"}  # not even the member's directory


def test_symlink_modes_are_not_modes(tmp_path: Path) -> None:
    link = special("top/l", tarfile.SYMTYPE, "ok")
    link.mode = 0o777  # what tar(1) records for every symlink
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes([file("top/ok"), link]))
    dest = box(tmp_path)
    bootstrap.extract_safely(archive, dest, strip=1)
    assert os.readlink(dest / "l") == "ok"


# -- the extraction budget ----------------------------------------------------------------------------


def zeros_tar_xz(path: Path, size: int) -> None:
    """A .tar.xz holding one file of `size` zero bytes, streamed (never in memory whole)."""
    info = tarfile.TarInfo("top/zeros")
    info.size = size

    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    with lzma.open(path, "wb", preset=0) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))


def test_a_small_tar_xz_of_zeros_hits_the_ratio_budget(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.xz"
    zeros_tar_xz(archive, 80 << 20)  # over the 64 MiB the ratio allows whatever the archive's size
    assert archive.stat().st_size * 100 < 80 << 20
    dest = box(tmp_path)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=1)
    assert "'top/zeros'" in failure.value.message and "ratio over the extraction budget" in failure.value.message
    assert tree(dest) == {}  # refused before a byte was written


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed: cannot build a sparse member")
@pytest.mark.parametrize("format_", ["gnu", "pax"])
def test_gnu_sparse_members_hit_the_budget(tmp_path: Path, format_: str) -> None:
    src = tmp_path / "src"
    (src / "top").mkdir(parents=True)
    with open(src / "top" / "hole", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, all hole
    archive = tmp_path / "evil.tar.xz"
    subprocess.run(["tar", "--sparse", f"--format={format_}", "-cJf", str(archive), "-C", str(src), "top"], check=True)
    assert archive.stat().st_size < 4096
    dest = box(tmp_path)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=1)
    assert "'top/hole'" in failure.value.message and "extraction budget" in failure.value.message
    assert tree(dest) == {}


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed: cannot build a sparse member")
def test_a_small_sparse_member_within_the_budget_is_extracted_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "top").mkdir(parents=True)
    with open(src / "top" / "hole", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    archive = tmp_path / "b.tar.xz"
    subprocess.run(["tar", "--sparse", "-cJf", str(archive), "-C", str(src), "top"], check=True)
    dest = box(tmp_path)
    bootstrap.extract_safely(archive, dest, strip=1)
    assert (dest / "hole").read_bytes() == bytes(1 << 20) + b"end"


def test_the_byte_and_entry_budgets_are_enforced_as_configured(tmp_path: Path) -> None:
    members: list[Member] = [file(f"top/d{i}/f", bytes(1000)) for i in range(5)]
    message, dest = refused(tmp_path, members, budget=bootstrap.ExtractBudget(max_bytes=2500))
    assert "'top/d2/f'" in message and "3000 bytes in all" in message
    assert sorted(tree(dest)) == ["d0", "d0/f", "d1", "d1/f"]
    shutil.rmtree(tmp_path / "box")
    (tmp_path / "evil.tar.xz").unlink()
    message, dest = refused(tmp_path, members, budget=bootstrap.ExtractBudget(max_entries=5))
    assert "'top/d2/f'" in message and "more than 5 entries" in message  # d2 and d2/f would be 6


def test_a_huge_header_is_not_read_into_memory(tmp_path: Path) -> None:
    # An 8 MiB pax header: tarfile reads a header whole, into memory, before yielding its member.
    big = tarfile.TarInfo("top/f")
    big.pax_headers = {"comment": "x" * (8 << 20)}
    archive = tmp_path / "evil.tar.xz"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(big, io.BytesIO(b""))
    archive.write_bytes(lzma.compress(out.getvalue()))
    dest = box(tmp_path)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=1)
    assert "headers or padding" in failure.value.message


def test_trailing_data_after_the_end_marker_is_bounded(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.xz"
    archive.write_bytes(lzma.compress(tar_bytes([file("top/f")], "w") + bytes(8 << 20)))
    dest = box(tmp_path)
    with pytest.raises(bootstrap.UnsafeArchiveError) as failure:
        bootstrap.extract_safely(archive, dest, strip=1)
    assert "the end of the archive" in failure.value.message


def test_install_archive_passes_the_budget_and_leaves_nothing_when_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tar.xz"
    archive.write_bytes(tar_bytes([file("top/a", bytes(100)), file("top/b", bytes(100))]))
    final = tmp_path / "bundles" / "project" / "1.0.0"
    with pytest.raises(bootstrap.UnsafeArchiveError):
        bootstrap.install_archive(
            archive, final, strip=1, marker={"version": "1"}, budget=bootstrap.ExtractBudget(max_bytes=150)
        )
    assert os.listdir(final.parent) == []
