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
from .system import env_line, systemd_quote

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
    """Where upstream's daemon reads its secrets (conat-password): /btrfs/data/secrets, 0700."""
    return Path(config.btrfs.mount_point) / "data" / "secrets"


def secrets_staging_dir(config: Config) -> Path:
    """Where the secrets step puts what it fetched (0700, files 0600) until
    /btrfs is mounted and install_secrets moves them to secrets_dir()."""
    return Path(config.bootstrap_dir) / "secrets-staging"


def btrfs_image_part(config: Config) -> Path:
    """Where the loop image is made (truncate + mkfs.btrfs) before it is renamed
    to btrfs.image_path: a killed mkfs leaves only this, which the next run removes."""
    image = Path(config.btrfs.image_path)
    return image.with_name(image.name + ".part")


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


# Where upstream (the daemon, the self-host connector, the hub) looks for things.
GROW_HELPER = Path("/usr/local/sbin/cocalc-grow-btrfs")
GROW_UNIT = "cocalc-grow-btrfs"
SYSTEM_DONE_MARKER = Path("/var/lib/cocalc") / DONE_FILE_NAME
SSH_PORT = 2222


def data_dir(config: Config) -> Path:
    """/btrfs/data: the daemon's DATA (a subvolume owned by the user)."""
    return Path(config.btrfs.mount_point) / "data"


def data_tmp_dir(config: Config) -> Path:
    return data_dir(config) / "tmp"


def image_size_gb(config: Config) -> int:
    """The loop image's size as recorded: the configured size, or more once
    cocalc-grow-btrfs grew the image (it never shrinks)."""
    try:
        actual = Path(config.btrfs.image_path).stat().st_size // 2**30
    except OSError:
        actual = 0
    return max(config.btrfs.image_size_gb, actual)


def daemon_urls(config: Config) -> tuple[str | None, str | None, str | None]:
    """(public URL, internal URL, ssh server) as upstream derives them:
    the host record's values, else from the public IP."""
    d = config.daemon
    ip = d.public_ip
    host = None if ip is None else (f"[{ip}]" if ":" in ip else ip)
    tunnel = f"https://{config.cloudflared.hostname}" if config.cloudflared else None
    public = tunnel or d.public_url or (f"https://{host}" if host else None)
    internal = d.internal_url or public
    ssh = d.ssh_server or (f"{host}:{SSH_PORT}" if host else None)
    return public, internal, ssh


def daemon_env(config: Config) -> dict[str, str]:
    """The keys the real daemon reads (UPSTREAM 13), from this project's layout;
    then config.env (the hub's extra entries), which wins."""
    mp = config.btrfs.mount_point
    d = config.daemon
    public, internal, ssh = daemon_urls(config)
    # behind a tunnel: cloudflared's port, and no TLS (cloudflared terminates it)
    port, https = (config.cloudflared.port, False) if config.cloudflared else (d.port, d.https)
    tools = str(bundles_dir(config) / "tools" / "current")
    values = {
        "MASTER_CONAT_SERVER": config.conat_urls[0],
        "PROJECT_HOST_ID": config.host.id,
        "PROJECT_HOST_NAME": config.host.name,
        "PROJECT_HOST_REGION": d.region,
        "PROJECT_HOST_PUBLIC_URL": public,
        "PROJECT_HOST_INTERNAL_URL": internal,
        "PROJECT_HOST_SSH_SERVER": ssh,
        "COCALC_SSH_SERVER": f"0.0.0.0:{SSH_PORT}",
        "PROJECT_RUNNER_NAME": "0",
        "COCALC_FILE_SERVER_MOUNTPOINT": mp,
        "DATA": str(data_dir(config)),
        "COCALC_DATA": str(data_dir(config)),
        "COCALC_LITE_SQLITE_FILENAME": str(data_dir(config) / "sqlite.db"),
        "COCALC_PROJECT_BUNDLES": str(bundles_dir(config) / "project"),
        "COCALC_PROJECT_TOOLS": tools,
        "COCALC_BIN_PATH": tools,
        "COCALC_SYNC_PROJECTS": f"{mp}/project-[project_id]/.local/share/cocalc/persist",
        "COCALC_BTRFS_IMAGE_GB": None if config.btrfs.data_disk else str(image_size_gb(config)),
        "COCALC_PROJECT_HOST_SOFTWARE_BASE_URL": d.software_base_url,
        "TMPDIR": str(data_tmp_dir(config)),
        "TMP": str(data_tmp_dir(config)),
        "TEMP": str(data_tmp_dir(config)),
        "HOST": "0.0.0.0",  # noqa: S104 (the daemon serves the world, as upstream)
        "PORT": str(port),
        "COCALC_PROJECT_HOST_HTTPS": "1" if https else "0",
        "COCALC_PROJECT_HOST_HTTPS_HOSTNAME": d.https_hostname if https else None,
        "DEBUG": "cocalc:*",
        "DEBUG_CONSOLE": "yes",
        # ours: where the bootstrap keeps things, and node on PATH
        "COCALC_BOOTSTRAP_ROOT": config.bootstrap_root,
        "HOME": config.home,
        "NVM_DIR": str(nvm_dir(config)),
        "PATH": f"{node_dir(config) / 'bin'}:{BASE_PATH}",
    }
    out = {key: value for key, value in values.items() if value is not None}
    out |= dict(config.env)
    return out


