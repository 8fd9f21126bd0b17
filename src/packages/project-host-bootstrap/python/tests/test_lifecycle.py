"""Upgrades in place: rollback when the new daemon is unhealthy, keep-N pruning,
and deprovision's pieces. The health endpoint is a real HTTP server whose
answer depends on the bundle `current` points to; systemd is not on this
machine, so systemctl and journalctl (only those) are recorded instead of run,
and the unit directory and env file live in the test's own directory."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_steps_support import context, make_config

BAD = "1.1.0"


# -- the daemon: healthy unless current points to the bad version --------------------


@contextmanager
def daemon_health(current: Path) -> Iterator[str]:
    class Health(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            version = os.path.basename(os.path.realpath(current))
            ok = version != BAD
            body = json.dumps({"version": version, **({} if ok else {"error": "broken on purpose"})}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()


class Systemd:
    """systemctl and journalctl, recorded; everything else runs for real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.active = False
        real = bootstrap.run_command

        def run_command(argv: Any, **kwargs: Any) -> Any:
            if argv[0] in ("systemctl", "journalctl"):
                self.calls.append(tuple(argv))
                if argv[:2] == ["systemctl", "restart"]:
                    self.active = True
                output = "daemon log line\n" if argv[0] == "journalctl" else ""
                return bootstrap.CommandResult(tuple(argv), 0, 0.0, output, output)
            return real(argv, **kwargs)

        def systemctl_state(verb: str, unit: str) -> str:
            if verb == "is-enabled":
                return "enabled"
            return "active" if self.active else "inactive"

        monkeypatch.setattr(bootstrap, "run_command", run_command)
        monkeypatch.setattr(bootstrap, "systemctl_state", systemctl_state)
        monkeypatch.setattr(bootstrap, "SYSTEMD_UNIT_DIR", tmp / "units")
        monkeypatch.setattr(bootstrap, "ENV_FILE", tmp / "etc" / "project-host.env")
        (tmp / "units").mkdir()
        (tmp / "etc").mkdir()

    def restarts(self) -> int:
        return sum(1 for c in self.calls if c[:2] == ("systemctl", "restart"))


def install_version(config: bootstrap.Config, artifact: str, version: str, *, at: float | None = None) -> Path:
    where = bootstrap.bundles_dir(config) / artifact / version
    where.mkdir(parents=True)
    marker = where / bootstrap.INSTALLED_MARKER
    marker.write_text(json.dumps({"artifact": artifact, "version": version}))
    if at is not None:
        os.utime(marker, (at, at))
    return where


def point(config: bootstrap.Config, artifact: str, link: str, version: str) -> None:
    bootstrap.point_symlink(bootstrap.bundles_dir(config) / artifact / link, version)


def service_config(tmp: Path, health_url: str, version: str, **changes: Any) -> bootstrap.Config:
    return make_config(
        tmp,
        artifacts={"project_host": {"url": f"http://127.0.0.1:9/ph/{version}/ph.tar.xz", "version": version}},
        service={"health_url": health_url, "health_timeout_s": 2},
        **changes,
    )


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Systemd, str]]:
    systemd = Systemd(monkeypatch, tmp_path)
    current = tmp_path / "home" / "cocalc-host" / "bundles" / "project_host" / "current"
    with daemon_health(current) as url:
        yield tmp_path, systemd, url


def upgrade(tmp: Path, url: str, version: str) -> bootstrap.ServiceStep:
    """What the install step does for a new version (installed beside, current swapped), then the service step."""
    config = service_config(tmp, url, version)
    Path(config.bootstrap_dir).mkdir(parents=True, exist_ok=True)
    if not (bootstrap.bundles_dir(config) / "project_host" / version).exists():
        install_version(config, "project_host", version)
    before = os.readlink(bootstrap.bundles_dir(config) / "project_host" / "current")
    point(config, "project_host", "current", version)
    if before != version:
        point(config, "project_host", "previous", before)
    return bootstrap.ServiceStep(context(config))


