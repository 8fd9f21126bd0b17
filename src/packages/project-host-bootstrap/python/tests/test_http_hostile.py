"""HTTP from the host against hostile or broken servers (issue 12), with
real servers on 127.0.0.1 (two ports = two origins; TLS with a throwaway
certificate): a credential never reaches another origin, a secret fetched
through a cross-origin redirect is never stored, a POST is never re-sent as
a GET or elsewhere (so a redirected events POST is not delivered), https is
never downgraded, and a public artifact may still follow a redirect."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from pathlib import Path

import bootstrap
import pytest
from hostile_support import Origin, events_of, origin, redirect, self_signed
from test_steps_support import context, make_config


def note(spool: bootstrap.EventSpool, text: str) -> None:
    """One event carrying `text` as its message (a failed step's message is free text)."""
    spool.emit(bootstrap.StepEndEvent(step="s", outcome=bootstrap.Outcome.FAILED, duration_s=0.0, message=text))


TOKEN = "tok-0123456789abcdef-hostile"  # noqa: S105 - a test token


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "SENDER_BASE_S", 0.05)
    monkeypatch.setattr(bootstrap, "SENDER_MAX_S", 0.2)


def secrets_step(tmp_path: Path, hub: Origin) -> tuple[bootstrap.SecretsStep, Path]:
    config = make_config(tmp_path, hub.url, secrets=["conat-password"])
    Path(config.bootstrap_dir).mkdir(parents=True)
    config.token_file.write_text(TOKEN + "\n")
    return bootstrap.SecretsStep(context(config)), bootstrap.secrets_staging_dir(config)  # where it writes


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_secret_behind_a_cross_origin_redirect_is_refused_and_never_stored(tmp_path: Path, code: int) -> None:
    with origin() as hub, origin() as thief:
        thief.routes["/steal"] = (200, {}, b"attacker-chosen-secret")
        hub.routes["/bootstrap/h1/secrets/conat-password"] = redirect(f"{thief.url}/steal", code)
        step, secrets = secrets_step(tmp_path, hub)
        with pytest.raises(bootstrap.BootstrapError) as failure:
            step.apply()
    assert "credential" in failure.value.message and f"HTTP {code}" in failure.value.message
    assert thief.seen == []  # not even a request without the token
    assert hub.seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert not (secrets / "conat-password").exists()


def test_a_same_origin_redirect_keeps_the_credential(tmp_path: Path) -> None:
    with origin() as hub:
        hub.routes["/bootstrap/h1/secrets/conat-password"] = redirect("/v2/secrets/conat-password")
        hub.routes["/v2/secrets/conat-password"] = (200, {}, b"the-real-secret-value")
        step, secrets = secrets_step(tmp_path, hub)
        step.apply()
    assert (secrets / "conat-password").read_text() == "the-real-secret-value"
    assert [s.headers.get("Authorization") for s in hub.seen] == [f"Bearer {TOKEN}"] * 2


def test_a_public_artifact_follows_a_cross_origin_redirect_without_credentials(tmp_path: Path) -> None:
    data = b"artifact bytes" * 1000
    with origin() as hub, origin() as cdn:
        cdn.routes["/a.tar.xz"] = (200, {}, data)
        hub.routes["/project/a.tar.xz"] = redirect(f"{cdn.url}/a.tar.xz")
        target = tmp_path / "a.tar.xz"
        bootstrap.download_verified(
            f"{hub.url}/project/a.tar.xz", target, hashlib.sha256(data).hexdigest(), log=bootstrap.Log(echo=False)
        )
    assert target.read_bytes() == data
    assert all("Authorization" not in s.headers for s in cdn.seen)


def test_credential_headers_are_stripped_when_a_credential_free_request_changes_origin(tmp_path: Path) -> None:
    # Only requests with a credential are refused; a Cookie-free, token-free GET follows, and
    # GuardedRedirects strips what a caller might have added under another name.
    with origin() as a, origin() as b:
        b.routes["/x"] = (200, {}, b"ok")
        a.routes["/x"] = redirect(f"{b.url}/x")
        with bootstrap.http_open(f"{a.url}/x", timeout_s=5, headers={"X-Trace": "1"}) as response:
            assert response.read() == b"ok"
    assert b.seen[0].headers.get("X-Trace") == "1"
    assert "Authorization" not in b.seen[0].headers and "Cookie" not in b.seen[0].headers


