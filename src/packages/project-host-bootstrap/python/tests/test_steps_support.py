"""Helpers for the step tests (no tests here): a valid config rooted in a
temporary directory, a real HTTP server on 127.0.0.1 that can cut
connections and ignore Range, and tarball builders."""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import bootstrap

HOST_ID = "0b9f3c2e-6f1d-4c55-9b1a-2f3e4d5c6b7a"


def config_dict(tmp: Path, base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    home = tmp / "home"
    root = home / "cocalc-host"
    return {
        "schema_version": 1,
        "host": {"id": HOST_ID, "name": "host-1"},
        "bootstrap_user": "ubuntu",
        "home": str(home),
        "bootstrap_root": str(root),
        "bootstrap_dir": str(root / "bootstrap"),
        "arch": "amd64",
        "os": {"id": "debian", "min_version": "12"},
        "hub": {
            "url": f"{base_url}/bootstrap/h1",
            "events_url": f"{base_url}/bootstrap/h1/events",
            "secrets_url": f"{base_url}/bootstrap/h1/secrets",
        },
        "conat_urls": [f"{base_url}/conat"],
        "artifacts": {
            name: {"url": f"{base_url}/{name}/1.0.0/{name}.tar.xz", "version": "1.0.0"}
            for name in ("project_host", "project", "tools")
        },
        "node": {"version": "20.1.2", "dist_url": f"{base_url}/dist"},
        "apt": {},
        "btrfs": {"mount_point": str(tmp / "btrfs"), "image_path": str(root / "btrfs.img"), "image_size_gb": 1},
        "service": {"exec": "bin/project-host", "health_url": f"{base_url}/health"},
    }


def make_config(tmp: Path, base_url: str = "http://127.0.0.1:9", **changes: Any) -> bootstrap.Config:
    """A validated config for a host rooted at tmp/home, run by the current user.
    `changes` are merged (deeply) into the JSON before validation."""
    config = bootstrap.Config.from_dict(merged(config_dict(tmp, base_url), changes), "test")
    # the schema forbids root as the user; the tests run as whoever runs them
    return dataclasses.replace(config, bootstrap_user=getpass.getuser())


def merged(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, Mapping) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both else value
    return out


def context(config: bootstrap.Config) -> bootstrap.Context:
    return bootstrap.Context(config, bootstrap.Log(echo=False))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a real HTTP server ---------------------------------------------------------------


@dataclass
class Behaviour:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes to send before cutting, per request
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    headers_seen: list[Mapping[str, str]] = field(default_factory=list)


class Handler(http.server.BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        b = self.behaviour
        path = self.path.split("?")[0]
        b.requests.append((path, self.headers.get("Range")))
        b.headers_seen.append(dict(self.headers))
        body = b.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if m and path not in b.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cuts = b.cut_after.get(path)
        if cuts:
            n = cuts.pop(0)
            self.wfile.write(payload[:n])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection breaks mid-body
            return
        self.wfile.write(payload)


@contextmanager
def serve(behaviour: Behaviour) -> Iterator[str]:
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- tarballs -----------------------------------------------------------------------------


Member = Union[tarfile.TarInfo, tuple[str, bytes, int]]  # noqa: UP007 - a runtime alias on 3.10


def tar_bytes(members: list[Member], mode: str = "w:xz") -> bytes:
    """A tarball from (name, content, mode) files and ready-made TarInfos."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, content, file_mode = member
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(content), file_mode
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def tree(root: Path) -> dict[str, str]:
    """Every path under root (relative) -> 'dir', 'file' or 'link:<target>'."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            found[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else "file"
    return found
