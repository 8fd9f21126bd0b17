"""Bounded logs: bootstrap.log rotates (size-bounded, a few generations), and
the event spool prunes what the hub acknowledged, never what it has not."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import bootstrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def generations(path: Path) -> list[Path]:
    """bootstrap.log's files, oldest first."""
    old = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: -int(p.suffix[1:]))
    return [*old, *([path] if path.exists() else [])]


def records(path: Path) -> list[str]:
    out: list[str] = []
    for f in generations(path):
        out += [json.loads(line)["message"] for line in f.read_text(encoding="utf-8").splitlines()]
    return out


def test_the_defaults_are_a_few_generations_of_a_few_mib() -> None:
    assert bootstrap.LOG_MAX_BYTES == 4 * 1024 * 1024
    assert bootstrap.LOG_GENERATIONS == 3
    log = bootstrap.Log(echo=False)
    assert (log.max_bytes, log.generations) == (bootstrap.LOG_MAX_BYTES, bootstrap.LOG_GENERATIONS)


def test_the_log_rotates_at_its_size_and_keeps_its_generations(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "bootstrap.log"
    log = bootstrap.Log(path, echo=False, max_bytes=4000, generations=2)
    for i in range(400):
        log.info(f"record {i:04d} " + "x" * 40)
    log.close()
    files = generations(path)
    assert [f.name for f in files] == ["bootstrap.log.2", "bootstrap.log.1", "bootstrap.log"]
    for f in files:
        assert f.stat().st_size <= 4000
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    kept = records(path)
    assert kept[-1].startswith("record 0399")  # the newest is always there, in order
    assert kept == [f"record {i:04d} " + "x" * 40 for i in range(400 - len(kept), 400)]
    assert not (tmp_path / "logs" / "bootstrap.log.3").exists()


def test_a_log_already_over_its_size_rotates_when_the_next_run_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.log"
    path.write_text(json.dumps({"message": "old"}) + "\n" + "y" * 5000 + "\n")
    log = bootstrap.Log(path, echo=False, max_bytes=4000, generations=3)
    log.info("new run")
    log.close()
    assert [json.loads(line)["message"] for line in path.read_text().splitlines()] == ["new run"]
    assert (tmp_path / "bootstrap.log.1").read_text().startswith('{"message": "old"}')


def test_no_generations_means_the_old_log_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.log"
    log = bootstrap.Log(path, echo=False, max_bytes=300, generations=0)
    for i in range(20):
        log.info(f"r{i}")
    log.close()
    assert generations(path) == [path]
    assert path.stat().st_size <= 300


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=900), min_size=1, max_size=80),
    max_bytes=st.integers(min_value=200, max_value=3000),
    keep=st.integers(min_value=0, max_value=4),
    reopen_every=st.integers(min_value=1, max_value=100),
)
def test_rotation_never_reorders_loses_the_newest_or_outgrows_its_bound(
    tmp_path_factory: object, sizes: list[int], max_bytes: int, keep: int, reopen_every: int
) -> None:
    directory: Path = tmp_path_factory.mktemp("log")  # type: ignore[attr-defined]
    path = directory / "bootstrap.log"
    log = bootstrap.Log(path, echo=False, max_bytes=max_bytes, generations=keep)
    written = []
    for i, n in enumerate(sizes):
        if i and i % reopen_every == 0:  # a new run opens the same log
            log.close()
            log = bootstrap.Log(path, echo=False, max_bytes=max_bytes, generations=keep)
        message = f"{i}:" + "z" * n
        log.info(message)
        written.append(message)
    log.close()
    files = generations(path)
    assert len(files) <= keep + 1
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines()
        # within the bound, or one record that alone is larger than the bound
        assert f.stat().st_size <= max_bytes or len(lines) == 1
    kept = records(path)
    assert kept == written[len(written) - len(kept) :]  # a suffix of what was written, in order
    assert kept and kept[-1] == written[-1]


# -- the event spool ---------------------------------------------------------------


def spool(directory: Path, run_id: str, events: int, acked: int | None) -> Path:
    path = directory / f"{run_id}.jsonl"
    lines = [
        json.dumps({"run_id": run_id, "seq": s, "ts": 1.0, "type": "progress", "phase": "p", "percent": 0})
        for s in range(events)
    ]
    path.write_text("".join(line + "\n" for line in lines))
    if acked is not None:
        bootstrap.acked_path(path).write_text(f"{acked}\n")
    return path


def test_a_new_run_prunes_acknowledged_spools_but_the_newest_and_never_an_unacknowledged_one(tmp_path: Path) -> None:
    events = tmp_path / "events"
    events.mkdir()
    old_acked = spool(events, "20260101T000000Z-aaaa", 5, acked=4)
    older_acked = spool(events, "20250101T000000Z-aaaa", 3, acked=2)
    newest_acked = spool(events, "20260301T000000Z-aaaa", 5, acked=4)
    partly = spool(events, "20260201T000000Z-aaaa", 5, acked=2)
    never = spool(events, "20251201T000000Z-aaaa", 5, acked=None)
    run = bootstrap.EventSpool(events, "20260401T000000Z-bbbb")
    try:
        assert sorted(run.pruned) == sorted([old_acked, older_acked])
        for gone in (old_acked, older_acked):
            assert not gone.exists() and not bootstrap.acked_path(gone).exists()
        for kept in (newest_acked, partly, never, run.path):
            assert kept.exists()
        assert bootstrap.unacked_events(partly)[0]["seq"] == 3
    finally:
        run.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    runs=st.lists(
        st.tuples(st.integers(min_value=0, max_value=6), st.one_of(st.none(), st.integers(min_value=-1, max_value=7))),
        max_size=8,
    ),
    keep=st.integers(min_value=0, max_value=3),
)
def test_pruning_deletes_only_fully_acknowledged_spools_beyond_the_newest_few(
    tmp_path_factory: object, runs: list[tuple[int, int | None]], keep: int
) -> None:
    directory: Path = tmp_path_factory.mktemp("events")  # type: ignore[attr-defined]
    paths = [spool(directory, f"2026{i:04d}T000000Z-run", n, acked) for i, (n, acked) in enumerate(runs)]
    unacked_before = {p: bootstrap.unacked_events(p) for p in paths}
    pruned = set(bootstrap.prune_acknowledged(directory, keep=keep))
    acknowledged = [
        p for p, (n, acked) in zip(paths, runs, strict=True) if acked is not None and acked >= 0 and acked >= n - 1
    ]
    acknowledged_newest_first = sorted(acknowledged, reverse=True)
    assert pruned == set(acknowledged_newest_first[keep:])
    for p in paths:
        if unacked_before[p]:
            assert p.exists(), "an unacknowledged event was pruned"
        assert p.exists() == (p not in pruned)
