"""Steps for what upstream's daemon needs from the OS: rootless containers
(subordinate ids, the user-namespace sysctl, podman storage on /btrfs) and
time sync (chrony)."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .commands import run_command
from .config import Config
from .facts import read_text_or, systemctl_state, user_ids
from .step import Step, StepState, file_matches, make_root_dirs, write_root_file, write_user_file

# -- rootless podman ------------------------------------------------------------------

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
SUBID_START = 100000  # the old bootstrap's range: 100000-165535
SUBID_COUNT = 65536
USERNS_SYSCTL_FILE = Path("/etc/sysctl.d/60-cocalc-userns.conf")
USERNS_SYSCTL = "kernel.unprivileged_userns_clone"
USERNS_PROC = Path("/proc/sys/kernel/unprivileged_userns_clone")  # Debian and Ubuntu kernels only
ROOT_STORAGE_CONF = Path("/etc/containers/storage.conf")


def subid_ranges(text: str) -> list[tuple[str, int, int]]:
    """(owner, first id, count) of every well-formed line of /etc/subuid or /etc/subgid."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit() and not line.lstrip().startswith("#"):
            ranges.append((fields[0], int(fields[1]), int(fields[2])))
    return ranges


def subid_entry(text: str, user: str, uid: int) -> str | None:
    """The line to add for `user`: the old range (100000, 65536 ids), moved up
    past every range it would overlap; None when the user already has one."""
    ranges = subid_ranges(text)
    if any(owner in (user, str(uid)) for owner, _, _ in ranges):
        return None
    start = SUBID_START
    while True:
        clash = [s + c for _, s, c in ranges if s < start + SUBID_COUNT and start < s + c]
        if not clash:
            return f"{user}:{start}:{SUBID_COUNT}"
        start = -(-max(clash) // SUBID_COUNT) * SUBID_COUNT  # the next multiple of 65536 past them


def with_subid_entry(text: str, entry: str) -> str:
    return text + ("" if text == "" or text.endswith("\n") else "\n") + entry + "\n"


def containers_dir(config: Config) -> Path:
    return Path(config.btrfs.mount_point) / "data" / "containers"


def storage_roots(config: Config, rootless_user: str | None) -> tuple[Path, Path]:
    """(runroot, graphroot): /btrfs/data/containers/root/{run,storage}, or
    /btrfs/data/containers/rootless/<user>/{run,storage}."""
    base = containers_dir(config) / ("root" if rootless_user is None else f"rootless/{rootless_user}")
    return base / "run", base / "storage"


def render_storage_conf(runroot: Path, graphroot: Path) -> str:
    return (
        "# Written by bootstrap.py; edits are overwritten. Container storage lives on /btrfs,\n"
        "# not on the root disk (the root disk filled up once).\n"
        "[storage]\n"
        'driver = "overlay"\n'
        f'runroot = "{runroot}"\n'
        f'graphroot = "{graphroot}"\n'
    )


def user_storage_conf(config: Config) -> Path:
    return Path(config.home) / ".config" / "containers" / "storage.conf"


class ContainersStep(Step):
    """Rootless podman for the user: subordinate ids, the user-namespace
    sysctl, and storage.conf (root's and the user's) with storage on /btrfs."""

    name = "containers"
    deps = ("apt", "btrfs")  # podman, uidmap; /btrfs/data
    weight_s = 1.0
    phase = "setting up containers"
    hint = "Check /etc/subuid, /etc/subgid and the storage.conf files; `podman info` as the user says what podman sees."

    def root_files(self) -> dict[Path, str]:
        run, graph = storage_roots(self.config, None)
        return {ROOT_STORAGE_CONF: render_storage_conf(run, graph), USERNS_SYSCTL_FILE: f"{USERNS_SYSCTL} = 1\n"}

    def user_conf(self) -> str:
        return render_storage_conf(*storage_roots(self.config, self.config.bootstrap_user))

    def dirs(self) -> dict[Path, tuple[str, int]]:
        """Storage directories: owner ("root" or the user) and mode."""
        user = self.config.bootstrap_user
        out: dict[Path, tuple[str, int]] = {containers_dir(self.config): ("root", 0o755)}
        out |= {p: ("root", 0o700) for p in storage_roots(self.config, None)}
        rootless = storage_roots(self.config, user)
        out[rootless[0].parent.parent] = ("root", 0o755)  # .../rootless
        out[rootless[0].parent] = (user, 0o700)
        out |= {p: (user, 0o700) for p in rootless}
        return out

    def inputs(self) -> Mapping[str, Any]:
        return {
            "user": self.config.bootstrap_user,
            "files": {str(p): c for p, c in self.root_files().items()},
            "user_conf": self.user_conf(),
        }

    def problems(self) -> list[str]:
        user = self.config.bootstrap_user
        uid = user_ids(user)[0]
        problems = [
            f"{p} is missing or differs" for p, c in self.root_files().items() if not file_matches(p, c, mode=0o644)
        ]
        if not file_matches(user_storage_conf(self.config), self.user_conf(), mode=0o644):
            problems.append(f"{user_storage_conf(self.config)} is missing or differs")
        problems += [f"{f} has no range for {user}" for f in SUBID_FILES if subid_entry(read_text_or(f), user, uid)]
        owners = {"root": 0, user: uid}
        for path, (owner, mode) in self.dirs().items():
            try:
                st = path.stat()
            except OSError:
                problems.append(f"{path} is missing")
                continue
            if st.st_uid != owners[owner] or stat.S_IMODE(st.st_mode) != mode:
                problems.append(f"{path} is not {owner}'s with mode {mode:o}")
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or "subordinate ids, sysctl and storage on /btrfs in place")

    def apply(self) -> None:
        user = self.config.bootstrap_user
        uid, _, group = user_ids(user)
        for path in SUBID_FILES:
            text = read_text_or(path)
            entry = subid_entry(text, user, uid)
            if entry is not None:
                write_root_file(path, with_subid_entry(text, entry), mode=0o644)
                self.log.info(f"{path}: {entry}")
        for path, content in self.root_files().items():
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
        self.apply_sysctl()
        owners = {"root": 0, user: uid}
        for path, (owner, mode) in self.dirs().items():
            if not path.exists():
                make_root_dirs(path)
            st = path.stat()
            if st.st_uid != owners[owner]:
                run_command(
                    ["chown", f"{owner}:{group if owner == user else 'root'}", str(path)], sudo=True, timeout_s=30
                )
            if stat.S_IMODE(st.st_mode) != mode:
                run_command(["chmod", f"{mode:o}", str(path)], sudo=True, timeout_s=30)
        if write_user_file(user_storage_conf(self.config), self.user_conf(), 0o644):
            self.log.info(f"wrote {user_storage_conf(self.config)}")

    def apply_sysctl(self) -> None:
        """Best effort, as upstream: only Debian/Ubuntu kernels have the knob, and
        inside a container /proc/sys may be read-only."""
        if not USERNS_PROC.exists():
            self.log.info(f"{USERNS_SYSCTL} does not exist on this kernel; user namespaces need no switch")
            return
        if read_text_or(USERNS_PROC).strip() == "1":
            return
        done = run_command(["sysctl", "-w", f"{USERNS_SYSCTL}=1"], sudo=True, check=False, timeout_s=30)
        if done.returncode != 0:
            self.log.warn(
                f"could not set {USERNS_SYSCTL}=1 now ({done.output.strip()}); {USERNS_SYSCTL_FILE} sets it at boot"
            )