def test_https_is_never_downgraded_to_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = self_signed(tmp_path)
    if tls is None:
        pytest.skip("openssl is not installed (apt-get install openssl): cannot make a TLS test server")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))  # trust the throwaway certificate, for this test only
    with origin(tls) as secure, origin() as plain:
        plain.routes["/a.tar.xz"] = (200, {}, b"downgraded")
        secure.routes["/ok"] = (200, {}, b"fine")
        secure.routes["/a.tar.xz"] = redirect(f"{plain.url}/a.tar.xz")
        with bootstrap.http_open(f"{secure.url}/ok", timeout_s=5) as response:
            assert response.read() == b"fine"  # the TLS server really is trusted
        with pytest.raises(bootstrap.BootstrapError) as failure:
            bootstrap.http_open(f"{secure.url}/a.tar.xz", timeout_s=5)
    assert "downgrade from https to http" in failure.value.message
    assert plain.seen == []


@pytest.mark.parametrize("code", [302, 303, 307])
def test_a_redirected_events_post_is_not_delivered(tmp_path: Path, code: int) -> None:
    log_path = tmp_path / "log.jsonl"
    with origin() as hub, origin() as other:
        other.routes["/events"] = (200, {}, b'{"ok":true}')
        hub.routes["/events"] = redirect(f"{other.url}/events", code)
        spool = bootstrap.EventSpool(tmp_path / "events", "run-1")
        note(spool, "hello")
        sender = bootstrap.EventSender(
            spool, url=f"{hub.url}/events", host_id="h", token=TOKEN, log=bootstrap.Log(log_path, echo=False)
        )
        assert sender.start()
        time.sleep(0.5)
        assert sender.close(0.5) is False
        spool.close()
    assert other.seen == []  # neither as a GET nor as a POST, with or without the token
    assert len(hub.seen) >= 2 and all(s.method == "POST" for s in hub.seen)  # retried, still POSTs
    assert not (tmp_path / "events" / "run-1.acked").exists()
    assert "redirect" in log_path.read_text() and "never re-sent" in log_path.read_text()


def test_nothing_is_sent_to_another_origin_across_a_whole_events_flush(tmp_path: Path) -> None:
    with origin() as hub:
        hub.routes["/events"] = (200, {}, b"{}")
        spool = bootstrap.EventSpool(tmp_path / "events", "run-1")
        for i in range(5):
            note(spool, f"m{i}")
        sender = bootstrap.EventSender(
            spool, url=f"{hub.url}/events", host_id="h", token=TOKEN, log=bootstrap.Log(echo=False)
        )
        assert sender.start()
        assert sender.close(5.0)
        spool.close()
    assert [e["message"] for e in events_of(hub.seen)] == [f"m{i}" for i in range(5)]


def test_every_redirect_combination_keeps_credentials_and_methods_where_they_belong() -> None:
    # The whole matrix, against real servers: method x status x same/cross origin x credential.
    with origin() as first, origin() as second:
        for method in ("GET", "HEAD", "POST"):
            for code in (301, 302, 303, 307, 308):
                for target in (first, second):
                    for credential in (True, False):
                        target.seen.clear()
                        first.seen.clear()
                        target.routes["/final"] = (200, {}, b"final")
                        first.routes["/start"] = redirect(f"{target.url}/final", code)
                        headers = {"Authorization": f"Bearer {TOKEN}"} if credential else {}
                        request = urllib.request.Request(
                            f"{first.url}/start",
                            data=b"{}" if method == "POST" else None,
                            method=method,
                            headers=headers,
                        )
                        case = f"{method} {code} {'same' if target is first else 'cross'} credential={credential}"
                        followed = method != "POST" and (target is first or not credential)
                        try:
                            with bootstrap.open_request(request, 5) as response:
                                response.read()
                            assert followed, case
                        except bootstrap.RedirectRefused:
                            assert not followed, case
                        arrived = [s for s in target.seen if s.path == "/final"]
                        assert len(arrived) == (1 if followed else 0), case
                        for seen in arrived:
                            assert seen.method == method, case  # never turned into another method
                            if target is second:
                                assert "Authorization" not in seen.headers, case
