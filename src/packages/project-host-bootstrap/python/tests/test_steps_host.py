"""Steps and probes against this machine: lock holders found through
/proc/locks (a real child process holds a real fcntl lock), preflight's
verdict on this host, and the steps that need no root (directories,
secrets from a real HTTP server, finalize)."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bootstrap
import pytest
from test_steps_support import Behaviour, context, make_config, serve

LOG = bootstrap.Log(echo=False)


@contextmanager
def lock_held(path: Path, seconds: float = 30.0) -> Iterator[subprocess.Popen[str]]:
    """A child process holding an fcntl (lockf) write lock on path, as apt does."""
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(float(sys.argv[2]))"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.kill()
        child.wait()


def test_lock_holder_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "lock-frontend"
    lock.touch()
    assert bootstrap.lock_holders(str(lock)) == []
    with lock_held(lock) as child:
        holders = bootstrap.lock_holders(str(lock))
        assert [pid for pid, _ in holders] == [child.pid]
        assert "fcntl" in holders[0][1]  # its command line
        with pytest.raises(bootstrap.BootstrapError) as failure:
            bootstrap.wait_for_locks([str(lock)], time.monotonic() + 1.5, LOG, poll_s=0.2)
        assert f"PID {child.pid}" in failure.value.message and failure.value.hint
    assert bootstrap.lock_holders(str(lock)) == []


def test_wait_for_locks_returns_when_the_holder_finishes(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    with lock_held(lock, seconds=1.0):
        start = time.monotonic()
        bootstrap.wait_for_locks([str(lock)], time.monotonic() + 20, LOG, poll_s=0.1)
        assert 0.3 < time.monotonic() - start < 10


DPKG_LOCK = Path("/var/lib/dpkg/lock-frontend")


@pytest.mark.skipif(os.geteuid() != 0 or not DPKG_LOCK.exists(), reason="needs root and a Debian host with dpkg")
def test_real_dpkg_frontend_lock_holder_is_named() -> None:
    """Needs root: holds the real /var/lib/dpkg/lock-frontend for a moment."""
    with lock_held(DPKG_LOCK) as child:
        assert f"PID {child.pid}" in bootstrap.describe_lock_holders(bootstrap.DPKG_LOCKS)
        # and apt itself agrees that the lock is taken
        apt = subprocess.run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=0", "install", "-y", "--no-download", "coreutils"],
            capture_output=True,
            text=True,
            env={**os.environ, "LANG": "C"},
        )
        assert apt.returncode != 0 and "lock" in apt.stderr.lower()


def test_preflight_reports_what_is_wrong_and_changes_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, arch="arm64" if bootstrap.machine_arch() != "arm64" else "amd64")
    step = bootstrap.PreflightStep(context(config))
    state = step.check()
    assert not state.satisfied and f"the config is for {config.arch}" in state.detail
    with pytest.raises(bootstrap.BootstrapError) as failure:
        step.apply()
    assert failure.value.hint and "architecture" in failure.value.hint
    if os.geteuid() == 0:
        assert "running as root" in failure.value.message
    if not bootstrap.systemd_is_pid1():
        assert "systemd is not PID 1" in failure.value.message
    assert not Path(config.bootstrap_root).exists()  # nothing created


def test_preflight_wrong_os_and_home(tmp_path: Path) -> None:
    config = make_config(tmp_path, os={"id": "plan9", "min_version": "4"})
    problems = [what for what, _ in bootstrap.preflight_problems(config)]
    assert any("the config expects plan9 4 or newer" in p for p in problems)
    assert any("getent passwd says" in p and str(tmp_path) in p for p in problems)


def test_directories_step(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    step = bootstrap.DirectoriesStep(context(config))
    assert not step.check().satisfied
    step.apply()
    state = step.check()
    assert state.satisfied, state.detail
    root = Path(config.bootstrap_root)
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "bin", "bootstrap", "bundles", "config", "logs"]
    assert "bundles/" in (root / "README.md").read_text()
    (root / "bin" / "env.sh").write_text("# edited\n")
    assert not step.check().satisfied
    step.apply()
    assert step.check().satisfied


def test_secrets_step_fetches_with_the_token_into_0600_files(tmp_path: Path) -> None:
    token = "tok-0123456789abcdef"  # noqa: S105 - a test token
    behaviour = Behaviour(files={"/bootstrap/h1/secrets/conat-password": b"hunter2-long-secret"})
    with serve(behaviour) as url:
        config = make_config(tmp_path, url, secrets=["conat-password"])
        Path(config.bootstrap_dir).mkdir(parents=True)
        config.token_file.write_text(token + "\n")
        step = bootstrap.SecretsStep(context(config))
        assert not step.check().satisfied
        step.apply()
        assert step.check().satisfied
    # fetched early, before /btrfs exists: staged in a 0700 directory of ours
    staged = Path(config.bootstrap_dir) / "secrets-staging" / "conat-password"
    assert staged.read_text() == "hunter2-long-secret"
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    assert stat.S_IMODE(staged.parent.stat().st_mode) == 0o700
    assert behaviour.headers_seen[0]["Authorization"] == f"Bearer {token}"
    assert bootstrap.REDACTOR("x hunter2-long-secret y") == "x *** y"
    # /btrfs mounted (here: its data/secrets directory made as the btrfs step does): moved there
    install = bootstrap.InstallSecretsStep(context(config))
    assert not install.check().satisfied
    target = Path(config.btrfs.mount_point) / "data" / "secrets"
    target.mkdir(mode=0o700, parents=True)
    install.apply()
    assert install.check().satisfied and step.check().satisfied
    path = target / "conat-password"  # where upstream's daemon reads it
    assert path.read_text() == "hunter2-long-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not staged.parent.exists()  # one copy only
    assert len(behaviour.headers_seen) == 1  # and a re-run fetches nothing
    step.apply()
    assert len(behaviour.headers_seen) == 1


def test_install_secrets_after_a_kill_between_install_and_unlink_keeps_one_copy(tmp_path: Path) -> None:
    config = make_config(tmp_path, secrets=["conat-password"])
    staging = bootstrap.secrets_staging_dir(config)
    target = bootstrap.secrets_dir(config)
    for d in (staging, target):
        d.mkdir(mode=0o700, parents=True)
    for d in (staging, target):  # installed, and still staged: killed before the unlink
        (d / "conat-password").write_text("pw-0123456789")
        (d / "conat-password").chmod(0o600)
    (staging / "old-name").write_text("no longer configured")
    (staging / "old-name").chmod(0o600)
    install = bootstrap.InstallSecretsStep(context(config))
    assert not install.check().satisfied
    install.apply()
    assert install.check().satisfied
    assert (target / "conat-password").read_text() == "pw-0123456789"
    assert not staging.exists() and not (target / "old-name").exists()


def test_install_secrets_fails_clearly_when_a_secret_was_never_fetched(tmp_path: Path) -> None:
    config = make_config(tmp_path, secrets=["conat-password"])
    bootstrap.secrets_dir(config).mkdir(mode=0o700, parents=True)
    with pytest.raises(bootstrap.BootstrapError, match="conat-password"):
        bootstrap.InstallSecretsStep(context(config)).apply()


def test_secrets_step_without_secrets_is_satisfied(tmp_path: Path) -> None:
    assert bootstrap.SecretsStep(context(make_config(tmp_path))).check().satisfied


def test_step_graph_starts_apt_downloads_and_node_at_once() -> None:
    by_name = {s.name: s for s in bootstrap.STEPS}
    assert len(by_name) == len(bootstrap.STEPS)
    for name in ("apt", "download_project_host", "download_project", "download_tools", "node"):
        assert set(by_name[name].deps) <= {"preflight", "directories"}
    assert "btrfs" in by_name["service"].deps and "apt" in by_name["btrfs"].deps
    assert by_name["finalize"].deps == ("service", "chrony", "tunnel", "gpu")
    # what upstream's daemon needs exists before it starts
    assert {"containers", "btrfs", "secrets", "install_secrets", "files"} <= set(by_name["service"].deps)
    assert {"apt", "btrfs"} <= set(by_name["containers"].deps)
    # the hub is needed only at the start: secrets are fetched right after the directories
    assert set(by_name["secrets"].deps) <= {"preflight", "directories"}
    assert {"secrets", "btrfs"} <= set(by_name["install_secrets"].deps)


needs_sudo = pytest.mark.skipif(
    shutil.which("sudo") is None or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0,
    reason="needs passwordless sudo (root with the sudo package is enough: apt-get install sudo)",
)


@needs_sudo
def test_write_root_file_is_atomic_with_mode_and_owner(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "cocalc" / "project-host.env"
    group = bootstrap.user_ids(getpass.getuser())[2]
    previous = os.umask(0o077)  # as under the stub
    try:
        bootstrap.write_root_file(target, "A=1\n", mode=0o640, group=group)
    finally:
        os.umask(previous)
    for created in (target.parent, target.parent.parent):  # reachable by the daemon's user
        assert stat.S_IMODE(created.stat().st_mode) == 0o755
    st = target.stat()
    assert target.read_text() == "A=1\n"
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o640, 0)
    inode = st.st_ino
    bootstrap.write_root_file(target, "A=2\n", mode=0o640, group=group)
    assert target.read_text() == "A=2\n" and target.stat().st_ino != inode  # replaced by rename, not rewritten
    assert os.listdir(target.parent) == ["project-host.env"]  # no temp files left
    assert bootstrap.file_matches(target, "A=2\n", mode=0o640, uid=0)


@needs_sudo
def test_files_step_writes_the_env_file_only_when_it_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "etc" / "cocalc" / "project-host.env"
    monkeypatch.setattr(bootstrap, "ENV_FILE", env_file)
    config = make_config(tmp_path)
    bootstrap.DirectoriesStep(context(config)).apply()
    step = bootstrap.FilesStep(context(config))
    assert not step.check().satisfied
    step.apply()
    assert step.check().satisfied
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert f"PROJECT_HOST_ID={config.host.id}\n" in env_file.read_text()
    inode = env_file.stat().st_ino
    step.apply()  # unchanged content: not rewritten
    assert env_file.stat().st_ino == inode
    saved = json.loads((Path(config.bootstrap_root) / "config" / "bootstrap.json").read_text())
    assert saved["host"]["id"] == config.host.id


@needs_sudo
def test_finalize_step_writes_ours_and_upstreams_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system_marker = tmp_path / "var" / "lib" / "cocalc" / ".bootstrap_done"
    monkeypatch.setattr(bootstrap, "SYSTEM_DONE_MARKER", system_marker)
    config = make_config(tmp_path)
    Path(config.bootstrap_dir).mkdir(parents=True)
    data_marker = Path(config.btrfs.mount_point) / "data" / ".bootstrap_done"
    data_marker.parent.mkdir(parents=True)
    step = bootstrap.FinalizeStep(context(config))
    assert not step.check().satisfied
    step.apply()
    assert step.check().satisfied
    ours = (Path(config.bootstrap_dir) / ".bootstrap_done").read_text()
    assert data_marker.read_text() == system_marker.read_text() == ours
    assert system_marker.stat().st_uid == 0 and stat.S_IMODE(system_marker.stat().st_mode) == 0o644
    data_marker.unlink()
    assert "missing or stale" in step.check().detail
    changed = make_config(tmp_path, node={"version": "22.0.0"})
    assert not bootstrap.FinalizeStep(context(changed)).check().satisfied


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None,
    reason="needs root and btrfs-progs to mount a btrfs loop image",
)
def test_btrfs_sysfs_dir_is_found_by_fsid_not_by_device_name(tmp_path: Path) -> None:
    image, mount = tmp_path / "fs.img", tmp_path / "m"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        uuid = subprocess.run(
            ["blkid", "-o", "value", "-s", "UUID", str(image)], capture_output=True, text=True
        ).stdout.strip()
        assert bootstrap.btrfs_fsid(str(mount)) == uuid
        assert bootstrap.btrfs_sysfs_dir(str(mount)) == Path("/sys/fs/btrfs") / uuid
        assert bootstrap.btrfs_fsid(str(tmp_path)) is None  # not btrfs
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_preflight_needs_zstd_for_a_zstd_archive_without_an_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python reads zstd only from 3.14 on: a .tar.zst bundle needs the zstd command, found before anything
    changes; a bundle with an image (mounted by the kernel) or a .tar.xz does not."""
    zst = "http://127.0.0.1:9/project/1.0.0/project.tar.zst?x=1"
    image = {"url": "http://127.0.0.1:9/project/1.0.0/project.sqfs", "sha256": "a" * 64}
    config = make_config(tmp_path, artifacts={"project": {"url": zst}, "tools": {"url": zst, "image": image}})
    if shutil.which("zstd") is not None:
        assert bootstrap.decompressor_problems(config) == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no zstd on PATH
    problems = bootstrap.decompressor_problems(config)
    assert problems == [("artifacts project is .tar.zst and the zstd command is missing", bootstrap.ZSTD_HINT)]
    assert problems[0] in bootstrap.preflight_problems(config)
    assert bootstrap.decompressor_problems(make_config(tmp_path)) == []  # .tar.xz: Python's lzma reads it