# -- time -------------------------------------------------------------------------------

CHRONY_CONF = Path("/etc/chrony/chrony.conf")
CHRONY_UNIT = "chrony.service"
TIMESYNCD_UNIT = "systemd-timesyncd.service"


def render_chrony_conf() -> str:
    """Upstream's chrony.conf (pool, makestep 1.0 -1, rtcsync) plus the
    distribution's file locations. Clock skew broke hosts once."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "pool pool.ntp.org iburst maxsources 4",
            "keyfile /etc/chrony/chrony.keys",
            "driftfile /var/lib/chrony/chrony.drift",
            "logdir /var/log/chrony",
            "maxupdateskew 100.0",
            "makestep 1.0 -1",
            "rtcsync",
            "",
        ]
    )


class ChronyStep(Step):
    """chrony keeps the clock; systemd-timesyncd is off."""

    name = "chrony"
    deps = ("apt",)  # chrony
    weight_s = 0.5
    phase = "setting up time sync"
    hint = "Check that chrony is in apt.packages; `systemctl status chrony` says why it does not run."

    def problems(self) -> list[str]:
        problems = []
        if not file_matches(CHRONY_CONF, render_chrony_conf(), mode=0o644):
            problems.append(f"{CHRONY_CONF} is missing or differs")
        if systemctl_state("is-enabled", CHRONY_UNIT) != "enabled":
            problems.append(f"{CHRONY_UNIT} is not enabled")
        if systemctl_state("is-enabled", TIMESYNCD_UNIT) == "enabled":
            problems.append(f"{TIMESYNCD_UNIT} is enabled")
        if systemctl_state("is-active", TIMESYNCD_UNIT) == "active":
            problems.append(f"{TIMESYNCD_UNIT} is running")
        return problems

    def inputs(self) -> Mapping[str, Any]:
        return {"conf": render_chrony_conf()}

    def check(self) -> StepState:
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or f"{CHRONY_UNIT} enabled with our config, timesyncd off")

    def apply(self) -> None:
        if systemctl_state("is-enabled", TIMESYNCD_UNIT) in ("enabled", "enabled-runtime") or (
            systemctl_state("is-active", TIMESYNCD_UNIT) == "active"
        ):
            run_command(["systemctl", "disable", "--now", TIMESYNCD_UNIT], sudo=True, timeout_s=120)
            self.log.info(f"disabled {TIMESYNCD_UNIT}")
        changed = not file_matches(CHRONY_CONF, render_chrony_conf(), mode=0o644)
        if changed:
            write_root_file(CHRONY_CONF, render_chrony_conf(), mode=0o644)
            self.log.info(f"wrote {CHRONY_CONF}")
        if systemctl_state("is-enabled", CHRONY_UNIT) != "enabled":
            run_command(["systemctl", "enable", CHRONY_UNIT], sudo=True, timeout_s=120, hint=self.hint)
        # restart to read the new file; a unit whose conditions fail (no CAP_SYS_TIME
        # in a container) stays inactive, which is what the distribution wants there
        verb = "restart" if changed else "start"
        done = run_command(["systemctl", verb, CHRONY_UNIT], sudo=True, check=False, timeout_s=120)
        state = systemctl_state("is-active", CHRONY_UNIT)
        if done.returncode != 0 or state != "active":
            self.log.warn(f"{CHRONY_UNIT} is {state} ({done.output.strip() or 'its conditions are not met here'})")
