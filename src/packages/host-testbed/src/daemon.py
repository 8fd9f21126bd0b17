#!/usr/bin/env python3
"""Stand-in project-host daemon for the tests, packed as upstream's bundle is:
the single executable `cocalc-project-host` (upstream: a Node SEA) with a
`node` link to it beside it. A real server on PORT that answers GET /healthz
with 200, and that holds the host to the contract the real daemon relies on
(UPSTREAM.md 13) before it starts:

- it reads /etc/cocalc/project-host.env itself, as the real daemon does
  (KEY=VALUE lines, # lines skipped, one pair of surrounding quotes
  stripped), and refuses to start unless every key of the file has the same
  value in its process environment, which systemd set from the same file
  with EnvironmentFile=: so both readings agree on the real values;
- it refuses to start unless every key it depends on is present and real:
  DATA and TMPDIR writable, the tools bundle's binaries in COCALC_BIN_PATH,
  the project bundle's entry point, the mounted file server, the conat
  password 0600, URLs that parse, its own bundle's layout...

Each check is a function in CHECKS (env -> problems); add one there to hold
the host to more. Exit 78 (EX_CONFIG) with every problem listed on stderr
when it refuses. It listens on 127.0.0.1 (the hosts share this machine's
network), not HOST.
"""

import http.server
import json
import os
import stat
import sys
import time
import urllib.parse
from collections.abc import Callable

VERSION = "@VERSION@"
# "fail": the testbed's broken build (BundleSpec.unhealthy): it starts and listens, but /healthz answers 503.
HEALTH = "@HEALTH@"
ENV_FILE = os.environ.get("COCALC_PROJECT_HOST_ENV_FILE", "/etc/cocalc/project-host.env")
STARTED = time.time()
EXEC_NAME = "cocalc-project-host"
TOOLS = ("dropbear", "rg", "rustic", "sshpiperd")  # the tools bundle's bin/ (the testbed's stand-ins)

# Keys of UPSTREAM.md 13 this stand-in depends on (as the real daemon does).
REQUIRED = (
    "MASTER_CONAT_SERVER",
    "PROJECT_HOST_ID",
    "PROJECT_HOST_NAME",
    "PROJECT_HOST_REGION",
    "PROJECT_HOST_PUBLIC_URL",
    "PROJECT_HOST_INTERNAL_URL",
    "PROJECT_HOST_SSH_SERVER",
    "COCALC_SSH_SERVER",
    "PROJECT_RUNNER_NAME",
    "COCALC_FILE_SERVER_MOUNTPOINT",
    "DATA",
    "COCALC_DATA",
    "COCALC_LITE_SQLITE_FILENAME",
    "COCALC_PROJECT_BUNDLES",
    "COCALC_PROJECT_TOOLS",
    "COCALC_BIN_PATH",
    "COCALC_SYNC_PROJECTS",
    "COCALC_PROJECT_HOST_SOFTWARE_BASE_URL",
    "TMPDIR",
    "TMP",
    "TEMP",
    "HOST",
    "PORT",
    "COCALC_PROJECT_HOST_HTTPS",
    "DEBUG",
    "DEBUG_CONSOLE",
)
MAY_BE_EMPTY = {"PROJECT_HOST_REGION"}  # present, but a host may have no region

Env = dict[str, str]


def parse_env_file(text: str) -> Env:
    """The real daemon's reading of its env file."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def is_url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> bool:
    parsed = urllib.parse.urlsplit(value)
    return parsed.scheme in schemes and bool(parsed.hostname)


def is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


# -- the checks: each takes the environment (file + process) and lists problems ---------


def check_own_layout(env: Env) -> list[str]:
    """Run as upstream's bundle runs: <bundle>/cocalc-project-host, `node` beside it linking to it."""
    exe = os.path.realpath(sys.argv[0])
    if os.path.basename(exe) != EXEC_NAME:
        return [f"run as {exe}, not as the bundle's {EXEC_NAME}"]
    node = os.path.join(os.path.dirname(exe), "node")
    if not os.path.islink(node) or os.path.realpath(node) != exe:
        return [f"{node} is not a link to {EXEC_NAME} (the bundle's layout)"]
    return []


def check_values(env: Env) -> list[str]:
    problems = []
    for key in ("MASTER_CONAT_SERVER", "PROJECT_HOST_PUBLIC_URL", "PROJECT_HOST_INTERNAL_URL"):
        if not is_url(env[key]):
            problems.append(f"{key} {env[key]!r} is not an http(s) URL")
    if not is_url(env["COCALC_PROJECT_HOST_SOFTWARE_BASE_URL"]):
        problems.append("COCALC_PROJECT_HOST_SOFTWARE_BASE_URL is not an http(s) URL")
    for key in ("PROJECT_HOST_SSH_SERVER", "COCALC_SSH_SERVER"):
        if not is_host_port(env[key]):
            problems.append(f"{key} {env[key]!r} is not host:port")
    if env["COCALC_PROJECT_HOST_HTTPS"] not in ("0", "1"):
        problems.append("COCALC_PROJECT_HOST_HTTPS is not 0 or 1")
    elif env["COCALC_PROJECT_HOST_HTTPS"] == "1" and not env.get("COCALC_PROJECT_HOST_HTTPS_HOSTNAME"):
        problems.append("COCALC_PROJECT_HOST_HTTPS is 1 but COCALC_PROJECT_HOST_HTTPS_HOSTNAME is missing")
    if not env["PORT"].isdigit():
        problems.append(f"PORT {env['PORT']!r} is not a port")
    if "COCALC_BTRFS_IMAGE_GB" in env and not env["COCALC_BTRFS_IMAGE_GB"].isdigit():
        problems.append(f"COCALC_BTRFS_IMAGE_GB {env['COCALC_BTRFS_IMAGE_GB']!r} is not a number of GB")
    return problems


