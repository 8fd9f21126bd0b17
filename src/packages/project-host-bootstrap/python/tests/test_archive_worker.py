"""Extraction in a worker process (issue 15): installs extract in a separate
python3 running bootstrap.py's own extract_safely, outside the installing
process's interpreter lock. What it extracts and every error it raises are
the in-process ones (the fuzzer, test_fuzz_archive.py, compares the two on
generated archives); here: the errors that are not refusals, a worker that
dies, an interrupt, and that installs really go through it."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import bootstrap
import pytest
from test_steps_support import Member, special, tar_bytes, tree

GOOD: list[Member] = [
    ("top/bin/daemon", b"#!/bin/sh\necho hi\n", 0o755),
    ("top/lib/data.txt", b"data\n", 0o644),
    special("top/bin/link", tarfile.SYMTYPE, "../lib/data.txt"),
    special("top/lib/hard", tarfile.LNKTYPE, "top/lib/data.txt"),
]


def both(
    archive: Path, tmp_path: Path, *, strip: int = 0, budget: bootstrap.ExtractBudget | None = None
) -> list[tuple[type[BaseException], str, object]]:
    """The error of each way (worker, in-process), each into its own new directory."""
    found: list[tuple[type[BaseException], str, object]] = []
    for fn in (bootstrap.extract_in_worker, bootstrap.extract_safely):
        dest = tmp_path / fn.__name__
        dest.mkdir()
        with pytest.raises(Exception) as failure:
            fn(archive, dest, strip=strip, budget=budget)
        e = failure.value
        found.append((type(e), str(e), getattr(e, "hint", None) or getattr(e, "errno", None)))
    return found


def test_worker_extracts_what_in_process_extracts(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(GOOD))
    counts, trees = [], []
    for fn in (bootstrap.extract_in_worker, bootstrap.extract_safely):
        dest = tmp_path / fn.__name__
        dest.mkdir()
        counts.append(fn(archive, dest, strip=1))
        trees.append(tree(dest))
    assert counts == [4, 4] and trees[0] == trees[1]
    assert trees[0]["bin/link"] == "link:../lib/data.txt"


def test_a_refusal_is_the_same_error(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.xz"
    archive.write_bytes(tar_bytes([("top/ok", b"ok", 0o644), special("top/up", tarfile.SYMTYPE, "../../..")]))
    worker, in_process = both(archive, tmp_path, strip=1)
    assert worker == in_process
    assert worker[0] is bootstrap.UnsafeArchiveError and "refusing member 'top/up'" in worker[1]


def test_a_budget_refusal_is_the_same_error(tmp_path: Path) -> None:
    archive = tmp_path / "big.tar.xz"
    archive.write_bytes(tar_bytes([("top/a", bytes(5000), 0o644)]))
    budget = bootstrap.ExtractBudget(max_bytes=4000)
    worker, in_process = both(archive, tmp_path, strip=1, budget=budget)
    assert worker == in_process and "more than the extraction budget of 4000 bytes" in worker[1]


def test_a_damaged_archive_is_the_same_error(tmp_path: Path) -> None:
    data = tar_bytes([("f", os.urandom(200_000), 0o644)])
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(data[: len(data) // 2])
    worker, in_process = both(archive, tmp_path)
    assert worker == in_process
    assert worker[0] is bootstrap.BootstrapError and "b.tar.xz" in worker[1] and "damaged" in str(worker[2])


def test_an_os_error_is_the_same_error(tmp_path: Path) -> None:
    """Not a refusal: the destination is a file (ENOTDIR), as a full disk (ENOSPC) would be an OSError."""
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(GOOD))
    found = []
    for fn in (bootstrap.extract_in_worker, bootstrap.extract_safely):
        dest = tmp_path / fn.__name__
        dest.write_text("a file, not a directory")
        with pytest.raises(NotADirectoryError) as failure:
            fn(archive, dest, strip=1)
        found.append((failure.value.errno, failure.value.strerror, failure.value.filename))
    assert [f[:2] for f in found] == [(errno.ENOTDIR, os.strerror(errno.ENOTDIR))] * 2
    assert [Path(str(f[2])).parent.name for f in found] == ["extract_in_worker", "extract_safely"]


def test_a_missing_archive_is_the_same_error(tmp_path: Path) -> None:
    worker, in_process = both(tmp_path / "gone.tar.xz", tmp_path)
    assert worker == in_process and worker[0] is FileNotFoundError


def test_a_worker_that_dies_is_a_clear_error_and_the_install_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also shows installs go through the worker: killing it fails the install."""
    monkeypatch.setattr(
        bootstrap,
        "worker_argv",
        lambda: [sys.executable, "-c", "import os, sys; print('dying', file=sys.stderr); os.kill(os.getpid(), 9)"],
    )
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(GOOD))
    final = tmp_path / "bundles" / "project" / "1.0.0"
    with pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.install_archive(archive, final, strip=1, marker={"version": "1.0.0"})
    assert failure.value.message == "extracting b.tar.xz failed: the worker ended (signal 9) without an answer"
    assert failure.value.log_tail == "dying" and failure.value.hint == bootstrap.WORKER_HINT
    assert os.listdir(final.parent) == []  # no staging directory, no version
    # in_process=True is the same install without a worker: it succeeds
    bootstrap.install_archive(archive, final, strip=1, marker={"version": "1.0.0"}, in_process=True)
    assert (final / "bin" / "daemon").is_file()


def test_an_interrupt_stops_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """terminate_running_commands() (the engine's answer to Ctrl-C/SIGTERM) reaches the worker."""
    started = tmp_path / "started"
    monkeypatch.setattr(
        bootstrap,
        "worker_argv",
        lambda: [sys.executable, "-c", f"import time; open({str(started)!r}, 'w').close(); time.sleep(60)"],
    )
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(GOOD))
    result: list[BaseException] = []

    def extract() -> None:
        try:
            bootstrap.extract_in_worker(archive, tmp_path)
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=extract)
    start = time.monotonic()
    thread.start()
    while not started.exists():
        assert time.monotonic() - start < 30, "the worker did not start"
        time.sleep(0.02)
    bootstrap.terminate_running_commands()
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(result[0], bootstrap.BootstrapError)
    assert f"(signal {signal.SIGTERM.value})" in str(result[0])


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed (apt-get install zstd)")
def test_the_worker_reads_zstd_through_the_zstd_tool(tmp_path: Path) -> None:
    plain = tmp_path / "b.tar"
    plain.write_bytes(tar_bytes(GOOD, "w"))
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "b.tar.zst")], check=True)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert bootstrap.extract_in_worker(tmp_path / "b.tar.zst", dest, strip=1) == 4
    assert (dest / "lib/data.txt").read_text() == "data\n"
