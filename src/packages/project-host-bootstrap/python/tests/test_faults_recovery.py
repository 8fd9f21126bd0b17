"""What a killed or powered-off run leaves, and what the next one does about it:
debris removed (ours only), events on disk before the hub has them, a spool
never reopened, a hub's 409 logged as a conflict, a full disk named."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import hub_server, make_config, make_steps, write_token

STEPS: list[dict[str, Any]] = [
    {"name": "first", "sleep": 0.05},
    {"name": "second", "deps": ["first"], "sleep": 0.05},
]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "SENDER_BASE_S", 0.05)
    monkeypatch.setattr(bootstrap, "SENDER_MAX_S", 0.2)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    def go(url: str, specs: Sequence[dict[str, Any]] = STEPS, *, flush_s: float = 3.0) -> int:
        config = make_config(tmp_path / "root", events_url=url)
        write_token(config)
        monkeypatch.setattr(bootstrap, "load_config", lambda path: config)
        (tmp_path / "root" / "work").mkdir(parents=True, exist_ok=True)
        steps = make_steps(specs, tmp_path / "root" / "work")
        return bootstrap.main(["--config", "c.json"], steps=steps, flush_s=flush_s)

    return go


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_run_removes_what_a_killed_run_of_ours_left_and_only_that(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    base = make_config(root)
    config = dataclasses.replace(
        base, home=str(tmp_path / "home"), service=dataclasses.replace(base.service, unit="cocalc-project-host")
    )
    etc = tmp_path / "etc"
    monkeypatch.setattr(bootstrap, "FSTAB", etc / "fstab")
    monkeypatch.setattr(bootstrap, "ENV_FILE", etc / "cocalc" / "project-host.env")
    monkeypatch.setattr(bootstrap, "SYSTEMD_UNIT_DIR", etc / "systemd" / "system")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    ran: list[list[str]] = []

    def no_sudo(argv: Sequence[str], **kwargs: Any) -> Any:
        ran.append(list(argv))
        for path in argv[3:]:  # rm -f -- PATH...
            Path(path).unlink(missing_ok=True)

    monkeypatch.setattr(bootstrap, "run_command", no_sudo)
    unit = f"{config.service.unit}.service"
    ours = [
        touch(root / "bootstrap" / ".state.json.k2j_h4g5.tmp"),
        touch(root / "bootstrap" / "events" / ".20261201T000000000000Z-0a1b2c3d.acked.abcdefgh.tmp"),
        touch(root / "config" / ".bootstrap-config.json.a1b2c3d4.tmp"),
        touch(root / "bin" / ".btrfs-grow.zzzzzzzz.tmp"),
        touch(root / "bundles" / ".downloads" / ".project-1.0.0.tar.xz.sha256.q1w2e3r4.tmp"),
        touch(root / "bundles" / "project" / ".staging-1.0.0-deadbeef" / "bin" / "x"),
        touch(tmp_path / "home" / ".nvm" / "versions" / "node" / ".staging-v20.1.0-0123abcd" / "bin" / "node"),
        touch(tmp_path / "home" / ".nvm" / "alias" / ".default.abcd_123.tmp"),
        touch(etc / ".fstab.0badcafe.tmp"),
        touch(etc / "cocalc" / ".project-host.env.12345678.tmp"),
        touch(etc / "systemd" / "system" / f".{unit}.abcdef01.tmp"),
        touch(tmp / "cocalc-bootstrap-a1b2c3d4"),
    ]
    link_tmp = root / "bundles" / "project" / ".current-0a0b0c0d"
    link_tmp.symlink_to("1.0.0")
    theirs = [
        touch(root / "bootstrap" / "state.json"),
        touch(root / "bootstrap" / "notes.tmp"),
        touch(root / "bootstrap" / ".state.json.too-long-a-name.tmp"),
        touch(root / "bundles" / ".downloads" / "project-1.0.0.tar.xz.part"),  # resumed, not debris
        touch(root / "bundles" / "project" / "1.0.0" / ".bootstrap-installed.json"),
        touch(etc / ".fstab.notours.tmp"),
        touch(etc / ".hosts.0badcafe.tmp"),  # not a file we replace
        touch(tmp / "cocalc-bootstrap-short"),
        touch(tmp / "other-a1b2c3d4"),
    ]
    (root / "bundles" / "project" / "current").symlink_to("1.0.0")

    removed = bootstrap.remove_debris(config, bootstrap.Log(echo=False))

    for path in ours:
        assert not path.exists(), path
    assert not (root / "bundles" / "project" / ".staging-1.0.0-deadbeef").exists()
    assert not os.path.lexists(link_tmp)
    for path in theirs:
        assert path.exists(), path
    assert (root / "bundles" / "project" / "current").is_symlink()
    staging = {str(p.parents[1]) for p in ours if ".staging-" in str(p)}
    assert sorted(removed) == sorted({str(p) for p in ours if ".staging-" not in str(p)} | staging | {str(link_tmp)})
    assert ran and ran[0][:3] == ["rm", "-f", "--"]  # root files: through sudo, in one command
    # nothing left: a second run removes nothing
    assert bootstrap.remove_debris(config, bootstrap.Log(echo=False)) == []


def test_the_hub_only_gets_events_that_are_already_on_the_hosts_disk(
    run: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    post = bootstrap.EventSender._post

    def checked(self: Any, events: list[dict[str, Any]]) -> str:
        mine = [e["seq"] for e in events if e["run_id"] == self.spool.run_id]
        if mine:
            seen.append((max(mine), self.spool._synced))
        return post(self, events)

    monkeypatch.setattr(bootstrap.EventSender, "_post", checked)
    with hub_server() as hub:
        assert run(hub.url) == 0
        assert hub.events()
    assert seen
    for sent, synced in seen:
        assert sent <= synced, (sent, synced)


def test_a_spool_file_is_never_reopened_for_more_events(tmp_path: Path) -> None:
    spool = bootstrap.EventSpool(tmp_path / "events", "r1")
    spool.emit(bootstrap.StepStartEvent(step="one"))
    spool.close()
    with pytest.raises(FileExistsError):
        bootstrap.EventSpool(tmp_path / "events", "r1")


def test_a_409_for_a_repeated_run_and_seq_is_logged_as_a_conflict(run: Callable[..., int], tmp_path: Path) -> None:
    with hub_server() as hub:
        hub.up, hub.status_when_down = False, 409
        assert run(hub.url) == 0
    log = (tmp_path / "root" / "logs" / "bootstrap.log").read_text()
    assert "HTTP 409" in log
    assert "already holds other content for the same run and sequence numbers" in log


def test_a_full_disk_names_the_file_system_and_the_space_needed(tmp_path: Path) -> None:
    target = tmp_path / "bundles" / ".downloads" / "x.tar.xz.part"
    mount = bootstrap.mount_point_of(target)
    assert os.path.ismount(mount) and str(tmp_path).startswith(str(mount))
    error = bootstrap.no_space_error(target, 5 << 20, what="downloading x.tar.xz")
    assert f"at {mount} " in error.message
    assert "5.0 MiB (5242880 bytes) more needed" in error.message
    assert error.hint is not None and f"df -h {mount}" in error.hint


def test_a_log_whose_end_a_power_cut_zeroed_is_cut_back_to_its_last_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "bootstrap.log"
    good = '{"event":"log","message":"one"}\n{"event":"log","message":"two"}\n'
    touch(path, good)
    with open(path, "ab") as f:
        f.write(b"\0" * 5000)
    log = bootstrap.Log(path, run_id="r2", echo=False)
    log.info("three")
    log.close()
    lines = path.read_text().splitlines()
    assert lines[:2] == good.splitlines()
    records = [json.loads(line) for line in lines]  # JSON lines again
    assert "removed a torn end" in records[2]["message"] and "5000 bytes" in records[2]["message"]
    assert records[3]["message"] == "three"
    assert bootstrap.cut_torn_tail(path) == 0  # whole lines: nothing to cut
