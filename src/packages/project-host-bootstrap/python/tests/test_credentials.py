"""The host credential on the host side (credentials.py) against a real local
HTTP hub: which secret a host sends, rotation when the hub's time has come
(and never a failed run for the hub's reasons), hostile answers (hypothesis);
and reconcile mode + send-events through the command line (reconcile.py)."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bootstrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_support import (
    TOKEN,
    free_port,
    hub_server,
    make_config,
    run_driver,
    write_spec,
    write_token,
)

CRED = "cchc_" + "A" * 43
NEXT = "cchc_" + "B" * 43
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)


class CredentialHub:
    """POST /credential answers `status` with `body` (bytes); records the Authorization headers."""

    def __init__(self) -> None:
        self.status = 201
        self.body: bytes = json.dumps({"credential": NEXT, "rotate_after": "2026-07-01T00:00:00.000Z"}).encode()
        self.auth: list[str | None] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hub.auth.append(self.headers.get("Authorization"))
                self.send_response(hub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(hub.body)))
                self.end_headers()
                self.wfile.write(hub.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hosts/x"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def credential_hub() -> Iterator[CredentialHub]:
    hub = CredentialHub()
    try:
        yield hub
    finally:
        hub.close()


def config_with(root: Path, hub_url: str) -> Any:
    import dataclasses

    config = make_config(root)
    return dataclasses.replace(config, hub=dataclasses.replace(config.hub, url=hub_url))


def write_credential(
    config: Any, credential: str = CRED, rotate_after: str | None = "2026-05-01T00:00:00.000Z"
) -> Path:
    path = bootstrap.credential_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(credential + "\n")
    path.chmod(0o600)
    if rotate_after is not None:
        bootstrap.rotate_after_path(config).write_text(rotate_after + "\n")
    return path


class Records:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self) -> Any:
        log = bootstrap.Log(echo=False)
        log.info = lambda message, **f: self.lines.append(f"info {message}")  # type: ignore[method-assign]
        log.warn = lambda message, **f: self.lines.append(f"warn {message}")  # type: ignore[method-assign]
        return log


def test_a_host_sends_its_credential_else_its_token_else_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert bootstrap.host_auth(config) is None
    write_token(config)
    assert bootstrap.host_auth(config) == TOKEN
    write_credential(config)
    assert bootstrap.host_auth(config) == CRED
    bootstrap.credential_path(config).write_text("not a credential $(rm -rf /)\n")
    assert bootstrap.read_credential(config) is None
    assert bootstrap.host_auth(config) == TOKEN


def test_rotation_when_due_swaps_the_file_atomically_0600(tmp_path: Path) -> None:
    with credential_hub() as hub:
        config = config_with(tmp_path, hub.url)
        path = write_credential(config)
        rec = Records()
        assert bootstrap.rotate_if_due(config, rec.log(), now=NOW) == NEXT
        assert hub.auth == [f"Bearer {CRED}"]
        assert path.read_text() == NEXT + "\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert bootstrap.rotate_after_path(config).read_text() == "2026-07-01T00:00:00.000Z\n"
        assert any("rotated this host's credential" in line for line in rec.lines)
        assert not any(NEXT in line for line in rec.lines)
        # not due now: no request at all
        assert bootstrap.rotate_if_due(config, rec.log(), now=NOW) == NEXT
        assert len(hub.auth) == 1


def test_not_due_on_the_hub_only_moves_the_time(tmp_path: Path) -> None:
    with credential_hub() as hub:
        hub.status, hub.body = 200, b'{"credential":null,"rotate_after":"2026-08-01T00:00:00.000Z"}'
        config = config_with(tmp_path, hub.url)
        path = write_credential(config, rotate_after=None)  # unknown time: ask
        assert bootstrap.rotate_if_due(config, Records().log(), now=NOW) == CRED
        assert path.read_text() == CRED + "\n"
        assert bootstrap.rotate_after_path(config).read_text() == "2026-08-01T00:00:00.000Z\n"


def test_refused_or_unreachable_hub_keeps_the_credential_and_says_why(tmp_path: Path) -> None:
    with credential_hub() as hub:
        hub.status, hub.body = 401, b'{"error":"host credential revoked","code":"credential_revoked"}'
        config = config_with(tmp_path, hub.url)
        path = write_credential(config)
        rec = Records()
        assert bootstrap.rotate_if_due(config, rec.log(), now=NOW) == CRED
        assert any("HTTP 401, credential_revoked" in line for line in rec.lines)
        assert path.read_text() == CRED + "\n"
    down = config_with(tmp_path, f"http://127.0.0.1:{free_port()}/hosts/x")
    rec = Records()
    assert bootstrap.rotate_if_due(down, rec.log(), now=NOW, timeout_s=2) == CRED
    assert any("trying again on the next run" in line for line in rec.lines)


answers = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda c, r: json.dumps({"credential": c, "rotate_after": r}).encode(),
        st.one_of(st.none(), st.text(max_size=60), st.just(NEXT), st.just(NEXT + "\n"), st.just("cchc_" + "x" * 42)),
        st.one_of(st.none(), st.text(max_size=30), st.just("2026-07-01T00:00:00Z"), st.just("2026-13-01T00:00:00Z")),
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10), lambda c: st.lists(c, max_size=3)
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([200, 201, 202, 400, 401, 403, 404, 500]), body=answers)
def test_hostile_answers_never_fail_the_run_nor_leave_a_bad_credential(
    tmp_path: Path, status: int, body: bytes
) -> None:
    with credential_hub() as hub:
        hub.status, hub.body = status, body
        config = config_with(tmp_path, hub.url)
        path = write_credential(config)
        got = bootstrap.rotate_if_due(config, Records().log(), now=NOW)
        on_disk = path.read_text().strip()
        assert got == on_disk
        assert bootstrap.CREDENTIAL_RE.fullmatch(on_disk)
        assert on_disk in (CRED, NEXT)
        when = bootstrap.parse_time(bootstrap.rotate_after_path(config).read_text())
        assert when is not None  # still a time (the old one, or the hub's valid one)


# -- reconcile and send-events through the command line ------------------------------------


def test_reconcile_with_the_hub_down_exits_0_quickly_and_send_events_delivers_later(tmp_path: Path) -> None:
    root = tmp_path / "root"
    port = free_port()
    steps = [{"name": "prepare"}, {"name": "service", "deps": ["prepare"], "marker": True}]
    spec = write_spec(
        tmp_path / "spec.json", root=root, steps=steps, events_url=f"http://127.0.0.1:{port}/events", flush_s=30
    )
    config = make_config(root)
    write_token(config)
    result = run_driver(spec, "reconcile", timeout=25)
    assert result.returncode == 0, result.stderr
    assert "reconcile mode" in (root / "logs" / "bootstrap.log").read_text()
    spooled = list((root / "bootstrap" / "events").glob("*.jsonl"))
    assert len(spooled) == 1
    # the hub comes back: send-events delivers the reconcile run (and status still reads it)
    import test_engine_support

    hub = test_engine_support.Hub(port)
    try:
        sent = run_driver(spec, "send-events", "--timeout", "20", timeout=40)
        assert sent.returncode == 0, sent.stderr
        types = [e["type"] for e in hub.events()]
        assert types[0] == "run_start" and types[-1] == "run_end"
        assert hub.auth and all(a == f"Bearer {TOKEN}" for a in hub.auth)
    finally:
        hub.close()
    assert spooled[0].exists()  # the newest run's spool stays for `status`
    code = run_driver(spec, "status", "--json")
    assert json.loads(code.stdout)["status"] == "done"


def test_send_events_with_nothing_spooled_is_0(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with hub_server() as hub:
        spec = write_spec(tmp_path / "spec.json", root=root, steps=[{"name": "a"}], events_url=hub.url)
        result = run_driver(spec, "send-events", "--timeout", "5")
        assert result.returncode == 0, result.stderr
        assert hub.batches == []


def test_the_help_names_the_new_commands() -> None:
    help_text = bootstrap.build_parser().format_help()
    assert "reconcile" in help_text and "send-events" in help_text
    assert os.path.basename(bootstrap.__file__) == "bootstrap.py"
