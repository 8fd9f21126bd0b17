"""Progress events against a real HTTP server on 127.0.0.1: order, outages,
a hub that never answers, replay after bootstrap.py is killed, and the
hub's own schema (src/events.ts, through tsx) accepting every event."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import (
    TOKEN,
    Hub,
    applied,
    free_port,
    hub_server,
    make_config,
    make_steps,
    run_driver,
    start_driver,
    write_spec,
    write_token,
)

PACKAGE_DIR = Path(__file__).resolve().parents[2]
STEPS: list[dict[str, Any]] = [
    {"name": "first", "sleep": 0.1},
    {"name": "second", "deps": ["first"], "sleep": 0.1},
    {"name": "third", "sleep": 0.2},
    {"name": "last", "deps": ["second", "third"]},
]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "SENDER_BASE_S", 0.05)
    monkeypatch.setattr(bootstrap, "SENDER_MAX_S", 0.2)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    def go(url: str, specs: Sequence[dict[str, Any]] = STEPS, *, flush_s: float = 5.0, token: bool = True) -> int:
        config = make_config(tmp_path / "root", events_url=url)
        if token:
            write_token(config)
        monkeypatch.setattr(bootstrap, "load_config", lambda path: config)
        (tmp_path / "root" / "work").mkdir(parents=True, exist_ok=True)
        steps = make_steps(specs, tmp_path / "root" / "work")
        return bootstrap.main(["--config", "c.json"], steps=steps, flush_s=flush_s)

    return go


def assert_complete_runs(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every run's events arrive once, in seq order from 0 without gaps, run_start first and run_end last."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        runs.setdefault(event["run_id"], []).append(event)
    for run_id, run_events in runs.items():
        assert [e["seq"] for e in run_events] == list(range(len(run_events))), run_id
        assert run_events[0]["type"] == "run_start"
        assert run_events[-1]["type"] == "run_end"
    return runs


def test_batches_arrive_in_order_with_the_token_in_the_header(run: Callable[..., int], tmp_path: Path) -> None:
    with hub_server() as hub:
        assert run(hub.url) == 0
        runs = assert_complete_runs(hub.events())
    assert len(runs) == 1
    assert hub.auth and set(hub.auth) == {f"Bearer {TOKEN}"}
    assert all(batch["host_id"] == make_config(tmp_path).host.id for batch in hub.batches)
    events = hub.events()
    assert [e["type"] for e in events].count("step_end") == len(STEPS)
    assert events[-1]["ok"] is True and events[-1]["failed_step"] is None
    percents = [e["percent"] for e in events if e["type"] == "progress"]
    assert percents == sorted(percents) and percents[-1] == 100.0
    spool = tmp_path / "root" / "bootstrap" / "events"
    (jsonl,) = spool.glob("*.jsonl")
    assert int(jsonl.with_suffix(".acked").read_text()) == len(events) - 1
    # the token never reaches the log, the spool or the state
    for path in (tmp_path / "root").rglob("*"):
        if path.is_file() and path.name != "bootstrap-token":
            assert TOKEN not in path.read_text(), path


def test_hub_down_then_up_every_event_arrives_once_in_order(run: Callable[..., int]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/events"
    holder: list[Hub] = []

    # connection refused for 0.4 s, then a real server on the same port, answering 503 for a while, then 200
    def bring_up() -> None:
        time.sleep(0.4)
        hub = Hub(port)
        hub.up = False
        holder.append(hub)
        time.sleep(0.3)
        hub.up = True

    starter = threading.Thread(target=bring_up)
    starter.start()
    try:
        specs = [{"name": f"s{i}", "sleep": 0.05} for i in range(12)]
        assert run(url, specs) == 0
        starter.join()
        events = holder[0].events()
        runs = assert_complete_runs(events)
        assert len(runs) == 1 and len(events) == 2 + 12 * 4 + 2
    finally:
        starter.join()
        for hub in holder:
            hub.close()


def test_hub_down_for_the_whole_run_the_run_succeeds_within_its_flush_bound(
    run: Callable[..., int], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/events"
    start = time.monotonic()
    assert run(url, flush_s=1.0) == 0
    elapsed = time.monotonic() - start
    assert elapsed < 0.5 + 1.0 + 1.0, elapsed  # the steps take ~0.4 s
    assert sorted(applied(tmp_path / "root" / "work")) == sorted(s["name"] for s in STEPS)
    # everything stays spooled for the next run
    (jsonl,) = (tmp_path / "root" / "bootstrap" / "events").glob("*.jsonl")
    assert not jsonl.with_suffix(".acked").exists()
    assert len(jsonl.read_text().splitlines()) == 2 + 4 * 4 + 2


def test_a_hub_that_answers_503_forever_does_not_hold_the_run(run: Callable[..., int]) -> None:
    with hub_server() as hub:
        hub.up = False
        start = time.monotonic()
        assert run(hub.url, flush_s=0.7) == 0
        assert time.monotonic() - start < 0.5 + 0.7 + 1.0
        assert hub.batches == []


def test_refused_batches_are_dropped_and_logged(run: Callable[..., int], tmp_path: Path) -> None:
    with hub_server() as hub:
        hub.up, hub.status_when_down = False, 400
        assert run(hub.url, flush_s=2.0) == 0
    log = (tmp_path / "root" / "logs" / "bootstrap.log").read_text()
    assert "the hub refused" in log and "HTTP 400" in log
    (jsonl,) = (tmp_path / "root" / "bootstrap" / "events").glob("*.jsonl")
    assert int(jsonl.with_suffix(".acked").read_text()) == len(jsonl.read_text().splitlines()) - 1


def test_without_a_token_nothing_is_sent_and_the_next_run_with_one_replays(
    run: Callable[..., int], tmp_path: Path
) -> None:
    with hub_server() as hub:
        assert run(hub.url, token=False) == 0
        assert hub.batches == []
        log = (tmp_path / "root" / "logs" / "bootstrap.log").read_text()
        assert log.count("no host credential (nor bootstrap token)") == 1
        assert run(hub.url) == 0
        runs = assert_complete_runs(hub.events())
    assert len(runs) == 2
    first, second = sorted(runs)
    assert hub.events()[0]["run_id"] == first  # the older run's events go first
    assert list((tmp_path / "root" / "bootstrap" / "events").glob("*.jsonl")) == [
        tmp_path / "root" / "bootstrap" / "events" / f"{second}.jsonl"
    ]  # the delivered spool of the older run is gone


def test_killed_run_replays_its_spool_after_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "root"
    port = free_port()
    url = f"http://127.0.0.1:{port}/events"
    specs: list[dict[str, Any]] = [
        {"name": "quick"},
        {"name": "hang", "deps": ["quick"], "sleep": 60},
        {"name": "end", "deps": ["hang"]},
    ]
    spec = write_spec(tmp_path / "spec.json", root=root, steps=specs, events_url=url, flush_s=5)
    write_token(make_config(root))
    proc = start_driver(spec)
    wait_for(lambda: "hang" in started_steps(root), what="the hang step to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed_spool,) = (root / "bootstrap" / "events").glob("*.jsonl")
    spooled = [json.loads(line) for line in killed_spool.read_text().splitlines()]
    assert spooled[-1]["type"] != "run_end"

    with hub_server_on(port) as hub:
        fixed = [{**s, "sleep": 0} for s in specs]
        write_spec(tmp_path / "spec.json", root=root, steps=fixed, events_url=url, flush_s=5)
        result = run_driver(spec)
        assert result.returncode == 0, result.stderr
        runs = assert_complete_runs_or_killed(hub.events())
    killed_run = spooled[0]["run_id"]
    assert runs[killed_run] == spooled  # exactly what was spooled, in order
    assert next(iter(runs)) == killed_run and len(runs) == 2


def assert_complete_runs_or_killed(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        runs.setdefault(event["run_id"], []).append(event)
    for run_id, run_events in runs.items():
        assert [e["seq"] for e in run_events] == list(range(len(run_events))), run_id
    return runs


def started_steps(root: Path) -> list[str]:
    log = root / "work" / "applied.log"
    return (
        [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start ")] if log.exists() else []
    )


def wait_for(predicate: Callable[[], bool], *, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class hub_server_on:  # used like hub_server()
    def __init__(self, port: int) -> None:
        self.hub = Hub(port)

    def __enter__(self) -> Hub:
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.hub.close()


VALIDATE_TS = """
import { readFileSync } from "node:fs";
import { EventBatchSchema } from "%s";
const batches = JSON.parse(readFileSync(process.argv[2], "utf8"));
let bad = 0;
for (const batch of batches) {
  const r = EventBatchSchema.safeParse(batch);
  if (!r.success) { bad++; console.error(JSON.stringify(r.error.issues)); }
}
console.log(`${batches.length} batches, ${bad} invalid`);
process.exit(bad ? 1 : 0);
"""


def test_every_event_validates_against_the_hub_schema(run: Callable[..., int], tmp_path: Path) -> None:
    tsx = PACKAGE_DIR / "node_modules" / ".bin" / "tsx"
    if not tsx.exists():
        tsx = PACKAGE_DIR.parents[2] / "node_modules" / ".bin" / "tsx"
    if not tsx.exists() or shutil.which("node") is None:
        pytest.skip("tsx/node not installed (run pnpm install): cannot load src/events.ts")
    specs = [*STEPS, {"name": "broken", "deps": ["first"], "fail": True, "command": ["sh", "-c", "echo oops; exit 4"]}]
    with hub_server() as hub:
        assert run(hub.url, specs) == bootstrap.EXIT_FAILED
    types = {e["type"] for e in hub.events()}
    assert types == {"run_start", "step_start", "step_end", "progress", "run_end"}
    end = hub.events()[-1]
    assert end["ok"] is False and end["failed_step"] == "broken" and "oops" in end["log_tail"]
    batches = tmp_path / "batches.json"
    batches.write_text(json.dumps(hub.batches))
    script = tmp_path / "validate.ts"
    script.write_text(VALIDATE_TS % (PACKAGE_DIR / "src" / "events.ts").as_posix())
    result = subprocess.run(
        [str(tsx), str(script), str(batches)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE_DIR,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 invalid" in result.stdout
