"""Steps for what upstream's daemon needs from the OS: rootless containers
(subordinate ids, the user-namespace sysctl, podman storage on /btrfs) and
time sync (chrony)."""

from __future__ import annotations

import shlex
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .apt import APT_ENV, apt_get_argv, apt_install, apt_update, wait_for_locks
from .commands import run_command
from .config import Config
from .credentials import host_auth
from .errors import BootstrapError
from .facts import DPKG_LOCKS, SYSTEMD_UNIT_DIR, file_sha256, missing_packages, read_text_or, systemctl_state, user_ids
from .fetch import download_verified
from .layout import (
    CLOUDFLARED_CONFIG,
    CLOUDFLARED_TOKEN_ENV,
    CLOUDFLARED_UNIT,
    TUNNEL_TOKEN_RE,
    downloads_dir,
    render_cloudflared_config,
    render_cloudflared_unit,
)
from .log import Log, add_secret
from .step import Step, StepState, file_matches, make_root_dirs, write_root_file, write_user_file
from .steps_host import fetch_secret

# -- removing what a step installed ------------------------------------------------------


def remove_installed(units: Sequence[str], paths: Sequence[Path], log: Log) -> list[str]:
    """Stop and disable the units that are there, delete the files that are
    there, reload systemd: what a step installed, when the config no longer
    asks for it (and for deprovisioning). Returns what was removed."""
    removed = []
    for unit in units:
        if (SYSTEMD_UNIT_DIR / unit).exists() or systemctl_state("is-active", unit) in ("active", "activating"):
            run_command(["systemctl", "disable", "--now", unit], sudo=True, check=False, timeout_s=120)
            log.info(f"stopped and disabled {unit}")
            removed.append(unit)
    for path in paths:
        if path.exists() or path.is_symlink():
            run_command(["rm", "-f", "--", str(path)], sudo=True, timeout_s=30)
            log.info(f"removed {path}")
            removed.append(str(path))
    if removed:
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
    return removed


def purge_packages(packages: Sequence[str], lock_timeout_s: int, log: Log) -> list[str]:
    """`apt-get purge` the packages that are installed; which ones it purged."""
    installed = [p for p in packages if p not in missing_packages([p])]
    if installed:
        wait_for_locks(DPKG_LOCKS, time.monotonic() + lock_timeout_s, log)
        run_command(
            apt_get_argv(["purge", *installed], lock_timeout_s),
            sudo=True,
            env=APT_ENV,
            timeout_s=lock_timeout_s + 600,
        )
        log.info(f"purged {' '.join(installed)}")
    return installed


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


# -- the tunnel -------------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    found = run_command(["dpkg-query", "-W", "-f", "${Version}", package], check=False, timeout_s=30)
    return found.output.strip() if found.returncode == 0 and found.output.strip() else None


