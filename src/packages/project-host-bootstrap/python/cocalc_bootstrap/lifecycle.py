"""Upgrades in place: the daemon's last healthy generation (for a rollback), and keep-N pruning.

An upgrade is an ordinary run with a new config: the new bundle version is
installed beside the old one, `current` swapped (the install steps), and the
daemon restarted only when its unit, env file or bundle changed (the service
step). This module adds what makes that safe:

- After every healthy (re)start the service step records the daemon's
  *generation* as it was then (project_host version, unit text, env file text)
  in <bootstrap_dir>/daemon-good.json. The env file holds no secrets.
- When the new generation is not healthy within service.health_timeout_s, the
  service step swaps project_host's `current` back to the recorded version,
  restores the unit and env file, restarts the daemon, waits for it to be
  healthy, and fails the run with the health check's output (its last answer,
  the answer's body, the journal). The failed generation is recorded in
  <bootstrap_dir>/daemon-failed.json: a later run with the same config rolls
  back at once instead of restarting the daemon into the same failure (a host
  rebooting with the bad config stays up); a new config tries again.
- Versions are pruned by the `prune` step, which runs only after the daemon
  is healthy (so a rollback's target is never gone): per artifact the newest
  `keep_versions` installs (by install time, `current` always among them) are
  kept, and a version something uses (a process's cwd, executable, open or
  mapped file inside it) is kept and tried again when the versions change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .archive import INSTALLED_MARKER, point_symlink
from .commands import run_command
from .config import VERSION_RE, Config
from .facts import ENV_FILE, read_text_or, user_ids
from .fetch import USER_AGENT
from .images import IMAGE_SUFFIX, IMAGES_DIR, image_record, mounted_image, remove_image
from .layout import bundles_dir
from .log import REDACTOR, Log, output_tail, utc_timestamp
from .step import Step, StepState, atomic_write_text, write_root_file
from .steps_install import read_link

GOOD_FILE_NAME = "daemon-good.json"
FAILED_FILE_NAME = "daemon-failed.json"
PRUNE_BUSY_FILE_NAME = "prune-busy.json"
PRUNING_PREFIX = ".pruning-"
HEALTH_BODY_LIMIT = 2000


# -- the daemon's generations ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DaemonGeneration:
    """What the daemon runs with: its bundle version, its unit and its env file."""

    version: str
    unit: str
    env: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def good_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / GOOD_FILE_NAME


def failed_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / FAILED_FILE_NAME


def read_json_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_good(config: Config) -> DaemonGeneration | None:
    data = read_json_record(good_path(config))
    if data is None or not all(isinstance(data.get(k), str) for k in ("version", "unit", "env")):
        return None
    return DaemonGeneration(version=data["version"], unit=data["unit"], env=data["env"])


def record_good(config: Config, generation: DaemonGeneration) -> None:
    record = {**dataclasses.asdict(generation), "healthy_at": utc_timestamp()}
    atomic_write_text(good_path(config), json.dumps(record, indent=1) + "\n", 0o600)
    failed_path(config).unlink(missing_ok=True)


def record_failed(config: Config, generation: DaemonGeneration, report: str, rolled_back_to: str) -> None:
    record = {
        "digest": generation.digest(),
        "version": generation.version,
        "rolled_back_to": rolled_back_to,
        "failed_at": utc_timestamp(),
        "report": report,
    }
    atomic_write_text(failed_path(config), json.dumps(record, indent=1) + "\n", 0o600)


def failed_before(config: Config, generation: DaemonGeneration) -> dict[str, Any] | None:
    """The record of this very generation's earlier failed health check, or None."""
    data = read_json_record(failed_path(config))
    return data if data is not None and data.get("digest") == generation.digest() else None


def health_answer(url: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, what it answered: status and the start of the body) of one GET."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(HEALTH_BODY_LIMIT)
            status = int(response.status)
    except urllib.error.HTTPError as e:
        body, status = e.read(HEALTH_BODY_LIMIT), e.code
        e.close()
    except OSError as e:
        return False, f"no answer ({getattr(e, 'reason', None) or e})"
    text = body.decode("utf-8", "replace").strip()
    return 200 <= status < 300, f"HTTP {status}" + (f": {text}" if text else "")