def test_secrets_step_unreachable_hub_fails_with_a_hint_about_the_hub_not_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "backoff_delay", lambda attempt, base_s, max_s: 0.01)
    config = make_config(tmp_path, "http://127.0.0.1:9", secrets=["conat-password"])  # port 9: refused
    Path(config.bootstrap_dir).mkdir(parents=True)
    config.token_file.write_text("tok-0123456789abcdef\n")
    with pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.SecretsStep(context(config)).apply()
    assert "hub.secrets_url" in (failure.value.hint or "")
    assert "partial download" not in (failure.value.hint or "")
    assert not bootstrap.secrets_staging_dir(config).joinpath("conat-password").exists()


def test_wait_until_healthy_asks_again_soon_then_backs_off_to_poll_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted daemon is asked again after 20 ms, then 40, 80, ... up to poll_s (a real
    HTTP server that answers 404 until the daemon is "up", then 200)."""
    behaviour = Behaviour()
    slept: list[float] = []

    def fake_sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) == 7:
            behaviour.files["/healthz"] = b"ok"

    with serve(behaviour) as url:
        monkeypatch.setattr(time, "sleep", fake_sleep)
        answer = bootstrap.wait_until_healthy(f"{url}/healthz", 60, poll_s=0.5)
    assert answer == "HTTP 200"
    assert slept == [0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
    assert len(behaviour.requests) == 8


def test_wait_until_healthy_fails_after_its_timeout_with_the_last_answer() -> None:
    with (
        serve(Behaviour()) as url,
        pytest.raises(bootstrap.BootstrapError, match=r"not healthy after 0\.3s \(last answer: HTTP 404\)"),
    ):
        bootstrap.wait_until_healthy(f"{url}/healthz", 0.3)