def tunnel_leftovers() -> list[Path]:
    """What a tunnel left behind (our unit, the token, our config.yml)."""
    ours = [SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service", CLOUDFLARED_TOKEN_ENV]
    if read_text_or(CLOUDFLARED_CONFIG).startswith("# Written by bootstrap.py"):
        ours.append(CLOUDFLARED_CONFIG)
    return [p for p in ours if p.exists()]


def remove_tunnel(lock_timeout_s: int, log: Log) -> list[str]:
    """Take a tunnel away: the unit (stopped, disabled, removed), the token env
    file, our config.yml, and the cloudflared package we installed."""
    left = tunnel_leftovers()
    if not left:
        return []
    had_unit = (SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service").exists()
    removed = remove_installed([f"{CLOUDFLARED_UNIT}.service"], left, log)
    if had_unit:  # we installed cloudflared for our unit
        removed += purge_packages(["cloudflared"], lock_timeout_s, log)
    return removed


class TunnelStep(Step):
    """cloudflared for a host reached through a Cloudflare tunnel: the pinned .deb
    (sha256 verified), the token in a root 0600 env file (TUNNEL_TOKEN, never an
    argument), config.yml ingress to the daemon, and cocalc-cloudflared.service.
    Taken away again (unit, token, package) when the config no longer has one."""

    name = "tunnel"
    deps = ("apt",)  # dpkg: one at a time
    weight_s = 3.0
    phase = "setting up the tunnel"
    hint = "See sudo journalctl -u cocalc-cloudflared -n 100 --no-pager; the token comes from the hub's secrets."

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{CLOUDFLARED_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        cf = self.config.cloudflared
        return {"cloudflared": None if cf is None else cf.to_dict()}

    def problems(self) -> list[str]:
        cf = self.config.cloudflared
        if cf is None:
            left = tunnel_leftovers()
            return [f"left over from an earlier tunnel: {', '.join(map(str, left))}"] if left else []
        unit = f"{CLOUDFLARED_UNIT}.service"
        problems = []
        if installed_version("cloudflared") != cf.deb.version:
            problems.append(f"cloudflared {cf.deb.version} is not installed")
        try:
            st = CLOUDFLARED_TOKEN_ENV.stat()
            if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
                problems.append(f"{CLOUDFLARED_TOKEN_ENV} is not root's 0600")
        except OSError:
            problems.append(f"{CLOUDFLARED_TOKEN_ENV} is missing")
        if not file_matches(CLOUDFLARED_CONFIG, render_cloudflared_config(cf.hostname, cf.port), mode=0o644):
            problems.append(f"{CLOUDFLARED_CONFIG} is missing or differs")
        if not file_matches(self.unit_path(), render_cloudflared_unit(), mode=0o644):
            problems.append(f"{self.unit_path()} is missing or differs")
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        if systemctl_state("is-active", unit) != "active":
            problems.append(f"{unit} is not active")
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        if self.config.cloudflared is None and not problems:
            return StepState(True, "no tunnel configured")
        return StepState(not problems, "; ".join(problems) or "cloudflared runs the tunnel")

    def apply(self) -> None:
        cf = self.config.cloudflared
        if cf is None:
            removed = remove_tunnel(self.config.apt.lock_timeout_s, self.log)
            self.log.info(f"removed the tunnel: {', '.join(removed)}" if removed else "no tunnel configured")
            return
        changed = False
        if installed_version("cloudflared") != cf.deb.version:
            deb = downloads_dir(self.config) / f"cloudflared_{cf.deb.version}.deb"
            download_verified(cf.deb.url, deb, cf.deb.sha256, log=self.log, size_bytes=cf.deb.size_bytes)
            spec = self.config.apt
            wait_for_locks(DPKG_LOCKS, time.monotonic() + spec.lock_timeout_s, self.log)
            run_command(
                apt_get_argv(["install", "--no-install-recommends", str(deb)], spec.lock_timeout_s),
                sudo=True,
                env=APT_ENV,
                timeout_s=spec.lock_timeout_s + 600,
                hint=self.hint,
            )
            self.log.info(f"installed cloudflared {cf.deb.version} (sha256 verified)")
            changed = True
        if not CLOUDFLARED_TOKEN_ENV.exists():
            changed |= self.fetch_token(cf.token_secret)
        for path, content in (
            (CLOUDFLARED_CONFIG, render_cloudflared_config(cf.hostname, cf.port)),
            (self.unit_path(), render_cloudflared_unit()),
        ):
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
                changed = True
        unit = f"{CLOUDFLARED_UNIT}.service"
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        verb = "restart" if changed else "start"
        run_command(["systemctl", verb, unit], sudo=True, timeout_s=120, hint=self.hint)
        self.log.info(f"{verb}ed {unit}")

    def fetch_token(self, name: str) -> bool:
        token = host_auth(self.config)  # the host credential (creds helper: was the bootstrap token)
        if token is None:
            raise BootstrapError(
                f"no host credential nor bootstrap token in {self.config.bootstrap_dir}",
                hint="Re-run the stub from the hub.",
            )
        value = fetch_secret(f"{self.config.hub.secrets_url.rstrip('/')}/{name}", token).strip()
        add_secret(value)
        if not TUNNEL_TOKEN_RE.fullmatch(value):
            raise BootstrapError(
                f"the hub's secret {name} does not look like a tunnel token",
                hint="Store the tunnel token (base64) as that secret on the hub.",
            )
        write_root_file(CLOUDFLARED_TOKEN_ENV, f"TUNNEL_TOKEN={value}\n", mode=0o600)
        self.log.info(f"wrote {CLOUDFLARED_TOKEN_ENV} (0600, root)")
        return True


# -- GPU hosts -------------------------------------------------------------------------

NVIDIA_KEYRING = Path("/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg")
NVIDIA_SOURCES = Path("/etc/apt/sources.list.d/nvidia-container-toolkit.list")
NVIDIA_DEVICE = Path("/dev/nvidiactl")  # there when an NVIDIA driver is loaded
CDI_HELPER = Path("/usr/local/sbin/cocalc-nvidia-cdi")
CDI_SPEC = "/etc/cdi/nvidia.yaml"
CDI_UNIT = "cocalc-nvidia-cdi"
GPU_GROUPS = ("video", "render")


def render_nvidia_sources(repo_url: str) -> str:
    return f"# Written by bootstrap.py; edits are overwritten.\ndeb [signed-by={NVIDIA_KEYRING}] {repo_url} /\n"


def render_cdi_helper(output: str = CDI_SPEC) -> str:
    """Regenerates the CDI spec (it goes stale after driver changes)."""
    return "\n".join(
        [
            "#!/bin/sh",
            "# Written by bootstrap.py; edits are overwritten. Run by cocalc-nvidia-cdi.timer.",
            "set -eu",
            f'mkdir -p "$(dirname {shlex.quote(output)})"',
            f"exec nvidia-ctk cdi generate --output={shlex.quote(output)}",
            "",
        ]
    )


def render_cdi_units(interval_s: int) -> dict[str, str]:
    """The oneshot service and its timer (upstream used cron every 5 minutes)."""
    service = "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Regenerate the NVIDIA CDI spec for containers",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={CDI_HELPER}",
            "",
        ]
    )
    timer = "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Regenerate the NVIDIA CDI spec regularly",
            "",
            "[Timer]",
            "OnBootSec=30s",
            f"OnUnitActiveSec={interval_s}s",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
    )
    return {f"{CDI_UNIT}.service": service, f"{CDI_UNIT}.timer": timer}