def restore_generation(config: Config, good: DaemonGeneration, unit_path: Path, log: Log) -> None:
    """Put the recorded generation back: project_host's `current`, the unit, the env file."""
    current = bundles_dir(config) / "project_host" / "current"
    if point_symlink(current, good.version):
        log.warn(f"project_host/current -> {good.version} (rolled back)")
    if read_text_or(unit_path) != good.unit:
        write_root_file(unit_path, good.unit, mode=0o644)
        log.warn(f"restored {unit_path}")
    if read_text_or(ENV_FILE) != good.env:
        group = user_ids(config.bootstrap_user)[2]
        write_root_file(ENV_FILE, good.env, mode=0o640, owner="root", group=group)
        log.warn(f"restored {ENV_FILE}")
    run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)


def journal_tail(unit: str) -> str:
    journal = run_command(["journalctl", "-u", unit, "-n", "40", "--no-pager"], sudo=True, check=False, timeout_s=60)
    return output_tail(REDACTOR(journal.output))


# -- pruning -----------------------------------------------------------------------


def installed_versions(config: Config, artifact: str) -> dict[str, float]:
    """Every installed version of `artifact` (extracted or a stored image) and when it was installed."""
    found: dict[str, float] = {}
    root = bundles_dir(config) / artifact
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_symlink() or not VERSION_RE.fullmatch(entry.name):
                continue
            for witness in (entry / INSTALLED_MARKER, image_record(artifact, entry.name)):
                try:
                    found[entry.name] = max(found.get(entry.name, 0.0), witness.stat().st_mtime)
                except OSError:
                    continue
    store = IMAGES_DIR / artifact
    if store.is_dir():
        for image in store.glob(f"*{IMAGE_SUFFIX}"):
            version = image.name[: -len(IMAGE_SUFFIX)]
            if VERSION_RE.fullmatch(version) and version not in found:
                try:
                    found[version] = image.stat().st_mtime
                except OSError:
                    continue
    return found


def versions_to_keep(installed: Mapping[str, float], current: str | None, previous: str | None, keep: int) -> set[str]:
    """`keep` versions: `current`, then `previous` (the one it replaced: the last healthy one,
    where a rollback goes), then the most recently installed others."""
    kept: set[str] = set()
    for version in (current, previous):
        if version is not None and version in installed and len(kept) < keep:
            kept.add(version)
    for version in sorted(installed, key=lambda v: (installed[v], v), reverse=True):
        if len(kept) >= keep:
            break
        kept.add(version)
    return kept


def processes_using(dirs: Sequence[Path]) -> dict[Path, str]:
    """Which of `dirs` a process uses (its cwd, executable, an open or a mapped file inside),
    as root sees it: dir -> 'PID n'. The scan is one `find` over /proc."""
    if not dirs:
        return {}
    found = run_command(
        [
            "find",
            "/proc",
            "-mindepth",
            "2",
            "-maxdepth",
            "3",
            "(",
            "-path",
            "/proc/[0-9]*/cwd",
            "-o",
            "-path",
            "/proc/[0-9]*/exe",
            "-o",
            "-path",
            "/proc/[0-9]*/fd/*",
            "-o",
            "-path",
            "/proc/[0-9]*/map_files/*",
            ")",
            "-printf",
            r"%p\t%l\n",
        ],
        sudo=True,
        check=False,
        timeout_s=120,
    )
    ours = {str(os.getpid())}
    using: dict[Path, str] = {}
    for line in found.output.splitlines():
        where, _, target = line.partition("\t")
        pid = where.split("/")[2] if where.count("/") >= 2 else ""
        if pid in ours or not target.startswith("/"):
            continue
        target = target.removesuffix(" (deleted)")
        for d in dirs:
            if d not in using and (target == str(d) or target.startswith(f"{d}/")):
                using[d] = f"PID {pid}"
    return using


