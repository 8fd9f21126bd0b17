"""The event contract: the shared vectors in fixtures/events/ through
check_event (zod's twin), the typed events the engine emits, and the spool
reader that status and timings use.

test/events-conformance.test.ts runs the same vectors through zod and compares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bootstrap
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "events"


def load_vectors(kind: str) -> list[Any]:
    return [
        pytest.param(json.loads(path.read_text(encoding="utf-8")), id=f"{kind}/{path.stem}")
        for path in sorted((FIXTURES / kind).glob("*.json"))
    ]


VALID = load_vectors("valid")
INVALID = load_vectors("invalid")


def test_there_are_enough_vectors_for_every_event_type_and_outcome() -> None:
    assert len(VALID) >= 10 and len(INVALID) >= 20
    events = [p.values[0]["event"] for p in VALID]
    assert {e["type"] for e in events} == {t.value for t in bootstrap.EventType}
    assert {e["outcome"] for e in events if e["type"] == "step_end"} == {o.value for o in bootstrap.Outcome}


@pytest.mark.parametrize("vector", VALID)
def test_valid_vector_parses_to_the_recorded_output(vector: dict[str, Any]) -> None:
    assert bootstrap.check_event(vector["event"]) == vector["output"]


@pytest.mark.parametrize("vector", INVALID)
def test_invalid_vector_reports_exactly_the_recorded_paths(vector: dict[str, Any]) -> None:
    with pytest.raises(bootstrap.EventError) as caught:
        bootstrap.check_event(vector["event"])
    assert sorted({path for path, _ in caught.value.issues}) == vector["errors"]


def test_every_typed_event_the_engine_can_emit_fits_the_contract(tmp_path: Path) -> None:
    spool = bootstrap.EventSpool(tmp_path, "20261201T000000000000Z-0123abcd")
    emitted: list[bootstrap.Event] = [
        bootstrap.RunStartEvent("0.3.0", True, (bootstrap.StepInfo("a", (), 1.0), bootstrap.StepInfo("b", ("a",), 2))),
        bootstrap.ProgressEvent("starting", 0.0),
        bootstrap.StepStartEvent("a"),
        bootstrap.StepEndEvent("a", bootstrap.Outcome.CHANGED, 0.5, "needs work: x"),
        bootstrap.StepEndEvent("b", bootstrap.Outcome.FAILED, 0.1, "applied, but y", hint="fix y", log_tail="tail"),
        bootstrap.RunEndEvent(False, 0.7, failed_step="b", hint="fix y"),
    ]
    for event in emitted:
        spool.emit(event)
    spool.close()
    lines = spool.path.read_text().splitlines()
    parsed = [bootstrap.check_event(json.loads(line)) for line in lines]
    assert [e["seq"] for e in parsed] == list(range(len(emitted)))
    assert [e["type"] for e in parsed] == [str(e.type) for e in emitted]
    assert parsed[3]["outcome"] == "changed" and parsed[0]["steps"][1] == {"name": "b", "deps": ["a"], "weight": 2}
    assert bootstrap.parse_events(lines) == parsed


def test_enums_are_their_values_as_text() -> None:
    assert str(bootstrap.Outcome.CHANGED) == "changed" and f"{bootstrap.Outcome.BLOCKED:<9}|" == "blocked  |"
    assert json.dumps({"o": bootstrap.Outcome.FAILED}) == '{"o": "failed"}'
    assert bootstrap.EventType("run_end") is bootstrap.EventType.RUN_END


def test_the_spool_reader_stops_at_a_torn_line_and_leaves_out_events_that_break_the_contract() -> None:
    good = json.dumps({"run_id": "r" * 8, "seq": 0, "ts": 1, "type": "step_start", "step": "a"})
    bad = json.dumps({"run_id": "r" * 8, "seq": 1, "ts": 1, "type": "step_start", "step": "A"})
    later = json.dumps({"run_id": "r" * 8, "seq": 2, "ts": 1, "type": "step_start", "step": "b"})
    events = bootstrap.parse_events([good, bad, later, '{"run_id": "torn', good])
    assert [e["step"] for e in events] == ["a", "b"]
