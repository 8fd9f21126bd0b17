"""The engine does not believe apply(): check() runs again after it. A step
whose apply() does not achieve its check fails with the check's finding;
"changed" means the first check found work and the second finds none."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import applied, make_config, make_steps

Spec = dict[str, Any]
CHAIN: list[Spec] = [{"name": "a"}, {"name": "b", "deps": ["a"]}, {"name": "c", "deps": ["b"]}]


class LyingStep(bootstrap.Step):
    """apply() returns without doing its job (as an early `return` would)."""

    name = "lying"
    hint = "fix the lying step"

    def check(self) -> bootstrap.StepState:
        return bootstrap.StepState(False, "/etc/lying.conf is missing")

    def apply(self) -> None:
        pass


class Recorder(bootstrap.EventSink):
    def __init__(self) -> None:
        self.events: list[bootstrap.Event] = []

    def emit(self, event: bootstrap.Event) -> None:
        self.events.append(event)

    def ends(self) -> dict[str, bootstrap.StepEndEvent]:
        return {e.step: e for e in self.events if isinstance(e, bootstrap.StepEndEvent)}


def runner(tmp_path: Path, steps: Sequence[type[bootstrap.Step]], sink: Recorder) -> bootstrap.Runner:
    return bootstrap.Runner(
        bootstrap.Plan(steps),
        bootstrap.Context(make_config(tmp_path), bootstrap.Log(echo=False)),
        state=bootstrap.StateStore(tmp_path / "state.json"),
        events=sink,
        jobs=1,
    )


def test_a_step_whose_apply_does_not_achieve_its_check_fails_with_the_finding(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    after = make_steps([{"name": "after", "deps": ["lying"]}], tmp_path / "w")
    sink = Recorder()
    with pytest.raises(bootstrap.StepFailed) as failure:
        runner(tmp_path, [LyingStep, *after], sink).run()
    assert failure.value.step == "lying"
    assert failure.value.message == "step lying failed: applied, but /etc/lying.conf is missing"
    assert failure.value.hint == "fix the lying step"
    ends = sink.ends()
    assert ends["lying"].outcome is bootstrap.Outcome.FAILED
    assert ends["lying"].message == "applied, but /etc/lying.conf is missing"
    assert ends["after"].outcome is bootstrap.Outcome.BLOCKED
    assert applied(tmp_path / "w") == []
    # no record: the next run applies it again
    state = json.loads((tmp_path / "state.json").read_text()) if (tmp_path / "state.json").exists() else {}
    assert "lying" not in state.get("steps", {})


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    workdir = tmp_path / "root" / "work"
    workdir.mkdir(parents=True)
    config = make_config(tmp_path / "root")
    monkeypatch.setattr(bootstrap, "load_config", lambda path: config)

    def go(specs: Sequence[Spec]) -> int:
        return bootstrap.main(["--config", "c.json"], steps=make_steps(specs, workdir), flush_s=0.2)

    return go


def outcomes(tmp_path: Path) -> dict[str, str]:
    run = bootstrap.fold_run(bootstrap.last_run_events(make_config(tmp_path / "root")))
    assert run is not None
    return {name: step["outcome"] for name, step in run.steps.items()}


def test_changed_only_when_the_first_check_found_work(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(CHAIN) == 0
    assert outcomes(tmp_path) == {"a": "changed", "b": "changed", "c": "changed"}
    (tmp_path / "root" / "work" / "b.out").unlink()
    assert run(CHAIN) == 0
    # b found work; c re-applied (its dependency changed) but had nothing to change
    assert outcomes(tmp_path) == {"a": "unchanged", "b": "changed", "c": "unchanged"}


def test_a_converged_host_without_its_state_file_reruns_with_nothing_changed(
    run: Callable[..., int], tmp_path: Path
) -> None:
    assert run(CHAIN) == 0
    state_file = tmp_path / "root" / "bootstrap" / "state.json"
    state_file.unlink()
    work = tmp_path / "root" / "work"
    (work / "applied.log").unlink()
    assert run(CHAIN) == 0
    assert applied(work) == ["a", "b", "c"]  # no record: each applied, to be sure
    assert outcomes(tmp_path) == {"a": "unchanged", "b": "unchanged", "c": "unchanged"}
    assert set(json.loads(state_file.read_text())["steps"]) == {"a", "b", "c"}  # records again
    (work / "applied.log").unlink()
    before = state_file.stat().st_mtime_ns, state_file.stat().st_ino
    assert run(CHAIN) == 0
    assert applied(work) == []  # and the next run skips them
    assert (state_file.stat().st_mtime_ns, state_file.stat().st_ino) == before  # a warm run writes no state


def test_state_json_holds_only_fingerprints_for_the_next_run(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(CHAIN) == 0
    state = json.loads((tmp_path / "root" / "bootstrap" / "state.json").read_text())
    assert set(state) == {"version", "steps"}
    for record in state["steps"].values():
        assert set(record) == {"fingerprint", "finished_at", "duration_s"}


def test_a_version_1_state_file_keeps_its_records_and_drops_last_run(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    old = {"version": 1, "steps": {"a": {"fingerprint": "f", "duration_s": 1.0}}, "last_run": {"run_id": "x"}}
    path.write_text(json.dumps(old))
    state = bootstrap.StateStore(path)
    assert state.step_record("a") == {"fingerprint": "f", "duration_s": 1.0}
    state.save()
    assert json.loads(path.read_text()) == {"version": 2, "steps": old["steps"]}