def check_data(env: Env) -> list[str]:
    problems = []
    data, mount = env["DATA"], env["COCALC_FILE_SERVER_MOUNTPOINT"]
    if env["COCALC_DATA"] != data:
        problems.append("COCALC_DATA differs from DATA")
    if not writable_dir(data):
        problems.append(f"DATA {data} is not a writable directory")
    for key in ("TMPDIR", "TMP", "TEMP"):
        if not writable_dir(env[key]) or not stat.S_IMODE(os.stat(env[key]).st_mode) & stat.S_ISVTX:
            problems.append(f"{key} {env[key]} is not a writable sticky directory")
    if not os.path.ismount(mount):
        problems.append(f"COCALC_FILE_SERVER_MOUNTPOINT {mount} is not a mount point")
    under = mount.rstrip("/") + "/"
    if not data.startswith(under):
        problems.append(f"DATA {data} is not on {mount}")
    if not os.path.isdir(os.path.dirname(env["COCALC_LITE_SQLITE_FILENAME"])):
        problems.append(f"COCALC_LITE_SQLITE_FILENAME {env['COCALC_LITE_SQLITE_FILENAME']}: no such directory")
    sync = env["COCALC_SYNC_PROJECTS"]
    if "[project_id]" not in sync or not sync.startswith(under):
        problems.append(f"COCALC_SYNC_PROJECTS {sync} is not a {mount}/...[project_id]... template")
    password = os.path.join(data, "secrets", "conat-password")
    try:
        st = os.stat(password)
        with open(password, encoding="utf-8") as f:
            empty = not f.read().strip()
        if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.getuid() or empty:
            problems.append(f"{password} is not a non-empty 0600 file of this user")
    except OSError as e:
        problems.append(f"{password}: {e.strerror}")
    return problems


def check_bundles(env: Env) -> list[str]:
    """The project bundle's current version and the tools bundle's binaries (upstream's layouts)."""
    problems = []
    current = os.path.join(env["COCALC_PROJECT_BUNDLES"], "current")
    for name in ("index.js", "package.json"):
        if not os.path.isfile(os.path.join(current, name)):
            problems.append(f"COCALC_PROJECT_BUNDLES {env['COCALC_PROJECT_BUNDLES']}: current/{name} is missing")
    for key in ("COCALC_PROJECT_TOOLS", "COCALC_BIN_PATH"):
        missing = [t for t in TOOLS if not os.access(os.path.join(env[key], t), os.X_OK)]
        if missing:
            problems.append(f"{key} {env[key]} has no executable {', '.join(missing)} (the tools bundle's bin/)")
    return problems


CHECKS: tuple[Callable[[Env], list[str]], ...] = (check_own_layout, check_values, check_data, check_bundles)


def contract_problems(env: Env, from_file: Env) -> list[str]:
    problems = []
    for key, value in from_file.items():
        if os.environ.get(key) != value:
            seen = os.environ.get(key)
            problems.append(f"{key}: the env file says {value!r} to the daemon's parser, systemd gave {seen!r}")
    missing = [k for k in REQUIRED if not env.get(k) and not (k in MAY_BE_EMPTY and k in env)]
    problems += [f"{k} is missing or empty" for k in missing]
    if missing:
        return problems
    for check in CHECKS:
        problems += check(env)
    return problems


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/healthz":
            self.send_error(404)
            return
        ok = HEALTH != "fail"
        why = {} if ok else {"error": "this build is broken on purpose: its health check fails"}
        body = json.dumps({"ok": ok, "version": VERSION, "pid": os.getpid(), "started": STARTED, **why}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("project-host: " + (format % args) + "\n")


def main() -> int:
    try:
        with open(ENV_FILE, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"project-host: cannot read {ENV_FILE} ({e.strerror}); refusing to start", file=sys.stderr)
        return 78  # EX_CONFIG
    from_file = parse_env_file(text)
    env = {**from_file, **os.environ}  # the process environment overrides the file, as upstream
    problems = contract_problems(env, from_file)
    if problems:
        print("project-host: refusing to start:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
        return 78
    port = int(env["PORT"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(
        f"project-host {VERSION} listening on 127.0.0.1:{port} ({len(from_file)} keys from {ENV_FILE})",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
