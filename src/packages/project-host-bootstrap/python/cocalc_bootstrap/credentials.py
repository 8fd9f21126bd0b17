"""The host credential: what this host shows the hub, and its rotation.

The stub exchanges the user-data bootstrap token (single use) for the host's
own credential on first contact and keeps it, one line, mode 0600, in
<bootstrap_dir>/host-credential, with the time the hub wants it rotated in
host-credential.rotate-after. Everything here uses that credential (events,
secrets); only a host bootstrapped by an older stub, which has no credential,
falls back to the token file. Once the rotation time has passed, a run asks
the hub (POST <hub.url>/credential with the credential) for a successor and
swaps the file atomically; the hub keeps the old one valid for a short grace
until the new one is used. A failed rotation never fails a run: it is tried
again on the next one.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from .config import Config
from .fetch import RedirectRefused, open_request
from .layout import read_token
from .log import REDACTOR, Log
from .step import atomic_write_text

CREDENTIAL_FILE_NAME = "host-credential"
CREDENTIAL_RE = re.compile(r"cchc_[A-Za-z0-9_-]{43}")
ROTATE_TIMEOUT_S = 10.0


def credential_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / CREDENTIAL_FILE_NAME


def rotate_after_path(config: Config) -> Path:
    return Path(config.bootstrap_dir) / f"{CREDENTIAL_FILE_NAME}.rotate-after"


def read_credential(config: Config) -> str | None:
    """The host credential, or None when there is none (or the file holds something else)."""
    try:
        text = credential_path(config).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not CREDENTIAL_RE.fullmatch(text):
        return None
    REDACTOR.add(text)
    return text


def host_auth(config: Config) -> str | None:
    """What this host sends as `Authorization: Bearer`: its credential, else
    (a host set up by an older stub) its bootstrap token, else None."""
    return read_credential(config) or read_token(config.token_file)


def parse_time(text: str) -> datetime.datetime | None:
    """An ISO 8601 UTC time as the hub writes it (2026-01-01T00:00:00.000Z); None when it is not one."""
    text = text.strip()
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", text):
        return None
    try:
        return datetime.datetime.fromisoformat(text[:-1]).replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def rotation_due(config: Config, now: datetime.datetime) -> bool:
    """Due when the hub's time has passed, or when this host does not know it."""
    try:
        when = parse_time(rotate_after_path(config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        when = None
    return when is None or when <= now


def rotate_if_due(
    config: Config,
    log: Log,
    *,
    now: datetime.datetime | None = None,
    timeout_s: float = ROTATE_TIMEOUT_S,
) -> str | None:
    """The credential to use from now on: a successor when the rotation was
    due and the hub gave one, else the current one (or the token fallback).
    Never raises for the hub's reasons; says what happened in the log."""
    current = read_credential(config)
    if current is None:
        return host_auth(config)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not rotation_due(config, now):
        return current
    url = f"{config.hub.url.rstrip('/')}/credential"
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Authorization": f"Bearer {current}"})
    try:
        with open_request(request, timeout_s) as response:
            answer = json.loads(response.read(4096).decode("utf-8"))
    except urllib.error.HTTPError as e:
        code = ""
        with contextlib.suppress(Exception):
            code = str(json.loads(e.read(1024).decode("utf-8")).get("code", ""))
        log.warn(
            f"the hub refused to rotate this host's credential (HTTP {e.code}{', ' + code if code else ''}); "
            "keeping the current one",
            event="credential",
        )
        return current
    except (RedirectRefused, OSError, http.client.HTTPException, ValueError) as e:
        log.warn(f"cannot rotate this host's credential now ({e}); trying again on the next run", event="credential")
        return current
    if not isinstance(answer, dict):
        log.warn("the hub's answer to the rotation is not a JSON object; keeping the current credential")
        return current
    successor = answer.get("credential")
    rotate_after = answer.get("rotate_after")
    if successor is not None and not (isinstance(successor, str) and CREDENTIAL_RE.fullmatch(successor)):
        log.warn("the hub's answer to the rotation holds no valid credential; keeping the current one")
        return current
    if successor is not None:
        REDACTOR.add(successor)
        atomic_write_text(credential_path(config), successor + "\n", 0o600)
        log.info(f"rotated this host's credential ({credential_path(config)}, 0600)", event="credential")
    if isinstance(rotate_after, str) and parse_time(rotate_after) is not None:
        atomic_write_text(rotate_after_path(config), rotate_after.strip() + "\n", 0o600)
    return successor or current