def first_bootstrap(tmp: Path, url: str) -> bootstrap.ServiceStep:
    config = service_config(tmp, url, "1.0.0")
    Path(config.bootstrap_dir).mkdir(parents=True)
    install_version(config, "project_host", "1.0.0")
    point(config, "project_host", "current", "1.0.0")
    bootstrap.ENV_FILE.write_text(bootstrap.render_env_file(config))
    step = bootstrap.ServiceStep(context(config))
    step.apply()
    return step


# -- rollback --------------------------------------------------------------------------


def test_an_unhealthy_upgrade_is_rolled_back_and_reported(host: tuple[Path, Systemd, str]) -> None:
    tmp, systemd, url = host
    first = first_bootstrap(tmp, url)
    good = bootstrap.read_good(first.config)
    assert good is not None and good.version == "1.0.0"
    restarts = systemd.restarts()

    step = upgrade(tmp, url, BAD)
    with pytest.raises(bootstrap.BootstrapError) as failed:
        step.apply()
    e = failed.value
    assert (
        "project_host 1.1.0 was not healthy within 2s; rolled back to 1.0.0, which is healthy and serving" in e.message
    )
    assert e.hint is not None and "Publish a fixed version" in e.hint
    assert e.log_tail is not None and "HTTP 503" in e.log_tail and "broken on purpose" in e.log_tail
    assert "daemon log line" in e.log_tail  # the journal
    assert os.readlink(bootstrap.bundles_dir(step.config) / "project_host" / "current") == "1.0.0"
    assert systemd.restarts() == restarts + 2  # into 1.1.0, then back
    assert bootstrap.read_good(step.config) == good  # still the last healthy one
    record = json.loads(bootstrap.failed_path(step.config).read_text())
    assert record["version"] == BAD and record["rolled_back_to"] == "1.0.0"
    # the stamp says the daemon runs the restored generation: a plain re-run of the good config does nothing
    assert bootstrap.read_text_or(step.stamp_path()).strip() == first.generation()


def test_the_same_bad_generation_again_rolls_back_without_restarting(host: tuple[Path, Systemd, str]) -> None:
    tmp, systemd, url = host
    first_bootstrap(tmp, url)
    with pytest.raises(bootstrap.BootstrapError):
        upgrade(tmp, url, BAD).apply()
    restarts = systemd.restarts()
    step = upgrade(tmp, url, BAD)  # the install step swapped current again
    start = time.monotonic()
    with pytest.raises(bootstrap.BootstrapError) as again:
        step.apply()
    assert "failed before: not restarted into it again" in again.value.message
    assert systemd.restarts() == restarts
    assert time.monotonic() - start < 2  # no health wait for a known failure
    assert os.readlink(bootstrap.bundles_dir(step.config) / "project_host" / "current") == "1.0.0"


def test_a_healthy_upgrade_records_the_new_generation_and_forgets_the_failure(host: tuple[Path, Systemd, str]) -> None:
    tmp, systemd, url = host
    first_bootstrap(tmp, url)
    with pytest.raises(bootstrap.BootstrapError):
        upgrade(tmp, url, BAD).apply()
    restarts = systemd.restarts()
    step = upgrade(tmp, url, "1.2.0")
    step.apply()
    assert systemd.restarts() == restarts + 1  # once, into 1.2.0
    good = bootstrap.read_good(step.config)
    assert good is not None and good.version == "1.2.0"
    assert not bootstrap.failed_path(step.config).exists()


