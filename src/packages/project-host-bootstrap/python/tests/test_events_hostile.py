"""Progress events against a hub that behaves like PostgreSQL and like the
hub's validation (issue 12), on a real HTTP server: text PostgreSQL refuses
(NUL, unpaired surrogates) is cleaned before it is sent, a batch the hub
refuses as invalid (400, 409, 422) is dropped with a local log line and
never blocks later events, and 5xx or a dead hub keep being retried."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from hostile_support import Answer, Origin, Seen, events_of, origin


def note(spool: bootstrap.EventSpool, text: str) -> None:
    """One event carrying `text` as its message (a failed step's message is free text)."""
    spool.emit(bootstrap.StepEndEvent(step="s", outcome=bootstrap.Outcome.FAILED, duration_s=0.0, message=text))


TOKEN = "tok-0123456789abcdef-events"  # noqa: S105 - a test token


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "SENDER_BASE_S", 0.05)
    monkeypatch.setattr(bootstrap, "SENDER_MAX_S", 0.2)


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def like_postgresql(seen: Seen) -> Answer:
    """500 for what a text/jsonb column refuses, as the hub answered before issue 12."""
    for text in strings(json.loads(seen.body)):
        if "\x00" in text:
            return 500, {}, b"invalid byte sequence: 0x00"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return 500, {}, b"unsupported Unicode escape sequence"
    return 200, {}, b'{"ok":true}'


def sender(tmp_path: Path, hub: Origin) -> tuple[bootstrap.EventSpool, bootstrap.EventSender, Path]:
    log = tmp_path / "log.jsonl"
    spool = bootstrap.EventSpool(tmp_path / "events", "run-1")
    send = bootstrap.EventSender(
        spool, url=f"{hub.url}/events", host_id="h", token=TOKEN, log=bootstrap.Log(log, echo=False)
    )
    return spool, send, log


def delivered(hub: Origin) -> list[dict[str, Any]]:
    return [e for s in hub.seen if like_postgresql(s)[0] == 200 for e in events_of([s])]


def test_nul_and_lone_surrogates_are_cleaned_before_they_are_sent(tmp_path: Path) -> None:
    with origin() as hub:
        hub.routes["/events"] = like_postgresql
        spool, send, _ = sender(tmp_path, hub)
        note(spool, "bad byte: \x00 and \udc80 from a failing command")
        note(spool, "a pair stays a pair: \U0001f600")
        note(spool, "after")
        assert send.start()
        assert send.close(5.0)
        spool.close()
    messages = [e["message"] for e in delivered(hub)]
    assert messages == [
        "bad byte: \ufffd and \ufffd from a failing command",
        "a pair stays a pair: \U0001f600",
        "after",
    ]
    assert bootstrap.sendable({"k\x00": ["\ud800"]}) == {"k\ufffd": ["\ufffd"]}


def test_a_spool_written_with_raw_escapes_is_cleaned_on_replay(tmp_path: Path) -> None:
    # An older bootstrap.py (or a torn write) left escapes PostgreSQL refuses in the spool file.
    events = tmp_path / "events"
    events.mkdir(mode=0o700)
    (events / "run-0.jsonl").write_text(
        '{"run_id":"run-0","seq":0,"ts":1,"type":"progress","message":"\\u0000\\udfff"}\n'
    )
    with origin() as hub:
        hub.routes["/events"] = like_postgresql
        spool, send, _ = sender(tmp_path, hub)
        note(spool, "now")
        assert send.start()
        assert send.close(5.0)
        spool.close()
    assert [e["message"] for e in delivered(hub)] == ["\ufffd\ufffd", "now"]


@pytest.mark.parametrize("status", [400, 409, 422])
def test_a_batch_refused_as_invalid_is_dropped_and_logged_and_later_batches_arrive(tmp_path: Path, status: int) -> None:
    def hub_route(seen: Seen) -> Answer:
        batch = json.loads(seen.body)["events"]
        if any(e.get("message") == "refused" for e in batch):
            return status, {}, b'{"error":"events[0].message: invalid"}'
        return 200, {}, b"{}"

    with origin() as hub:
        hub.routes["/events"] = hub_route
        spool, send, log = sender(tmp_path, hub)
        note(spool, "refused")
        assert send.start()
        deadline = time.monotonic() + 5
        while not hub.seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        note(spool, "later")
        assert send.close(5.0)
        spool.close()
    assert len([s for s in hub.seen if b"refused" in s.body]) == 1  # not retried
    assert [e["message"] for e in events_of(hub.seen) if e["message"] == "later"] == ["later"]
    text = log.read_text()
    assert f"HTTP {status}" in text and "dropped" in text
    assert (tmp_path / "events" / "run-1.acked").read_text().strip() == "1"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_keeps_being_retried_and_nothing_is_dropped(tmp_path: Path, status: int) -> None:
    answers = [status, status, 200]

    def hub_route(seen: Seen) -> Answer:
        return (answers.pop(0) if len(answers) > 1 else answers[0]), {}, b"{}"

    with origin() as hub:
        hub.routes["/events"] = hub_route
        spool, send, log = sender(tmp_path, hub)
        note(spool, "kept")
        assert send.start()
        assert send.close(5.0)
        spool.close()
    assert len(hub.seen) == 3
    assert [e["message"] for e in events_of(hub.seen[-1:])] == ["kept"]
    assert "dropped" not in log.read_text()


def test_a_dead_hub_is_retried_and_the_spool_kept(tmp_path: Path) -> None:
    with origin() as hub:
        url = hub.url
    log = tmp_path / "log.jsonl"
    spool = bootstrap.EventSpool(tmp_path / "events", "run-1")
    send = bootstrap.EventSender(spool, url=f"{url}/events", host_id="h", token=TOKEN, log=bootstrap.Log(log))
    note(spool, "kept")
    assert send.start()
    assert send.close(0.5) is False
    spool.close()
    assert send.failures >= 2
    assert not (tmp_path / "events" / "run-1.acked").exists()


def test_sendable_leaves_clean_values_alone() -> None:
    value = {"a": [1, 2.5, None, True, "ascii", "ünïcode ✓"]}
    assert bootstrap.sendable(value) == value
