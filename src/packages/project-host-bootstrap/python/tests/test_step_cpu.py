"""CPU-seconds per step (the step_end event's `cpu`): the step's own thread
(RUSAGE_THREAD) and the children it reaped (wait4 rusage), measured, so the
benchmark's figures rest on measurement. Real processes burn real CPU here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import make_config, make_steps

# ~0.3 CPU-seconds in a child (a busy loop on the process clock: user and system time, the clock is a syscall).
BURN_USER = [sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"]


def test_a_reaped_child_is_charged_to_the_current_step() -> None:
    meter = bootstrap.StepCpu()
    token = bootstrap.STEP_CPU.set(meter)
    try:
        bootstrap.run_command(BURN_USER, timeout_s=60)
    finally:
        bootstrap.STEP_CPU.reset(token)
    cpu = meter.stop()
    children = cpu["children_user_s"] + cpu["children_sys_s"]
    assert 0.25 <= children < 5, cpu
    # the step's own thread only waited
    assert cpu["user_s"] < 0.25, cpu


def test_without_a_step_nothing_is_charged_and_nothing_breaks() -> None:
    assert bootstrap.STEP_CPU.get() is None
    r = bootstrap.run_command(BURN_USER, timeout_s=60)
    assert r.returncode == 0


def test_metered_popen_keeps_the_rusage_of_the_child_and_its_reaped_children() -> None:
    # a shell that runs the burner as its own child: wait4 on the shell includes it
    proc = bootstrap.MeteredPopen(["sh", "-c", '"$@"', "sh", *BURN_USER])
    assert proc.wait(timeout=60) == 0
    assert proc.rusage is not None and proc.rusage.ru_utime + proc.rusage.ru_stime >= 0.25


def test_thread_time_is_the_steps_own_work() -> None:
    meter = bootstrap.StepCpu()
    x = 0
    import time

    t = time.process_time()
    while time.process_time() - t < 0.2:
        x += 1
    cpu = meter.stop()
    assert cpu["user_s"] + cpu["sys_s"] >= 0.15, cpu
    assert cpu["children_user_s"] == 0 and cpu["children_sys_s"] == 0


def test_step_end_events_carry_each_steps_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path / "root")
    monkeypatch.setattr(bootstrap, "load_config", lambda path: config)
    (tmp_path / "root" / "work").mkdir(parents=True, exist_ok=True)
    specs: list[dict[str, Any]] = [
        {"name": "burner", "command": BURN_USER},
        {"name": "idle", "deps": ["burner"], "sleep": 0.1},
    ]
    steps = make_steps(specs, tmp_path / "root" / "work")
    assert bootstrap.main(["--config", "c.json"], steps=steps, flush_s=0.5) == 0
    (spool,) = (tmp_path / "root" / "bootstrap" / "events").glob("*.jsonl")
    ends = {e["step"]: e for e in map(json.loads, spool.read_text().splitlines()) if e["type"] == "step_end"}
    for e in ends.values():
        bootstrap.check_event(e)  # the contract holds
    burner = ends["burner"]["cpu"]
    assert burner["children_user_s"] + burner["children_sys_s"] >= 0.25
    assert ends["idle"]["cpu"]["children_user_s"] == 0
    assert ends["idle"]["cpu"]["user_s"] < 0.25