def gpu_leftovers() -> list[Path]:
    """What a GPU config left behind: our units, helper, apt source, keyring, CDI spec."""
    ours = [SYSTEMD_UNIT_DIR / n for n in render_cdi_units(300)] + [CDI_HELPER, NVIDIA_SOURCES]
    if not any(p.exists() for p in ours):
        return []  # not ours: the keyring and spec may be an operator's
    return [p for p in (*ours, NVIDIA_KEYRING, Path(CDI_SPEC)) if p.exists()]


def remove_gpu(lock_timeout_s: int, log: Log) -> list[str]:
    """Take GPU support away: the timer and its service (stopped, disabled,
    removed), the helper, the repository and its keyring, the CDI spec (stale
    without the toolkit), and the toolkit package. The user stays in video
    and render (harmless without a GPU; groups may be shared)."""
    left = gpu_leftovers()
    if not left:
        return []
    removed = remove_installed([f"{CDI_UNIT}.timer", f"{CDI_UNIT}.service"], left, log)
    return removed + purge_packages(["nvidia-container-toolkit"], lock_timeout_s, log)


def user_groups(user: str) -> set[str]:
    found = run_command(["id", "-nG", user], check=False, timeout_s=30)
    return set(found.output.split()) if found.returncode == 0 else set()


