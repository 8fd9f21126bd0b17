"""CPU slots (issue 15): CPU-heavy work (the extractions) runs at most
`slots` at a time, a free slot goes to the biggest waiting archive (the
critical path), downloads and the rest take none, and a wait is visible in
the log and the events."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import make_config as engine_config
from test_steps_support import context, make_config, sha256, tar_bytes


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Holder:
    """A thread that takes a slot and keeps it until released."""

    def __init__(self, slots: bootstrap.CpuSlots, who: str, priority: float) -> None:
        self.got = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(slots, who, priority))
        self.thread.start()

    def run(self, slots: bootstrap.CpuSlots, who: str, priority: float) -> None:
        with slots.slot(who, priority):
            self.got.set()
            self.release.wait(30)

    def done(self) -> None:
        self.release.set()
        self.thread.join(30)


def test_a_free_slot_goes_to_the_biggest_waiter_first_come_among_equals() -> None:
    waits: list[tuple[str, list[str]]] = []
    slots = bootstrap.CpuSlots(2, on_wait=lambda who, holders: waits.append((who, holders)))
    a, b = Holder(slots, "a", 0), Holder(slots, "b", 0)
    wait_until(lambda: a.got.is_set() and b.got.is_set(), "the first two slots")
    waiters = {}
    for who, priority in [("c", 10), ("d", 30), ("e", 20), ("f", 30)]:
        waiters[who] = Holder(slots, who, priority)
        wait_until(lambda who=who: who in slots.waiting(), f"{who} to queue")  # type: ignore[misc]
    assert slots.waiting() == ["d", "f", "e", "c"]
    assert [w for w, _ in waits] == ["c", "d", "e", "f"] and waits[0][1] == ["a", "b"]
    a.done()
    wait_until(lambda: waiters["d"].got.is_set(), "d")
    assert not any(waiters[w].got.is_set() for w in "fec")  # one slot freed, one waiter served
    b.done()
    wait_until(lambda: waiters["f"].got.is_set(), "f")
    for who in ["d", "f", "e", "c"]:
        waiters[who].done()
    assert slots.granted == ["a", "b", "d", "f", "e", "c"]
    assert slots.peak == 2 and slots.holders() == [] and slots.waiting() == []


def test_never_more_holders_than_slots_under_contention() -> None:
    slots = bootstrap.CpuSlots(3)
    inside = []
    lock = threading.Lock()
    count = [0]

    def work(i: int) -> None:
        with slots.slot(f"w{i}", i % 5):
            with lock:
                count[0] += 1
                inside.append(count[0])
            time.sleep(0.002)
            with lock:
                count[0] -= 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(inside) <= 3 and slots.peak <= 3 and len(slots.granted) == 40


def test_an_interrupted_wait_leaves_the_queue() -> None:
    """on_wait raising (an interrupt while logging) must not leave a ghost waiter that blocks the others."""

    def broken(who: str, holders: list[str]) -> None:
        raise KeyboardInterrupt

    slots = bootstrap.CpuSlots(1, on_wait=broken)
    a = Holder(slots, "a", 0)
    wait_until(a.got.is_set, "a")
    with pytest.raises(KeyboardInterrupt), slots.slot("b", 100):
        pass
    assert slots.waiting() == []
    a.done()
    with slots.slot("c", 0):
        assert slots.holders() == ["c"]


def test_slots_default_to_the_cores_or_the_config(tmp_path: Path) -> None:
    config = engine_config(tmp_path)
    assert config.cpu_slots is None
    assert bootstrap.cpu_slots(config) == (os.cpu_count() or 1)
    assert bootstrap.cpu_slots(dataclasses.replace(config, cpu_slots=3)) == 3


class Recorder(bootstrap.EventSink):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


def test_the_engine_runs_cpu_work_one_slot_at_a_time_biggest_first_and_downloads_take_none(tmp_path: Path) -> None:
    """cpu_slots 1: `first` holds the only slot until the three installs wait for it and the
    download (no slot) has finished; then the installs get it biggest first."""
    order: list[str] = []
    ran_while_held: list[str] = []
    box: dict[str, Any] = {}

    def make(
        name: str, size: int, *, cpu: bool = True, body: Callable[[Any], None] | None = None
    ) -> type[bootstrap.Step]:
        class S(bootstrap.Step):
            def check(self) -> bootstrap.StepState:
                return bootstrap.StepState(name in order, "done" if name in order else "not yet")

            def apply(self) -> None:
                box["cpu"] = self.ctx.cpu
                if not cpu:
                    order.append(name)
                    if self.ctx.cpu is not None and self.ctx.cpu.holders() == ["first"]:
                        ran_while_held.append(name)
                    return
                with bootstrap.cpu_slot(self.ctx.cpu, name, size):
                    if body is not None:
                        body(self)
                    order.append(name)

        S.name = name
        S.__name__ = f"Step_{name}"
        return S

    def hold_until_all_wait(step: Any) -> None:
        wait_until(lambda: len(step.ctx.cpu.waiting()) == 3 and "download" in order, "three waiters and the download")

    first = make("first", 0, body=hold_until_all_wait)
    small, big, mid = make("small", 1), make("big", 300), make("mid", 20)
    download = make("download", 0, cpu=False)
    plan = bootstrap.Plan([first, small, big, mid, download])
    config = dataclasses.replace(engine_config(tmp_path), cpu_slots=1)
    (tmp_path / "bootstrap").mkdir()
    log_file = tmp_path / "run.log"
    log = bootstrap.Log(log_file, echo=False)
    events = Recorder()
    runner = bootstrap.Runner(
        plan,
        bootstrap.Context(config, log),
        state=bootstrap.StateStore(tmp_path / "bootstrap" / "state.json"),
        events=events,
    )
    runner.run()
    cpu = box["cpu"]
    assert cpu.slots == 1 and cpu.peak == 1
    assert cpu.granted == ["first", "big", "mid", "small"]
    assert ran_while_held == ["download"]
    waits = [e for e in events.events if isinstance(e, bootstrap.ProgressEvent) and "CPU slot" in e.phase]
    assert sorted(e.phase for e in waits) == [f"{n}: waiting for a CPU slot" for n in ("big", "mid", "small")]
    text = log_file.read_text()
    assert text.count("waiting for a CPU slot (1 of 1 busy: first)") == 3
    assert text.count("got a CPU slot after waiting") == 3


def test_the_install_step_extracts_inside_a_slot_sized_by_its_archive(tmp_path: Path) -> None:
    """The real install step asks for a slot, with its archive's size as priority, and waits for it."""
    data = tar_bytes([("pkg/bin/project-host", b"#!/bin/sh\n", 0o755)])
    artifact = {"version": "2.0.0", "sha256": sha256(data), "strip_components": 1, "executables": ["bin/project-host"]}
    config = make_config(tmp_path, artifacts={"project_host": artifact})
    waited: list[tuple[str, list[str]]] = []
    slots = bootstrap.CpuSlots(1, on_wait=lambda who, holders: waited.append((who, holders)))
    ctx = dataclasses.replace(context(config), cpu=slots)
    archive = bootstrap.artifact_archive(config, "project_host", config.artifacts.project_host)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(data)
    bootstrap.write_user_file(bootstrap.checksum_path(archive), f"{sha256(data)}  {archive.name}\n", 0o644)
    blocker = Holder(slots, "someone else", 1e12)
    wait_until(blocker.got.is_set, "the blocker")
    step = bootstrap.InstallProjectHostStep(ctx)
    thread = threading.Thread(target=step.apply)
    thread.start()
    wait_until(lambda: slots.waiting() == ["install_project_host"], "the install to wait")
    assert not step.check().satisfied  # nothing extracted while it waits
    blocker.done()
    thread.join(60)
    assert step.check().satisfied
    assert waited == [("install_project_host", ["someone else"])]
    assert slots.granted == ["someone else", "install_project_host"]
