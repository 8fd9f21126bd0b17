"""The link first to apt (issue 15): on a cold host our downloads wait while apt
fetches its lists and packages (apt is the longest chain, and a shared link
would slow it 3-5x), then go while dpkg works; the wait never outlives apt,
whatever apt's outcome, and serial runs have no wait at all."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_engine_support import make_config as engine_config


def test_open_without_a_holder_and_the_holder_never_waits_for_itself() -> None:
    assert bootstrap.LinkFirst(None).turn("download_project") == 0.0
    link = bootstrap.LinkFirst("apt", max_wait_s=5)
    assert link.held
    assert link.turn("apt") == 0.0  # not a wait on itself


def test_a_turn_waits_for_the_release_and_says_so() -> None:
    seen: list[Any] = []
    link = bootstrap.LinkFirst(
        "apt",
        on_wait=lambda who, holder: seen.append(("wait", who, holder)),
        on_granted=lambda who, waited, timed_out: seen.append(("granted", who, timed_out)),
    )
    done = threading.Event()

    def download() -> None:
        link.turn("download_project")
        seen.append(("downloading",))
        done.set()

    thread = threading.Thread(target=download)
    thread.start()
    deadline = time.monotonic() + 30
    while not seen:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not done.wait(0.2)  # still held: nothing downloads
    seen.append(("apt released",))
    link.release()
    thread.join(30)
    assert seen == [
        ("wait", "download_project", "apt"),
        ("apt released",),
        ("granted", "download_project", False),
        ("downloading",),
    ]
    link.release()  # idempotent
    assert not link.held


def test_a_turn_gives_up_after_max_wait_and_says_it_timed_out() -> None:
    timed: list[bool] = []
    link = bootstrap.LinkFirst("apt", max_wait_s=0.05, on_granted=lambda who, w, timed_out: timed.append(timed_out))
    assert link.turn("node") >= 0.05
    assert timed == [True]


class Recorder(bootstrap.EventSink):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


def fake(
    name: str,
    body: Callable[[bootstrap.Step], None],
    deps: tuple[str, ...] = (),
    *,
    uses_link: bool = False,
    first: bool | None = None,
) -> type[bootstrap.Step]:
    """A step; `first`: whether it asks for the link first (default: only the one named apt)."""
    wants_first = name == "apt" if first is None else first
    ran: list[bool] = []

    class S(bootstrap.Step):
        def check(self) -> bootstrap.StepState:
            return bootstrap.StepState(bool(ran), "done" if ran else "not yet")

        def apply(self) -> None:
            body(self)
            ran.append(True)

        @classmethod
        def link_first(cls, ctx: bootstrap.Context) -> bool:
            return wants_first

    S.name = name
    S.deps = deps
    S.uses_link = uses_link
    S.__name__ = f"Step_{name}"
    return S


def run_plan(tmp_path: Path, steps: list[type[bootstrap.Step]], **config: Any) -> tuple[Recorder, str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(engine_config(tmp_path), **config)
    (tmp_path / "bootstrap").mkdir(exist_ok=True)
    log_file = tmp_path / "run.log"
    events = Recorder()
    runner = bootstrap.Runner(
        bootstrap.Plan(steps),
        bootstrap.Context(cfg, bootstrap.Log(log_file, echo=False)),
        state=bootstrap.StateStore(tmp_path / "bootstrap" / "state.json"),
        events=events,
    )
    error: Any = None
    try:
        runner.run()
    except bootstrap.StepFailed as e:
        error = e
    return events, log_file.read_text(), (runner, error)


def test_the_engine_gives_apt_the_link_first_then_the_downloads_go_while_dpkg_works(tmp_path: Path) -> None:
    order: list[str] = []
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            order.append(what)

    def apt(step: bootstrap.Step) -> None:
        # wait until both downloads are queued on the link, then "fetch", release, "dpkg"
        deadline = time.monotonic() + 30
        while sum(1 for o in order if o.startswith("asks:")) < 2:
            assert time.monotonic() < deadline, "the downloads never asked for the link"
            time.sleep(0.005)
        note("apt: fetched")
        assert step.ctx.link is not None
        step.ctx.link.release()
        time.sleep(0.1)
        note("apt: dpkg done")

    def download(step: bootstrap.Step) -> None:
        note(f"asks: {step.name}")
        step.link_turn()
        note(f"downloads: {step.name}")

    steps = [
        fake("apt", apt),
        fake("download_project", download, uses_link=True),
        fake("node", download, uses_link=True),
    ]
    events, text, (runner, error) = run_plan(tmp_path, steps)
    assert error is None
    assert runner.ctx.link.holder == "apt" and not runner.ctx.link.held
    assert order.index("apt: fetched") < min(order.index("downloads: download_project"), order.index("downloads: node"))
    assert order.index("apt: dpkg done") > order.index("apt: fetched")
    assert text.count("waiting for apt's downloads to finish first") == 2
    assert text.count("downloading now (after waiting") == 2
    phases = [e.phase for e in events.events if isinstance(e, bootstrap.ProgressEvent)]
    assert "download_project: waiting for apt's downloads" in phases


@pytest.mark.parametrize("apt_outcome", ["fails", "has nothing to fetch"])
def test_the_link_is_everyones_when_apt_ends_whatever_its_outcome(tmp_path: Path, apt_outcome: str) -> None:
    got: list[float] = []

    def apt(step: bootstrap.Step) -> None:
        time.sleep(0.2)  # the download asks meanwhile
        if apt_outcome == "fails":
            raise bootstrap.BootstrapError("apt-get update exited with 100")

    def download(step: bootstrap.Step) -> None:
        got.append(bootstrap.LinkFirst.turn(step.ctx.link, step.name) if step.ctx.link else -1.0)

    steps = [fake("apt", apt), fake("download_project", download, uses_link=True)]
    _, text, (_, error) = run_plan(tmp_path, steps)
    assert (error is not None) == (apt_outcome == "fails")
    assert len(got) == 1 and got[0] < bootstrap.LINK_MAX_WAIT_S  # released by apt's end, not by the timeout
    assert "gave up waiting" not in text


def test_nobody_first_in_serial_runs_without_apt_or_with_too_few_threads(tmp_path: Path) -> None:
    def noop(step: bootstrap.Step) -> None:
        step.link_turn()

    def dl(name: str) -> type[bootstrap.Step]:
        return fake(name, noop, uses_link=True)

    _, _, (serial, _) = run_plan(tmp_path / "a", [fake("apt", noop), dl("download_project")], parallel=False)
    assert serial.ctx.link.holder is None
    _, _, (no_apt, _) = run_plan(tmp_path / "b", [dl("download_project"), dl("node")])
    assert no_apt.ctx.link.holder is None
    # as many threads as waiters: apt could queue behind them, so nobody goes first
    cfg = dataclasses.replace(engine_config(tmp_path), parallel=True)
    plan = bootstrap.Plan([fake("apt", noop), dl("download_project"), dl("node")])
    ctx = bootstrap.Context(cfg, bootstrap.Log(tmp_path / "c.log", echo=False))
    state = bootstrap.StateStore(tmp_path / "c-state.json")
    two, three = (bootstrap.Runner(plan, ctx, state=state, jobs=n).ctx.link for n in (2, 3))
    assert two is not None and two.holder is None
    assert three is not None and three.holder == "apt"
    # apt present but not asking to go first (a bundle will be extracted): nobody first
    plan2 = bootstrap.Plan([fake("apt", noop, first=False), dl("download_project")])
    link2 = bootstrap.Runner(plan2, ctx, state=state, jobs=16).ctx.link
    assert link2 is not None and link2.holder is None
    # a step that does not say it uses the link never waits on it
    quiet = fake("other", noop)(dataclasses.replace(ctx, link=bootstrap.LinkFirst("apt", max_wait_s=30)))
    started = time.monotonic()
    quiet.link_turn()
    assert time.monotonic() - started < 5


def test_the_apt_step_fetches_first_only_when_it_holds_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bootstrap, "apt_download", lambda pkgs, t, log: calls.append("download-only " + " ".join(pkgs)))
    cfg = engine_config(tmp_path)
    log = bootstrap.Log(tmp_path / "apt.log", echo=False)
    link = bootstrap.LinkFirst("apt")
    step = bootstrap.AptStep(bootstrap.Context(cfg, log, link=link))
    step.fetch_first(["podman", "crun"])
    assert calls == ["download-only podman crun"] and not link.held
    step.fetch_first(["podman"])  # released: nothing more to do first
    other = bootstrap.AptStep(bootstrap.Context(cfg, log, link=bootstrap.LinkFirst(None)))
    other.fetch_first(["podman"])
    assert calls == ["download-only podman crun"]


def test_a_failed_fetch_gives_the_link_up_and_leaves_the_install_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(pkgs: list[str], t: int, log: Any) -> None:
        found = bootstrap.CommandResult(
            ("apt-get",), 100, 0.1, "E: Unable to fetch some archives", "E: Unable to fetch"
        )
        raise bootstrap.CommandError("apt-get install exited with 100", found)

    monkeypatch.setattr(bootstrap, "apt_download", fail)
    link = bootstrap.LinkFirst("apt")
    step = bootstrap.AptStep(
        bootstrap.Context(engine_config(tmp_path), bootstrap.Log(tmp_path / "a.log", echo=False), link=link)
    )
    step.fetch_first(["podman"])
    assert not link.held
    assert "installing as usual" in (tmp_path / "a.log").read_text()


def test_apt_goes_first_only_when_every_bundle_is_mounted_from_an_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an archive to extract, that bundle's chain is the longer one: its download must not wait."""
    cfg = engine_config(tmp_path)
    ctx = bootstrap.Context(cfg, bootstrap.Log(tmp_path / "f.log", echo=False))
    assert all(getattr(cfg.artifacts, a).image is None for a, _ in cfg.artifacts.items())
    assert bootstrap.AptStep.link_first(ctx) is False  # archives only
    image = bootstrap.ImageSpec(url="https://example.org/i.sqfs", sha256="a" * 64, size_bytes=None)
    arts = {a: dataclasses.replace(getattr(cfg.artifacts, a), image=image) for a, _ in cfg.artifacts.items()}
    with_images = dataclasses.replace(cfg, artifacts=dataclasses.replace(cfg.artifacts, **arts))
    ctx_images = bootstrap.Context(with_images, ctx.log)
    monkeypatch.setattr(bootstrap, "images_unsupported", lambda log: None)  # a kernel that mounts them
    assert bootstrap.AptStep.link_first(ctx_images) is True
    monkeypatch.setattr(bootstrap, "images_unsupported", lambda log: "no squashfs in /proc/filesystems")
    assert bootstrap.AptStep.link_first(ctx_images) is False  # the archives are installed instead
    one_archive = dataclasses.replace(
        with_images.artifacts, tools=dataclasses.replace(with_images.artifacts.tools, image=None)
    )
    monkeypatch.setattr(bootstrap, "images_unsupported", lambda log: None)
    assert (
        bootstrap.AptStep.link_first(
            bootstrap.Context(dataclasses.replace(with_images, artifacts=one_archive), ctx.log)
        )
        is False
    )