def test_without_a_healthy_generation_there_is_no_rollback(host: tuple[Path, Systemd, str]) -> None:
    tmp, systemd, url = host
    config = service_config(tmp, url, BAD)
    Path(config.bootstrap_dir).mkdir(parents=True)
    install_version(config, "project_host", BAD)
    point(config, "project_host", "current", BAD)
    with pytest.raises(bootstrap.BootstrapError) as failed:
        bootstrap.ServiceStep(context(config)).apply()
    assert "rolled back" not in failed.value.message
    assert systemd.restarts() == 1  # started once; no rollback restart
    assert "HTTP 503" in (failed.value.log_tail or "")
    assert os.readlink(bootstrap.bundles_dir(config) / "project_host" / "current") == BAD
    assert bootstrap.read_good(config) is None


def test_an_unhealthy_unit_or_env_change_is_rolled_back_too(host: tuple[Path, Systemd, str]) -> None:
    tmp, systemd, url = host
    first = first_bootstrap(tmp, url)
    env_before = bootstrap.ENV_FILE.read_text()
    # a new env entry, and a daemon that is unhealthy whatever it runs
    config = service_config(tmp, "http://127.0.0.1:9/healthz", "1.0.0", env={"NEW_KEY": "x"})
    bootstrap.ENV_FILE.write_text(bootstrap.render_env_file(config))
    step = bootstrap.ServiceStep(context(config))
    with pytest.raises(bootstrap.BootstrapError) as failed:
        step.apply()
    # the restored generation is unhealthy at this URL too: it says both fail
    assert "neither is 1.0.0" in failed.value.message
    assert "the new unit or env file was not healthy" in failed.value.message
    assert systemd.restarts() == 3  # the first start, the new env, the rollback
    assert bootstrap.ENV_FILE.read_text() == env_before
    assert bootstrap.read_good(first.config) is not None


# -- keep N ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    times=st.dictionaries(st.from_regex(r"[0-9]\.[0-9]", fullmatch=True), st.floats(0, 1e9), min_size=0, max_size=8),
    keep=st.integers(1, 5),
    pick=st.integers(0, 100),
)
def test_versions_to_keep(times: dict[str, float], keep: int, pick: int) -> None:
    names = sorted(times)
    current = names[pick % len(names)] if names else None
    previous = names[(pick // 3) % len(names)] if names else None
    kept = bootstrap.versions_to_keep(times, current, previous, keep)
    assert kept <= set(times)
    assert len(kept) == min(keep, len(times))
    if current is not None:
        assert current in kept  # never the one current points to
    if previous is not None and keep >= 2:
        assert previous in kept  # the rollback target
    # the rest are the newest
    rest = kept - {current, previous}
    dropped = set(times) - kept
    if rest and dropped:
        assert min(times[v] for v in rest) >= max(times[v] for v in dropped)


def prune_config(tmp: Path, keep: int) -> bootstrap.Config:
    config = make_config(tmp, keep_versions=keep)
    Path(config.bootstrap_dir).mkdir(parents=True)
    for artifact in ("project", "tools"):
        install_version(config, artifact, "1.0.0")
        point(config, artifact, "current", "1.0.0")
    return config


def test_prune_keeps_n_never_current_and_says_what_it_removed(tmp_path: Path) -> None:
    config = prune_config(tmp_path, keep=2)
    now = time.time()
    for i, version in enumerate(("0.9.0", "1.0.0", "1.1.0", "1.2.0", "1.3.0")):
        install_version(config, "project_host", version, at=now - 100 + i)
    point(config, "project_host", "current", "1.1.0")  # rolled back: current is not the newest
    point(config, "project_host", "previous", "0.9.0")
    step = bootstrap.PruneStep(context(config))
    assert not step.check().satisfied
    assert "project_host: 1.0.0, 1.2.0, 1.3.0" in step.check().detail
    step.apply()
    root = bootstrap.bundles_dir(config) / "project_host"
    assert sorted(p.name for p in root.iterdir()) == ["0.9.0", "1.1.0", "current", "previous"]
    assert step.check().satisfied
    assert sorted(p.name for p in (bootstrap.bundles_dir(config) / "tools").iterdir()) == ["1.0.0", "current"]


def test_prune_keep_one_removes_the_dangling_previous(tmp_path: Path) -> None:
    config = prune_config(tmp_path, keep=1)
    install_version(config, "project_host", "1.0.0", at=1)
    install_version(config, "project_host", "1.1.0", at=2)
    point(config, "project_host", "current", "1.1.0")
    point(config, "project_host", "previous", "1.0.0")
    bootstrap.PruneStep(context(config)).apply()
    root = bootstrap.bundles_dir(config) / "project_host"
    assert sorted(p.name for p in root.iterdir()) == ["1.1.0", "current"]


def test_a_version_in_use_is_kept_until_the_versions_change(tmp_path: Path) -> None:
    config = prune_config(tmp_path, keep=1)
    old = install_version(config, "project_host", "1.0.0", at=1)
    install_version(config, "project_host", "1.1.0", at=2)
    point(config, "project_host", "current", "1.1.0")
    holder = subprocess.Popen(["sleep", "60"], cwd=old)  # a process working in the old version
    try:
        step = bootstrap.PruneStep(context(config))
        step.apply()
        assert old.is_dir()
        assert json.loads(step.busy_path().read_text()) == {"project_host": ["1.0.0"]}
        assert step.check().satisfied  # kept on purpose: the run does not fail for it
        assert "1 in use" in step.check().detail
    finally:
        holder.kill()
        holder.wait()
    # the versions change (a later upgrade): it is tried again, and goes
    install_version(config, "project_host", "1.2.0", at=3)
    point(config, "project_host", "current", "1.2.0")
    later = bootstrap.PruneStep(context(dataclasses.replace(config, keep_versions=2)))
    later.apply()
    assert not old.exists()
    assert json.loads(later.busy_path().read_text()) == {}


def test_processes_using_sees_cwd_and_open_files(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a, b, c):
        d.mkdir()
    (b / "f").write_text("x")
    in_a = subprocess.Popen(["sleep", "60"], cwd=a)
    in_b = subprocess.Popen(["sleep", "60"], stdin=(b / "f").open())
    try:
        using = bootstrap.processes_using([a, b, c])
        assert using[a] == f"PID {in_a.pid}"
        assert using[b] == f"PID {in_b.pid}"
        assert c not in using
    finally:
        for p in (in_a, in_b):
            p.kill()
            p.wait()


# -- deprovision's pieces ------------------------------------------------------------------


FSTAB_LINE = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))


