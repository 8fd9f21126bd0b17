"""`bootstrap.py timings` prints each step's CPU-seconds (the step_end
events' `cpu`: the step's thread and the children it reaped) and their sum;
a step without a measurement (blocked, or an older bootstrap.py's event)
shows '-'. From a hand-written spool, and from a real run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bootstrap
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine_support import make_config, run_driver, write_spec

RUN = "run-20261202-000001"


def spool(config: Any, cpu: dict[str, dict[str, float] | None]) -> None:
    """A finished run: prepare → work, side; each step's cpu as given (None: not measured)."""
    steps = [("prepare", []), ("work", ["prepare"]), ("side", ["prepare"])]
    events: list[dict[str, Any]] = [
        {
            "type": "run_start",
            "version": "0.0.0",
            "parallel": True,
            "steps": [{"name": n, "deps": d, "weight": 1} for n, d in steps],
        }
    ]
    t = 100.0
    for name, _ in steps:
        events.append({"type": "step_start", "step": name, "ts": t})
        t += 1.0
        events.append(
            {"type": "step_end", "step": name, "outcome": "changed", "duration_s": 1.0, "ts": t, "cpu": cpu[name]}
        )
    events.append({"type": "run_end", "ok": True, "wall_s": t - 100.0, "ts": t})
    directory = bootstrap.events_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"run_id": RUN, "seq": i, "ts": e.pop("ts", 100.0), **e}) for i, e in enumerate(events)]
    (directory / f"{RUN}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def cpu(user: float, sys_: float, cuser: float, csys: float) -> dict[str, float]:
    return {"user_s": user, "sys_s": sys_, "children_user_s": cuser, "children_sys_s": csys}


def step_lines(text: str) -> dict[str, str]:
    return {line.split()[1]: line for line in text.splitlines() if line.startswith("  ")}


def test_each_step_shows_its_cpu_seconds_and_the_sum(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    spool(config, {"prepare": cpu(0.1, 0.05, 1.0, 0.25), "work": cpu(0.5, 0.0, 10.0, 14.0), "side": None})
    text = bootstrap.format_timings(config)
    lines = step_lines(text)
    assert lines["prepare"].endswith("cpu 1.40s")
    assert lines["work"].endswith("cpu 24.50s")
    assert lines["side"].endswith("cpu -")  # not measured
    assert "CPU-seconds the steps report: 25.90s" in text
    assert text.splitlines()[-1].startswith("critical path (")


def test_no_cpu_line_when_no_step_was_measured(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    spool(config, {"prepare": None, "work": None, "side": None})
    text = bootstrap.format_timings(config)
    assert all(line.endswith("cpu -") for line in step_lines(text).values())
    assert "CPU-seconds the steps report" not in text


seconds = st.floats(min_value=0, max_value=1e5, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.none(), st.tuples(seconds, seconds, seconds, seconds)), min_size=3, max_size=3))
def test_the_sum_is_the_steps_own_figures(tmp_path_factory: Any, measured: list[Any]) -> None:
    config = make_config(tmp_path_factory.mktemp("t"))
    by_step = dict(zip(("prepare", "work", "side"), (None if m is None else cpu(*m) for m in measured), strict=True))
    spool(config, by_step)
    text = bootstrap.format_timings(config)
    lines = step_lines(text)
    for name, c in by_step.items():
        want = "-" if c is None else f"{bootstrap.step_cpu_seconds(c):.2f}s"
        assert lines[name].endswith(f"cpu {want}")
    total = [bootstrap.step_cpu_seconds(c) for c in by_step.values() if c is not None]
    if total:
        assert f"CPU-seconds the steps report: {sum(x for x in total if x is not None):.2f}s" in text
    else:
        assert "CPU-seconds the steps report" not in text


def test_a_real_run_reports_cpu_for_every_step_that_ran(tmp_path: Path) -> None:
    root = tmp_path / "root"
    steps = [{"name": "prepare", "sleep": 0.05}, {"name": "work", "deps": ["prepare"], "sleep": 0.1}]
    spec = write_spec(tmp_path / "spec.json", root=root, steps=steps)
    assert run_driver(spec).returncode == 0
    result = run_driver(spec, "timings")
    assert result.returncode == 0, result.stderr
    lines = step_lines(result.stdout)
    assert set(lines) == {"prepare", "work"}
    for line in lines.values():
        figure = line.rsplit("cpu ", 1)[1]
        assert figure.endswith("s") and float(figure[:-1]) >= 0, line
    assert "CPU-seconds the steps report: " in result.stdout
