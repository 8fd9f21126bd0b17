"""Steps that bring the host up: btrfs, the service, finalize."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .commands import run_command
from .errors import BootstrapError, __version__
from .facts import (
    ENV_FILE,
    FSTAB,
    SYSTEMD_UNIT_DIR,
    btrfs_fsid,
    btrfs_quota_enabled,
    is_btrfs_subvolume,
    mount_at,
    read_text_or,
    systemctl_state,
    user_ids,
)
from .layout import (
    GROW_HELPER,
    GROW_UNIT,
    SYSTEM_DONE_MARKER,
    btrfs_image_part,
    bundles_dir,
    data_dir,
    done_marker,
    render_env_file,
    render_grow_unit,
    render_unit,
)
from .lifecycle import (
    DaemonGeneration,
    failed_before,
    failed_path,
    health_answer,
    journal_tail,
    read_good,
    record_failed,
    record_good,
    restore_generation,
)
from .log import REDACTOR, utc_timestamp
from .step import Step, StepState, atomic_write_text, file_matches, make_root_dirs, write_root_file
from .steps_host import owned_dir
from .system import (
    BTRFS_DIR_MODES,
    BTRFS_LABEL,
    MIN_DATA_DISK_UNIT,
    block_device_probe,
    fstab_entry,
    fstab_with_entry,
    http_status,
    render_grow_helper,
    tcp_reachable,
    wait_for_block_device,
    wait_until_healthy,
)


def foreign_image_problem(image: Path) -> str | None:
    """Why an existing file at btrfs.image_path is not ours to format, or None when it may be
    used: absent (we create it), holding no data at all (every block a hole: ours from an
    interrupted run), or holding the btrfs filesystem bootstrap.py makes (labelled BTRFS_LABEL).
    The config keeps the path inside bootstrap_root; this keeps it from naming a file there
    (or a link out of there) that is someone else's."""
    try:
        st = image.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return f"{image} exists and is not a regular file (a link, a directory or a device)"
    if st.st_blocks == 0:
        return None
    found = block_device_probe(str(image))
    if found.get("TYPE") == "btrfs" and found.get("LABEL") == BTRFS_LABEL:
        return None
    what = f"a {found['TYPE']} filesystem" if found.get("TYPE") else "data"
    return f"{image} exists and holds {what}, not the btrfs filesystem bootstrap.py makes ({BTRFS_LABEL})"


