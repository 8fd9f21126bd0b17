"""HTTP from the host: verified, resumable downloads."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .commands import retry
from .errors import BootstrapError, __version__
from .log import Log
from .step import write_user_file

# -- downloads -------------------------------------------------------------------

DOWNLOAD_CHUNK = 1 << 20
DOWNLOAD_ATTEMPTS = 8
DOWNLOAD_ATTEMPT_TIMEOUT_S = 30.0  # per socket operation: a stalled server fails the attempt
DOWNLOAD_DEADLINE_S = 1800.0
USER_AGENT = f"cocalc-bootstrap/{__version__}"
SHA256_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})(?:[ \t]+\*?(\S(?:.*\S)?))?$")
DOWNLOAD_HINT = (
    "Check that the URL answers from this host (curl -fI <url>) and that the hub's manifest is right; "
    "the partial download is kept and resumed on the next run."
)


class TransientError(BootstrapError):
    """A failure worth retrying: network errors, 5xx/429, a cut connection."""


CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")


class RedirectRefused(BootstrapError):
    """A redirect that would carry a credential to another origin, downgrade
    https to http, or re-send a POST (as a GET, or elsewhere)."""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what a credential is issued for."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1  # a malformed port never equals a real origin
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port if port is not None else default


def redirect_refusal(request: urllib.request.Request, new_url: str) -> str | None:
    """Why a redirect from request to new_url must not be followed, or None."""
    method = request.get_method()
    old, new = origin(request.full_url), origin(new_url)
    if method not in ("GET", "HEAD"):
        return f"a {method} is never re-sent, neither as a GET nor to another address"
    if new[0] not in ("http", "https"):
        return f"{new[0] or 'no'} scheme: only http and https are followed"
    if old[0] == "https" and new[0] == "http":
        return "a downgrade from https to http"
    if new != old and any(request.has_header(h) for h in CREDENTIAL_HEADERS):
        return "the request carries a credential for its own origin, never sent to another one"
    return None


class GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, minus what leaks or changes a request: see
    redirect_refusal. A credential-free GET (a public artifact) may follow a
    redirect to another origin, with any credential header stripped."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        why = redirect_refusal(req, newurl)
        if why is not None:
            fp.close()
            raise RedirectRefused(
                f"{req.get_method()} {req.full_url}: HTTP {code} redirect to {newurl} refused: {why}",
                hint="Point the config at the final URL (same origin, https stays https); "
                "nothing was sent to the redirect's target.",
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()  # urllib would turn a HEAD into a GET
        if new is not None and origin(newurl) != origin(req.full_url):
            for header in CREDENTIAL_HEADERS:
                new.remove_header(header)
        return new


def open_request(request: urllib.request.Request, timeout_s: float) -> Any:
    """urlopen with GuardedRedirects (the only way this program opens a URL
    that may carry a credential). Raises what urlopen raises, and RedirectRefused."""
    opener = urllib.request.build_opener(GuardedRedirects)
    return opener.open(request, timeout=timeout_s)


def http_open(url: str, *, timeout_s: float, headers: Mapping[str, str] | None = None) -> http.client.HTTPResponse:
    """GET url; TransientError for what a retry may fix, BootstrapError otherwise
    (RedirectRefused for a redirect that would leak or downgrade)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        response = open_request(request, timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (408, 425, 429) or e.code >= 500:
            raise TransientError(f"GET {url}: HTTP {e.code} {e.reason}", hint=DOWNLOAD_HINT) from None
        raise HttpStatusError(url, e.code, str(e.reason)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise TransientError(f"GET {url}: {reason}", hint=DOWNLOAD_HINT) from None
    assert isinstance(response, http.client.HTTPResponse)
    if (
        headers
        and any(h.lower() in ("authorization", "cookie") for h in headers)
        and (origin(response.geturl()) != origin(url))
    ):  # belt and braces: GuardedRedirects refuses this before it happens
        response.close()
        raise RedirectRefused(f"GET {url}: answered from {response.geturl()}, another origin")
    return response


class HttpStatusError(BootstrapError):
    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"GET {url}: HTTP {status} {reason}", hint=DOWNLOAD_HINT)
        self.status = status


def http_get_text(url: str, *, limit: int = 1 << 20, timeout_s: float = DOWNLOAD_ATTEMPT_TIMEOUT_S) -> str:
    """A small text resource (a checksum file), retried when transient."""

    def attempt() -> str:
        with http_open(url, timeout_s=timeout_s) as response:
            try:
                body = response.read(limit + 1)
            except (OSError, http.client.HTTPException) as e:
                raise TransientError(f"GET {url}: {e}", hint=DOWNLOAD_HINT) from None
        if len(body) > limit:
            raise BootstrapError(f"GET {url}: more than {limit} bytes; not a checksum file", hint=DOWNLOAD_HINT)
        return body.decode("utf-8", "replace")

    return retry(attempt, what=f"GET {url}", attempts=4, retry_if=lambda e: isinstance(e, TransientError))


def url_basename(url: str) -> str:
    return urllib.parse.unquote(os.path.basename(urllib.parse.urlsplit(url).path))


def parse_sha256_file(text: str, name: str) -> str:
    """The sha256 for `name` in sha256sum(1) format (`<hex>  <name>`, or a
    lone `<hex>`). Anything else, or no entry or two different ones, is an error."""
    found: set[str] = set()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        m = SHA256_LINE_RE.match(line)
        if not m:
            raise ValueError(f"not a sha256sum line: {line[:100]!r}")
        listed = m.group(2)
        if (listed is None and len(lines) == 1) or listed in (name, f"./{name}"):
            found.add(m.group(1).lower())
    if len(found) != 1:
        raise ValueError(f"{'no' if not found else 'more than one'} sha256 for {name!r}")
    return found.pop()


def published_sha256(url: str) -> str:
    """The checksum published beside an artifact, at `<url>.sha256`."""
    parts = urllib.parse.urlsplit(url)
    sha_url = urllib.parse.urlunsplit(parts._replace(path=parts.path + ".sha256"))
    hint = (
        f"Publish {url_basename(url)}.sha256 beside the artifact, or put its sha256 in the config; "
        "bootstrap.py never installs an unverified download."
    )
    try:
        text = http_get_text(sha_url, limit=64 * 1024)
    except HttpStatusError as e:
        raise BootstrapError(
            f"no checksum for {url}: the config has none and {sha_url} answered HTTP {e.status}", hint=hint
        ) from None
    try:
        return parse_sha256_file(text, url_basename(url))
    except ValueError as e:
        raise BootstrapError(f"{sha_url} is not a usable checksum file: {e}", hint=hint) from None


def fetch_to_part(url: str, part: Path, *, deadline: float, timeout_s: float) -> str:
    """One attempt: continue `part` from its current size (Range), hashing
    as it streams; returns the sha256 of the whole file. A server that
    ignores Range (200) starts the file and the hash over."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = http_open(url, timeout_s=timeout_s, headers=headers)
    except HttpStatusError as e:
        if e.status != 416:
            raise
        part.unlink()  # longer than the file: it changed upstream; start over
        raise TransientError(f"GET {url}: the partial download does not fit the file; starting over") from None
    with response:
        if offset and response.status == 206 and content_range_start(response) == offset:
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(DOWNLOAD_CHUNK):
                    digest.update(chunk)
            append = True
        else:
            digest, append, offset = hashlib.sha256(), False, 0
        length = response.getheader("Content-Length")
        try:
            received = stream_into(response, part, append, digest, deadline=deadline, url=url)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            have = part.stat().st_size if part.exists() else 0
            total = offset + int(length) if length is not None and length.isdigit() else None
            needed = None if total is None else total - have
            raise no_space_error(part, needed, what=f"downloading {url_basename(url)}") from None
    if length is not None and length.isdigit() and received != int(length):
        raise TransientError(f"GET {url}: connection closed after {offset + received} bytes; resuming")
    return digest.hexdigest()


def mount_point_of(path: Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def no_space_error(path: Path, needed_bytes: int | None, *, what: str) -> BootstrapError:
    """ENOSPC as a failure that names the file system, what is free and what is needed."""
    mount = mount_point_of(path)
    try:
        st = os.statvfs(mount)
        free = f"{human_size(st.f_bavail * st.f_frsize)} free of {human_size(st.f_blocks * st.f_frsize)}"
    except OSError:
        free = "free space unknown"
    need = f"{human_size(needed_bytes)} ({needed_bytes} bytes) more needed" if needed_bytes else "more space needed"
    return BootstrapError(
        f"no space left on the file system at {mount} while {what} into {path}: {free}, {need}",
        hint=f"Free at least {human_size(needed_bytes) if needed_bytes else 'some'} on {mount} (df -h {mount}) "
        "or give the host a bigger disk, then run the bootstrap again; the partial download is kept and resumed.",
    )


def content_range_start(response: http.client.HTTPResponse) -> int | None:
    m = re.match(r"bytes (\d+)-", response.getheader("Content-Range") or "")
    return int(m.group(1)) if m else None


def stream_into(
    response: http.client.HTTPResponse, part: Path, append: bool, digest: Any, *, deadline: float, url: str
) -> int:
    received = 0
    with open(part, "ab" if append else "wb") as f:
        while True:
            if time.monotonic() > deadline:
                raise BootstrapError(f"GET {url}: still downloading at the deadline", hint=DOWNLOAD_HINT)
            try:
                chunk = response.read1(DOWNLOAD_CHUNK)  # what has arrived: a reset loses nothing written
            except (OSError, http.client.HTTPException) as e:
                raise TransientError(f"GET {url}: {e!r} after {received} bytes; resuming") from None
            if not chunk:
                return received
            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)


def download_verified(
    url: str,
    target: Path,
    sha256: str | None,
    *,
    log: Log,
    size_bytes: int | None = None,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    attempt_timeout_s: float = DOWNLOAD_ATTEMPT_TIMEOUT_S,
) -> str:
    """Download url to target, verified: stream to `<target>.part` while
    hashing, resume after breaks, and rename to target only when the sha256
    (from the config, else `<url>.sha256`) matches. Returns the sha256."""
    expected = sha256 or published_sha256(url)
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + deadline_s
    start = time.monotonic()
    digest = retry(
        lambda: fetch_to_part(url, part, deadline=deadline, timeout_s=attempt_timeout_s),
        what=f"download {url_basename(url)}",
        attempts=DOWNLOAD_ATTEMPTS,
        deadline_s=deadline_s,
        base_s=1.0,
        max_s=15.0,
        retry_if=lambda e: isinstance(e, TransientError),
    )
    size = part.stat().st_size
    if digest != expected or (size_bytes is not None and size != size_bytes):
        part.unlink()
        raise BootstrapError(
            f"{url}: verification failed: sha256 {digest}, {size} bytes; expected sha256 {expected}"
            + (f", {size_bytes} bytes" if size_bytes is not None else ""),
            hint="The download is not the published artifact (wrong checksum in the manifest, or a broken mirror). "
            "Nothing was installed; fix the artifact or its sha256 and run again.",
        )
    os.replace(part, target)
    write_user_file(checksum_path(target), f"{digest}  {target.name}\n", 0o644)
    took = time.monotonic() - start
    log.info(f"downloaded {url_basename(url)}: {human_size(size)} in {took:.1f}s, sha256 verified", bytes=size)
    return digest


def checksum_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def verified_download(target: Path, sha256: str | None) -> bool:
    """A download we verified earlier (its .sha256 beside it) that matches sha256, when given."""
    try:
        recorded = parse_sha256_file(checksum_path(target).read_text(encoding="utf-8"), target.name)
    except (OSError, ValueError):
        return False
    return target.is_file() and (sha256 is None or recorded == sha256)


def remove_download(target: Path) -> None:
    for path in (target, checksum_path(target), target.with_name(target.name + ".part")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