def render_env_file(config: Config) -> str:
    """/etc/cocalc/project-host.env: the daemon's environment (no secrets:
    those are files in /btrfs/data/secrets). Read the same by systemd's
    EnvironmentFile= and by the daemon's own parser (see env_line)."""
    header = "# Written by bootstrap.py from the host's config; edits are overwritten.\n"
    return header + "".join(env_line(key, value) + "\n" for key, value in daemon_env(config).items())


def render_unit(config: Config, group: str) -> str:
    """The project-host daemon's systemd unit: in the foreground, as the user,
    after /btrfs is mounted and cocalc-grow-btrfs has run."""
    service = config.service
    exec_path = f"{bundles_dir(config)}/project_host/current/{service.exec}"
    argv = " ".join(systemd_quote(a) for a in (exec_path, *service.args))
    port = config.cloudflared.port if config.cloudflared else config.daemon.port
    caps = ["AmbientCapabilities=CAP_NET_BIND_SERVICE"] if port < 1024 else []
    return "\n".join(
        [
            "# Written by bootstrap.py from the host's config; edits are overwritten.",
            "[Unit]",
            "Description=CoCalc project host",
            f"Wants=network-online.target {GROW_UNIT}.service",
            f"After=network-online.target {GROW_UNIT}.service",
            f"RequiresMountsFor={systemd_quote(config.btrfs.mount_point)}",
            "",
            "[Service]",
            "Type=simple",
            f"User={config.bootstrap_user}",
            f"Group={group}",
            f"WorkingDirectory={systemd_quote(config.bootstrap_root)}",
            f"EnvironmentFile={ENV_FILE}",
            f"ExecStart={argv}",
            *caps,
            "Restart=on-failure",
            "RestartSec=2",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


CLOUDFLARED_DIR = Path("/etc/cloudflared")
CLOUDFLARED_TOKEN_ENV = CLOUDFLARED_DIR / "token.env"
CLOUDFLARED_CONFIG = CLOUDFLARED_DIR / "config.yml"
CLOUDFLARED_UNIT = "cocalc-cloudflared"
TUNNEL_TOKEN_RE = re.compile(r"[A-Za-z0-9+/=_.-]{16,4096}")


def render_cloudflared_config(hostname: str, port: int) -> str:
    """Ingress to the daemon's port, everything else 404 (upstream's config.yml)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "ingress:",
            f"  - hostname: {hostname}",
            f"    service: http://localhost:{port}",
            "  - service: http_status:404",
            "",
        ]
    )


def render_cloudflared_unit() -> str:
    """cloudflared reads the token from TUNNEL_TOKEN (the 0600 env file): never on
    its command line, where `ps` would show it (the old unit's mistake)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Cloudflare tunnel to the CoCalc project host",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"EnvironmentFile={CLOUDFLARED_TOKEN_ENV}",
            f"ExecStart=/usr/bin/cloudflared --no-autoupdate --config {CLOUDFLARED_CONFIG} tunnel run",
            "Restart=always",
            "RestartSec=5",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def render_grow_unit(config: Config) -> str:
    """Runs cocalc-grow-btrfs at every boot, before the daemon (as the old start script did)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            f"Description=Grow the btrfs filesystem at {config.btrfs.mount_point} to fill its disk or image",
            f"RequiresMountsFor={systemd_quote(config.btrfs.mount_point)}",
            f"Before={config.service.unit}.service",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            f"ExecStart={GROW_HELPER}",
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

          bin/        helpers: env.sh (source it for node on PATH)
          bootstrap/  the bootstrap itself: stub, config, token, state.json, logs of past runs
          bundles/    <artifact>/<version>, and <artifact>/current -> the version in use
          config/     bootstrap.json (the config as applied); secrets are in /btrfs/data/secrets
          logs/       bootstrap.log (JSON lines)

        The daemon runs as the systemd unit {config.service.unit}.service with
        /etc/cocalc/project-host.env; sudo {GROW_HELPER} [GB] grows /btrfs; `python3 bootstrap/bootstrap.py --config
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
