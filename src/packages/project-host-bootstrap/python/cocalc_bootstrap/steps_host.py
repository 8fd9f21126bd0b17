"""Steps that prepare the host: preflight, directories, files, secrets."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .archive import decompressor_problems
from .commands import retry, run_command
from .config import Config
from .errors import MIN_PYTHON, BootstrapError
from .facts import ENV_FILE, machine_arch, passwd_entry, read_os_release, systemd_is_pid1, user_ids, version_tuple
from .fetch import DOWNLOAD_ATTEMPT_TIMEOUT_S, TransientError, http_open
from .layout import BOOTSTRAP_SUBDIRS, read_token, render_env_file, render_env_helper, render_readme, secrets_dir
from .log import add_secret
from .step import Step, StepState, atomic_write_text, file_matches, write_root_file, write_user_file

# -- the steps ------------------------------------------------------------------------


class PreflightStep(Step):
    """Is this a host we can bootstrap? Changes nothing unless everything passes."""

    name = "preflight"
    weight_s = 2.0
    phase = "checking the host"
    hint = "Fix what preflight lists (each problem says what to do); nothing was changed on the host."

    def inputs(self) -> Mapping[str, Any]:
        c = self.config
        return {
            "os": [c.os.id, c.os.min_version],
            "arch": c.arch,
            "user": c.bootstrap_user,
            "home": c.home,
            "root": c.bootstrap_root,
        }

    def check(self) -> StepState:
        problems = preflight_problems(self.config)
        if problems:
            return StepState(False, "; ".join(what for what, _ in problems))
        if not Path(self.config.bootstrap_root).is_dir():
            return StepState(False, f"{self.config.bootstrap_root} does not exist yet")
        return StepState(True, "OS, systemd, arch, user, home, sudo and python are as expected")

    def apply(self) -> None:
        problems = preflight_problems(self.config)
        if problems:
            raise BootstrapError(
                "preflight: this host cannot be bootstrapped as configured:\n"
                + "\n".join(f"  - {what}" for what, _ in problems),
                hint="\n".join(f"{what}: {fix}" for what, fix in problems),
            )
        Path(self.config.bootstrap_root).mkdir(mode=0o755, parents=True, exist_ok=True)


def preflight_problems(config: Config) -> list[tuple[str, str]]:
    """Every reason this host does not fit the config: (what is wrong, what to do)."""
    problems: list[tuple[str, str]] = []
    release = read_os_release()
    os_id, os_version = release.get("ID", "unknown"), release.get("VERSION_ID", "")
    wanted = f"{config.os.id} {config.os.min_version} or newer"
    if os_id != config.os.id or version_tuple(os_version) < version_tuple(config.os.min_version):
        problems.append(
            (
                f"this is {release.get('PRETTY_NAME', os_id)} ({os_id} {os_version or '?'}); "
                f"the config expects {wanted}",
                "Use a host made from the expected image, or fix os in the host's config.",
            )
        )
    if not systemd_is_pid1():
        problems.append(
            ("systemd is not PID 1 here", "Boot the host with systemd as init: the daemon runs as a systemd service.")
        )
    arch = machine_arch()
    if arch != config.arch:
        problems.append(
            (
                f"this machine is {arch}; the config is for {config.arch}",
                "Use the config (and bundles) for this machine's architecture.",
            )
        )
    problems += user_problems(config)
    problems += decompressor_problems(config)
    if sys.version_info < MIN_PYTHON:
        found = ".".join(map(str, sys.version_info[:3]))
        problems.append(
            (
                f"python3 is {found}; bootstrap.py needs {'.'.join(map(str, MIN_PYTHON))} or newer",
                "Use a newer OS image (Ubuntu 24.04 has 3.12).",
            )
        )
    return problems


def user_problems(config: Config) -> list[tuple[str, str]]:
    user = config.bootstrap_user
    problems: list[tuple[str, str]] = []
    if os.geteuid() == 0:
        problems.append(
            ("bootstrap.py is running as root", f"Run it as {user} (the stub drops to that user by itself).")
        )
    else:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if me != user:
            problems.append(
                (f"bootstrap.py runs as {me}, the config says {user}", f"Run it as {user}, or fix bootstrap_user.")
            )
    entry = passwd_entry(user)
    if entry is None:
        problems.append((f"user {user} does not exist", "Create it (cloud-init users:) or fix bootstrap_user."))
    elif entry.pw_dir != config.home:
        problems.append(
            (
                f"getent passwd says {user}'s home is {entry.pw_dir}; the config says {config.home}",
                "Fix home (and the paths under it) in the config.",
            )
        )
    if shutil.which("sudo") is None:
        problems.append(("sudo is not installed", "Install sudo and give the user passwordless sudo."))
    elif run_command(["true"], sudo=True, check=False, timeout_s=30).returncode != 0:
        problems.append(
            (
                f"`sudo -n true` fails for {user}",
                f"Give {user} passwordless sudo, e.g. /etc/sudoers.d/90-cocalc: `{user} ALL=(ALL) NOPASSWD:ALL`.",
            )
        )
    root = Path(config.bootstrap_root)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append((f"{existing} is not writable by {user}", f"chown -R {user}: {root} (or fix bootstrap_root)."))
    return problems


class DirectoriesStep(Step):
    """The bootstrap root's layout, owned by the user, with a README and env.sh."""

    name = "directories"
    deps = ("preflight",)
    weight_s = 0.2
    phase = "preparing"
    hint = "The bootstrap root must be writable by the bootstrap user (see preflight)."

    def dirs(self) -> list[Path]:
        root = Path(self.config.bootstrap_root)
        dirs = [root, *(root / d for d in BOOTSTRAP_SUBDIRS), Path(self.config.bootstrap_dir)]
        return list(dict.fromkeys(dirs))  # bootstrap_dir is usually root/bootstrap

    def files(self) -> dict[Path, tuple[str, int]]:
        root = Path(self.config.bootstrap_root)
        return {
            root / "README.md": (render_readme(self.config), 0o644),
            root / "bin" / "env.sh": (render_env_helper(self.config), 0o644),
        }

    def inputs(self) -> Mapping[str, Any]:
        return {"dirs": [str(d) for d in self.dirs()], "files": {str(p): c for p, (c, _) in self.files().items()}}

    def check(self) -> StepState:
        uid = user_ids(self.config.bootstrap_user)[0]
        problems = [
            f"{d} is missing or not owned by {self.config.bootstrap_user}" for d in self.dirs() if not owned_dir(d, uid)
        ]
        problems += [
            f"{p} is missing or differs" for p, (c, mode) in self.files().items() if not file_matches(p, c, mode=mode)
        ]
        return StepState(not problems, "; ".join(problems) or "all directories and files in place")

    def apply(self) -> None:
        uid, _, group = user_ids(self.config.bootstrap_user)
        for d in self.dirs():
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not owned_dir(d, uid):  # e.g. made by root by hand
                run_command(["chown", f"{self.config.bootstrap_user}:{group}", str(d)], sudo=True, timeout_s=30)
        for path, (content, mode) in self.files().items():
            if write_user_file(path, content, mode):
                self.log.info(f"wrote {path}")


