#!/usr/bin/env python3
"""Stand-in project-host daemon for the tests: a real server on the port
from its environment that answers GET /healthz with 200.

It refuses to start without its env file, like the real daemon, so a unit
that starts before the bootstrap wrote the file fails loudly."""

import http.server
import json
import os
import sys
import time
import urllib.parse

VERSION = "@VERSION@"
ENV_FILE = os.environ.get("COCALC_PROJECT_HOST_ENV_FILE", "/etc/cocalc/project-host.env")
STARTED = time.time()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/healthz":
            self.send_error(404)
            return
        body = json.dumps({"ok": True, "version": VERSION, "pid": os.getpid(), "started": STARTED}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("project-host: " + (format % args) + "\n")


def listen_port() -> int:
    """The port of the host's internal URL (what the hub health-checks), else PORT."""
    internal = os.environ.get("COCALC_HOST_INTERNAL_URL", "")
    if internal:
        parsed = urllib.parse.urlsplit(internal)
        if parsed.port:
            return parsed.port
    return int(os.environ.get("PORT") or "9001")


def main() -> int:
    if not os.path.isfile(ENV_FILE):
        print(f"project-host: {ENV_FILE} is missing; refusing to start", file=sys.stderr)
        return 78  # EX_CONFIG
    port = listen_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"project-host {VERSION} listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
