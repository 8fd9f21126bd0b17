"""Where things live on the host, and the files rendered from the config."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

from .archive import bundle_problems, read_marker
from .commands import BASE_PATH
from .config import ArtifactSpec, Config
from .facts import ENV_FILE
from .fetch import url_basename
from .log import REDACTOR
from .system import env_quote, systemd_quote

# -- where things go ---------------------------------------------------------------

BOOTSTRAP_SUBDIRS = ("bin", "bootstrap", "bundles", "config", "logs")
ARCHIVE_SUFFIX_RE = re.compile(r"(\.tar\.(?:xz|gz|zst|zstd|bz2)|\.t[gx]z|\.tzst|\.tar)$")


DONE_FILE_NAME = ".bootstrap_done"


def done_marker(config: Config) -> Path:
    """Written by the final step once the host is bootstrapped; read by `status`."""
    return Path(config.bootstrap_dir) / DONE_FILE_NAME


def read_token(path: Path) -> str | None:
    """The bootstrap token (its own 0600 file); None when it is not there."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if token:
        REDACTOR.add(token)
    return token or None


def bundles_dir(config: Config) -> Path:
    return Path(config.bootstrap_root) / "bundles"


def downloads_dir(config: Config) -> Path:
    return bundles_dir(config) / ".downloads"


def secrets_dir(config: Config) -> Path:
    return Path(config.bootstrap_root) / "config" / "secrets"


def nvm_dir(config: Config) -> Path:
    return Path(config.home) / ".nvm"


def node_dir(config: Config) -> Path:
    return nvm_dir(config) / "versions" / "node" / f"v{config.node.version}"


def artifact_archive(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    m = ARCHIVE_SUFFIX_RE.search(url_basename(spec.url))
    return downloads_dir(config) / f"{artifact}-{spec.version}{m.group(1) if m else '.archive'}"


def bundle_version_dir(config: Config, artifact: str, spec: ArtifactSpec) -> Path:
    return bundles_dir(config) / artifact / spec.version


def bundle_installed(config: Config, artifact: str, spec: ArtifactSpec) -> bool:
    """This version is completely installed (and is the artifact the config names)."""
    version_dir = bundle_version_dir(config, artifact, spec)
    marker = read_marker(version_dir)
    return (
        marker is not None
        and (spec.sha256 is None or marker.get("sha256") == spec.sha256)
        and not bundle_problems(version_dir, spec.expected_files, spec.executables)
    )


# -- rendered files ------------------------------------------------------------------


def render_env_file(config: Config) -> str:
    """/etc/cocalc/project-host.env: the daemon's environment (no secrets:
    those are files in COCALC_SECRETS_DIR). config.env wins over ours."""
    root = Path(config.bootstrap_root)
    values = {
        "COCALC_HOST_ID": config.host.id,
        "COCALC_HOST_NAME": config.host.name,
        "COCALC_HUB_URL": config.hub.url,
        "COCALC_CONAT_URL": config.conat_urls[0],
        "COCALC_CONAT_URLS": ",".join(config.conat_urls),
        "COCALC_BOOTSTRAP_ROOT": str(root),
        "COCALC_BUNDLES": str(bundles_dir(config)),
        "COCALC_BTRFS": config.btrfs.mount_point,
        "COCALC_SECRETS_DIR": str(secrets_dir(config)),
        "HOME": config.home,
        "NVM_DIR": str(nvm_dir(config)),
        "PATH": f"{node_dir(config) / 'bin'}:{BASE_PATH}",
    }
    if config.tunnel is not None:
        t = config.tunnel
        values |= {
            "COCALC_TUNNEL_HOST": t.host,
            "COCALC_TUNNEL_PORT": str(t.port),
            "COCALC_TUNNEL_USER": t.user,
            "COCALC_TUNNEL_REMOTE_PORT": str(t.remote_port),
            "COCALC_TUNNEL_LOCAL_PORT": str(t.local_port),
        }
    values |= dict(config.env)
    header = "# Written by bootstrap.py from the host's config; edits are overwritten.\n"
    return header + "".join(f"{key}={env_quote(value)}\n" for key, value in values.items())


def render_unit(config: Config, group: str) -> str:
    """The project-host daemon's systemd unit."""
    service = config.service
    exec_path = f"{bundles_dir(config)}/project_host/current/{service.exec}"
    return "\n".join(
        [
            "# Written by bootstrap.py from the host's config; edits are overwritten.",
            "[Unit]",
            "Description=CoCalc project host",
            "Wants=network-online.target",
            "After=network-online.target",
            f"RequiresMountsFor={systemd_quote(config.btrfs.mount_point)}",
            "",
            "[Service]",
            "Type=simple",
            f"User={config.bootstrap_user}",
            f"Group={group}",
            f"WorkingDirectory={systemd_quote(config.bootstrap_root)}",
            f"EnvironmentFile={ENV_FILE}",
            f"ExecStart={systemd_quote(exec_path)}",
            "Restart=on-failure",
            "RestartSec=2",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def render_readme(config: Config) -> str:
    return textwrap.dedent(
        f"""\
        This directory belongs to CoCalc's project-host bootstrap (bootstrap.py).

          bin/        helpers: env.sh (source it for node on PATH), btrfs-grow
          bootstrap/  the bootstrap itself: stub, config, token, state.json, logs of past runs
          bundles/    <artifact>/<version>, and <artifact>/current -> the version in use
          config/     bootstrap.json (the config as applied) and secrets/ (0600 files)
          logs/       bootstrap.log (JSON lines)

        The daemon runs as the systemd unit {config.service.unit}.service with
        /etc/cocalc/project-host.env; `python3 bootstrap/bootstrap.py --config
        bootstrap/bootstrap-config.json status` says how the last run went.
        Re-running the bootstrap is safe: it only changes what differs.
        """
    )


def render_env_helper(config: Config) -> str:
    q = shlex.quote
    return textwrap.dedent(
        f"""\
        # Source this (". {q(str(Path(config.bootstrap_root) / "bin" / "env.sh"))}") for the bootstrap's environment.
        export COCALC_BOOTSTRAP_ROOT={q(config.bootstrap_root)}
        export NVM_DIR={q(str(nvm_dir(config)))}
        export PATH={q(str(Path(config.bootstrap_root) / "bin"))}:{q(str(node_dir(config) / "bin"))}:"$PATH"
        """
    )