class GpuStep(Step):
    """NVIDIA's container toolkit on GPU hosts: its apt repository with a pinned
    keyring, the packages, the user in video and render, and the CDI spec kept
    fresh by a systemd timer. A host without an NVIDIA GPU skips it, and says so."""

    name = "gpu"
    deps = ("apt",)  # apt/dpkg one at a time
    weight_s = 20.0
    phase = "setting up the GPU"
    hint = "Check the NVIDIA driver (nvidia-smi) and gpu.repo_url / gpu.keyring_sha256 in the config."

    def inputs(self) -> Mapping[str, Any]:
        gpu = self.config.gpu
        return {"gpu": None if gpu is None else gpu.to_dict(), "gpu_present": NVIDIA_DEVICE.exists()}

    def skip_reason(self) -> str | None:
        if self.config.gpu is None:
            return "no GPU configured"
        if not NVIDIA_DEVICE.exists():
            return f"no NVIDIA GPU on this host ({NVIDIA_DEVICE} is missing): the container toolkit is not installed"
        return None

    def files(self) -> dict[Path, tuple[str, int]]:
        gpu = self.config.gpu
        assert gpu is not None
        out = {NVIDIA_SOURCES: (render_nvidia_sources(gpu.repo_url), 0o644), CDI_HELPER: (render_cdi_helper(), 0o755)}
        out |= {SYSTEMD_UNIT_DIR / n: (t, 0o644) for n, t in render_cdi_units(gpu.cdi_interval_s).items()}
        return out

    def problems(self) -> list[str]:
        gpu = self.config.gpu
        assert gpu is not None
        problems = []
        try:
            if file_sha256(NVIDIA_KEYRING) != gpu.keyring_sha256:
                problems.append(f"{NVIDIA_KEYRING} differs from the pinned keyring")
        except OSError:
            problems.append(f"{NVIDIA_KEYRING} is missing")
        problems += [
            f"{p} is missing or differs" for p, (c, m) in self.files().items() if not file_matches(p, c, mode=m)
        ]
        missing = missing_packages(gpu.packages)
        if missing:
            problems.append(f"not installed: {' '.join(missing)}")
        absent = [g for g in GPU_GROUPS if g not in user_groups(self.config.bootstrap_user)]
        if absent:
            problems.append(f"{self.config.bootstrap_user} is not in {', '.join(absent)}")
        if systemctl_state("is-enabled", f"{CDI_UNIT}.timer") != "enabled":
            problems.append(f"{CDI_UNIT}.timer is not enabled")
        if not Path(CDI_SPEC).exists():
            problems.append(f"{CDI_SPEC} is missing")
        return problems

    def check(self) -> StepState:
        why = self.skip_reason()
        if self.config.gpu is None and gpu_leftovers():
            return StepState(False, f"left over from an earlier GPU config: {', '.join(map(str, gpu_leftovers()))}")
        if why is not None:
            return StepState(True, why)
        problems = self.problems()
        return StepState(not problems, "; ".join(problems) or "NVIDIA container toolkit, CDI spec and timer in place")

    def apply(self) -> None:
        why = self.skip_reason()
        gpu = self.config.gpu
        if gpu is None:
            removed = remove_gpu(self.config.apt.lock_timeout_s, self.log)
            self.log.info(f"removed GPU support: {', '.join(removed)}" if removed else "no GPU configured")
            return
        if why is not None:
            self.log.info(why)
            return
        keyring = downloads_dir(self.config) / "nvidia-container-toolkit-keyring.gpg"
        download_verified(gpu.keyring_url, keyring, gpu.keyring_sha256, log=self.log)
        make_root_dirs(NVIDIA_KEYRING.parent)
        run_command(
            ["install", "-m", "0644", "-o", "root", "-g", "root", str(keyring), str(NVIDIA_KEYRING)],
            sudo=True,
            timeout_s=30,
        )
        for path, (content, mode) in self.files().items():
            if not file_matches(path, content, mode=mode):
                write_root_file(path, content, mode=mode)
                self.log.info(f"wrote {path}")
        spec = self.config.apt
        apt_update(spec.lock_timeout_s, self.log)  # the new repository's lists
        apt_install(gpu.packages, spec.lock_timeout_s, self.log)
        for group in GPU_GROUPS:
            if run_command(["getent", "group", group], check=False, timeout_s=30).returncode != 0:
                run_command(["groupadd", "--system", group], sudo=True, timeout_s=30)
        run_command(["usermod", "-aG", ",".join(GPU_GROUPS), self.config.bootstrap_user], sudo=True, timeout_s=30)
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        run_command(["systemctl", "enable", "--now", f"{CDI_UNIT}.timer"], sudo=True, timeout_s=120)
        run_command(["systemctl", "start", f"{CDI_UNIT}.service"], sudo=True, timeout_s=300, hint=self.hint)
        self.log.info(f"generated {CDI_SPEC}; {CDI_UNIT}.timer regenerates it every {gpu.cdi_interval_s}s")
