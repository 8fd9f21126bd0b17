"""The command line as a subprocess: the lock, kill -9 and converge, status
and its exit codes, timings, help; and the engine's own overhead."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_events import started_steps, wait_for
from test_engine_support import (
    applied,
    make_config,
    make_steps,
    run_driver,
    start_driver,
    write_spec,
)

BOOTSTRAP_PY = Path(bootstrap.__file__)


def specs(hang: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"name": "prepare", "sleep": 0.05},
        {"name": "work", "deps": ["prepare"], "sleep": hang},
        {"name": "side", "deps": ["prepare"], "sleep": 0.05},
        {"name": "finalize", "deps": ["work", "side"], "marker": True},
    ]


def status(spec: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_driver(spec, "status", "--json", *args)
    return result.returncode, json.loads(result.stdout)


def test_second_concurrent_run_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path / "spec.json", root=root, steps=specs(hang=60))
    first = start_driver(spec)
    try:
        wait_for(lambda: "work" in started_steps(root), what="the first run to reach `work`")
        code, report = status(spec)
        assert (code, report["status"], report["running"]) == (2, "running", ["work"])
        second = run_driver(spec)
        assert second.returncode == bootstrap.EXIT_LOCKED, second.stderr
        assert f"PID {first.pid}" in second.stderr
        assert "hint: Wait for it to finish" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_kill_9_mid_step_then_rerun_converges(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path / "spec.json", root=root, steps=specs(hang=60))
    code, report = status(spec)
    assert (code, report["status"]) == (2, "not started")
    proc = start_driver(spec)
    wait_for(lambda: "work" in started_steps(root), what="`work` to start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    code, report = status(spec)
    assert (code, report["status"]) == (1, "interrupted")
    assert "run bootstrap.py again" in report["hint"]

    write_spec(tmp_path / "spec.json", root=root, steps=specs(hang=0))
    result = run_driver(spec)
    assert result.returncode == 0, result.stderr
    done = applied(root / "work")
    assert done.count("prepare") == 1  # finished before the kill: not redone
    assert done.count("work") == 1 and done.count("finalize") == 1
    assert status(spec)[0] == 0

    (root / "work" / "applied.log").unlink()
    assert run_driver(spec).returncode == 0
    assert applied(root / "work") == []  # converged: nothing left to do


def test_status_reports_a_failure_with_its_hint(tmp_path: Path) -> None:
    root = tmp_path / "root"
    broken = [{"name": "prepare"}, {"name": "work", "deps": ["prepare"], "fail": True}]
    spec = write_spec(tmp_path / "spec.json", root=root, steps=broken)
    result = run_driver(spec)
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1] == "hint: fix work"
    code, report = status(spec)
    assert code == 1 and report["status"] == "failed"
    assert report["failed_step"] == "work" and report["hint"] == "fix work"
    text = run_driver(spec, "status")
    assert text.returncode == 1 and "failed step: work: work broke" in text.stdout


def test_status_wait_blocks_until_the_run_ends(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path / "spec.json", root=root, steps=specs(hang=1.0))
    proc = start_driver(spec)
    try:
        wait_for(lambda: "work" in started_steps(root), what="`work` to start")
        start = time.monotonic()
        code, report = status(spec, "--wait")
        assert time.monotonic() - start > 0.3
        assert (code, report["status"]) == (0, "done")
    finally:
        proc.wait(timeout=30)


def test_timings_show_durations_and_the_critical_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = write_spec(tmp_path / "spec.json", root=root, steps=specs(hang=0.4))
    assert run_driver(spec).returncode == 0
    result = run_driver(spec, "timings")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ranked = [line.split()[1] for line in lines if line.startswith("  ")]
    assert ranked[0] == "work"  # slowest first
    critical = lines[-1]
    assert "prepare -> work -> finalize" in critical
    share = int(critical.split("s, ")[1].split("%")[0])
    assert 70 <= share <= 100, critical


def test_timings_before_any_run_is_an_error_with_a_hint(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.json", root=tmp_path / "root", steps=specs())
    result = run_driver(spec, "timings")
    assert result.returncode == 1 and "hint: Run the bootstrap first" in result.stderr


def test_help_documents_commands_flags_and_exit_codes() -> None:
    import subprocess

    result = subprocess.run([sys.executable, str(BOOTSTRAP_PY), "--help"], capture_output=True, text=True, check=True)
    documented = (
        "run ",
        "plan ",
        "status ",
        "timings ",
        "--only",
        "--skip",
        "--jobs",
        "--debug",
        "--wait",
        "exit codes",
    )
    for text in documented:
        assert text in result.stdout, text
    assert "like cloud-init" in result.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.json", root=tmp_path / "root", steps=[{"name": "a", "fail": True}])
    assert "Traceback" not in run_driver(spec).stderr
    assert "Traceback" in run_driver(spec, "--debug").stderr


def test_engine_overhead_20_noop_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured, printed, and bounded loosely: 20 no-op steps (a chain of 4
    layers of 5), a first run and a re-run where everything is satisfied."""
    config = make_config(tmp_path / "root")
    monkeypatch.setattr(bootstrap, "load_config", lambda path: config)
    (tmp_path / "root" / "work").mkdir(parents=True)
    noop = [{"name": f"s{i:02d}", "deps": [f"s{i - 5:02d}"] if i >= 5 else []} for i in range(20)]
    steps = make_steps(noop, tmp_path / "root" / "work")
    timings = {}
    for label in ("first run", "re-run, all satisfied"):
        start = time.perf_counter()
        assert bootstrap.main(["--config", "c.json"], steps=steps, flush_s=0.2) == 0
        timings[label] = time.perf_counter() - start
    print(f"\nengine overhead, 20 no-op steps: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in timings.items())}")
    assert all(v < 3.0 for v in timings.values()), timings


def test_sigterm_stops_running_commands_and_leaves_the_run_resumable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    steps = [{"name": "prepare"}, {"name": "long", "deps": ["prepare"], "command": ["sleep", "60"]}]
    spec = write_spec(tmp_path / "spec.json", root=root, steps=steps)
    proc = start_driver(spec)
    wait_for(lambda: "long" in started_steps(root), what="`long` to start")
    time.sleep(0.2)  # let it reach the command
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == bootstrap.EXIT_INTERRUPTED, output
    assert time.monotonic() - start < 5, "the running command was not stopped"
    assert "run bootstrap.py again to resume" in output
    code, report = status(spec)
    assert (code, report["status"]) == (1, "interrupted")


def test_unwritable_bootstrap_dir_fails_with_a_hint(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions: make the bootstrap dir a file instead
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "bootstrap").write_text("not a directory")
    else:
        (tmp_path / "root").mkdir(mode=0o500)
    spec = write_spec(tmp_path / "spec.json", root=tmp_path / "root", steps=[{"name": "a"}])
    result = run_driver(spec)
    assert result.returncode == 1
    assert "error: cannot use" in result.stderr and "hint: check that" in result.stderr