def owned_dir(path: Path, uid: int) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


class FilesStep(Step):
    """/etc/cocalc/project-host.env and config/bootstrap.json, rewritten only when they differ."""

    name = "files"
    deps = ("directories",)
    weight_s = 0.5
    phase = "preparing"
    hint = "Writing /etc/cocalc needs sudo; see the failing command above."

    def config_json(self) -> str:
        return json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"

    def config_path(self) -> Path:
        return Path(self.config.bootstrap_root) / "config" / "bootstrap.json"

    def inputs(self) -> Mapping[str, Any]:
        return {"env": render_env_file(self.config), "config": self.config_json()}

    def env_ok(self) -> bool:
        gid = user_ids(self.config.bootstrap_user)[1]
        return file_matches(ENV_FILE, render_env_file(self.config), mode=0o640, uid=0, gid=gid)

    def check(self) -> StepState:
        problems = [] if self.env_ok() else [f"{ENV_FILE} is missing or differs (content, mode 0640 or owner)"]
        if not file_matches(self.config_path(), self.config_json(), mode=0o644):
            problems.append(f"{self.config_path()} is missing or differs")
        return StepState(not problems, "; ".join(problems) or "both files are up to date")

    def apply(self) -> None:
        if not self.env_ok():
            group = user_ids(self.config.bootstrap_user)[2]
            # root-owned, readable by the user's group (the daemon), by nobody else
            write_root_file(ENV_FILE, render_env_file(self.config), mode=0o640, owner="root", group=group)
            self.log.info(f"wrote {ENV_FILE}")
        if write_user_file(self.config_path(), self.config_json(), 0o644):
            self.log.info(f"wrote {self.config_path()}")


class SecretsStep(Step):
    """The secrets the config names (upstream: conat-password), fetched once with
    the bootstrap token into 0600 files in /btrfs/data/secrets (0700)."""

    name = "secrets"
    deps = ("directories", "btrfs")
    weight_s = 1.0
    phase = "preparing"
    hint = (
        "Check hub.secrets_url and that the bootstrap token (bootstrap-token) is still valid; the hub issues a new one."
    )

    def path(self, name: str) -> Path:
        return secrets_dir(self.config) / name

    def inputs(self) -> Mapping[str, Any]:
        return {"names": list(self.config.secrets), "url": self.config.hub.secrets_url}

    def missing(self) -> list[str]:
        missing = []
        for name in self.config.secrets:
            try:
                st, value = self.path(name).stat(), self.path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                missing.append(name)
                continue
            add_secret(value)  # so that nothing logs it, even when this step is skipped
            if stat.S_IMODE(st.st_mode) != 0o600 or not value.strip():
                missing.append(name)
        return missing

    def check(self) -> StepState:
        if not self.config.secrets:
            return StepState(True, "no secrets configured")
        missing = self.missing()
        return StepState(
            not missing,
            f"missing: {', '.join(missing)}" if missing else f"{len(self.config.secrets)} secret(s) present",
        )

    def apply(self) -> None:
        missing = self.missing()
        if not missing:
            return
        token = read_token(self.config.token_file)
        if token is None:
            raise BootstrapError(
                f"no bootstrap token at {self.config.token_file}",
                hint="The stub writes it; re-run the stub from the hub.",
            )
        secrets_dir(self.config).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(secrets_dir(self.config), 0o700)
        for name in missing:
            value = fetch_secret(f"{self.config.hub.secrets_url.rstrip('/')}/{name}", token)
            add_secret(value)
            atomic_write_text(self.path(name), value, 0o600)
            self.log.info(f"fetched secret {name} into {self.path(name)} (0600)")


def fetch_secret(url: str, token: str) -> str:
    def attempt() -> str:
        with http_open(
            url, timeout_s=DOWNLOAD_ATTEMPT_TIMEOUT_S, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            try:
                return response.read(64 * 1024).decode("utf-8")
            except (OSError, http.client.HTTPException, UnicodeDecodeError) as e:
                raise TransientError(f"GET {url}: {e}") from None

    value = retry(attempt, what=f"GET {url}", attempts=4, retry_if=lambda e: isinstance(e, TransientError))
    if not value.strip():
        raise BootstrapError(f"GET {url}: the hub answered with an empty secret")
    return value