class BtrfsStep(Step):
    """The btrfs filesystem for projects: data disk or sparse loop image, mounted
    from a tagged fstab line, with the data subvolume (tmp, secrets), quota,
    /usr/local/sbin/cocalc-grow-btrfs and its boot-time unit."""

    name = "btrfs"
    deps = ("apt",)  # btrfs-progs
    weight_s = 5.0
    phase = "setting up btrfs"
    hint = "Check the disk or image, and that btrfs-progs is in apt.packages; `dmesg | tail` shows mount errors."

    @property
    def mount_point(self) -> Path:
        return Path(self.config.btrfs.mount_point)

    def helper_path(self) -> Path:
        return GROW_HELPER

    def helper_text(self) -> str:
        b = self.config.btrfs
        return render_grow_helper(b.mount_point, None if b.data_disk else b.image_path, str(ENV_FILE))

    def grow_unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{GROW_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        return {"btrfs": dataclasses.asdict(self.config.btrfs), "user": self.config.bootstrap_user}

    def entry_for(self, source: str) -> str | None:
        """The fstab line for the filesystem mounted from `source`."""
        b = self.config.btrfs
        if b.data_disk is None:
            return fstab_entry(b.image_path, b.mount_point, loop=True)
        fsid = btrfs_fsid(b.mount_point)
        return fstab_entry(f"UUID={fsid}", b.mount_point, loop=False) if fsid else None

    def check(self) -> StepState:
        problems = []
        mounted = mount_at(str(self.mount_point))
        if mounted is None or mounted[1] != "btrfs":
            problems.append(f"no btrfs filesystem mounted at {self.mount_point}")
        else:
            problems += self.mounted_problems(mounted[0])
        if not file_matches(self.helper_path(), self.helper_text(), mode=0o755, uid=0):
            problems.append(f"{self.helper_path()} is missing or differs")
        if not file_matches(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644):
            problems.append(f"{self.grow_unit_path()} is missing or differs")
        elif systemctl_state("is-enabled", f"{GROW_UNIT}.service") != "enabled":
            problems.append(f"{GROW_UNIT}.service is not enabled")
        return StepState(
            not problems,
            "; ".join(problems) or f"btrfs at {self.mount_point} with data (tmp, secrets), quota, grow helper",
        )

    def mounted_problems(self, source: str) -> list[str]:
        uid = user_ids(self.config.bootstrap_user)[0]
        problems = []
        entry = self.entry_for(source)
        fstab = read_text_or(FSTAB)
        if entry is None or fstab_with_entry(fstab, entry) != fstab:
            problems.append("the tagged fstab line is missing or differs")
        if not btrfs_quota_enabled(str(self.mount_point)):
            problems.append("quota is not enabled")
        if not is_btrfs_subvolume(self.mount_point / "data"):
            problems.append(f"{self.mount_point / 'data'} is not a subvolume")
        for name, mode in BTRFS_DIR_MODES.items():
            path = self.mount_point / name
            if not owned_dir(path, uid) or stat.S_IMODE(path.stat().st_mode) != mode:
                problems.append(f"{path} is not mode {mode:o} and owned by {self.config.bootstrap_user}")
        return problems

    def apply(self) -> None:
        mp = str(self.mount_point)
        mounted = mount_at(mp)
        if mounted is not None and mounted[1] != "btrfs":
            raise BootstrapError(
                f"{mp} has a {mounted[1]} filesystem mounted from {mounted[0]}",
                hint="Unmount it or choose another btrfs.mount_point; bootstrap.py will not mount over it.",
            )
        entry = self.entry_for(mounted[0]) if mounted else self.prepare_filesystem()
        if entry is None:
            raise BootstrapError(f"cannot tell which filesystem is mounted at {mp}", hint=self.hint)
        self.write_fstab(entry)
        if mounted is None:
            make_root_dirs(self.mount_point)
            run_command(
                ["mount", mp], sudo=True, timeout_s=120, hint=self.hint
            )  # through the fstab line: proves it works
            self.log.info(f"mounted {mp}")
        self.prepare_tree()
        self.install_grow_helper()

    def install_grow_helper(self) -> None:
        if not file_matches(self.helper_path(), self.helper_text(), mode=0o755, uid=0):
            write_root_file(self.helper_path(), self.helper_text(), mode=0o755)
            self.log.info(f"wrote {self.helper_path()}")
        unit = f"{GROW_UNIT}.service"
        if not file_matches(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644):
            write_root_file(self.grow_unit_path(), render_grow_unit(self.config), mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
            self.log.info(f"wrote {self.grow_unit_path()}")
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)

    def prepare_filesystem(self) -> str:
        """Make (or find) the filesystem; returns its fstab line."""
        b = self.config.btrfs
        if b.data_disk is not None:
            device = wait_for_block_device(
                b.data_disk.candidates, b.data_disk.wait_s, b.data_disk.min_size_gb * MIN_DATA_DISK_UNIT, self.log
            )
            self.make_btrfs(device)
            uuid = block_device_probe(device).get("UUID")
            if not uuid:
                raise BootstrapError(f"blkid shows no UUID on {device} after mkfs.btrfs", hint=self.hint)
            return fstab_entry(f"UUID={uuid}", b.mount_point, loop=False)
        image = Path(b.image_path)
        problem = foreign_image_problem(image)
        if problem:
            raise BootstrapError(
                f"{problem}; refusing to format it",
                hint="btrfs.image_path must name a file bootstrap.py creates. Move that file away, "
                "or choose another path inside bootstrap_root.",
            )
        if image.exists():
            self.make_btrfs(str(image))  # ours: reused, or (holes only: an older interrupted run) formatted
        else:
            self.make_image(image)
        return fstab_entry(b.image_path, b.mount_point, loop=True)

    def make_image(self, image: Path) -> None:
        """A new sparse loop image with our btrfs on it, made at `<image>.part` and renamed
        into place only when complete (synced): a run killed in truncate or mkfs.btrfs leaves
        the .part (removed by the next run), never a half-made image at btrfs.image_path."""
        b = self.config.btrfs
        part = btrfs_image_part(self.config)
        make_root_dirs(image.parent)
        if os.path.lexists(part):  # normally removed by remove_debris already
            if not stat.S_ISREG(part.lstat().st_mode):
                raise BootstrapError(
                    f"{part} exists and is not a regular file",
                    hint="bootstrap.py makes the loop image there first; move that away.",
                )
            run_command(["rm", "-f", "--", str(part)], sudo=True, timeout_s=30)
        run_command(["truncate", "-s", f"{b.image_size_gb}G", str(part)], sudo=True, timeout_s=60)
        run_command(["chmod", "0600", str(part)], sudo=True, timeout_s=30)
        # no -f: mkfs.btrfs itself refuses to overwrite a filesystem (there is none: a new file)
        run_command(["mkfs.btrfs", "-q", "-L", BTRFS_LABEL, str(part)], sudo=True, timeout_s=300, hint=self.hint)
        run_command(["sync", "--", str(part)], sudo=True, timeout_s=300)  # its blocks before its name
        run_command(["mv", "-T", "--", str(part), str(image)], sudo=True, timeout_s=30)
        run_command(["sync", "--", str(image.parent)], sudo=True, timeout_s=60)  # the rename
        self.log.info(f"created sparse image {image} ({b.image_size_gb} GB) with a btrfs filesystem")

    def make_btrfs(self, device: str) -> None:
        """mkfs.btrfs on an empty device; reuse btrfs; refuse anything else."""
        found = block_device_probe(device)
        if found.get("TYPE") == "btrfs":
            self.log.info(f"{device} already holds btrfs; reusing it")
            return
        if found.get("TYPE") or found.get("PTTYPE"):
            what = found.get("TYPE") or f"a {found.get('PTTYPE')} partition table"
            raise BootstrapError(
                f"{device} holds {what}; refusing to format it",
                hint="bootstrap.py never reformats a disk that holds data. Wipe it yourself (wipefs -a) "
                "if it is really unused, or use another disk.",
            )
        # no -f: mkfs.btrfs itself refuses to overwrite a filesystem blkid might have missed
        run_command(["mkfs.btrfs", "-q", "-L", BTRFS_LABEL, device], sudo=True, timeout_s=300, hint=self.hint)
        self.log.info(f"made a btrfs filesystem on {device}")

    def write_fstab(self, entry: str) -> None:
        current = read_text_or(FSTAB)
        wanted = fstab_with_entry(current, entry)
        if wanted != current:
            write_root_file(FSTAB, wanted, mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, check=False, timeout_s=120)  # fstab generator
            self.log.info(f"fstab: {entry}")

    def prepare_tree(self) -> None:
        mp = self.mount_point
        user, (uid, _, group) = self.config.bootstrap_user, user_ids(self.config.bootstrap_user)
        data = mp / "data"
        if not is_btrfs_subvolume(data):
            if os.path.lexists(data):
                raise BootstrapError(
                    f"{data} exists but is not a btrfs subvolume",
                    hint=f"Move it away; bootstrap.py creates {data} as a subvolume.",
                )
            run_command(["btrfs", "subvolume", "create", str(data)], sudo=True, timeout_s=60)
        if not btrfs_quota_enabled(str(mp)):
            run_command(["btrfs", "quota", "enable", str(mp)], sudo=True, timeout_s=600)
        for name, mode in BTRFS_DIR_MODES.items():  # parents first: each is the user's before we look inside
            path = mp / name
            if not path.exists():
                make_root_dirs(path)
            if not owned_dir(path, uid):
                run_command(["chown", f"{user}:{group}", str(path)], sudo=True, timeout_s=30)
            if stat.S_IMODE(path.stat().st_mode) != mode:  # explicit: the umask is the stub's 077
                run_command(["chmod", f"{mode:o}", str(path)], sudo=True, timeout_s=30)


class ServiceStep(Step):
    """The daemon's systemd unit: enabled, running, healthy; restarted only
    when its unit, env file or bundle changed since the last (re)start."""

    name = "service"
    deps = (
        "install_project_host",
        "install_project",
        "install_tools",
        "node",
        "btrfs",
        "containers",
        "metadata",  # projects never start before the metadata service is closed to them
        "files",
        "secrets",
        "install_secrets",
    )
    weight_s = 10.0
    phase = "starting services"
    hint = "See the daemon's log: sudo journalctl -u <unit> -n 100 --no-pager (the unit is service.unit in the config)."

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{self.config.service.unit}.service"

    def unit_text(self) -> str:
        return render_unit(self.config, user_ids(self.config.bootstrap_user)[2])

    def stamp_path(self) -> Path:
        return Path(self.config.bootstrap_dir) / "service.generation"

    def generation(self) -> str:
        """What the running daemon was started with: unit, env file, bundle."""
        digest = hashlib.sha256(self.unit_text().encode())
        digest.update(read_text_or(ENV_FILE).encode())
        digest.update(os.path.realpath(bundles_dir(self.config) / "project_host" / "current").encode())
        return digest.hexdigest()

    def inputs(self) -> Mapping[str, Any]:
        return {
            "unit": self.unit_text(),
            "env": render_env_file(self.config),
            "bundle": self.config.artifacts.project_host.version,
        }

    def check(self) -> StepState:
        unit = f"{self.config.service.unit}.service"
        problems = []
        if not file_matches(self.unit_path(), self.unit_text(), mode=0o644):
            problems.append(f"{self.unit_path()} is missing or differs")
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        if systemctl_state("is-active", unit) != "active":
            problems.append(f"{unit} is not active")
        elif read_text_or(self.stamp_path()).strip() != self.generation():
            problems.append("its unit, env file or bundle changed since it started")
        else:
            status, what = http_status(self.config.service.health_url, timeout_s=5)
            if status is None or not 200 <= status < 300:
                problems.append(f"{self.config.service.health_url} answers {what}")
        return StepState(not problems, "; ".join(problems) or f"{unit} is active, current and healthy")

    def apply(self) -> None:
        service = self.config.service
        unit = f"{service.unit}.service"
        if not file_matches(self.unit_path(), self.unit_text(), mode=0o644):
            write_root_file(self.unit_path(), self.unit_text(), mode=0o644)
            run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
            self.log.info(f"wrote {self.unit_path()}")
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        generation = self.generation()
        wanted = self.daemon_generation()
        good = read_good(self.config)
        upgrade = good is not None and good != wanted
        failed = failed_before(self.config, wanted) if upgrade else None
        if good is not None and failed is not None:
            self.roll_back(unit, good, wanted, failed.get("report") or "", again=True)
        if read_text_or(self.stamp_path()).strip() != generation:
            run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
            self.log.info(f"(re)started {unit}: its unit, env file or bundle changed")
        elif systemctl_state("is-active", unit) != "active":
            run_command(["systemctl", "start", unit], sudo=True, timeout_s=120, hint=self.hint)
            self.log.info(f"started {unit}")
        else:
            self.log.info(f"{unit} already runs this unit, env file and bundle; not restarted")
        try:
            self.wait_healthy(unit)
        except BootstrapError as e:
            if good is None or not upgrade:
                raise
            self.roll_back(unit, good, wanted, f"{e.message}\n{e.log_tail or ''}".strip(), again=False)
        atomic_write_text(self.stamp_path(), generation + "\n", 0o644)
        record_good(self.config, wanted)
        self.report_conat()

    def daemon_generation(self) -> DaemonGeneration:
        """The generation the config asks for (what a rollback would restore, once healthy)."""
        return DaemonGeneration(
            version=self.config.artifacts.project_host.version, unit=self.unit_text(), env=render_env_file(self.config)
        )

    def roll_back(
        self, unit: str, good: DaemonGeneration, wanted: DaemonGeneration, report: str, *, again: bool
    ) -> None:
        """Back to the last healthy generation, restarted and healthy; then fail the run with the report."""
        old, new = good.version, wanted.version
        what = f"project_host {new}" if new != old else "the new unit or env file"
        self.log.warn(f"{what}: {'failed its health check before' if again else 'not healthy'}; rolling back to {old}")
        restore_generation(self.config, good, self.unit_path(), self.log)
        still_running = read_text_or(self.stamp_path()).strip() == self.generation()
        if not (again and still_running and systemctl_state("is-active", unit) == "active"):
            run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
        healthy, answer = False, ""
        deadline = time.monotonic() + self.config.service.health_timeout_s
        while not healthy and time.monotonic() < deadline:
            healthy, answer = health_answer(self.config.service.health_url, timeout_s=5)
            if not healthy:
                time.sleep(0.5)
        if not healthy:
            raise BootstrapError(
                f"{what} was not healthy, and neither is {old} after the rollback ({answer})",
                hint=f"Both versions fail here: see sudo journalctl -u {unit} -n 100 --no-pager.",
                log_tail=f"{report}\n--- after the rollback ---\n{journal_tail(unit)}",
            )
        atomic_write_text(self.stamp_path(), self.generation() + "\n", 0o644)
        if not again:
            record_failed(self.config, wanted, report, old)
        self.log.warn(f"rolled back: {unit} runs project_host {old} and is healthy ({answer})")
        raise BootstrapError(
            f"{what} was not healthy within {self.config.service.health_timeout_s}s; rolled back to {old}, "
            f"which is healthy and serving"
            + (" (this generation failed before: not restarted into it again)" if again else ""),
            hint=(
                "Publish a fixed version (a new config tries again); the health check's answer and the daemon's "
                f"journal are below. {failed_path(self.config)} records the failure (remove it to retry this config)."
            ),
            log_tail=report,
        )

    def wait_healthy(self, unit: str) -> None:
        service = self.config.service
        start = time.monotonic()
        try:
            what = wait_until_healthy(service.health_url, service.health_timeout_s)
        except BootstrapError as e:
            _, answer = health_answer(service.health_url, timeout_s=5)
            raise BootstrapError(
                e.message,
                hint=f"The daemon started but is not healthy; see sudo journalctl -u {unit} -n 100 --no-pager.",
                log_tail=f"health check: {REDACTOR(answer)}\n{journal_tail(unit)}",
            ) from None
        self.log.info(f"{service.health_url} answered {what} after {time.monotonic() - start:.1f}s")

    def report_conat(self) -> None:
        for url in self.config.conat_urls:
            why = tcp_reachable(url)
            if why is None:
                self.log.info(f"conat {url} is reachable")
            else:
                self.log.warn(f"conat {url} is not reachable from this host ({why}); the daemon will keep trying")


class FinalizeStep(Step):
    """`.bootstrap_done` with a summary of what this host runs: ours, and where
    upstream looks (/btrfs/data/.bootstrap_done, /var/lib/cocalc/.bootstrap_done)."""

    name = "finalize"
    deps = ("service", "chrony", "tunnel", "gpu")
    weight_s = 0.2
    phase = "finishing"
    hint = "The bootstrap directory must be writable."

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "host_id": c.host.id,
            "host_name": c.host.name,
            "bootstrap_version": __version__,
            "bundles": {name: spec.version for name, spec in c.artifacts.items()},
            "node": c.node.version,
            "btrfs": c.btrfs.mount_point,
            "service": c.service.unit,
        }

    def inputs(self) -> Mapping[str, Any]:
        return self.summary()

    def upstream_markers(self) -> tuple[Path, Path]:
        return data_dir(self.config) / done_marker(self.config).name, SYSTEM_DONE_MARKER

    def check(self) -> StepState:
        try:
            done = json.loads(done_marker(self.config).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return StepState(False, f"{done_marker(self.config)} is missing")
        summary = self.summary()
        same = isinstance(done, dict) and {k: done.get(k) for k in summary} == summary
        if not same:
            return StepState(False, "the host changed since the last bootstrap")
        ours = done_marker(self.config).read_text(encoding="utf-8")
        missing = [str(p) for p in self.upstream_markers() if read_text_or(p) != ours]
        if missing:
            return StepState(False, f"{', '.join(missing)} missing or stale")
        return StepState(True, f"done since {done.get('finished_at')}")

    def apply(self) -> None:
        record = {**self.summary(), "finished_at": utc_timestamp()}
        text = json.dumps(record, indent=2) + "\n"
        atomic_write_text(done_marker(self.config), text, 0o644)
        in_data, system = self.upstream_markers()
        atomic_write_text(in_data, text, 0o644)  # /btrfs/data is the user's
        write_root_file(system, text, mode=0o644)