@settings(max_examples=300, deadline=None)
@given(before=st.lists(FSTAB_LINE, max_size=6), after=st.lists(FSTAB_LINE, max_size=6))
def test_fstab_without_ours_keeps_every_other_line(before: list[str], after: list[str]) -> None:
    foreign = [line for line in before + after if bootstrap.fstab_lines_not_ours(line) == [line]]
    text = "\n".join(foreign) + ("\n" if foreign else "")
    ours = bootstrap.fstab_with_entry(text, bootstrap.fstab_entry("/img", "/btrfs", loop=True))
    assert bootstrap.fstab_without_ours(ours).splitlines() == text.splitlines()
    assert bootstrap.fstab_without_ours(text) == text  # nothing of ours: unchanged, byte for byte
    assert bootstrap.fstab_without_ours(bootstrap.fstab_without_ours(ours)) == bootstrap.fstab_without_ours(ours)


def test_destroy_data_must_name_the_mount_point_and_changes_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config.to_dict(), "bootstrap_user": "ubuntu"}))
    Path(config.bootstrap_dir).mkdir(parents=True)
    (Path(config.bootstrap_dir) / "keep").write_text("x")
    code = bootstrap.main(["--config", str(path), "deprovision", "--destroy-data", "/btrfs-typo"])
    assert code == bootstrap.EXIT_CONFIG
    assert (Path(config.bootstrap_dir) / "keep").read_text() == "x"


