"""The step graph and its executor: order, real overlap, serial mode,
failure propagation, refusal of broken graphs, idempotency of re-runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import applied, make_config, make_steps, started

Spec = dict[str, Any]

# a diamond plus an independent chain: a -> (b, c) -> d ; x -> y
DIAMOND: list[Spec] = [
    {"name": "a", "sleep": 0.05},
    {"name": "b", "deps": ["a"], "sleep": 0.3},
    {"name": "c", "deps": ["a"], "sleep": 0.3},
    {"name": "d", "deps": ["b", "c"]},
    {"name": "x", "sleep": 0.3},
    {"name": "y", "deps": ["x"]},
]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """Run bootstrap.main in-process on a plan of fake steps under tmp_path."""
    workdir = tmp_path / "root" / "work"
    workdir.mkdir(parents=True)

    def go(specs: Sequence[Spec], *args: str, parallel: bool = True) -> int:
        config = make_config(tmp_path / "root", parallel=parallel)
        monkeypatch.setattr(bootstrap, "load_config", lambda path: config)
        steps = make_steps(specs, workdir)
        return bootstrap.main(["--config", "c.json", *args], steps=steps, flush_s=0.5)

    return go


def last_run(tmp_path: Path) -> dict[str, Any]:
    """The last run as its events tell it (the spool, read as `status` and `timings` read it)."""
    run = bootstrap.fold_run(bootstrap.last_run_events(make_config(tmp_path / "root")))
    assert run is not None and run.end is not None
    return {"steps": run.steps, "wall_s": run.wall_s, "parallel": run.parallel, **run.end}


def overlaps(run: dict[str, Any], first: str, second: str) -> bool:
    a, b = run["steps"][first], run["steps"][second]
    return bool(a["start_s"] < b["end_s"] and b["start_s"] < a["end_s"])


def test_dependencies_run_first_and_independent_steps_overlap(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(DIAMOND) == 0
    info = last_run(tmp_path)
    steps = info["steps"]
    for name, spec in ((s["name"], s) for s in DIAMOND):
        for dep in spec.get("deps", []):
            assert steps[dep]["end_s"] <= steps[name]["start_s"], f"{name} started before {dep} ended"
    # real overlap, from the recorded times: b, c and x sleep 0.3 s each, side by side
    assert overlaps(info, "b", "c")
    assert overlaps(info, "b", "x")
    assert info["wall_s"] < 0.3 * 3, info["wall_s"]
    assert sorted(applied(tmp_path / "root" / "work")) == sorted(s["name"] for s in DIAMOND)


def test_serial_mode_walks_the_graph_in_stable_order(run: Callable[..., int], tmp_path: Path) -> None:
    specs = [{**s, "sleep": 0.01} for s in DIAMOND]
    assert run(specs, parallel=False) == 0
    # lowest list position among the ready steps, one at a time
    assert applied(tmp_path / "root" / "work") == ["a", "b", "c", "d", "x", "y"]
    info = last_run(tmp_path)
    assert not any(overlaps(info, p, q) for p in info["steps"] for q in info["steps"] if p < q)
    assert info["parallel"] is False


def test_jobs_1_is_serial_too(run: Callable[..., int], tmp_path: Path) -> None:
    assert run([{**s, "sleep": 0.01} for s in DIAMOND], "--jobs", "1") == 0
    assert applied(tmp_path / "root" / "work") == ["a", "b", "c", "d", "x", "y"]


def test_stable_order_ignores_list_order_only_for_dependencies() -> None:
    steps = make_steps([{"name": "late", "deps": ["early"]}, {"name": "other"}, {"name": "early"}], Path("/none"))
    assert bootstrap.Plan(steps).order == ("other", "early", "late")


def test_a_failure_blocks_dependents_lets_running_steps_finish_and_fails_the_run(
    run: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs: list[Spec] = [
        {"name": "a"},
        {"name": "broken", "deps": ["a"], "fail": True, "sleep": 0.05},
        {"name": "slow", "deps": ["a"], "sleep": 0.4},
        {"name": "after-broken", "deps": ["broken"]},
        {"name": "after-slow", "deps": ["slow"]},
    ]
    assert run(specs) == bootstrap.EXIT_FAILED
    info = last_run(tmp_path)
    outcomes = {name: step["outcome"] for name, step in info["steps"].items()}
    assert outcomes["broken"] == "failed"
    assert outcomes["slow"] == "changed"  # was running: allowed to finish
    assert "after-broken" not in applied(tmp_path / "root" / "work")
    assert "after-slow" not in applied(tmp_path / "root" / "work")  # nothing new starts after a failure
    assert info["ok"] is False and info["failed_step"] == "broken" and info["hint"] == "fix broken"
    err = capsys.readouterr().err
    assert "error: step broken failed: broken broke" in err
    assert err.rstrip().endswith("hint: fix broken")


def test_blocked_steps_are_reported_with_their_cause(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (tmp_path / "w").mkdir()
    steps = make_steps([{"name": "a", "fail": True}, {"name": "b", "deps": ["a"]}, {"name": "c"}], tmp_path / "w")
    sink = RecordingSink()
    runner = bootstrap.Runner(
        bootstrap.Plan(steps),
        bootstrap.Context(config, bootstrap.Log(echo=False)),
        state=bootstrap.StateStore(tmp_path / "state.json"),
        events=sink,
        jobs=1,
    )
    with pytest.raises(bootstrap.StepFailed) as failure:
        runner.run()
    assert failure.value.step == "a" and failure.value.hint == "fix a"
    ends = {e["step"]: e for e in sink.events if e["type"] == "step_end"}
    assert ends["b"]["outcome"] == "blocked" and "a failed" in ends["b"]["message"]
    assert ends["c"]["outcome"] == "blocked" and "stopped after a failed" in ends["c"]["message"]


class RecordingSink(bootstrap.EventSink):
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: bootstrap.Event) -> None:
        self.events.append({"type": str(event.type), **bootstrap.event_fields(event)})


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([{"name": "a", "deps": ["c"]}, {"name": "b", "deps": ["a"]}, {"name": "c", "deps": ["b"]}], "cycle"),
        ([{"name": "a", "deps": ["ghost"]}], "unknown step(s) ghost"),
        ([{"name": "a"}, {"name": "a"}], "two steps are named 'a'"),
        ([{"name": "Bad Name"}], "invalid name"),
        ([{"name": "unchecked", "no_check": True}], "step unchecked has no check()"),
    ],
)
def test_broken_graphs_are_refused_before_anything_runs(
    specs: list[Spec], message: str, run: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(specs) == bootstrap.EXIT_FAILED
    assert message in capsys.readouterr().err
    assert applied(tmp_path / "root" / "work") == []
    assert not (tmp_path / "root" / "bootstrap" / "state.json").exists()


def test_rerun_does_nothing_and_says_why(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(DIAMOND) == 0
    assert run(DIAMOND) == 0
    assert sorted(applied(tmp_path / "root" / "work")) == sorted(s["name"] for s in DIAMOND)  # once each
    assert {s["outcome"] for s in last_run(tmp_path)["steps"].values()} == {"unchanged"}
    records = [json.loads(line) for line in (tmp_path / "root" / "logs" / "bootstrap.log").read_text().splitlines()]
    skips = [r for r in records if r["event"] == "skip"]
    assert {r["step"] for r in skips} == {s["name"] for s in DIAMOND}
    assert all("inputs unchanged" in r["message"] for r in skips)


def test_changed_input_reruns_that_step_and_its_dependents_only(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(DIAMOND) == 0
    work = tmp_path / "root" / "work"
    (work / "applied.log").unlink()
    changed = [{**s, "content": "v2"} if s["name"] == "b" else s for s in DIAMOND]
    assert run(changed) == 0
    assert applied(work) == ["b", "d"]


def test_unsatisfied_check_reapplies_even_when_inputs_match(run: Callable[..., int], tmp_path: Path) -> None:
    assert run(DIAMOND) == 0
    work = tmp_path / "root" / "work"
    (work / "applied.log").unlink()
    (work / "x.out").unlink()  # someone removed what x made
    assert run(DIAMOND) == 0
    assert applied(work) == ["x", "y"]  # y re-runs because its dependency changed


def test_a_dependency_applied_in_an_interrupted_run_still_reruns_its_dependents(
    run: Callable[..., int], tmp_path: Path
) -> None:
    assert run(DIAMOND) == 0
    work = tmp_path / "root" / "work"
    (work / "applied.log").unlink()
    # --only b: b changes, d must not be trusted any more; the next full run re-applies it
    assert run([{**s, "content": "v2"} if s["name"] == "b" else s for s in DIAMOND], "--only", "b") == 0
    assert applied(work) == ["b"]
    assert run([{**s, "content": "v2"} if s["name"] == "b" else s for s in DIAMOND]) == 0
    assert applied(work) == ["b", "d"]


def test_only_and_skip_select_steps_and_reject_unknown_names(
    run: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "root" / "work"
    assert run(DIAMOND, "--only", "a,x", "--only", "y") == 0
    assert sorted(applied(work)) == ["a", "x", "y"]
    assert run(DIAMOND, "--skip", "d", "--skip", "b") == 0
    assert sorted(applied(work)) == ["a", "c", "x", "y"]
    assert run(DIAMOND, "--only", "a,nope") == bootstrap.EXIT_CONFIG
    assert "unknown step name(s): nope" in capsys.readouterr().err
    assert run(DIAMOND, "--skip", "zzz") == bootstrap.EXIT_CONFIG


def test_plan_command_reports_from_real_state_and_writes_nothing(
    run: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(DIAMOND) == 0
    work = tmp_path / "root" / "work"
    (work / "a.out").write_text("tampered")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run(DIAMOND, "plan") == 0
    assert snapshot(tmp_path) == before
    out = capsys.readouterr().out
    assert "will change  a  a.out differs" in out
    assert "will change  b  after a" in out
    assert "will change  d  after b, c" in out
    assert "satisfied    x  x.out ok" in out
    assert out.rstrip().endswith("2 satisfied, 4 will change, 0 blocked")


def test_plan_marks_steps_blocked_when_their_check_cannot_run(
    run: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Unreadable(bootstrap.Step):
        name = "unreadable"

        def check(self) -> bootstrap.StepState:
            raise bootstrap.BootstrapError("cannot read /etc/os-release")

    config = make_config(tmp_path)
    plan = bootstrap.Plan([Unreadable, *make_steps([{"name": "b", "deps": ["unreadable"]}], tmp_path)])
    rows = bootstrap.preview(
        plan, bootstrap.Context(config, bootstrap.Log(echo=False)), bootstrap.StateStore(tmp_path / "s.json")
    )
    assert rows[0] == ("unreadable", "blocked", "check failed: cannot read /etc/os-release")
    assert rows[1][:2] == ("b", "blocked")


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*"))}


def test_started_steps_are_logged_with_their_step(run: Callable[..., int], tmp_path: Path) -> None:
    specs: list[Spec] = [{"name": "p", "sleep": 0.1}, {"name": "q", "sleep": 0.1}]
    assert run(specs) == 0
    assert sorted(started(tmp_path / "root" / "work")) == ["p", "q"]
    records = [json.loads(line) for line in (tmp_path / "root" / "logs" / "bootstrap.log").read_text().splitlines()]
    applies = {r["step"]: r for r in records if r["event"] == "apply"}
    assert set(applies) == {"p", "q"}  # each worker thread carries its own step
    for record in records:
        assert set(record) >= {"ts", "run_id", "step", "event", "message"}
        assert record["run_id"] == records[0]["run_id"]
    ends = [r for r in records if r["event"] == "step_end"]
    assert {r["step"] for r in ends} == {"p", "q"} and all(r["duration_s"] >= 0.1 for r in ends)


def test_terminal_console_keeps_a_progress_line_and_plain_console_does_not() -> None:
    import io

    tty = io.StringIO()
    log = bootstrap.Log(console=tty, tty=True)
    log.step_started("apt", 0.0)
    log.progress(25.0, ["apt", "node"])
    log.info("hello", step="apt")
    log.step_finished("apt", "changed", 1.25, 50.0)
    log.close()
    text = tty.getvalue()
    assert "[ 25%] running: apt, node" in text
    # every new line first clears the progress line, then redraws it
    assert "\r\x1b[K    apt: hello\n[ 25%] running: apt, node" in text
    assert "<== apt changed in 1.2s" in text and text.endswith("\r\x1b[K")

    plain = io.StringIO()
    log = bootstrap.Log(console=plain, tty=False)
    log.step_started("apt", 0.0)
    log.progress(25.0, ["apt"])
    log.step_finished("apt", "failed", 2.0, 25.0, "apt-get exited with 100")
    assert plain.getvalue() == "[  0%] ==> apt\n[ 25%] <== apt failed in 2.0s: apt-get exited with 100\n"


def test_percent_is_weighted_by_the_last_run_durations(tmp_path: Path) -> None:
    steps = make_steps([{"name": "slow", "weight": 1.0}, {"name": "fast", "weight": 1.0}], tmp_path)
    state = bootstrap.StateStore(tmp_path / "state.json")
    plan = bootstrap.Plan(steps)
    progress = bootstrap.Progress(plan, state)
    progress.finish("fast")
    assert progress.percent() == 50.0  # default weights: equal
    state.record_step("slow", "fp", 9.0)
    state.record_step("fast", "fp", 1.0)
    progress = bootstrap.Progress(plan, state)
    progress.finish("fast")
    assert progress.percent() == 10.0  # refined by what each took last time


def test_step_bugs_fail_the_run_with_the_exception_named(run: Callable[..., int], tmp_path: Path) -> None:
    class Buggy(bootstrap.Step):
        name = "buggy"

        def check(self) -> bootstrap.StepState:
            return bootstrap.StepState(False, "never done")

        def apply(self) -> None:
            raise KeyError("missing")

    config = make_config(tmp_path)
    runner = bootstrap.Runner(
        bootstrap.Plan([Buggy]),
        bootstrap.Context(config, bootstrap.Log(echo=False)),
        state=bootstrap.StateStore(tmp_path / "state.json"),
    )
    with pytest.raises(bootstrap.StepFailed) as failure:
        runner.run()
    assert "KeyError: 'missing'" in failure.value.message
    assert failure.value.hint == bootstrap.Step.hint
    assert isinstance(failure.value.__cause__, KeyError)