def remove_extracted(where: Path, log: Log) -> None:
    """An extracted version: renamed aside first (never half a version under its name), then removed."""
    aside = where.with_name(f"{PRUNING_PREFIX}{where.name}-{os.getpid()}")
    os.rename(where, aside)
    run_command(["chmod", "-R", "u+rwX", str(aside)], check=False, timeout_s=300)
    run_command(["rm", "-rf", "--one-file-system", str(aside)], timeout_s=600)
    log.info(f"pruned {where}")


class PruneStep(Step):
    """Installed versions beyond keep_versions per artifact, removed once the daemon is healthy."""

    name = "prune"
    deps = ("service",)
    weight_s = 0.5
    phase = "finishing"
    hint = "A version could not be removed (see the message); the host runs fine, a later run tries again."

    def busy_path(self) -> Path:
        return Path(self.config.bootstrap_dir) / PRUNE_BUSY_FILE_NAME

    def inputs(self) -> Mapping[str, Any]:
        return {
            "keep_versions": self.config.keep_versions,
            "versions": {name: spec.version for name, spec in self.config.artifacts.items()},
        }

    def prunable(self) -> dict[str, list[str]]:
        """artifact -> versions beyond the keep set (oldest first)."""
        out: dict[str, list[str]] = {}
        for artifact, _ in self.config.artifacts.items():
            installed = installed_versions(self.config, artifact)
            current = read_link(bundles_dir(self.config) / artifact / "current")
            previous = read_link(bundles_dir(self.config) / artifact / "previous")
            keep = versions_to_keep(installed, current, previous, self.config.keep_versions)
            extra = sorted((v for v in installed if v not in keep), key=lambda v: installed[v])
            if extra:
                out[artifact] = extra
        return out

    def busy(self) -> dict[str, list[str]]:
        data = read_json_record(self.busy_path()) or {}
        return {a: [v for v in vs if isinstance(v, str)] for a, vs in data.items() if isinstance(vs, list)}

    def check(self) -> StepState:
        busy = self.busy()
        waiting = {a: [v for v in vs if v not in busy.get(a, [])] for a, vs in self.prunable().items()}
        waiting = {a: vs for a, vs in waiting.items() if vs}
        if waiting:
            listed = "; ".join(f"{a}: {', '.join(vs)}" for a, vs in waiting.items())
            return StepState(False, f"versions beyond keep_versions={self.config.keep_versions}: {listed}")
        held = sum(len(vs) for vs in busy.values())
        kept = f" ({held} in use, kept until the versions change)" if held else ""
        return StepState(True, f"at most {self.config.keep_versions} version(s) per artifact{kept}")

    def apply(self) -> None:
        self.remove_leftovers()
        prunable = self.prunable()
        dirs = {(a, v): bundles_dir(self.config) / a / v for a, vs in prunable.items() for v in vs}
        using = processes_using(list(dirs.values()))
        busy: dict[str, list[str]] = {}
        for (artifact, version), where in dirs.items():
            if where in using:
                self.log.warn(f"{artifact} {version} is in use ({using[where]}); kept, a later upgrade prunes it")
                busy.setdefault(artifact, []).append(version)
            elif mounted_image(where) is not None or image_record(artifact, version).exists():
                if not remove_image(self.config, artifact, version, self.log):
                    busy.setdefault(artifact, []).append(version)
            elif where.exists():
                remove_extracted(where, self.log)
            previous = bundles_dir(self.config) / artifact / "previous"
            if read_link(previous) == version and not where.exists():
                previous.unlink()
        atomic_write_text(self.busy_path(), json.dumps(busy, indent=1, sort_keys=True) + "\n", 0o644)

    def remove_leftovers(self) -> None:
        """Versions a killed prune had set aside (renamed, so never used again)."""
        for artifact, _ in self.config.artifacts.items():
            root = bundles_dir(self.config) / artifact
            for leftover in root.glob(f"{PRUNING_PREFIX}*") if root.is_dir() else ():
                run_command(["chmod", "-R", "u+rwX", str(leftover)], check=False, timeout_s=300)
                run_command(["rm", "-rf", "--one-file-system", str(leftover)], timeout_s=600)
                self.log.info(f"removed {leftover} (left by a killed prune)")