def test_remove_except_keeps_the_image_and_the_way_to_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "btrfs.img").write_text("data")
    (root / "images" / "other").write_text("x")
    (root / "bundles" / "tools" / "1.0.0").mkdir(parents=True)
    (root / "bootstrap").mkdir()
    (root / "bootstrap" / "token").write_text("t")
    removed = bootstrap.remove_except(root, root / "images" / "btrfs.img")
    assert sorted(removed) == ["bootstrap/", "bundles/", "images/other"]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["images", "images/btrfs.img"]
    assert bootstrap.remove_except(root, root / "images" / "btrfs.img") == []  # again: nothing
    bootstrap.remove_except(root, None)
    assert not root.exists()


def test_deprovision_removes_units_and_root_files_of_ours_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tunnel and GPU bits (not on the e2e host) go when they are ours; a foreign file of the same kind stays."""
    systemd = Systemd(monkeypatch, tmp_path)
    etc = tmp_path / "etc"
    names = {
        "CLOUDFLARED_TOKEN_ENV": etc / "cloudflared" / "token.env",
        "CLOUDFLARED_CONFIG": etc / "cloudflared" / "config.yml",
        "CDI_HELPER": tmp_path / "sbin" / "cocalc-nvidia-cdi",
        "NVIDIA_SOURCES": etc / "apt" / "nvidia.list",
        "NVIDIA_KEYRING": tmp_path / "keyrings" / "nvidia.gpg",
        "ROOT_STORAGE_CONF": etc / "containers" / "storage.conf",
        "USERNS_SYSCTL_FILE": etc / "sysctl.d" / "60-cocalc-userns.conf",
        "GROW_HELPER": tmp_path / "sbin" / "cocalc-grow-btrfs",
        "SYSTEM_DONE_MARKER": tmp_path / "var-lib-cocalc" / ".bootstrap_done",
        "IMAGES_DIR": tmp_path / "bundle-images",
    }
    for name, path in names.items():
        monkeypatch.setattr(bootstrap, name, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Written by bootstrap.py; edits are overwritten.\n")
    names["ROOT_STORAGE_CONF"].write_text("# the operator's own\n[storage]\n")  # not ours: kept
    names["IMAGES_DIR"].unlink()
    bootstrap.ENV_FILE.write_text("# Written by bootstrap.py\nA=1\n")
    units = tmp_path / "units"
    config = make_config(tmp_path)
    for unit in (f"{config.service.unit}.service", "cocalc-cloudflared.service", "cocalc-nvidia-cdi.timer"):
        (units / unit).write_text("[Unit]\n")
    image_unit = units / "x-bundles-tools-1.0.0.mount"
    image_unit.write_text(bootstrap.render_mount_unit(config, "tools", "1.0.0"))
    foreign_mount = units / "srv-data.mount"
    foreign_mount.write_text("[Mount]\nWhere=/srv/data\n")
    report = bootstrap.DeprovisionReport()
    bootstrap.remove_units(config, report)
    bootstrap.remove_root_files(dataclasses.replace(config, cloudflared=None), report)
    assert sorted(p.name for p in units.iterdir()) == ["srv-data.mount"]
    disabled = [c[-1] for c in systemd.calls if c[:3] == ("systemctl", "disable", "--now")]
    assert disabled == [
        f"{config.service.unit}.service",
        "cocalc-cloudflared.service",
        "cocalc-nvidia-cdi.timer",
        image_unit.name,
    ]
    assert ("systemctl", "daemon-reload") in systemd.calls
    left = {name for name, path in names.items() if path.exists()}
    assert left == {"ROOT_STORAGE_CONF"}
    assert not bootstrap.ENV_FILE.exists()
    assert f"{bootstrap.ENV_FILE}" in report.text() and "removed: " in report.text()
    # again: nothing of ours is left, and it says so
    again = bootstrap.DeprovisionReport()
    bootstrap.remove_units(config, again)
    bootstrap.remove_root_files(config, again)
    assert again.removed == []
    assert "removed: nothing" in again.text()
